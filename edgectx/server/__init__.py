"""`edgectx serve`: the engine behind the OpenAI chat-completions API (app, request, pool, runner)."""
