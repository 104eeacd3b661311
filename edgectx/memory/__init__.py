"""The long-context memory (Locret eviction + InfLLM retrieval): `context` (ContextMemory, one LayerMemory per
layer), `config`, `tiers` (sinks, window, retained), `block_store` (every token on the host), `retrieval`,
`scoring` and `heads` (eviction scores), `device` (block-cache sizing), `plan` (the memory arithmetic before
a load), `state` (a memory to and from a snapshot)."""
