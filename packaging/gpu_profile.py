"""Where a long-context decode step's time goes on a GPU: the GPU check's companion, for the next change to make.

Builds a synthetic model (nf4 on CUDA), accounts for every byte the build left allocated (the model's tensors,
then the largest CUDA tensors the model does not own), prefills `--context` tokens, and profiles `--steps` decode
steps with torch.profiler: per-step wall times, the CUDA-graph runner's counts, and the ops with the most self
CPU and self CUDA time. Prints one JSON object (the op tables as text inside it).

    python packaging/gpu_profile.py --synthetic llama-3.1-8b --context 32768 --steps 24 > profile.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch


def _model_tensors(model: torch.nn.Module) -> dict[int, int]:
    """data_ptr -> bytes of every tensor the model holds: parameters, buffers, bitsandbytes quantization states."""
    held = {}

    def add(t) -> None:
        if isinstance(t, torch.Tensor) and t.device.type == "cuda" and t.numel():
            held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
        state = getattr(t, "quant_state", None)
        if state is not None:
            for name in ("absmax", "code", "offset"):
                add(getattr(state, name, None))
            nested = getattr(state, "state2", None)
            if nested is not None:
                add(nested.absmax)
                add(nested.code)
    for module in model.modules():
        for value in vars(module).values():
            add(value)
    return held


def _strangers(held: dict[int, int], top: int = 12) -> list[dict]:
    seen, rows = set(), []
    for obj in gc.get_objects():
        try:
            if not (isinstance(obj, torch.Tensor) and obj.device.type == "cuda"):
                continue
            ptr = obj.untyped_storage().data_ptr()
        except Exception:  # noqa: BLE001 - objects gc hands back may be half-built
            continue
        if ptr in held or ptr in seen:
            continue
        seen.add(ptr)
        rows.append({"bytes": obj.untyped_storage().nbytes(), "shape": list(obj.shape), "dtype": str(obj.dtype)})
    return sorted(rows, key=lambda r: -r["bytes"])[:top]


def main() -> int:
    from edgectx.engine import Engine, default_dtype
    from edgectx.memory.config import MemoryConfig, default_chunk_tokens
    from edgectx.memory.device import set_memory_cap
    from edgectx.model.synthetic import SYNTHETIC, build_synthetic
    from edgectx.quant.linear import resolve_weights

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--synthetic", default="llama-3.1-8b")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--gpu-mem-cap-gib", type=float, default=24)
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (tests/test_gpu_check.py)")
    args = p.parse_args()
    cuda = args.device == "cuda"
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if cuda:
        set_memory_cap(dev, int(args.gpu_mem_cap_gib * 2**30))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = default_dtype(dev)
    weights = resolve_weights(dev, "auto", fp16_bytes=SYNTHETIC[args.synthetic].weight_bytes("fp16"))
    t0 = time.perf_counter()
    model, spec = build_synthetic(args.synthetic, dev, dtype, weights=weights)
    sync()
    held = _model_tensors(model)
    out = {"synthetic": args.synthetic, "weights": weights, "build_s": round(time.perf_counter() - t0, 1),
           "allocated_after_build": torch.cuda.memory_allocated(dev) if cuda else None, "model_tensor_bytes": sum(held.values()),
           "planned_weight_bytes": spec.weight_bytes(weights), "largest_tensors_not_in_model": _strangers(held)}
    print(json.dumps({"build": out}), flush=True)

    config = MemoryConfig(chunk_tokens=default_chunk_tokens(dev.type))  # the device's defaults, as the bench's
    engine = Engine(Path(f"synthetic-{args.synthetic}"), model, spec, None, None, dev, dtype, memory_config=config)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (args.context,), generator=gen).tolist()
    t0 = time.perf_counter()
    engine.prefill(ids)
    sync()
    out["prefill_s"] = round(time.perf_counter() - t0, 2)
    token = int(torch.argmax(engine.next_logits))
    for _ in range(16):  # captures and compiles settle
        token = int(torch.argmax(engine.forward([token])[-1]))
    stats = getattr(engine.step, "stats", dict)
    before, times = stats(), []
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            t = time.perf_counter()
            token = int(torch.argmax(engine.forward([token])[-1]))
            times.append(round((time.perf_counter() - t) * 1e3, 2))
    after = stats()
    table = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    out.update(step_ms=times, graphs={k: v - before.get(k, 0) for k, v in after.items() if isinstance(v, int)},
               retrievals=engine.memory.record.n_retrievals,
               by_self_cuda=table.table(sort_by=sort, row_limit=25, max_name_column_width=60),
               by_self_cpu=table.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    # the same steps unprofiled, each step's time (the profiler's own overhead left out)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        token = int(torch.argmax(engine.forward([token])[-1]))
        times.append(round((time.perf_counter() - t) * 1e3, 2))
    out["step_ms_unprofiled"] = times
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
