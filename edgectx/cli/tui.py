"""`edgectx tui` (and bare `edgectx` in a terminal): the terminal UI over the embedded or a chosen model.

The app (edgectx.tui) is imported only when this command runs, so every other command starts without Textual.
The model loads in the background while the app is already up.

    edgectx tui --model ~/models/llama-3.2-3b-instruct.Q4_K_M.gguf --temperature 0.2
    edgectx tui --engine http://gpu-server:8000/v1   # a remote engine (OpenAI chat API) instead of a local model
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgectx.cli.options import (add_decode_args, add_engine_args, add_memory_args, add_model_args, add_sampling_args, engine_options,
                                 engine_url_from, max_tokens_from, memory_config_from, sampling_from)
from edgectx.config import Config
from edgectx.quant.formats import SNAPSHOT_CODECS


def add_parser(sub) -> None:
    tui = sub.add_parser("tui", help="the terminal UI (what `edgectx` opens in a terminal)")
    add_model_args(tui)
    add_engine_args(tui)
    add_decode_args(tui)
    add_memory_args(tui)
    tui.add_argument("--system", help="system prompt for new conversations")
    tui.add_argument("--codec", choices=SNAPSHOT_CODECS, help="how new document snapshots are stored (default int4)")
    add_sampling_args(tui)


def run(args: argparse.Namespace, config: Config) -> int:
    """Load the model in the background and run the app until it quits."""
    from edgectx.chat.conversation import Settings
    from edgectx.engine import Engine
    from edgectx.model.discover import discover, resolve_model
    from edgectx.store.conversations import ConversationStore
    from edgectx.tui.app import EdgectxApp  # imports textual: only here, so other commands start fast
    from edgectx.tui.bridge import Bridge

    settings = Settings(system=args.system or config.system, codec=args.codec or config.snapshot_codec or "int4",
                        sampling=sampling_from(args, config), budget=args.budget or config.budget,
                        max_tokens=max_tokens_from(args, config),
                        thinking=False if args.no_thinking else config.thinking)

    def load_model(path, progress):
        args.budget = settings.budget  # the settings screen may have changed it
        engine = Engine.load(path, progress=progress, **engine_options(args, config))
        if getattr(args, "compile", False):
            engine.compile_step()  # in the background, while the user types; decoding is eager until it is ready
        return engine

    app = None
    url = engine_url_from(args, config)
    with ConversationStore() as store:
        if url:  # a remote engine: connected in the background as a model would load; no local models to switch to
            from edgectx.chat.remote import RemoteEngine, api_key_from_env

            bridge = Bridge(lambda progress: RemoteEngine.connect(url, api_key_from_env(), model=args.engine_model),
                            store, settings)
        else:
            bridge = Bridge(lambda progress: load_model(resolve_model(args.model, config), progress), store, settings,
                            load_model=load_model, list_models=lambda: discover(app.config if app else config))
        app = EdgectxApp(bridge, config=config)
        app.run()
    return 0


def run_latency_bench(args: argparse.Namespace) -> dict:
    """`edgectx bench tui-latency` (edgectx.tui.latency): key-press latency in the TUI during a long read."""
    from edgectx.bench.corpus import stdlib_text
    from edgectx.config import load_config
    from edgectx.engine import Engine
    from edgectx.model.discover import resolve_model
    from edgectx.tui.latency import run_tui_latency

    config = load_config()
    path = resolve_model(args.model, config)
    load = lambda: Engine.load(path, device=args.device, n_threads=args.threads,  # noqa: E731
                               memory_config=memory_config_from(args, config))
    source = Path(args.text).read_text(encoding="utf-8") if args.text else stdlib_text(min_chars=args.context * 6)
    return run_tui_latency(load, source, args.context, presses=args.presses)
