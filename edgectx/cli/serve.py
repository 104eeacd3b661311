"""`edgectx serve`: the engine and its long-context memory behind the OpenAI chat-completions API.

Any OpenAI client (Open WebUI, `llm`, Continue, the `openai` package, another edgectx with --engine) gets the
memory underneath: prefix reuse across turns, ingested documents restored from their snapshots, prompts past the
trained window read in chunks. It binds 127.0.0.1 unless told otherwise; any other address needs an API key.

    edgectx serve --port 8000
    edgectx serve --host 0.0.0.0 --api-key "$(openssl rand -hex 16)"   # or EDGECTX_API_KEY
"""

from __future__ import annotations

import argparse
import ipaddress
import os

from edgectx.cli.options import MAX_TOKENS, add_memory_args, add_model_args, file_mib, float_range, int_range, load_engine
from edgectx.config import Config
from edgectx.errors import UsageError

KEY_ENV = "EDGECTX_API_KEY"


def add_parser(sub) -> None:
    serve = sub.add_parser("serve", help="serve the model and its long-context memory over the OpenAI chat API")
    add_model_args(serve)
    add_memory_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int_range(1, 65535), default=8000, help="port (default 8000)")
    serve.add_argument("--api-key", help=f"clients must send it as a bearer token; required off loopback (or {KEY_ENV})")
    serve.add_argument("--max-tokens", type=int_range(1, MAX_TOKENS), default=4096,
                       help="the longest answer a request may ask for (default 4096; also the default answer limit)")
    serve.add_argument("--max-body-mib", type=file_mib, default=32.0, help="largest request body in MiB (default 32)")
    serve.add_argument("--conversations", type=int_range(1, 1024), default=4,
                       help="conversations whose memories stay in RAM (default 4); older ones go to disk")
    serve.add_argument("--ram-gib", type=float_range(0, above=True), default=4.0, help="RAM for the memories of waiting conversations (default 4)")
    serve.add_argument("--model-id", help="the model's name in the API (default: the model file's name)")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key_for(args: argparse.Namespace) -> str | None:
    """The key clients must send: --api-key, else $EDGECTX_API_KEY; refused when missing off loopback."""
    key = args.api_key or os.environ.get(KEY_ENV) or None
    if key is None and not _loopback(args.host):
        raise UsageError(f"Binding {args.host} exposes the model beyond this machine: set an API key with --api-key "
                         f"or {KEY_ENV}.")
    return key


def _serve(app, host: str, port: int) -> None:
    """uvicorn, whose Ctrl-C (or SIGTERM) also stops the answer being computed: uvicorn waits for open requests
    before it stops, and one may be a prefill of minutes."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.runner.stop()
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run()


def run(args: argparse.Namespace, config: Config) -> int:
    import tempfile
    from pathlib import Path

    from rich.console import Console

    from edgectx.config import cache_dir
    from edgectx.server.app import ServeSettings, create_app
    from edgectx.server.request import Limits
    from edgectx.store.conversations import ConversationStore

    key = api_key_for(args)  # before the model loads: a refused start costs nothing
    status = Console(stderr=True)
    engine = load_engine(args, config, status)
    cache_dir().mkdir(parents=True, exist_ok=True)
    spill = Path(tempfile.mkdtemp(prefix="serve-", dir=cache_dir()))
    settings = ServeSettings(model_id=args.model_id or engine.path.stem, api_key=key,
                             limits=Limits(max_tokens=args.max_tokens, max_body_bytes=int(args.max_body_mib * 2**20)),
                             spill_dir=spill, max_in_ram=args.conversations, ram_bytes=int(args.ram_gib * 2**30))
    with ConversationStore() as store:  # ingested documents' snapshots
        app = create_app(engine, settings, store=store)
        status.print(f"[dim]Serving {settings.model_id} on http://{args.host}:{args.port}/v1"
                     f"{' (API key required)' if key else ''}; Ctrl-C stops.[/dim]", highlight=False)
        _serve(app, args.host, args.port)
    return 0
