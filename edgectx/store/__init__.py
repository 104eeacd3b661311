"""The conversation store in SQLite: `db` (connection, transactions, errors as sentences), `schema` (the tables
and their migrations), `conversations` (ConversationStore: conversations, messages, search), `documents`
(documents read, attached to conversations), `snapshots` (the manifest of snapshot files), `values` (what a
row holds, checked as it is read back) and `export` (Markdown and JSON)."""
