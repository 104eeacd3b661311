"""The model, knowing nothing of the memory: `spec` (shapes), `transformer`, `rope`, `kv`, `decode`,
`sampling`, `stops`, loaders (`gguf`, `hf`, `assembly`, `source`, `fingerprint`, `synthetic`), `discover`
(models on disk), tokenizers (`tokenizer`, `hf_tokenizer`, `hf_tokenizer_config`) and `chat_template`."""
