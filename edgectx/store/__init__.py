"""The conversation store in SQLite: `db` (connection, migrations, errors as sentences), `conversations`
(ConversationStore: conversations, messages, search), `documents` (documents read, attached to conversations),
`snapshots` (the manifest of snapshot files) and `export` (Markdown and JSON)."""
