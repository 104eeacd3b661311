"""Retrieved blocks gathered by ids on the device (issue 21): the Triton kernel that reads the pinned host store
(through Triton's interpreter on a CPU, compiled on a GPU), the store's torch gather it is checked against, and
the probe that turns it off where a GPU cannot read pinned memory at its host address."""

from __future__ import annotations

import logging

import pytest
import torch

from edgectx import kernels
from edgectx.memory import block_store
from edgectx.memory.block_store import HostBlockStore

N_KV, BLOCK, HEAD_DIM = 3, 8, 16
ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")  # the kernel's: compiled on a GPU, the interpreter on a CPU


def _store(device: torch.device, host_dtype: torch.dtype, n_blocks: int = 11) -> HostBlockStore:
    """A store of `n_blocks` whole blocks and a partial one over segments of 2 blocks (six separate allocations)."""
    store = HostBlockStore(N_KV, HEAD_DIM, BLOCK, device, host_dtype=host_dtype, repr_dtype=host_dtype)
    store.segment_blocks = 2
    gen = torch.Generator().manual_seed(0)
    for n in (5, 3 * BLOCK, n_blocks * BLOCK - 5 - 3 * BLOCK + 3):  # crossing blocks and segments unevenly
        k, v = (torch.randn(N_KV, n, HEAD_DIM, generator=gen).to(device) for _ in range(2))
        store.append(k, v)
    assert store.n_blocks == n_blocks and len(store.segments) == 6
    return store


def _expected(store: HostBlockStore, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ks, vs = [], []
    for h, row in enumerate(blocks.tolist()):
        ks.append(torch.cat([store.block(b)[0][h] for b in row]))
        vs.append(torch.cat([store.block(b)[1][h] for b in row]))
    return torch.stack(ks), torch.stack(vs)


BLOCKS = [[0, 5, 10, 3], [9, 9, 1, 2], [4, 7, 6, 8]]  # per KV head, any order, a block twice


@pytest.mark.parametrize("host_dtype,out_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_the_kernel_reads_each_heads_blocks_across_segments(host_dtype, out_dtype):
    """Each KV head's own blocks, from six allocations at negative and positive distances from the first, into
    outputs whose heads are further apart than their columns (a context's retrieved columns), converted."""
    from edgectx.kernels.block_gather import gather_blocks, segment_offsets

    store = _store(torch.device("cpu"), host_dtype)
    if ON_GPU:  # the segments as a CUDA store holds them: pinned, read over the bus
        store.segments = [segment.pin_memory() for segment in store.segments]
    blocks = torch.tensor(BLOCKS, device=DEVICE)
    offsets = torch.tensor(segment_offsets(store.segments), device=DEVICE)
    k_ctx = torch.full((N_KV, 50 + 4 * BLOCK, HEAD_DIM), -7.0, dtype=out_dtype, device=DEVICE)
    v_ctx = torch.full_like(k_ctx, -7.0)
    gather_blocks(store.segments[0], offsets, blocks, k_ctx[:, 50:], v_ctx[:, 50:], store.segment_blocks)
    k_ctx, v_ctx = k_ctx.cpu(), v_ctx.cpu()
    k_want, v_want = _expected(store, blocks.cpu())
    assert torch.equal(k_ctx[:, 50:], k_want.to(out_dtype)) and torch.equal(v_ctx[:, 50:], v_want.to(out_dtype))
    assert (k_ctx[:, :50] == -7).all() and (v_ctx[:, :50] == -7).all()  # nothing written outside its columns


def test_the_stores_torch_gather_is_the_kernels_oracle():
    store = _store(torch.device("cpu"), torch.float16)
    blocks = torch.tensor(BLOCKS)
    k_out, v_out = torch.empty(N_KV, 4 * BLOCK, HEAD_DIM), torch.empty(N_KV, 4 * BLOCK, HEAD_DIM)
    store.gather(blocks, k_out, v_out)
    k_want, v_want = _expected(store, blocks)
    assert torch.equal(k_out, k_want.float()) and torch.equal(v_out, v_want.float())
    store.gather(blocks[:, :0], k_out[:, :0], v_out[:, :0])  # nothing selected: nothing to do


def test_the_kernel_refuses_outputs_of_the_wrong_shape():
    from edgectx.kernels.block_gather import gather_blocks

    store = _store(torch.device("cpu"), torch.float16)
    out = torch.empty(N_KV, 3 * BLOCK, HEAD_DIM)
    with pytest.raises(ValueError, match="shapes do not match"):
        gather_blocks(store.segments[0], torch.zeros(6, dtype=torch.long), torch.tensor(BLOCKS), out, out, 2)


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(block_store, "_gather_probe", {})


@pytest.mark.parametrize("failure", ["no triton", "raises", "wrong bytes"])
def test_a_gpu_whose_kernel_cannot_read_pinned_memory_copies_as_before(monkeypatch, fresh, caplog, failure):
    """The probe (once per device): Triton off, a launch that raises, or bytes that differ (memory not mapped at its
    host address) -> one warning, and the memory keeps reading block ids back to copy them."""
    monkeypatch.setattr(kernels, "available", lambda device: failure != "no triton")

    def probe(device, layout):
        if failure == "raises":
            raise RuntimeError("Pointer argument cannot be accessed from Triton (cpu tensor?)")
        return False

    monkeypatch.setattr(block_store, "_probe_gather", probe)
    with caplog.at_level(logging.WARNING, logger="edgectx.memory.block_store"):
        assert not block_store.device_gather_works(torch.device("cuda", 0))
        assert not block_store.device_gather_works(torch.device("cuda"))  # the same device: no second probe
    assert len(caplog.records) == 1 and "pinned memory" in caplog.records[0].getMessage()


def test_a_gpu_whose_probe_passes_gathers_on_the_device(monkeypatch, fresh):
    monkeypatch.setattr(kernels, "available", lambda device: True)
    calls = []
    monkeypatch.setattr(block_store, "_probe_gather", lambda device, layout: calls.append(device) or True)
    assert block_store.device_gather_works(torch.device("cuda", 0)) and block_store.device_gather_works(torch.device("cuda", 0))
    assert len(calls) == 1


@pytest.mark.parametrize("layout", [block_store.PROBE_LAYOUT, (torch.bfloat16, 8, 128, 128)])
def test_the_probe_gathers_a_store_of_the_memorys_own_layout(monkeypatch, layout):
    """The probe launches the kernel a retrieval of that store will (dtype, KV heads, block size and head_dim are
    its constexprs), so that a compile failing for an 8B model's layout turns the device gather off at the probe,
    not in the middle of a prefill (the probe used to gather a tiny float16 store only). Run here through the
    interpreter: pinned memory is the CPU's own, and a bad read is caught."""
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: t)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    assert block_store._probe_gather(torch.device("cpu"), layout)
    import edgectx.kernels.block_gather as bg

    real = bg.gather_blocks

    def swapped(base, offsets, blocks, k, v, segment_blocks):  # each head's two blocks in the wrong columns
        real(base, offsets, blocks.flip(1), k, v, segment_blocks)

    monkeypatch.setattr(bg, "gather_blocks", swapped)
    assert not block_store._probe_gather(torch.device("cpu"), layout)


def test_the_store_probes_its_own_layout(monkeypatch, fresh):
    monkeypatch.setattr(kernels, "available", lambda device: True)
    seen = []
    monkeypatch.setattr(block_store, "_probe_gather", lambda device, layout: seen.append(layout) or True)
    store = HostBlockStore(8, 128, 128, torch.device("cpu"), host_dtype=torch.bfloat16)
    store.device = torch.device("cuda", 0)  # (the property only reads the device; nothing is allocated)
    assert store.device_gather and seen == [(torch.bfloat16, 8, 128, 128)]


@pytest.mark.gpu
def test_the_kernel_reads_the_pinned_store_on_a_gpu():
    """On CUDA: the staged store's pinned segments, read by the compiled kernel right after their flushes (the
    kernel waits for them on the device), equal the blocks read on the host; the real probe passes."""
    device = torch.device("cuda")
    assert block_store.device_gather_works(device)
    store = _store(device, torch.bfloat16)
    assert store.staged and store.segments[0].is_pinned() and store.device_gather
    blocks = torch.tensor(BLOCKS, device=device)
    k_out = torch.empty(N_KV, 4 * BLOCK, HEAD_DIM, dtype=torch.bfloat16, device=device)
    v_out = torch.empty_like(k_out)
    store.gather(blocks, k_out, v_out)
    k_want, v_want = _expected(store, blocks.cpu())  # (settles: waits for the flushes on the host)
    assert torch.equal(k_out.cpu(), k_want) and torch.equal(v_out.cpu(), v_want)
    store.release()  # waits for the kernel before the pinned segments go
    assert not store._gathered
