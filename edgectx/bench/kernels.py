"""Decode attention on the GPU: the Triton kernel (edgectx.kernels) against the memory's torch path.

For a budget-sized selected context (one decode query, GQA), times `grouped_attention` (PyTorch SDPA, what
the memory runs without the kernel) with and without a per-head validity mask (duplicate tokens, which
push SDPA off its fused path), and the flash-decoding kernel on the same inputs, with CUDA events. Also the
kernel's largest error against the float32 reference. Times are medians of `repeats` after a warm-up;
compare ratios from one run (the machine is shared).

`--gguf` times instead the matrix-vector kernel that reads GGUF blocks (edgectx.kernels.gguf_matmul) on an
8B-shaped Q4_K matrix (14336 x 4096, the FFN's gate/up) against a torch fp16 matmul of the same weight,
as GB/s of weight bytes read per product: decode is bandwidth-bound, so the kernel should beat fp16 by up to
the byte ratio (4.5 bits per weight against 16) when it runs near the GPU's memory bandwidth.

    python -m edgectx.bench.kernels --keys 1024,4608,16384 --json
    python -m edgectx.bench.kernels --gguf --tokens 1,4 --block-n 8,16,32
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys

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


def _graph_ms(fn, repeats: int, launches: int = 10) -> float | None:
    """The time of one `fn()` replayed from a CUDA graph of `launches` calls: the GPU's time without the host's
    launch overhead (which `_time_ms` includes: a Triton launch costs tens of microseconds in Python). None if
    the capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # compiled and warm before the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(launches):
                fn()
    except RuntimeError:
        return None
    return _time_ms(graph.replay, repeats) / launches


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
        for name, fn in (("sdpa", lambda: grouped_attention(q, k, v, None)), ("kernel", lambda: decode_attention(q, k, v)),
                         ("sdpa_masked", lambda: grouped_attention(q, k, v, mask)),
                         ("kernel_masked", lambda: decode_attention(q, k, v, valid=valid))):
            row[f"{name}_graph_ms"] = _graph_ms(fn, repeats)  # without the host's launch overhead
        row["speedup"] = row["sdpa_ms"] / row["kernel_ms"]
        row["speedup_masked"] = row["sdpa_masked_ms"] / row["kernel_masked_ms"]
        ref = decode_attention_reference(q, k, v, valid=valid)
        row["max_abs_err"] = (decode_attention(q, k, v, valid=valid).float() - ref.float()).abs().max().item()
        rows.append(row)
    return rows


def run_gguf_matvec(rows: int = 14336, cols: int = 4096, tokens: tuple[int, ...] = (1,), qtype: str = "Q4_K",
                    dtype: torch.dtype = torch.float16, block_ns: tuple[int | None, ...] = (None,),
                    repeats: int = 50, steps: tuple[int | None, ...] = (None,), warps: tuple[int | None, ...] = (None,),
                    on_row=None) -> list[dict]:
    """One row per (token count, BLOCK_N, blocks per step, warps; None: the type's default): the GGUF kernel's
    and the fp16 matmul's times and weight GB/s, the layer's time (TritonGgufLinear, Python overhead included)
    and the kernel's largest error against float32, relative to the output's scale. `on_row(row)`: called as
    each row lands (a sweep cut short keeps its rows)."""
    if not (torch.cuda.is_available() and kernels.has_triton()):
        raise UsageError("The GGUF kernel benchmark needs a CUDA GPU and Triton installed.")
    from gguf import GGMLQuantizationType

    from edgectx.kernels.gguf_matmul import LAYOUTS, gguf_matvec
    if qtype not in GGMLQuantizationType.__members__ or int(GGMLQuantizationType[qtype]) not in LAYOUTS:
        names = ", ".join(GGMLQuantizationType(t).name for t in LAYOUTS)
        raise UsageError(f"No GGUF kernel for {qtype!r}: choose one of {names}.")
    from edgectx.quant.block_samples import random_matrix
    from edgectx.quant.gguf_cuda import TritonGgufLinear

    dev = torch.device("cuda")
    m = random_matrix(GGMLQuantizationType[qtype], rows, cols, scale=1e-3, device=dev)
    w16 = m.dequantize(dtype)  # the same weights as a dense 16-bit matrix
    layer = TritonGgufLinear([m])
    out = []
    for n_tokens in tokens:
        x = torch.randn(n_tokens, cols, device=dev).to(dtype)
        ref = x.float() @ m.dequantize(torch.float32).t()
        dense_ms = _time_ms(lambda: x @ w16.t(), repeats)
        layer_ms = _time_ms(lambda: layer(x), repeats)
        fp16_graph_ms = _graph_ms(lambda: x @ w16.t(), repeats)
        layout = LAYOUTS[int(m.qtype)]
        default = layout.matvec_tile or (layout.block_n, layout.blocks_per_step, 4)
        for block_n, nb, n_warps in itertools.product(block_ns, steps, warps):
            tile = dict(block_n=block_n, blocks_per_step=nb, num_warps=n_warps)
            kernel_ms = _time_ms(lambda: gguf_matvec(x, m.raw, m.qtype, rows, cols, **tile), repeats)
            y = gguf_matvec(x, m.raw, m.qtype, rows, cols, **tile).float()
            graph_ms = _graph_ms(lambda: gguf_matvec(x, m.raw, m.qtype, rows, cols, **tile), repeats)
            out.append({
                "qtype": qtype, "rows": rows, "cols": cols, "tokens": n_tokens,
                "block_n": block_n or default[0], "blocks_per_step": nb or default[1], "num_warps": n_warps or default[2],
                "dtype": str(dtype).split(".")[-1], "weight_bytes": m.nbytes, "fp16_bytes": w16.nbytes,
                "kernel_ms": kernel_ms, "layer_ms": layer_ms, "fp16_ms": dense_ms, "kernel_graph_ms": graph_ms,
                "fp16_graph_ms": fp16_graph_ms,
                "kernel_gbps": m.nbytes / kernel_ms / 1e6, "fp16_gbps": w16.nbytes / dense_ms / 1e6,
                "speedup": dense_ms / kernel_ms,
                "max_rel_err": ((y - ref).abs().max() / ref.abs().max()).item(),
            })
            if on_row:
                on_row(out[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgectx.bench.kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--keys", default="1024,4608,16384", help="context lengths, comma-separated")
    parser.add_argument("--n-kv", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                        help="default bfloat16 (attention), float16 (--gguf)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--gguf", action="store_true", help="time the GGUF block matvec kernel instead")
    parser.add_argument("--qtype", default="Q4_K", help="with --gguf: the block type")
    parser.add_argument("--tokens", default="1", help="with --gguf: rows of x, comma-separated")
    parser.add_argument("--block-n", default="", help="with --gguf: output rows per program, comma-separated "
                        "(default: the type's own)")
    parser.add_argument("--blocks-per-step", default="", help="with --gguf: blocks a program decodes per step, "
                        "comma-separated (default: the type's own)")
    parser.add_argument("--num-warps", default="", help="with --gguf: warps per program, comma-separated "
                        "(default: the type's own)")
    parser.add_argument("--repeats", type=int, default=50, help="with --gguf: timed launches per row (the median)")
    args = parser.parse_args(argv)
    if args.gguf:
        return _main_gguf(args)
    try:
        rows = run_kernels([int(n) for n in args.keys.split(",")], args.n_kv, args.group, args.head_dim,
                           getattr(torch, args.dtype or "bfloat16"))
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


def _ints(text: str) -> tuple[int | None, ...]:
    return tuple(int(n) for n in text.split(",")) if text else (None,)


def _main_gguf(args: argparse.Namespace) -> int:
    try:
        rows = run_gguf_matvec(tokens=tuple(int(n) for n in args.tokens.split(",")), qtype=args.qtype,
                               dtype=getattr(torch, args.dtype or "float16"),
                               block_ns=_ints(args.block_n), steps=_ints(args.blocks_per_step),
                               warps=_ints(args.num_warps), repeats=args.repeats,
                               on_row=lambda row: print(f"row: {json.dumps(row)}", file=sys.stderr, flush=True))
    except UsageError as e:
        print(f"error: {e}")
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['qtype']} {r['rows']}x{r['cols']} T={r['tokens']} BLOCK_N={r['block_n']}: kernel {r['kernel_ms']:.4f} ms "
                  f"({r['kernel_gbps']:.0f} GB/s)  layer {r['layer_ms']:.4f} ms  fp16 {r['fp16_ms']:.4f} ms "
                  f"({r['fp16_gbps']:.0f} GB/s)  {r['speedup']:.2f}x  max rel err {r['max_rel_err']:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
