"""`edgectx bench ...`: conformance to llama.cpp, speed, long-context fidelity, recall, memory, reopening, TUI latency.

Each bench lives in edgectx.bench; this module parses its flags, loads the engine, runs it and prints a
report (or JSON with --json).

    edgectx bench conformance --tokens 4096 --json
    edgectx bench fidelity --context 8192 --budget 2048,1024 --scorer attention,heads
    edgectx bench speed --synthetic-gguf llama-8b --quant q4_k_m --busy 1 --json
    edgectx bench recall --context 4096,16384 --depths 0.05,0.5,0.95 --trials 3 --tasks single,multiquestion
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgectx.bench.needles import TASKS
from edgectx.bench.synthetic_gguf import QUANTS, SHAPES
from edgectx.cli.options import (DEFAULT_BUDGET, MAX_SEED, MAX_TOKENS, add_memory_args, add_model_args, float_range,
                                 int_range, chunk_from, memory_config_from, token_counts)
from edgectx.errors import UsageError
from edgectx.memory.config import SCORERS, MemoryConfig
from edgectx.quant.formats import SNAPSHOT_CODECS


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="measure conformance to llama.cpp, speed, long-context fidelity and memory")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    conf = bench_sub.add_parser("conformance", help="teacher-forced top-1 agreement and NLL vs llama.cpp")
    speed = bench_sub.add_parser("speed", help="prefill and decode tokens/s vs llama.cpp, full attention and memory")
    fidelity = bench_sub.add_parser("fidelity", help="the long-context memory vs full attention, teacher-forced")
    longppl = bench_sub.add_parser("longppl", help="NLL by position bucket far past the trained context")
    memory = bench_sub.add_parser("memory", help="device and host KV bytes as the context grows")
    reopen = bench_sub.add_parser("reopen", help="snapshot size, restore vs prefill time, and quality after a restore")
    latency = bench_sub.add_parser("tui-latency", help="TUI key-press latency while a long document is read")
    recall = bench_sub.add_parser("recall", help="needle tasks: does the memory bring back the passage a question needs")
    _add_recall_args(recall)
    serve = bench_sub.add_parser("serve", help="time to first token over HTTP, turns 1 and 2 over a long document: "
                                 "edgectx serve vs llama.cpp's server")
    add_model_args(serve)
    add_memory_args(serve, allow_full=False)
    serve.add_argument("--json", action="store_true", help="print JSON on stdout")
    serve.add_argument("--context", type=int_range(64, MAX_TOKENS), default=16384, help="the document's tokens (default 16384)")
    serve.add_argument("--max-tokens", type=int_range(1, 4096), default=32, help="each answer's tokens (default 32)")
    for p in (conf, speed, fidelity, longppl, memory, reopen, latency):
        add_model_args(p)
        p.add_argument("--text", help="a UTF-8 text file (default: Python's standard library sources, or its docs)")
        p.add_argument("--json", action="store_true", help="print JSON on stdout")
    for p in (speed, longppl, memory, reopen, latency):
        add_memory_args(p, allow_full=False)
    latency.add_argument("--context", type=int_range(1, MAX_TOKENS), default=32768, help="tokens of text to read (default 32768)")
    latency.add_argument("--presses", type=int_range(1, 10_000), default=20, help="key presses to time during the read (default 20)")
    add_memory_args(fidelity, allow_full=False, lists=True)
    for p in (conf, fidelity, longppl, memory, reopen):
        p.add_argument("--corpus", choices=("stdlib", "docs"), help="built-in text when no --text: sources or docs prose")
    conf.add_argument("--tokens", type=int_range(2, MAX_TOKENS), default=4096, help="positions to compare (default 4096)")
    conf.add_argument("--reference", choices=("f32", "none"), default="f32",
                      help="also score both engines against the weights requantized to F32 by llama.cpp (made once and "
                      "cached; default f32), or not (none)")
    conf.add_argument("--self-check", action=argparse.BooleanOptionalAction,
                      help="also run llama.cpp again with n_batch 64 and another thread count: its agreement with itself "
                      "(default: with the reference)")
    speed.add_argument("--context", type=token_counts, default=[512, 4096], help="comma-separated lengths (default 512,4096)")
    speed.add_argument("--decode-tokens", type=int_range(1, MAX_TOKENS), default=64, help="tokens decoded at each depth (default 64)")
    fidelity.add_argument("--context", type=int_range(2, MAX_TOKENS), default=8192, help="tokens of text (default 8192)")
    fidelity.add_argument("--decode-tail", type=int_range(0, MAX_TOKENS), default=0,
                          help="feed the last N tokens one at a time, as generation does (decode-time retrieval and "
                          "eviction), and score them apart (default 0)")
    longppl.add_argument("--context", type=int_range(2, MAX_TOKENS), default=131072, help="tokens of text (default 131072)")
    longppl.add_argument("--full-max", type=int_range(0, MAX_TOKENS), default=16384, help="score full attention up to here (default 16384; 0 skips it)")
    memory.add_argument("--contexts", type=token_counts, default=[8192, 32768, 131072], help="comma-separated lengths")
    reopen.add_argument("--context", type=int_range(1, MAX_TOKENS), default=32768, help="tokens of text to prefill and snapshot (default 32768)")
    reopen.add_argument("--codec", choices=SNAPSHOT_CODECS, default="int4", help="snapshot codec (default int4; fp16 is lossless)")
    reopen.add_argument("--next-tokens", type=int_range(2, MAX_TOKENS), default=512, help="tokens teacher-forced after the restore (default 512)")
    reopen.add_argument("--snapshot", help="keep the snapshot at this path (default: a temporary file)")
    speed.add_argument("--compile", action="store_true",
                       help="decode through the compiled step (as `chat --compile` does); default: eager, as chat decodes")
    speed.add_argument("--synthetic", metavar="NAME", help="random weights (4-bit on a GPU) with this model's shapes, no download "
                       "(llama-3.1-8b, phi-3-mini-128k, qwen2.5-7b); no llama.cpp reference")
    speed.add_argument("--synthetic-gguf", metavar="NAME", choices=tuple(SHAPES),
                       help=f"write (once, cached) a random-weight GGUF of this model's shapes and compare on it, no download "
                       f"({', '.join(SHAPES)}; tiny is for tests)")
    speed.add_argument("--quant", choices=tuple(QUANTS), help="with --synthetic-gguf: llama.cpp's quantization (default q4_k_m)")
    speed.add_argument("--busy", type=int_range(0, 256), default=0,
                       help="CPU-bound processes running beside each engine while it is measured (default 0)")
    speed.add_argument("--full", action="store_true", help="with --synthetic: full attention too, where it fits")
    speed.add_argument("--gpu-mem-cap-gib", type=float_range(0, above=True), help="cap this process's GPU memory (e.g. 24 to act as an RTX 4090)")
    speed.add_argument("--bandwidth-gbs", type=float_range(0, above=True), help="GPU memory bandwidth for the weight-read floor "
                       "(default: from the GPU's name: H100 SXM 3350, H100 PCIe 2000, RTX 4090 1008)")


def _depths(text: str) -> list[float]:
    """'0.05,0.5' -> [0.05, 0.5] (an argparse type): fractions of the document from 0 to 1."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions from 0 to 1, got {text!r}") from None
    if not values or not all(0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"depths are fractions of the document from 0 to 1, got {text!r}")
    return values


def _tasks(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in TASKS for v in values):
        raise argparse.ArgumentTypeError(f"tasks are {', '.join(TASKS)}; got {text!r}")
    return list(dict.fromkeys(values))


def _add_recall_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_memory_args(p, allow_full=False)
    p.add_argument("--text", action="append", metavar="FILE",
                   help="a UTF-8 text to hide the needles in; repeat for several, read one after another "
                   "(default: Python's documentation prose)")
    p.add_argument("--corpus", choices=("stdlib", "docs"), help="built-in text when no --text: sources or docs prose (default docs)")
    p.add_argument("--context", type=token_counts, default=[4096, 16384],
                   help="comma-separated prompt lengths in tokens (default 4096,16384)")
    p.add_argument("--depths", type=_depths, default=[0.05, 0.5, 0.95],
                   help="comma-separated needle depths, fractions of the document (default 0.05,0.5,0.95)")
    p.add_argument("--trials", type=int_range(1, 1000), default=2, help="samples per cell (default 2)")
    p.add_argument("--tasks", type=_tasks, default=["single"], help=f"comma-separated: {', '.join(TASKS)} (default single)")
    p.add_argument("--questions", type=int_range(3, 5), default=3, help="questions in a row for multiquestion (default 3)")
    p.add_argument("--answer-tokens", type=int_range(1, 512), default=24, help="greedy tokens per answer (default 24)")
    p.add_argument("--seed", type=int_range(0, MAX_SEED), default=0, help="needles, keys and values (default 0)")
    p.add_argument("--full", action=argparse.BooleanOptionalAction, default=True,
                   help="also answer with full attention where the conversation fits the trained context (default on)")
    p.add_argument("--resume", type=Path, metavar="FILE",
                   help="keep each finished sample in FILE (JSON lines) and take those already there: a long grid "
                   "can stop and go on later with the same command")
    p.add_argument("--json", action="store_true", help="print JSON on stdout")


def run(args: argparse.Namespace) -> int:
    import torch

    from edgectx.config import load_config
    from edgectx.engine import Engine
    from edgectx.model.discover import resolve_model

    threads = args.threads or torch.get_num_threads()
    if args.bench == "tui-latency":
        from edgectx.cli.tui import run_latency_bench  # imports textual: only for this bench

        result = run_latency_bench(args)
        print(json.dumps(result, indent=2) if args.json else
              f"{result['presses']} key presses during a {result['context_tokens']:,}-token read ({result['ingest_s']} s): "
              f"median {result.get('median_ms')} ms, max {result.get('max_ms')} ms")
        return 0
    if args.bench == "serve":
        return _run_serve_bench(args, threads)
    if args.bench == "speed":
        _check_speed_flags(args)
    config = load_config()
    weights = args.weights or config.weights or "auto"
    if getattr(args, "synthetic_gguf", None):
        path = _synthetic_gguf(args.synthetic_gguf, args.quant or "q4_k_m")
    else:
        path = None if getattr(args, "synthetic", None) else resolve_model(args.model, config)
    if args.bench in ("speed", "conformance") and path is not None and path.is_dir():
        raise UsageError(f"bench {args.bench} compares against llama.cpp, which reads only GGUF: {path.name} is a "
                         "Hugging Face directory, so pass a .gguf file of the model (or --synthetic NAME).")
    if args.bench == "recall" and args.text and args.corpus:
        raise UsageError("--text and --corpus both name the text to hide the needles in: pick one.")
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
                           n_threads=threads, device=args.device, text_file=args.text, compile_decode=args.compile,
                           weights=weights, gpu_mem_cap_gib=args.gpu_mem_cap_gib, busy=args.busy)
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


def _check_speed_flags(args: argparse.Namespace) -> None:
    if args.synthetic_gguf and args.synthetic:
        raise UsageError("--synthetic-gguf and --synthetic are different benches, so pick one: --synthetic-gguf compares "
                         "with llama.cpp on a random-weight GGUF, --synthetic measures edgectx alone on a GPU.")
    if args.synthetic_gguf and args.model:
        raise UsageError("--synthetic-gguf writes its own model, so drop --model (or drop --synthetic-gguf to measure that model).")
    if args.quant and not args.synthetic_gguf:
        raise UsageError("--quant goes with --synthetic-gguf: a --model GGUF keeps the quantization it was written with.")
    if args.busy and args.synthetic:
        raise UsageError("--busy goes with a GGUF (--model or --synthetic-gguf): --synthetic measures the GPU alone.")


def _synthetic_gguf(name: str, quant: str) -> Path:
    """The cached random-weight GGUF, written first (minutes for the 8B) when it is missing."""
    from rich.console import Console

    from edgectx.bench.synthetic_gguf import cached_path, synthetic_gguf
    from edgectx.cli.console import note

    target = cached_path(name, quant)
    if not target.exists():
        note(Console(stderr=True), f"Writing {target} once (random weights, then llama.cpp's quantizer; minutes for llama-8b) ...")
    return synthetic_gguf(name, quant)


def _run_serve_bench(args: argparse.Namespace, threads: int) -> int:
    from edgectx.bench.serve import run_serve_bench
    from edgectx.config import load_config
    from edgectx.model.discover import resolve_model

    path = resolve_model(args.model, load_config())
    if path.is_dir():
        raise UsageError(f"bench serve compares against llama.cpp, which reads only GGUF: pass a .gguf file, not {path.name}.")
    flags = {"--budget": args.budget, "--positions": args.positions, "--chunk": args.chunk, "--scorer": args.scorer,
             "--weights": args.weights, "--device": args.device}
    serve_args = tuple(str(v) for flag, value in flags.items() if value is not None for v in (flag, value))
    result = run_serve_bench(path, document_tokens=args.context, threads=threads, max_tokens=args.max_tokens,
                             serve_args=serve_args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for turn in ("turn1", "turn2"):
        e, l = result["edgectx"][turn]["ttft_s"], result["llama_cpp"][turn]["ttft_s"]
        print(f"{turn}: time to first token edgectx {e:.2f} s, llama.cpp {l:.2f} s, ratio {result['ttft_ratio'][turn]:.2f}")
    return 0


def _run_quality_bench(args: argparse.Namespace, engine, memory: MemoryConfig | None, threads: int) -> dict:
    if args.bench == "conformance":
        from edgectx.bench.conformance import run_conformance

        return run_conformance(engine, n_tokens=args.tokens, text_file=args.text, n_threads=threads,
                               corpus=args.corpus or "stdlib", reference=args.reference, self_check=args.self_check)
    if args.bench == "fidelity":
        from edgectx.bench.fidelity import run_fidelity

        runs = [(budget, scorer) for budget in args.budget or [DEFAULT_BUDGET] for scorer in args.scorer or ["auto"]]
        configs = [MemoryConfig.for_budget(budget, positions=args.positions or "compact", chunk_tokens=chunk_from(args),
                                           scorer=scorer if scorer in SCORERS else "auto") for budget, scorer in runs]
        oracles = [None if scorer in SCORERS else scorer for _, scorer in runs]
        if args.decode_tail >= args.context:
            raise UsageError(f"--decode-tail ({args.decode_tail}) must be below --context ({args.context}).")
        return run_fidelity(engine, args.context, configs, text_file=args.text, corpus=args.corpus or "stdlib", oracles=oracles,
                            decode_tail=args.decode_tail)
    if args.bench == "longppl":
        from edgectx.bench.longppl import run_longppl

        return run_longppl(engine, args.context, memory, full_max=args.full_max, text_file=args.text,
                           corpus=args.corpus or "docs", quiet=args.json)
    if args.bench == "recall":
        from edgectx.bench.recall import RecallGrid, run_recall

        grid = RecallGrid(args.context, args.depths, trials=args.trials, tasks=args.tasks, seed=args.seed,
                          answer_tokens=args.answer_tokens, questions=args.questions, full=args.full)
        return run_recall(engine, grid, memory, texts=args.text, corpus=args.corpus or "docs", resume=args.resume)
    if args.bench == "reopen":
        from edgectx.bench.reopen import run_reopen

        return run_reopen(engine, args.context, memory, codec=args.codec, next_tokens=args.next_tokens, text_file=args.text,
                          corpus=args.corpus or "docs", snapshot_path=args.snapshot)
    from edgectx.bench.memory import run_memory

    return run_memory(engine, args.contexts, memory, text_file=args.text, corpus=args.corpus or "docs", quiet=args.json)
