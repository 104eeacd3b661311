"""Triton kernels against their torch references: on a GPU compiled, on a CPU through Triton's interpreter.

Tolerances (max abs error on outputs of magnitude ~1): float32 2e-5; float16 2e-3 and bfloat16 2e-2, where
the kernel rounds rotated keys and softmax weights to the input dtype before its dot products (as tensor
cores take them) while the reference stays in float32 throughout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU, and Triton's interpreter is off (tests/conftest.py turns it on)", allow_module_level=True)

from edgectx import kernels  # noqa: E402
from edgectx.model.gguf import load_model, open_gguf, read_spec  # noqa: E402
from edgectx.kernels import block_scoring as scoring_mod  # noqa: E402
from edgectx.kernels import decode_attention as decode_mod  # noqa: E402
from edgectx.kernels.reference import block_scores_reference, decode_attention_reference  # noqa: E402
from edgectx.memory.context import ContextMemory  # noqa: E402
from edgectx.memory.config import MemoryConfig  # noqa: E402
from edgectx.memory.retrieval import select_blocks  # noqa: E402
from edgectx.model.rope import Rope  # noqa: E402
from edgectx.model.spec import ModelSpec  # noqa: E402
from tiny_gguf import write_tiny_gguf  # noqa: E402

ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _tables(rope_dim: int, n_positions: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = base ** (-torch.arange(rope_dim // 2, dtype=torch.float64) * 2 / rope_dim)
    theta = torch.arange(n_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cos(theta).float().to(DEVICE), torch.sin(theta).float().to(DEVICE)


def _case(n_kv, group, head_dim, n_keys, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_kv * group, 1, head_dim, generator=g)
    k = torch.randn(n_kv, n_keys, head_dim, generator=g)
    v = torch.randn(n_kv, n_keys, head_dim, generator=g)
    # distinct positions per head, unordered, as retrieved blocks and retained tokens give them
    positions = torch.stack([torch.randperm(4 * n_keys, generator=g)[:n_keys] for _ in range(n_kv)])
    return [t.to(DEVICE) for t in (q.to(dtype), k.to(dtype), v.to(dtype), positions)]


@pytest.mark.parametrize("n_kv, group, head_dim, rope_dim, n_keys, n_splits", [
    (2, 1, 64, 64, 1, None),        # a single key
    (2, 3, 64, 32, 200, None),      # partial rotary, N not a multiple of the 64-key block
    (1, 4, 128, 128, 333, 3),       # several splits, the last one short
    (2, 4, 128, 64, 130, 7),        # more splits asked than blocks: clamped
    (1, 2, 64, 64, 5000, 70),       # one KV head on a big GPU: the merge reads 3 tiles of splits, the last empty
])
@pytest.mark.parametrize("rotate", [True, False])
def test_decode_attention_matches_reference_fp32(n_kv, group, head_dim, rope_dim, n_keys, n_splits, rotate):
    q, k, v, positions = _case(n_kv, group, head_dim, n_keys, torch.float32)
    rope = dict(positions=positions, q_position=4 * n_keys, cos=None, sin=None)
    if rotate:
        rope["cos"], rope["sin"] = _tables(rope_dim, 4 * n_keys + 1)
    else:
        rope = {}
    out = decode_mod.decode_attention(q, k, v, n_splits=n_splits, **rope)
    ref = decode_attention_reference(q, k, v, **rope)
    assert out.shape == (n_kv * group, 1, head_dim) and out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=ATOL[torch.float32]), (out - ref).abs().max()


def test_rotation_changes_the_result():
    """The in-kernel rotation is not a no-op that the reference happens to share."""
    q, k, v, positions = _case(2, 2, 64, 96, torch.float32)
    cos, sin = _tables(64, 400)
    rotated = decode_mod.decode_attention(q, k, v, positions=positions, q_position=390, cos=cos, sin=sin)
    plain = decode_mod.decode_attention(q, k, v)
    assert (rotated - plain).abs().max() > 0.05
    shared = decode_mod.decode_attention(q, k, v, positions=positions[0], q_position=390, cos=cos, sin=sin)
    assert torch.allclose(shared, decode_attention_reference(q, k, v, positions=positions[0].expand(2, -1),
                                                             q_position=390, cos=cos, sin=sin), atol=ATOL[torch.float32])
    with pytest.raises(ValueError, match="outside"):
        decode_mod.decode_attention(q, k, v, positions=positions, q_position=400, cos=cos, sin=sin)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_half_precision(dtype):
    q, k, v, positions = _case(2, 3, 64, 150, dtype, seed=1)
    cos, sin = _tables(32, 601)
    rope = dict(positions=positions, q_position=600, cos=cos, sin=sin)
    out = decode_mod.decode_attention(q, k, v, n_splits=2, **rope)
    ref = decode_attention_reference(q, k, v, **rope)
    assert out.dtype == dtype
    err = (out.float() - ref.float()).abs().max().item()
    assert err < ATOL[dtype], err


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_float32_query_over_16_bit_keys(kv_dtype):
    """A memory computing in float32 over a 16-bit cache (kv_dtype) hands the kernel float32 queries: the answer
    comes back in float32, as close to the reference as a wholly 16-bit call is."""
    q, k, v, positions = _case(2, 3, 64, 150, torch.float32, seed=1)
    k, v = k.to(kv_dtype), v.to(kv_dtype)
    cos, sin = _tables(32, 601)
    rope = dict(positions=positions, q_position=600, cos=cos, sin=sin)
    out = decode_mod.decode_attention(q, k, v, n_splits=2, **rope)
    ref = decode_attention_reference(q, k, v, **rope)
    assert out.dtype == ref.dtype == torch.float32
    err = (out - ref).abs().max().item()
    assert err < ATOL[kv_dtype], err


def test_per_head_validity_and_lengths():
    """Heads keep different keys: a mask with holes, per-head lengths, and one head left with nothing (zeros)."""
    q, k, v, positions = _case(3, 2, 64, 180, torch.float32, seed=2)
    g = torch.Generator().manual_seed(3)
    valid = (torch.rand(3, 180, generator=g) > 0.4).to(DEVICE)
    lengths = torch.tensor([180, 70, 0], device=DEVICE)
    cos, sin = _tables(64, 721)
    rope = dict(positions=positions, q_position=720, cos=cos, sin=sin)
    out = decode_mod.decode_attention(q, k, v, valid=valid, lengths=lengths, n_splits=3, **rope)
    ref = decode_attention_reference(q, k, v, valid=valid, lengths=lengths, **rope)
    assert torch.allclose(out, ref, atol=ATOL[torch.float32]), (out - ref).abs().max()
    assert torch.equal(out[4:], torch.zeros_like(out[4:]))  # KV head 2 (query heads 4, 5) has no key
    unmasked = decode_attention_reference(q, k, v, **rope)
    assert (unmasked[:4] - out[:4]).abs().max() > 1e-3  # the mask mattered


def test_columns_past_a_heads_length_may_hold_anything():
    """A captured decode step attends over a buffer's whole capacity with per-head lengths; the columns past them
    are scratch (uninitialized memory, NaN among it). The kernel loads none of them, and the reference, which
    stands in for it where Triton cannot run, must ignore them too (it multiplied their values by zero: NaN)."""
    q, k, v, _ = _case(3, 2, 32, 96, torch.float32, seed=5)
    lengths = torch.tensor([96, 40, 7], device=DEVICE)
    dirty_k, dirty_v = k.clone(), v.clone()
    for head, n in enumerate(lengths.tolist()):
        dirty_k[head, n:], dirty_v[head, n:] = float("nan"), float("inf")
    clean = decode_attention_reference(q, k, v, lengths=lengths)
    assert torch.equal(decode_attention_reference(q, dirty_k, dirty_v, lengths=lengths), clean)
    out = decode_mod.decode_attention(q, dirty_k, dirty_v, lengths=lengths, n_splits=2)
    assert torch.allclose(out, clean, atol=ATOL[torch.float32]), (out - clean).abs().max()


def test_kernel_tables_are_the_engines_rope():
    """Rotating in the kernel from Rope's half tables equals the engine's path: Rope.rotate, then attention."""
    spec = ModelSpec(arch="llama", n_layers=1, dim=256, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=64,
                     vocab_size=8, context_length=512, rope_dim=32)
    rope = Rope(spec, DEVICE)
    q, k, v, positions = _case(2, 2, 64, 100, torch.float32, seed=4)
    rope.reserve(401)
    out = decode_mod.decode_attention(q, k, v, positions=positions, q_position=400, cos=rope._cos, sin=rope._sin)
    k_rot = torch.stack([rope.apply(k[h], positions[h]) for h in range(2)])
    q_rot = rope.apply(q, torch.tensor([400], device=DEVICE))
    ref = decode_attention_reference(q_rot, k_rot, v)
    assert torch.allclose(out, ref, atol=ATOL[torch.float32]), (out - ref).abs().max()


@pytest.mark.parametrize("n_tokens, dtype", [(1, torch.float32), (37, torch.float32), (5, torch.bfloat16)])
def test_block_scores_match_reference(n_tokens, dtype):
    g = torch.Generator().manual_seed(n_tokens)
    q = torch.randn(8, n_tokens, 64, generator=g).to(DEVICE, dtype)
    reps = torch.randn(300, 2, 64, generator=g).to(DEVICE, torch.float16)
    scores = scoring_mod.block_scores(q, reps, n_eligible=250, block_b=64)  # 4 tiles, the last partial
    ref = block_scores_reference(q, reps, 250)
    assert scores.shape == (2, 250) and scores.dtype == torch.float32
    assert torch.allclose(scores, ref, atol=1e-5, rtol=1e-4), (scores - ref).abs().max()


def test_block_scores_follow_select_blocks_rule():
    """The reference ranks blocks exactly as retrieval does, so the kernel can stand in for its scoring."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(6, 9, 32, generator=g)
    reps = torch.randn(40, 3, 32, generator=g)
    blocks, probs = select_blocks(q, reps, n_eligible=33, top_k=4)
    scores = scoring_mod.block_scores(q.to(DEVICE), reps.to(DEVICE), n_eligible=33).cpu()
    assert torch.equal(scores.topk(4, dim=1).indices.sort(dim=1).values, blocks)
    assert torch.allclose(torch.softmax(scores, dim=1).gather(1, blocks), probs, atol=1e-6)


@pytest.fixture
def fresh_probe(monkeypatch):
    """The kernels' per-device probe, as in a new process."""
    monkeypatch.setattr(kernels, "_probed", set())
    monkeypatch.setattr(kernels, "_broken", {})


def test_available_dispatch(monkeypatch, fresh_probe):
    monkeypatch.setattr(kernels, "_tiny_launch", lambda device: None)  # a GPU where one launch runs
    assert kernels.available("cuda") == kernels.has_triton()
    assert not kernels.available("cpu")
    with kernels.forced():
        assert kernels.available("cpu")
        monkeypatch.setenv("EDGECTX_KERNELS", "0")
        assert not kernels.available("cpu")
    assert not kernels.available("cpu")


def _decode_logits(model, spec, config, dtype, ids, n_decode):
    """Prefill all but the last `n_decode` ids in chunks, then decode those one at a time: their logits."""
    memory = ContextMemory(spec, Rope(spec, DEVICE), DEVICE, dtype, config)
    prefix, out, saw_duplicates = ids[:-n_decode], [], False
    with torch.inference_mode():
        for start in range(0, len(prefix), config.chunk_tokens):
            chunk = prefix[start : start + config.chunk_tokens]
            memory.begin(len(chunk))
            model(torch.tensor(chunk, device=DEVICE), memory)
            memory.commit()
        for token in ids[-n_decode:]:
            memory.begin(1)
            out.append(model(torch.tensor([token], device=DEVICE), memory))
            memory.commit()
            saw_duplicates |= any(layer.asm.valid is not None for layer in memory.layers)
    assert memory.stats()["evicted_tokens"] > 0 and memory.record.n_retrievals > 0
    return torch.cat(out), saw_duplicates


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), pytest.param(torch.bfloat16, 2e-2, marks=pytest.mark.gpu)])
def test_memory_decode_with_kernel_matches_reference_path(tmp_path, monkeypatch, dtype, atol):
    """A tiny model past its budget (evicting, retrieving): the kernel decode gives the torch path's logits."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf", arch="llama", n_heads=6, n_kv_heads=2, dim=96, n_layers=1)
    gguf_file = open_gguf(path)
    spec = read_spec(gguf_file)
    model = load_model(gguf_file, DEVICE, dtype)
    config = MemoryConfig(budget_tokens=96, n_sink=4, n_local=32, block_size=16, top_k_blocks=2, cache_blocks=4,
                          chunk_tokens=32, n_observe=8, retrieve_every=2, evict_every=8)
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 258, 300)]
    calls = []
    real_decode = kernels.decode
    monkeypatch.setattr(kernels, "decode", lambda *a, **kw: calls.append(1) or real_decode(*a, **kw))
    monkeypatch.setenv("EDGECTX_KERNELS", "0")  # the torch path, even on CUDA
    reference, _ = _decode_logits(model, spec, config, dtype, ids, 4)
    assert not calls
    monkeypatch.delenv("EDGECTX_KERNELS")
    with kernels.forced():  # on a CPU, through the interpreter; on CUDA the kernel is the default anyway
        with_kernel, duplicates = _decode_logits(model, spec, config, dtype, ids, 4)
    assert len(calls) == 4 * spec.n_layers  # decode steps only: prefill chunks keep SDPA
    assert duplicates, "expected retrieved blocks overlapping resident tokens (the valid mask)"
    err = (with_kernel - reference).abs().max().item()
    assert err < atol * max(1.0, reference.abs().max().item()), err  # bf16: relative (an ulp at |logit| 32 is 0.25)
    assert torch.equal(with_kernel.argmax(-1), reference.argmax(-1))


AOT_COMPILE = """
import sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from edgectx.kernels import block_gather, block_scoring, decode_attention as da

arch = int(sys.argv[1])

def compile_(fn, sig, consts, arch):
    sig = {**sig, **{k: "constexpr" for k in consts}}
    triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32))

ints = dict.fromkeys("q_position n_keys split_len n_splits has_valid s_qh s_kh s_kn s_vh s_vn s_ph s_pn s_mh s_mn s_tab".split(), "i32")
sig = dict(Q="*bf16", K="*bf16", V="*bf16", POS="*i64", VALID="*u8", LENS="*i32", COS="*fp32", SIN="*fp32",
           M_OUT="*fp32", L_OUT="*fp32", ACC_OUT="*fp32", scale_log2="fp32", **ints)
compile_(da._split_kernel, sig, dict(GROUP=4, GROUP_PAD=16, HEAD_DIM=128, BLOCK_D=128, ROPE_HALF=32, ROTATE=True,
         HAS_LENS=True, BLOCK_N=64, PRECISION=None, DOT=tl.bfloat16, KV_ALIGN=16), arch)
compile_(da._merge_kernel, dict(M_IN="*fp32", L_IN="*fp32", ACC_IN="*fp32", OUT="*bf16", n_splits="i32", s_oh="i32"),
         dict(GROUP=4, GROUP_PAD=16, HEAD_DIM=128, BLOCK_D=128, SPLITS_BLOCK=32), arch)
compile_(block_scoring._scores_kernel, dict(Q="*bf16", R="*fp16", OUT="*fp32", n_tokens="i32", n_blocks="i32",
         scale="fp32", s_qh="i32", s_qt="i32", s_rb="i32", s_rk="i32", s_ok="i32"),
         dict(GROUP=4, HEAD_DIM=128, BLOCK_D=128, BLOCK_T=32, BLOCK_B=128), arch)
# the retrieval gather reads the pinned host store (fp16) into bf16 columns; its offsets are int64 elements
compile_(block_gather._gather_kernel, dict(BASE="*fp16", OFFSETS="*i64", BLOCKS="*i64", K_OUT="*bf16", V_OUT="*bf16",
         k_sel="i32", segment_blocks="i32", s_kh="i32", s_kt="i32", s_vh="i32", s_vt="i32"),
         dict(N_KV=8, BLOCK_SIZE=128, HEAD_DIM=128, BLOCK_D=128, ROWS=32), arch)
print("compiled")
"""


@pytest.mark.slow  # ~8 s of CPU an architecture: four kernels through Triton's compiler and ptxas
@pytest.mark.skipif(ON_GPU, reason="the GPU tests run the compiled kernels themselves")
@pytest.mark.parametrize("arch", [80, 90])  # A100 / RTX 30xx, and H100 / H200 (another code generator for dots)
def test_kernels_compile_for_nvidia_gpus_without_one(tmp_path, arch):
    """The interpreter accepts code the compiler rejects (a loop-carried variable changing shape did): compile
    every kernel (all features on) through ptxas, ahead of time, in a process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", AOT_COMPILE, str(arch)], env=env, cwd=tmp_path,  # not the checkout: its
                          capture_output=True, text=True, timeout=300)  # edgectx/ lacks kernels/ at that path
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


DECODE_PTX = """
import collections, json, re
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from edgectx.kernels import decode_attention as da

fn = da._split_kernel
ints = "q_position n_keys split_len n_splits has_valid s_qh s_kh s_kn s_vh s_vn s_ph s_pn s_mh s_mn s_tab".split()
sig = dict(Q="*bf16", K="*bf16", V="*bf16", POS="*i64", VALID="*u8", LENS="*i32", COS="*fp32", SIN="*fp32",
           M_OUT="*fp32", L_OUT="*fp32", ACC_OUT="*fp32", scale_log2="fp32", **dict.fromkeys(ints, "i32"))
consts = dict(GROUP=4, GROUP_PAD=16, HEAD_DIM=128, BLOCK_D=128, ROPE_HALF=64, ROTATE=True, HAS_LENS=True, BLOCK_N=64,
              PRECISION=None, DOT=tl.bfloat16, KV_ALIGN=16)
# what the JIT knows at a launch from the memory: tensors 16-byte aligned, the integers it specializes
# (those not in do_not_specialize) multiples of 16 (strides of head_dim 128)
known = [n for n in sig if sig[n].startswith("*")] + [n for n in ints if n not in da.SPLIT_RUNTIME_INTS + ("s_pn", "s_mn")]
attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in known}
kernel = triton.compile(ASTSource(fn, {**sig, **dict.fromkeys(consts, "constexpr")}, consts, attrs),
                        target=GPUTarget("cuda", 90, 32))
print(json.dumps(collections.Counter(re.findall(r"(?:ld\\.global|cp\\.async\\.\\w+)\\.[\\w.]*", kernel.asm["ptx"]))))
"""


@pytest.mark.slow  # ~5 s of CPU: Triton's compiler for sm_90
@pytest.mark.skipif(ON_GPU, reason="the GPU tests time the kernel itself")
def test_the_decode_kernel_reads_keys_and_values_16_bytes_at_a_time(tmp_path):
    """The head strides change with the context's capacity, so they are not specialized (a compile each time they
    crossed a multiple of 16); unspecialized, the compiler could not tell a head's first key is 16-byte aligned and
    read K and V two bytes at a time (192 scalar 16-bit loads in the PTX for sm_90, no asynchronous copies of K
    and V). KV_ALIGN (16 where both head strides are multiples of 16) says so."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", DECODE_PTX], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loads = json.loads(done.stdout.strip().splitlines()[-1])  # PTX opcodes and their counts
    assert not any(op.startswith("ld.global.b16") for op in loads), loads
    assert loads.get("cp.async.cg.shared.global", 0) >= 64, loads  # K and V in 16-byte asynchronous copies


MERGE_PTXAS = """
import re, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from edgectx.kernels import decode_attention as da

fn = da._merge_kernel
sig = dict(M_IN="*fp32", L_IN="*fp32", ACC_IN="*fp32", OUT="*bf16", n_splits="i32", s_oh="i32")
consts = dict(GROUP=7, GROUP_PAD=16, HEAD_DIM=128, BLOCK_D=128, SPLITS_BLOCK=da.MERGE_SPLITS_BLOCK)
attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in ("M_IN", "L_IN", "ACC_IN", "OUT", "s_oh")}
kernel = triton.compile(ASTSource(fn, {**sig, **dict.fromkeys(consts, "constexpr")}, consts, attrs),
                        target=GPUTarget("cuda", 90, 32))
with open("merge.ptx", "w") as f:
    f.write(kernel.asm["ptx"])
report = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", "merge.ptx", "-o", "merge.cubin"],
                        capture_output=True, text=True, check=True).stderr
print(sum(int(n) for n in re.findall(r"(\\d+) bytes spill stores", report)))
"""


@pytest.mark.slow  # ~4 s of CPU: Triton's compiler and ptxas for sm_90
@pytest.mark.skipif(ON_GPU, reason="the GPU tests time the kernel itself")
def test_the_split_merge_keeps_its_tile_in_registers_for_any_number_of_kv_heads(tmp_path):
    """Found by review: the merge read every split at once, a tile of (splits rounded up to a power of two) x
    head_dim floats; splits fill 2 x 132 SMs over the KV heads, so a model with 2 KV heads (Qwen2.5 0.5B to 3B) had
    256 x 128 (ptxas: 255 registers and spills) and one KV head 512 x 128 (3.9 KB of spill stores a program). It
    now merges 32 splits at a time, whatever their number (tests above: 70 splits against the reference)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", MERGE_PTXAS], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) == 0, done.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_gpu_realistic(dtype):
    """A budget-sized context on the GPU: 8 KV heads of group 4, head_dim 128, 4608 keys, default splits."""
    q, k, v, positions = _case(8, 4, 128, 4608, dtype, seed=5)
    cos, sin = _tables(128, 4 * 4608 + 1)
    valid = torch.rand(8, 4608, device=DEVICE) > 0.1
    rope = dict(positions=positions, q_position=4 * 4608, cos=cos, sin=sin)
    out = decode_mod.decode_attention(q, k, v, valid=valid, **rope)
    ref = decode_attention_reference(q, k, v, valid=valid, **rope)
    assert (out.float() - ref.float()).abs().max().item() < ATOL[dtype]


C_COMPILER_MISSING = "Failed to find C compiler. Please specify via CC environment variable."


def test_a_failed_probe_launch_turns_the_kernels_off_with_one_warning(monkeypatch, fresh_probe, caplog):
    """Issue 21, defect 6: Triton imports fine on a machine without gcc or Python.h, then fails at its first launch
    (it compiles a C launcher). `available` tries one tiny launch first and says no, once."""
    tries = []

    def no_compiler(device):
        tries.append(device)
        raise RuntimeError(C_COMPILER_MISSING)

    monkeypatch.setattr(kernels, "_tiny_launch", no_compiler)
    with kernels.forced(), caplog.at_level("WARNING", logger="edgectx.kernels"):
        assert not kernels.available("cpu") and not kernels.available("cpu")
    assert tries == [torch.device("cpu")]  # probed once per device and process
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "Failed to find C compiler" in warnings[0] and "falls back to PyTorch" in warnings[0]


@pytest.mark.skipif(ON_GPU, reason="the probe on a GPU is the CUDA tests' own first launch")
def test_the_real_probe_launch_runs_through_the_interpreter(fresh_probe):
    with kernels.forced():
        assert kernels.available("cpu")
    assert kernels._probed == {"cpu"} and not kernels._broken


def test_a_device_named_with_or_without_its_index_shares_one_probe_and_one_off_switch(monkeypatch, fresh_probe):
    """`available(torch.device("cuda"))` and a failed launch on a tensor's "cuda:0" are the same GPU (the first GPU
    run found the switch keyed on two names: the kernels stayed on after a failure)."""
    monkeypatch.setattr(kernels, "_tiny_launch", lambda device: None)  # a GPU where one launch runs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert kernels._key("cuda") == kernels._key(torch.device("cuda", 0)) == "cuda:0" and kernels._key("cpu") == "cpu"
    kernels._disable("cuda:0", RuntimeError("a launch failed"))
    assert not kernels.available(torch.device("cuda"))


def test_a_launch_failing_mid_decode_answers_with_the_reference_and_stays_off(monkeypatch, fresh_probe, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError(C_COMPILER_MISSING)  # a new shape class compiling for the first time

    q, k, v, positions = _case(2, 4, 64, 100, torch.float32)
    valid = torch.rand(2, 100, device=DEVICE) > 0.2
    monkeypatch.setattr(decode_mod, "decode_attention", broken)
    monkeypatch.setattr(kernels, "_tiny_launch", lambda device: None)
    with kernels.forced(), caplog.at_level("WARNING", logger="edgectx.kernels"):
        assert kernels.available(DEVICE)
        out = kernels.decode(q, k, v, valid=valid, n_splits=3)
        assert not kernels.available(DEVICE)
    assert torch.equal(out, decode_attention_reference(q, k, v, valid=valid))
    assert len(caplog.records) == 1
    with pytest.raises(ValueError, match="do not group"):  # the caller's own errors are not the toolchain's
        monkeypatch.undo()
        kernels.decode(q, k[:, :, :32], v, valid=valid)


def test_memory_decode_falls_back_to_the_torch_path_when_the_probe_fails(tmp_path, monkeypatch, fresh_probe):
    """The whole decode on a machine whose Triton cannot launch: the torch path's logits, the kernel never called."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf", arch="llama", n_heads=6, n_kv_heads=2, dim=96, n_layers=1)
    gguf_file = open_gguf(path)
    spec = read_spec(gguf_file)
    model = load_model(gguf_file, DEVICE, torch.float32)
    config = MemoryConfig(budget_tokens=96, n_sink=4, n_local=32, block_size=16, top_k_blocks=2, cache_blocks=4,
                          chunk_tokens=32, n_observe=8, retrieve_every=2, evict_every=8)
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 258, 300)]
    monkeypatch.setenv("EDGECTX_KERNELS", "0")
    reference, _ = _decode_logits(model, spec, config, torch.float32, ids, 4)
    monkeypatch.delenv("EDGECTX_KERNELS")
    calls = []
    monkeypatch.setattr(kernels, "decode", lambda *a, **kw: calls.append(1))
    monkeypatch.setattr(kernels, "_tiny_launch", lambda device: (_ for _ in ()).throw(RuntimeError(C_COMPILER_MISSING)))
    with kernels.forced():
        fallback, _ = _decode_logits(model, spec, config, torch.float32, ids, 4)
    assert not calls and torch.equal(fallback, reference)
