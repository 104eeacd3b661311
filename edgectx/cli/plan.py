"""`edgectx plan`: will this model and context fit this GPU? Answered before loading anything.

Reads the shapes from GGUF metadata (or the synthetic table), asks edgectx.memory.plan for the arithmetic,
prints it, and exits 0 when the plan fits `--gpu-mem-gib` (and the host's RAM), 1 with one sentence when it
does not.

    edgectx plan --synthetic llama-3.1-8b --context 131072 --gpu-mem-gib 24 --weights nf4
"""

from __future__ import annotations

import argparse
import json

from edgectx.cli.options import MAX_TOKENS, add_memory_args, float_range, int_range
from edgectx.memory.plan import GIB, MemoryPlan, PlanDoesNotFit, available_ram_bytes, plan_memory
from edgectx.quant.formats import WEIGHT_FORMATS


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="will a model and context fit a GPU? device and host memory, before loading anything")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", "-m", help="a .gguf file, a Hugging Face checkpoint directory or a listed name (default: the embedded SmolLM2); only its metadata is read")
    source.add_argument("--synthetic", metavar="NAME", help="a synthetic model's shapes: llama-3.1-8b, phi-3-mini-128k, qwen2.5-7b")
    p.add_argument("--context", type=int_range(1, MAX_TOKENS), required=True, help="tokens the conversation will hold")
    p.add_argument("--gpu-mem-gib", type=float_range(0, above=True), required=True, help="GPU memory to plan for, in GiB")
    p.add_argument("--host-mem-gib", type=float_range(0, above=True), help="host RAM for the block store, in GiB (default: this machine's)")
    p.add_argument("--weights", choices=WEIGHT_FORMATS, help="weight format (default auto: nf4 when bitsandbytes is installed)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_memory_args(p)


def run(args: argparse.Namespace) -> int:
    import torch

    from edgectx.cli.options import memory_config_from
    from edgectx.config import load_config
    from edgectx.errors import UsageError
    from edgectx.model.gguf import file_weight_bytes
    from edgectx.quant.linear import resolve_weights

    config = load_config()
    if args.synthetic:
        from edgectx.model.synthetic import synthetic_spec

        spec, name = synthetic_spec(args.synthetic), args.synthetic
    else:
        from edgectx.model.source import open_model
        from edgectx.model.discover import resolve_model

        path = resolve_model(args.model, config)
        source = open_model(path)
        spec, name = source.spec, path.name  # a GGUF's metadata or a directory's config.json
    gguf_file = source.handle if not args.synthetic and source.kind == "gguf" else None
    weights = args.weights or config.weights or "auto"
    if weights == "auto" and gguf_file is not None:
        weights = "gguf"  # on CUDA a GGUF file keeps its own blocks (edgectx.quant.gguf_cuda): plan those bytes
    elif weights == "auto":  # a format asked for by name is planned without bitsandbytes installed here
        weights = resolve_weights(torch.device("cuda"), weights, spec.weight_bytes("fp16"))
    if weights == "gguf" and gguf_file is None:
        raise UsageError("--weights gguf keeps a GGUF file's own quantization: plan a .gguf file with --model, "
                         "or use auto, fp16, nf4 or int8.")
    file_bytes = file_weight_bytes(gguf_file) if weights == "gguf" else None
    # RAM available now, not all of it: the store is pinned on a GPU, and pinned pages cannot be swapped out
    host = int(args.host_mem_gib * GIB) if args.host_mem_gib else available_ram_bytes()
    memory = memory_config_from(args, config, device="cuda")  # planned for a GPU: its default chunk
    plan = plan_memory(spec, args.context, int(args.gpu_mem_gib * GIB), memory, weights, host, name,
                       file_weight_bytes=file_bytes)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print_plan(plan)
    if not plan.fits_device:
        nf4 = "" if plan.weights == "nf4" else "--weights nf4, "
        raise PlanDoesNotFit(
            f"{name} at {args.context:,} tokens needs {plan.device_total_bytes / GIB:.1f} GiB on the GPU but {args.gpu_mem_gib:g} GiB "
            f"were given: try {nf4}a smaller --budget, or a shorter --context.")
    if not plan.fits_host:
        raise PlanDoesNotFit(
            f"The host block store for {args.context:,} tokens needs {max(plan.host_reserved_bytes, plan.host_pinned_bytes) / GIB:.1f} GiB of RAM but "
            f"{host / GIB:.1f} GiB are available: use a shorter --context.")
    return 0


def print_plan(plan: MemoryPlan) -> None:
    def gib(n: int) -> str:
        return f"{n / GIB:8.2f} GiB"

    budget = f"budget {plan.budget_tokens:,} tokens" if plan.budget_tokens else "full attention"
    print(f"{plan.model}: {plan.context_tokens:,} tokens, {plan.weights} weights, {budget}")
    print(f"  weights                        {gib(plan.weight_bytes)}")
    if plan.device_kv is not None:
        kv = plan.device_kv
        print(f"  device KV (memory tiers)       {gib(kv.total_bytes)}")
        print(f"    sinks + window + retained    {gib(kv.resident_kv_bytes)}  ({gib(kv.resident_bytes).strip()} allocated)")
        # On CUDA retrieval reads the pinned host store with a kernel and allocates no cache; counted for the GPUs
        # where that kernel cannot run (edgectx.memory.block_store.device_gather_works)
        print(f"    block cache                  {gib(kv.block_cache_bytes)}  (only where blocks cannot be read from pinned memory)")
        print(f"    attention context            {gib(kv.work_bytes)}")
        print(f"    block representatives        {gib(kv.repr_bytes)}")
    else:
        print(f"  device KV (full attention)     {gib(plan.device_kv_bytes)}")
    print(f"  activations ({plan.chunk_tokens:,}-token chunk)".ljust(33) + gib(plan.activation_bytes))
    if plan.budget_tokens:
        print(f"  recent queries + copy staging  {gib(plan.query_buffer_bytes + plan.copy_pool_bytes)}")
    print(f"  CUDA runtime                   {gib(plan.runtime_bytes)}")
    print(f"  allocator slack                {gib(plan.allocator_slack_bytes)}")
    print(f"  device total                   {gib(plan.device_total_bytes)}  of {plan.gpu_bytes / GIB:g} GiB: "
          f"{'fits' if plan.fits_device else 'does NOT fit'}")
    print(f"  full attention KV (comparison) {gib(plan.full_kv_bytes)}")
    if plan.budget_tokens:
        print(f"  host block store (fp16)        {gib(plan.host_kv_bytes)}  ({gib(plan.host_reserved_bytes).strip()} in segments, "
              f"{gib(plan.host_pinned_bytes).strip()} pinned) of {plan.host_ram_bytes / GIB:.0f} GiB RAM available: "
              f"{'fits' if plan.fits_host else 'does NOT fit'}")
