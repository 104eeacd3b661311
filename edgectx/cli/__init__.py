"""The `edgectx` command: `main` (parser and dispatch), `options` (shared flags and what they become),
`console` (warnings and progress bars), and one module per command group."""
