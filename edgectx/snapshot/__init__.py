"""The .ectx snapshot file format (docs/snapshot-format.md): `file` (write atomically, read with checks),
`format` (the header), `sections` (typed, compressed sections) and `token_chain` (hashes over token prefixes)."""
