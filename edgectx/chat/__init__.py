"""A conversation over one engine, shared by the CLI chat and the TUI: `conversation` (send, redo, resume,
attach), `session` (turns and prefix reuse), `opening` (documents at its start and their snapshots),
`recorder` (what reaches the conversation store), `citations`, and reading documents (`documents`, `pdf`,
`token_spans`)."""
