"""Decode attention on the GPU: the Triton kernel (edgectx.kernels) against the memory's torch path.

For a budget-sized selected context (one decode query, GQA), times `grouped_attention` (PyTorch SDPA, what
the memory runs without the kernel) with and without a per-head validity mask (duplicate tokens, which
push SDPA off its fused path), and the flash-decoding kernel on the same inputs, with CUDA events. Also the
kernel's largest error against the float32 reference. Times are medians of `repeats` after a warm-up;
compare ratios from one run (the machine is shared).

    python -m edgectx.bench.kernels --keys 1024,4608,16384 --json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from edgectx import kernels
from edgectx.errors import UsageError
from edgectx.model.kv import grouped_attention


def _time_ms(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_kernels(keys: list[int], n_kv: int = 8, group: int = 4, head_dim: int = 128,
                dtype: torch.dtype = torch.bfloat16, repeats: int = 50) -> list[dict]:
    if not (torch.cuda.is_available() and kernels.available("cuda")):
        raise UsageError("The kernel benchmark needs a CUDA GPU and Triton installed.")
    from edgectx.kernels.decode_attention import decode_attention
    from edgectx.kernels.reference import decode_attention_reference

    dev = torch.device("cuda")
    rows = []
    for n_keys in keys:
        g = torch.Generator(device=dev).manual_seed(n_keys)
        q = torch.randn(n_kv * group, 1, head_dim, device=dev, generator=g).to(dtype)
        k = torch.randn(n_kv, n_keys, head_dim, device=dev, generator=g).to(dtype)
        v = torch.randn(n_kv, n_keys, head_dim, device=dev, generator=g).to(dtype)
        valid = torch.rand(n_kv, n_keys, device=dev, generator=g) > 0.05
        mask = valid[:, None, :]  # (n_kv, T=1, S), as Assembly.mask gives it
        row = {"keys": n_keys, "n_kv": n_kv, "group": group, "head_dim": head_dim, "dtype": str(dtype).split(".")[-1]}
        row["sdpa_ms"] = _time_ms(lambda: grouped_attention(q, k, v, None), repeats)
        row["kernel_ms"] = _time_ms(lambda: decode_attention(q, k, v), repeats)
        row["sdpa_masked_ms"] = _time_ms(lambda: grouped_attention(q, k, v, mask), repeats)
        row["kernel_masked_ms"] = _time_ms(lambda: decode_attention(q, k, v, valid=valid), repeats)
        row["speedup"] = row["sdpa_ms"] / row["kernel_ms"]
        row["speedup_masked"] = row["sdpa_masked_ms"] / row["kernel_masked_ms"]
        ref = decode_attention_reference(q, k, v, valid=valid)
        row["max_abs_err"] = (decode_attention(q, k, v, valid=valid).float() - ref.float()).abs().max().item()
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgectx.bench.kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--keys", default="1024,4608,16384", help="context lengths, comma-separated")
    parser.add_argument("--n-kv", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        rows = run_kernels([int(n) for n in args.keys.split(",")], args.n_kv, args.group, args.head_dim,
                           getattr(torch, args.dtype))
    except UsageError as e:
        print(f"error: {e}")
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['keys']:>6} keys  sdpa {r['sdpa_ms']:.3f} ms  kernel {r['kernel_ms']:.3f} ms  ({r['speedup']:.2f}x)"
                  f"  masked: sdpa {r['sdpa_masked_ms']:.3f} ms  kernel {r['kernel_masked_ms']:.3f} ms"
                  f"  ({r['speedup_masked']:.2f}x)  max err {r['max_abs_err']:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
