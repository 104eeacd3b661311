"""The `edgectx` command: argument parsing and dispatch; every user error ends in one sentence.

    edgectx                      # the terminal UI in a terminal; the line chat when piped
    edgectx tui [--model M]      # the terminal UI
    edgectx chat --prompt "hi"   # one-shot answer on stdout
    edgectx models | doctor | --version
    edgectx bench conformance | speed | fidelity | longppl | memory | reopen
    edgectx heads train | import | info
    edgectx history [--search Q] | export ID --format md|json
    edgectx ingest FILE... | chat --doc FILE | chat --resume ID | cache ls|rm|gc
    edgectx plan --model M | --synthetic NAME --context N --gpu-mem-gib G
"""

from __future__ import annotations

import argparse
import json
import sys

from edgectx import __version__
from edgectx.config import CODECS as SNAPSHOT_CODECS
from edgectx.config import WEIGHT_FORMATS
from edgectx.errors import EdgectxError, UsageError
from edgectx.memory_config import POSITIONS, SCORERS, MemoryConfig

DEFAULT_BUDGET = MemoryConfig().budget_tokens


def _contexts(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {text!r}") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError("context lengths must be at least 2 tokens")
    return values


def _budget(text: str) -> int | str:
    if text == "full":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count or 'full', got {text!r}") from None
    if value < 64:
        raise argparse.ArgumentTypeError("the budget must be at least 64 tokens")
    return value


BENCH_SCORERS = SCORERS + ("oracle", "oracle-logprob")  # edgectx.bench.oracle: eviction by the true labels


def _scorers(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in BENCH_SCORERS]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"scorers are {', '.join(BENCH_SCORERS)}; got {text!r}")
    return values


def _memory_args(p: argparse.ArgumentParser, allow_full: bool = True, lists: bool = False) -> None:
    """The memory flags; with `lists`, --budget and --scorer take comma-separated values (one run each)."""
    full = "; 'full' for plain full attention" if allow_full else ""
    several = " (comma-separated: one run each)" if lists else ""
    p.add_argument("--budget", type=_contexts if lists else _budget if allow_full else int,
                   help=f"device KV budget in tokens per layer and KV head (default {DEFAULT_BUDGET}{full}){several}")
    p.add_argument("--positions", choices=POSITIONS, help="how the kept context is numbered (default compact)")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk in tokens; eviction runs after each (default 512)")
    p.add_argument("--scorer", type=_scorers if lists else None, choices=None if lists else SCORERS,
                   help="eviction scores: Locret retaining heads, attention mass, or recency (window) "
                   f"(default auto: heads when the model has them){several}"
                   + ("; oracle / oracle-logprob: the true labels heads learn, read from the future (a ceiling)" if lists else ""))


def memory_config_from(args: argparse.Namespace, config=None) -> MemoryConfig | None:
    """The memory the flags (then the config file) ask for; None means plain full attention."""
    budget = args.budget or (config.budget if config else None) or DEFAULT_BUDGET
    if budget == "full":
        return None
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 64:
        raise UsageError(f"The memory budget must be a token count of at least 64, or 'full' (got {budget!r}).")
    positions = args.positions or (config.positions if config else None) or "compact"
    scorer = getattr(args, "scorer", None) or (config.scorer if config else None) or "auto"
    return MemoryConfig.for_budget(int(budget), positions=positions, chunk_tokens=args.chunk, scorer=scorer)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="a .gguf file, a Hugging Face model directory, or a name `edgectx models` lists (default: the embedded SmolLM2)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 or auto (default: auto)")
    p.add_argument("--threads", type=int, help="CPU threads for the engine (default: PyTorch's choice)")
    p.add_argument("--ctx", type=int, help="context window in tokens (default: the model's trained context)")
    p.add_argument("--weights", choices=WEIGHT_FORMATS,
                   help="weight format: 16-bit, or 4-bit nf4 / 8-bit int8 through bitsandbytes (default auto: nf4 on CUDA "
                   "when bitsandbytes is installed, else fp16)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgectx", description="Chat with very long local documents on one machine.")
    parser.add_argument("--version", action="version", version=f"edgectx {__version__}")
    sub = parser.add_subparsers(dest="command")

    chat = sub.add_parser("chat", help="chat in the terminal, or answer one --prompt and exit")
    _model_args(chat)
    _memory_args(chat)
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--prompt", "-p", help="answer this one message on stdout and exit")
    chat.add_argument("--temperature", type=float, default=0.7, help="0 for greedy (default 0.7)")
    chat.add_argument("--top-k", type=int, default=40)
    chat.add_argument("--top-p", type=float, default=0.9)
    chat.add_argument("--repeat-penalty", type=float, default=1.1)
    chat.add_argument("--seed", type=int, help="fix the sampling seed for reproducible answers")
    chat.add_argument("--max-tokens", type=int, default=512, help="longest answer in tokens (default 512)")
    chat.add_argument("--stop", action="append", default=[], help="stop when the answer contains this text (repeatable)")
    chat.add_argument("--doc", action="append", default=[], metavar="FILE",
                      help="chat about this file: restores its snapshot, or reads it and saves one (repeatable)")
    chat.add_argument("--resume", type=int, metavar="ID", help="continue conversation ID (`edgectx history` lists them)")
    chat.add_argument("--codec", choices=SNAPSHOT_CODECS, help="how new document snapshots are stored (default int4)")
    chat.add_argument("--max-file-mib", type=float, default=64.0, help="largest document to read, in MiB (default 64)")
    chat.add_argument("--no-history", action="store_true", help="do not save this chat's messages")

    tui = sub.add_parser("tui", help="the terminal UI (what `edgectx` opens in a terminal)")
    _model_args(tui)
    _memory_args(tui)
    tui.add_argument("--system", help="system prompt for new conversations")
    tui.add_argument("--codec", choices=SNAPSHOT_CODECS, help="how new document snapshots are stored (default int4)")
    # Sampling as `chat` takes it; unset flags fall back to the config file, then to chat's defaults.
    tui.add_argument("--temperature", type=float, help="0 for greedy (default 0.7)")
    tui.add_argument("--top-k", type=int, help="default 40")
    tui.add_argument("--top-p", type=float, help="default 0.9")
    tui.add_argument("--repeat-penalty", type=float, help="default 1.1")
    tui.add_argument("--seed", type=int, help="fix the sampling seed for reproducible answers")
    tui.add_argument("--max-tokens", type=int, help="longest answer in tokens (default 512)")

    models = sub.add_parser("models", help="list GGUF models found on this machine")
    models.add_argument("--json", action="store_true")

    doctor = sub.add_parser("doctor", help="check torch, CUDA, optional GPU packages, paths and the default model")
    doctor.add_argument("--json", action="store_true")

    from edgectx.heads_cli import add_parser as add_heads_parser

    add_heads_parser(sub, _model_args)

    from edgectx.history_cli import add_parsers as add_history_parsers
    from edgectx.ingest_cli import add_parsers as add_ingest_parsers

    add_history_parsers(sub)
    add_ingest_parsers(sub, _model_args, _memory_args)

    from edgectx.plan import add_parser as add_plan_parser

    add_plan_parser(sub, _memory_args)

    bench = sub.add_parser("bench", help="measure conformance to llama.cpp, speed, long-context fidelity and memory")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    conf = bench_sub.add_parser("conformance", help="teacher-forced top-1 agreement and NLL vs llama.cpp")
    speed = bench_sub.add_parser("speed", help="prefill and decode tokens/s vs llama.cpp, full attention and memory")
    fidelity = bench_sub.add_parser("fidelity", help="the long-context memory vs full attention, teacher-forced")
    longppl = bench_sub.add_parser("longppl", help="NLL by position bucket far past the trained context")
    memory = bench_sub.add_parser("memory", help="device and host KV bytes as the context grows")
    reopen = bench_sub.add_parser("reopen", help="snapshot size, restore vs prefill time, and quality after a restore")
    latency = bench_sub.add_parser("tui-latency", help="TUI key-press latency while a long document is read")
    for p in (conf, speed, fidelity, longppl, memory, reopen, latency):
        _model_args(p)
        p.add_argument("--text", help="a UTF-8 text file (default: Python's standard library sources, or its docs)")
        p.add_argument("--json", action="store_true", help="print JSON on stdout")
    for p in (speed, longppl, memory, reopen, latency):
        _memory_args(p, allow_full=False)
    latency.add_argument("--context", type=int, default=32768, help="tokens of text to read (default 32768)")
    latency.add_argument("--presses", type=int, default=20, help="key presses to time during the read (default 20)")
    _memory_args(fidelity, allow_full=False, lists=True)
    for p in (fidelity, longppl, memory, reopen):
        p.add_argument("--corpus", choices=("stdlib", "docs"), help="built-in text when no --text: sources or docs prose")
    conf.add_argument("--tokens", type=int, default=4096, help="positions to compare (default 4096)")
    speed.add_argument("--context", type=_contexts, default=[512, 4096], help="comma-separated lengths (default 512,4096)")
    speed.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded at each depth (default 64)")
    fidelity.add_argument("--context", type=int, default=8192, help="tokens of text (default 8192)")
    longppl.add_argument("--context", type=int, default=131072, help="tokens of text (default 131072)")
    longppl.add_argument("--full-max", type=int, default=16384, help="score full attention up to here (default 16384; 0 skips it)")
    memory.add_argument("--contexts", type=_contexts, default=[8192, 32768, 131072], help="comma-separated lengths")
    reopen.add_argument("--context", type=int, default=32768, help="tokens of text to prefill and snapshot (default 32768)")
    reopen.add_argument("--codec", choices=SNAPSHOT_CODECS, default="int4", help="snapshot codec (default int4; fp16 is lossless)")
    reopen.add_argument("--next-tokens", type=int, default=512, help="tokens teacher-forced after the restore (default 512)")
    reopen.add_argument("--snapshot", help="keep the snapshot at this path (default: a temporary file)")
    speed.add_argument("--eager", action="store_true", help="decode without compiling the decode step")
    speed.add_argument("--synthetic", metavar="NAME", help="random weights (4-bit on a GPU) with this model's shapes, no download "
                       "(llama-3.1-8b, phi-3-mini-128k, qwen2.5-7b); no llama.cpp reference")
    speed.add_argument("--full", action="store_true", help="with --synthetic: full attention too, where it fits")
    speed.add_argument("--gpu-mem-cap-gib", type=float, help="cap this process's GPU memory (e.g. 24 to act as an RTX 4090)")
    speed.add_argument("--bandwidth-gbs", type=float, help="GPU memory bandwidth for the weight-read floor "
                       "(default: from the GPU's name: H100 SXM 3350, H100 PCIe 2000, RTX 4090 1008)")
    return parser


def _print_models(as_json: bool) -> int:
    from edgectx.config import load_config
    from edgectx.models import discover

    entries = discover(load_config())
    if as_json:
        print(json.dumps([{"name": e.name, "path": str(e.path), "source": e.source, "size_bytes": e.size_bytes} for e in entries], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "source", "size", "path")
    for e in entries:
        table.add_row(e.name, e.source, f"{e.size_bytes / 2**20:,.0f} MiB", str(e.path))
    Console().print(table)
    if not entries:
        print("No models found: pass --model PATH, or add model_paths to the config file.")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch

    from edgectx.config import load_config
    from edgectx.engine import Engine
    from edgectx.models import resolve_model

    threads = args.threads or torch.get_num_threads()
    if args.bench == "tui-latency":
        from edgectx.tui.app import run_latency_bench  # imports textual: only for this bench

        result = run_latency_bench(args)
        print(json.dumps(result, indent=2) if args.json else
              f"{result['presses']} key presses during a {result['context_tokens']:,}-token read ({result['ingest_s']} s): "
              f"median {result.get('median_ms')} ms, max {result.get('max_ms')} ms")
        return 0
    config = load_config()
    weights = args.weights or config.weights or "auto"
    path = None if getattr(args, "synthetic", None) else resolve_model(args.model, config)
    if args.bench in ("speed", "conformance") and path is not None and path.is_dir():
        raise UsageError(f"bench {args.bench} compares against llama.cpp, which reads only GGUF: {path.name} is a "
                         "Hugging Face directory, so pass a .gguf file of the model (or --synthetic NAME).")
    memory = memory_config_from(args) if args.bench not in ("conformance", "fidelity") else None
    if args.bench == "speed" and args.full and not args.synthetic:
        raise UsageError("--full goes with --synthetic: on a GGUF, bench speed runs full attention wherever the model's context allows.")
    if args.bench == "speed" and args.synthetic:
        from edgectx.bench.synthetic_speed import run_synthetic_speed

        result = run_synthetic_speed(args.synthetic, args.context, memory, decode_tokens=args.decode_tokens, device=args.device,
                                     n_threads=args.threads, gpu_mem_cap_gib=args.gpu_mem_cap_gib,
                                     bandwidth_gbs=args.bandwidth_gbs, full=args.full, weights=weights)
    elif args.bench == "speed":
        from edgectx.bench.speed import run_speed

        result = run_speed(path, args.context, memory, decode_tokens=args.decode_tokens,
                           n_threads=threads, device=args.device, text_file=args.text, compile_decode=not args.eager,
                           weights=weights, gpu_mem_cap_gib=args.gpu_mem_cap_gib)
    else:
        engine = Engine.load(path, device=args.device, n_ctx=args.ctx or args.tokens + 1 if args.bench == "conformance" else None,
                             n_threads=threads, weights=weights)
        result = _run_quality_bench(args, engine, memory, threads)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        from edgectx.bench.report import print_report

        print_report(args.bench, result)
    return 0


def _run_quality_bench(args: argparse.Namespace, engine, memory: MemoryConfig | None, threads: int) -> dict:
    if args.bench == "conformance":
        from edgectx.bench.conformance import run_conformance

        return run_conformance(engine, n_tokens=args.tokens, text_file=args.text, n_threads=threads)
    if args.bench == "fidelity":
        from edgectx.bench.fidelity import run_fidelity

        runs = [(budget, scorer) for budget in args.budget or [DEFAULT_BUDGET] for scorer in args.scorer or ["auto"]]
        configs = [MemoryConfig.for_budget(budget, positions=args.positions or "compact", chunk_tokens=args.chunk,
                                           scorer=scorer if scorer in SCORERS else "auto") for budget, scorer in runs]
        oracles = [None if scorer in SCORERS else scorer for _, scorer in runs]
        return run_fidelity(engine, args.context, configs, text_file=args.text, corpus=args.corpus or "stdlib", oracles=oracles)
    if args.bench == "longppl":
        from edgectx.bench.longppl import run_longppl

        return run_longppl(engine, args.context, memory, full_max=args.full_max, text_file=args.text,
                           corpus=args.corpus or "docs", quiet=args.json)
    if args.bench == "reopen":
        from edgectx.bench.reopen import run_reopen

        if args.context < 1 or args.next_tokens < 2:
            raise UsageError("--context must be at least 1 token and --next-tokens at least 2.")
        return run_reopen(engine, args.context, memory, codec=args.codec, next_tokens=args.next_tokens, text_file=args.text,
                          corpus=args.corpus or "docs", snapshot_path=args.snapshot)
    from edgectx.bench.memory import run_memory

    return run_memory(engine, args.contexts, memory, text_file=args.text, corpus=args.corpus or "docs", quiet=args.json)


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "models":
        return _print_models(args.json)
    if args.command == "doctor":
        from edgectx.doctor import run_doctor

        return run_doctor(args.json)
    if args.command == "bench":
        return _bench(args)
    if args.command == "plan":
        from edgectx.plan import run_plan

        return run_plan(args)
    if args.command == "heads":
        from edgectx.heads_cli import run_heads

        return run_heads(args)
    if args.command in ("history", "export"):
        from edgectx.history_cli import run_history_command

        return run_history_command(args)
    if args.command == "cache":
        from edgectx.ingest_cli import run_cache

        return run_cache(args)
    from edgectx.config import load_config

    if args.command == "ingest":
        from edgectx.ingest_cli import run_ingest

        return run_ingest(args, load_config())
    if args.command is None and sys.stdin.isatty() and sys.stdout.isatty():
        args = build_parser().parse_args(["tui"])  # bare `edgectx` in a terminal
    if args.command == "tui":
        from edgectx.tui.app import run_tui  # imports textual: only here, so other commands start fast

        return run_tui(args, load_config())
    from edgectx.repl import run_chat

    if args.command is None:  # bare `edgectx` in a pipe or CI: the line chat with defaults
        args = build_parser().parse_args(["chat"])
    return run_chat(args, load_config())


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(argv)
    except EdgectxError as e:
        print(f"edgectx: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print("\nedgectx: interrupted.", file=sys.stderr)
        code = 130
    except MemoryError:
        print("edgectx: out of memory: try a smaller model or a shorter context (--ctx).", file=sys.stderr)
        code = 1
    sys.exit(code)
