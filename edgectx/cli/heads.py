"""`edgectx heads train | import | info`: make, convert and inspect retaining heads.

    edgectx heads train --text notes.md src/*.py          # heads for the embedded model, used by default after
    edgectx heads import locret_llama31.pt --model llama-3.1-8b-instruct.Q4_K_M.gguf
    edgectx heads info --json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgectx.chat.documents import DEFAULT_MAX_BYTES, read_document
from edgectx.cli.options import MAX_TOKENS, add_model_args, file_mib, float_range, int_range
from edgectx.errors import UsageError


def add_parser(sub) -> None:
    heads = sub.add_parser("heads", help="train, import or inspect Locret retaining heads (trained eviction scores)")
    heads_sub = heads.add_subparsers(dest="heads", required=True)
    train = heads_sub.add_parser("train", help="train heads for a model on your own long text (backbone frozen)")
    imp = heads_sub.add_parser("import", help="convert heads published with Locret (a .pt/.bin/.safetensors state dict)")
    info = heads_sub.add_parser("info", help="which heads a model uses, and how they were trained")
    for p in (train, imp, info):
        add_model_args(p)
    train.add_argument("--text", nargs="+", required=True, metavar="FILE", help="text, Markdown, source code or PDF files to learn from")
    train.add_argument("--max-file-mib", type=file_mib, default=DEFAULT_MAX_BYTES / 2**20,
                       help=f"largest file to read, in MiB (default {DEFAULT_MAX_BYTES // 2**20})")
    train.add_argument("--out", help="where to write the heads (default: the data dir, where edgectx finds them)")
    train.add_argument("--hidden", type=int_range(1, 65536), default=128, help="MLP width (default 128)")
    train.add_argument("--tokens", type=int_range(0, MAX_TOKENS), default=0, help="tokens of text to read (default 65536, less for big models)")
    train.add_argument("--steps", type=int_range(1, 10**8), default=1200, help="optimizer steps (default 1200)")
    train.add_argument("--seq-len", type=int_range(1, MAX_TOKENS), help="full-attention sequence length for labels (default 4096, or the trained context if shorter)")
    train.add_argument("--offset", type=int_range(0, MAX_TOKENS), default=512, help="first later query a label counts (default 512; 0 = Locret's)")
    train.add_argument("--span", type=int_range(1, MAX_TOKENS), default=1024, help="later queries a label counts (default 1024)")
    # The choices are heads_train.LABELS, not imported here: that module pulls in torch.
    train.add_argument("--label", choices=("logit", "logprob"), default="logit",
                       help="what a label measures: the max attention logit later queries give a token (logit, Locret's), "
                            "or that logit minus each query's log-normalizer, i.e. its log attention probability (logprob)")
    train.add_argument("--top-weight", type=float_range(0), default=1.0,
                       help="extra weight on the errors of tokens more important than average (default 1; 0 = Locret's plain SmoothL1)")
    train.add_argument("--cache", metavar="DIR", help="keep each sequence's features and labels in DIR (about 150 MB per "
                       "4096 tokens for the embedded model): a rerun on the same text and label settings reads nothing again")
    train.add_argument("--json", action="store_true", help="print the training report as JSON")
    imp.add_argument("file", help="Locret's heads: a state dict with layers.N.self_attn.fc1/fc2.weight")
    imp.add_argument("--out", help="where to write the converted heads (default: the data dir)")
    info.add_argument("--json", action="store_true")


def spread_sequences(ids: list[int], n_tokens: int, seq_len: int) -> list[int]:
    """At most `n_tokens` ids as whole sequences spread evenly over the text, in order (variety over a long text)."""
    n_seq = min(n_tokens, len(ids)) // seq_len
    if n_seq * seq_len >= len(ids) or n_seq < 2:
        return ids[: n_seq * seq_len]
    step = (len(ids) - seq_len) / (n_seq - 1)
    return [t for i in range(n_seq) for t in ids[round(i * step) : round(i * step) + seq_len]]


def _train(args: argparse.Namespace, path: Path) -> int:
    import torch

    from edgectx.memory.heads import save_heads, user_heads_path
    from edgectx.train.cache import SequenceCache
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from edgectx.engine import Engine
    from edgectx.train.heads import TrainSettings, train_heads

    from edgectx.model.source import open_model

    max_bytes = int(args.max_file_mib * 2**20)
    text = "\n\n".join(read_document(name, max_bytes).text for name in args.text)  # bad files fail before the model loads
    trained = open_model(path).spec.context_length
    if args.seq_len and args.seq_len > trained:
        raise UsageError(f"--seq-len {args.seq_len} is past {path.name}'s trained context ({trained}).")
    settings = TrainSettings(hidden=args.hidden, tokens=args.tokens, steps=args.steps, seq_len=args.seq_len or min(4096, trained),
                             offset=args.offset, span=args.span, label=args.label,
                             top_weight=args.top_weight)
    engine = Engine.load(path, device=args.device, n_ctx=settings.seq_len, n_threads=args.threads, weights=args.weights or "auto")
    ids = engine.tokenizer.encode(text, add_bos=False, special=False)
    ids = spread_sequences(ids, settings.n_tokens(engine.spec), settings.seq_len)
    if len(ids) < 2 * settings.seq_len:
        raise UsageError(f"The text has {len(ids)} tokens; training needs at least {2 * settings.seq_len}: pass more text.")
    cache = SequenceCache(Path(args.cache), engine.fingerprint, settings) if args.cache else None
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        reading = bar.add_task("reading", total=len(ids) // settings.seq_len * settings.seq_len, info="")
        training = bar.add_task("training", total=settings.steps, info="", start=False)

        def report(phase: str, done: int, total: int, figures: dict) -> None:
            if phase == "reading":
                bar.update(reading, completed=done, info=f"{done:,}/{total:,} tokens")
            else:
                bar.start_task(training)
                info = f"held-out loss {figures['heldout_loss']:.3f}, top-10% recall {figures['heldout_recall']:.3f}" if figures else None
                bar.update(training, completed=done, **({"info": info} if info else {}))

        result = train_heads(engine, ids, settings, progress=report, cache=cache)
    out = Path(args.out).expanduser() if args.out else user_heads_path(engine.fingerprint)
    save_heads(result.heads, out, result.info(engine))
    report_data = {"model": engine.path.name, "out": str(out), "collect_s": result.collect_s, "train_s": result.train_s,
                   "train_tokens": result.train_tokens, "heldout_tokens": result.heldout_tokens, "curve": result.curve,
                   "threads": torch.get_num_threads(), "cached_sequences": cache.hits if cache else 0}
    if args.json:
        print(json.dumps(report_data, indent=2))
    else:
        last = result.curve[-1]
        print(f"Heads written to {out} ({out.stat().st_size / 2**20:.1f} MiB): read {result.collect_s:.0f} s, "
              f"trained {result.train_s:.0f} s; held-out loss {last['heldout_loss']:.3f}, top-10% recall {last['heldout_recall']:.3f}.")
        if not args.out:
            print("edgectx finds them for this model from now on: evict with them by --scorer heads (or scorer = \"heads\" in the config).")
    return 0


def _import(args: argparse.Namespace, path: Path) -> int:
    from edgectx.memory.heads import HeadsInfo, import_locret, save_heads, user_heads_path
    from edgectx.model.source import open_model

    source = open_model(path)
    spec, fingerprint = source.spec, source.fingerprint()
    heads = import_locret(Path(args.file), spec)
    out = Path(args.out).expanduser() if args.out else user_heads_path(fingerprint)
    save_heads(heads, out, HeadsInfo(fingerprint, path.name, "locret-import", {"imported_from": str(args.file)}))
    print(f"Imported {spec.n_layers} layers of retaining heads (width {heads.hidden}) for {path.name} into {out}.")
    return 0


def _info(args: argparse.Namespace, path: Path) -> int:
    from edgectx.memory.heads import find_heads, load_heads, read_heads_metadata
    from edgectx.model.source import open_model

    source = open_model(path)
    spec, fingerprint = source.spec, source.fingerprint()
    found = find_heads(fingerprint)
    data = {"model": path.name, "fingerprint": fingerprint, "heads": str(found) if found else None}
    if found:
        meta = read_heads_metadata(found)
        heads, info = load_heads(found, spec, fingerprint)
        curve = info.training.get("curve") or []
        data.update({"source": info.source, "hidden": heads.hidden, "size_bytes": found.stat().st_size,
                     "train_s": info.training.get("train_s"), "collect_s": info.training.get("collect_s"),
                     "final": curve[-1] if curve else None, "settings": info.training.get("settings"),
                     "format_version": meta.get("version")})
    if args.json:
        print(json.dumps(data, indent=2))
    elif found:
        final = data["final"]
        tail = f"; held-out top-10% recall {final['heldout_recall']:.3f}" if final else ""
        print(f"{path.name} uses {data['source']} retaining heads (width {data['hidden']}) from {found}{tail}.")
    else:
        print(f"{path.name} has no retaining heads: eviction uses attention mass. Train some with `edgectx heads train --text FILE...`.")
    return 0


def run(args: argparse.Namespace) -> int:
    from edgectx.config import load_config
    from edgectx.model.discover import resolve_model

    path = resolve_model(args.model, load_config())
    return {"train": _train, "import": _import, "info": _info}[args.heads](args, path)
