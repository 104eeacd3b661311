"""The host block store: every token's pre-RoPE K and V for one layer, in host RAM, in fixed blocks.

InfLLM keeps the whole context in CPU memory in blocks and brings back the few that matter; this is
that store. Tokens are appended in order and kept in fixed-size segments (no reallocation of the whole
store as it grows, so a 128K context never needs twice its memory). A segment is laid out block-major,
(blocks, K|V, n_kv_heads, block_size, head_dim), so one block's K and V are one contiguous slab, laid out
as a device cache slot: bringing a block back is a single copy, and on CUDA (segments in pinned memory)
an asynchronous one. Each completed block gets a representative key (the mean of its keys per KV head,
in the device's dtype) that retrieval scores queries against; representatives live on the device.

On a CUDA device nothing in `append` waits for the GPU (issue 21): a partial block is *staged* in a device
buffer of one block, and a completed block is flushed to its pinned host slab by one asynchronous copy on
`copy_stream` (the stream that later copies blocks back, so a block is always written before it is read),
with its representative computed on the device. Two staging buffers take turns; the compute stream waits (an
event, not the host) for a buffer's last flush before writing it again. The whole blocks of a prefill chunk
skip the staging: laid out as slabs in one device buffer, flushed together (a copy per host segment). Host reads
of the store (`tokens`, `slab`, snapshots) first `settle` it: wait for the flushes and write the partial
block through. On the CPU the store is host memory already and `append` writes straight into it.

`gather` brings back each KV head's blocks by ids that stay on the device: on CUDA a Triton kernel reads them from
the pinned segments itself (edgectx.kernels.block_gather: no read of the ids, no pinned staging, no host memcpy;
a prefill chunk's retrieval then makes no sync), checked once by `device_gather`'s probe; on a CPU (a test of the
device path) the same with torch indexing.

    store = HostBlockStore(n_kv_heads=3, head_dim=64, block_size=128, device=torch.device("cpu"))
    store.append(k, v)           # (n_kv_heads, T, head_dim) each, pre-RoPE
    k, v = store.block(3)         # (n_kv_heads, 128, head_dim) in the host dtype
"""

from __future__ import annotations

import logging

import torch

from edgectx import kernels

log = logging.getLogger(__name__)


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device`, without stalling the host on CUDA: a copy from pageable memory waits
    for its stream to drain, one from pinned memory does not. On the CPU it is `t` itself."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


SEGMENT_BLOCKS = 32  # blocks per host segment: 4096 tokens at block_size 128


class HostBlockStore:
    def __init__(self, n_kv_heads: int, head_dim: int, block_size: int, device: torch.device,
                 host_dtype: torch.dtype = torch.float16, repr_dtype: torch.dtype = torch.float16,
                 copy_stream: "torch.cuda.Stream | None" = None, staged: bool | None = None):
        self.n_kv_heads, self.head_dim, self.block_size = n_kv_heads, head_dim, block_size
        self.device, self.host_dtype, self.repr_dtype = device, host_dtype, repr_dtype
        self.segment_blocks = SEGMENT_BLOCKS
        # Pinned (page-locked) host memory is what lets a host-to-device copy run asynchronously; CPU-only
        # builds cannot pin, and a CPU device has nothing to copy to.
        self.pin = device.type == "cuda" and torch.cuda.is_available()
        self.segments: list[torch.Tensor] = []  # each (segment_blocks, 2, n_kv_heads, block_size, head_dim)
        self._column_base: tuple | None = None  # next_column's (segment, its address, row bytes, rows)
        self.n_tokens = 0
        self.representatives = torch.empty(0, n_kv_heads, head_dim, device=device, dtype=repr_dtype)
        # Decided once: stage on the device (CUDA; tests may force it on a CPU to check it against the plain path).
        self.staged = device.type == "cuda" if staged is None else staged
        self.copy_stream = copy_stream if copy_stream is not None or not self.pin else torch.cuda.Stream(device)
        self._stage: torch.Tensor | None = None  # (2 buffers, 2 K|V, n_kv_heads, block_size, head_dim)
        self._flushed: list = [None, None]  # per buffer: the event its last flush recorded (CUDA)
        self._last_flush: "torch.cuda.Event | None" = None  # the last copy to the host (CUDA; the stream runs in order)
        self._offsets: tuple | None = None  # (segment addresses, their offsets on the device): `gather`'s
        self._gathered = False  # a kernel has read the pinned segments (CUDA): wait for it before releasing them
        if self.staged:
            self._stage = torch.empty(2, 2, n_kv_heads, block_size, head_dim, device=device, dtype=host_dtype)

    @property
    def segment_tokens(self) -> int:
        return self.segment_blocks * self.block_size

    @property
    def n_blocks(self) -> int:
        """Completed blocks (the last, partial block is not retrievable yet)."""
        return self.n_tokens // self.block_size

    def _new_segment(self) -> torch.Tensor:
        shape = (self.segment_blocks, 2, self.n_kv_heads, self.block_size, self.head_dim)
        return torch.empty(shape, dtype=self.host_dtype, pin_memory=self.pin)

    def _segment(self, seg: int) -> torch.Tensor:
        """Segment `seg`, allocated on demand (the next one after the last)."""
        if seg == len(self.segments):
            self.segments.append(self._new_segment())
        return self.segments[seg]

    def _slab(self, block: int) -> torch.Tensor:
        """Block `block`'s storage, (2, n_kv_heads, block_size, head_dim), contiguous; allocated on demand."""
        seg, b = divmod(block, self.segment_blocks)
        return self._segment(seg)[b]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append (n_kv_heads, T, head_dim) pre-RoPE keys and values; completes blocks and their representatives."""
        if self.staged:
            self._append_staged(k, v)
            return
        done_blocks = self.n_blocks
        written, total = 0, k.shape[1]
        while written < total:
            block, offset = divmod(self.n_tokens, self.block_size)
            n = min(total - written, self.block_size - offset)
            slab = self._slab(block)  # host memory: K and V are written (and rounded) in place
            slab[0, :, offset : offset + n] = k[:, written : written + n]
            slab[1, :, offset : offset + n] = v[:, written : written + n]
            written += n
            self.n_tokens += n
        self._completed(done_blocks)

    def load(self, k: torch.Tensor, v: torch.Tensor, representatives: torch.Tensor) -> None:
        """Fill an empty store from host tensors (a snapshot's): K and V (n_kv_heads, T, head_dim) written into the
        host segments where they lie, a segment at a time, with the blocks' `representatives` given (n_blocks,
        n_kv_heads, head_dim). The staged store's partial block also goes into its staging buffer, where the next
        tokens join it. `append` would send a staged store's every token through the device and back (1.3 GiB a
        layer at 128K tokens for an 8B model) and compute representatives the snapshot holds already."""
        if self.n_tokens:
            raise ValueError("load fills an empty store")
        total, bs = k.shape[1], self.block_size
        for t0 in range(0, total, self.segment_tokens):
            segment, n = self._segment(t0 // self.segment_tokens), min(self.segment_tokens, total - t0)
            whole, t1 = n // bs, t0 + n // bs * bs
            for i, x in enumerate((k, v)):  # segment layout (blocks, K|V, n_kv_heads, block_size, head_dim)
                segment[:whole, i] = x[:, t0:t1].unflatten(1, (whole, bs)).transpose(0, 1)
                if t1 < t0 + n:  # the last, partial block
                    segment[whole, i, :, : t0 + n - t1] = x[:, t1 : t0 + n]
        self.n_tokens = total
        self.representatives = representatives.to(self.device, self.repr_dtype)
        self._restage()

    def _restage(self) -> None:
        """The staged store's partial block, from host memory into its staging buffer, where the next tokens join it
        (after a load or a truncation)."""
        block, offset = divmod(self.n_tokens, self.block_size)
        if self.staged and offset:
            with torch.inference_mode():  # (buffers made during a forward are inference tensors)
                self._stage[block % 2][:, :, :offset].copy_(self._slab(block)[:, :, :offset])

    def next_column(self) -> tuple[int, tuple[int, int]]:
        """Where the next token's K and V go in host memory (CPU store only): the address of its first K row and
        (bytes between its rows, rows): n_kv K rows then n_kv V rows, the same tuple every time. A fused decode step
        writes them there itself, then `advance` counts the token."""
        block, offset = divmod(self.n_tokens, self.block_size)
        seg, b = divmod(block, self.segment_blocks)
        segment = self._segment(seg)
        if self._column_base is None or self._column_base[0] is not segment:
            row = self.head_dim * self.host_dtype.itemsize  # segments: (blocks, K|V, n_kv_heads, block_size, head_dim)
            self._column_base = (segment, segment.data_ptr(), row, (self.block_size * row, 2 * self.n_kv_heads))
        _, base, row, rows = self._column_base
        return base + ((b * 2) * self.n_kv_heads * self.block_size + offset) * row, rows

    def advance(self) -> None:
        """The token `next_column` (the staged store: `stage_row`) pointed at has been written."""
        if self.staged:
            block, offset = divmod(self.n_tokens, self.block_size)
            self.n_tokens += 1
            if offset + 1 == self.block_size:
                self._flushed[block % 2] = self._copy_out(block, self._stage[block % 2][None])
            return
        done_blocks = self.n_blocks
        self.n_tokens += 1
        self._completed(done_blocks)

    def stage_row(self) -> int:
        """Where the next token goes in the staging buffers (the staged store; a captured decode step writes it
        there, then `advance`), as a row of `stage_rows`: its first KV head's K row, the others at `stage_offsets`
        from it. A token that starts a block first makes the compute stream (not the host) wait for the buffer's last
        flush."""
        block, offset = divmod(self.n_tokens, self.block_size)
        if offset == 0 and self._flushed[block % 2] is not None:
            torch.cuda.current_stream(self.device).wait_event(self._flushed[block % 2])
        return (block % 2) * 2 * self.n_kv_heads * self.block_size + offset

    @property
    def stage_rows(self) -> torch.Tensor:
        """The staging buffers as rows of head_dim: (2 buffers x K|V x n_kv_heads x block_size, head_dim)."""
        return self._stage.view(-1, self.head_dim)

    def stage_offsets(self) -> torch.Tensor:
        """(2 x n_kv_heads,) the rows of a token's K heads then V heads from its `stage_row`, on the device."""
        heads = torch.arange(self.n_kv_heads, device=self.device) * self.block_size
        return torch.cat((heads, heads + self.n_kv_heads * self.block_size))

    def _completed(self, done_blocks: int) -> None:
        """Representatives for the blocks completed since there were `done_blocks`."""
        if self.n_blocks > done_blocks:
            reps = [self._slab(b)[0].float().mean(dim=1) for b in range(done_blocks, self.n_blocks)]
            new = torch.stack(reps).to(self.repr_dtype)  # (new_blocks, n_kv, d)
            if self.device.type != "cpu":
                new = new.to(self.device)
            self.representatives = torch.cat((self.representatives, new))

    def _append_staged(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """The device path: a partial block goes on in its staging buffer (flushed when it completes), whole blocks
        go straight from `k` and `v`, flushed together: a prefill chunk of 2,048 tokens is one flush, not 16."""
        written, total = 0, k.shape[1]
        offset = self.n_tokens % self.block_size
        if offset:
            written = self._stage_tokens(k, v, 0, min(total, self.block_size - offset))
        whole = (total - written) // self.block_size
        if whole:
            self._flush_blocks(k[:, written : written + whole * self.block_size],
                               v[:, written : written + whole * self.block_size])
            written += whole * self.block_size
        if written < total:
            self._stage_tokens(k, v, written, total - written)

    def _stage_tokens(self, k: torch.Tensor, v: torch.Tensor, start: int, n: int) -> int:
        """Tokens [start, start + n) of `k` and `v` into the current block's staging buffer (they fit in that
        block); flushed if they complete it. Returns start + n."""
        block, offset = divmod(self.n_tokens, self.block_size)
        buf = self._stage[block % 2]
        if offset == 0 and self._flushed[block % 2] is not None:
            torch.cuda.current_stream(self.device).wait_event(self._flushed[block % 2])  # its last flush read it
        buf[0, :, offset : offset + n] = k[:, start : start + n]
        buf[1, :, offset : offset + n] = v[:, start : start + n]
        self.n_tokens += n
        if offset + n == self.block_size:
            self._flushed[block % 2] = self._copy_out(block, buf[None])
        return start + n

    def _flush_blocks(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Whole blocks (k and v (n_kv_heads, m * block_size, head_dim), starting a block) laid out as slabs in one
        device buffer and copied out together: one copy per host segment they touch."""
        m = k.shape[1] // self.block_size
        kv = torch.empty(m, 2, self.n_kv_heads, self.block_size, self.head_dim, device=self.device, dtype=self.host_dtype)
        kv[:, 0] = k.unflatten(1, (m, self.block_size)).transpose(0, 1)
        kv[:, 1] = v.unflatten(1, (m, self.block_size)).transpose(0, 1)
        first = self.n_tokens // self.block_size
        self.n_tokens += m * self.block_size
        self._copy_out(first, kv)
        if self.copy_stream is not None:  # the buffer lives until the copies have read it
            kv.record_stream(self.copy_stream)

    def _copy_out(self, first: int, kv: torch.Tensor) -> "torch.cuda.Event | None":
        """Slabs `kv` (m, 2, n_kv_heads, block_size, head_dim) on the device become blocks first.. first + m: their
        representatives, computed on the device, and their host copies, asynchronous on `copy_stream` (an event
        returned for the last one; None on a CPU test of this path, where the copies are plain)."""
        rep = kv[:, 0].float().mean(dim=2).to(self.repr_dtype)  # (m, n_kv, d), on the device
        self.representatives = torch.cat((self.representatives, rep))
        stream = self.copy_stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))  # the blocks' last writes come first
        block, end = first, first + kv.shape[0]
        with torch.cuda.stream(stream):  # a no-op for None (a CPU test of this path: plain copies)
            while block < end:  # one copy per segment touched
                seg, b = divmod(block, self.segment_blocks)
                n = min(end - block, self.segment_blocks - b)
                self._segment(seg)[b : b + n].copy_(kv[block - first : block - first + n], non_blocking=stream is not None)
                block += n
            if stream is None:
                return None
            event = torch.cuda.Event()
            event.record(stream)
        self._last_flush = event
        return event

    def settle(self) -> None:
        """Make host memory hold every token (waits for the flushes and copies the partial block; staged path only).
        For host reads: snapshots, truncation, rebuilding tiers, the CPU-side block copies."""
        if not self.staged:
            return
        if self._last_flush is not None:
            self._last_flush.synchronize()
        block, offset = divmod(self.n_tokens, self.block_size)
        if offset:
            with torch.inference_mode():  # segments made during a forward are inference tensors
                self._slab(block)[:, :, :offset].copy_(self._stage[block % 2][:, :, :offset])

    def slab(self, block: int) -> torch.Tensor:
        """A completed block's K and V as one contiguous (2, n_kv_heads, block_size, head_dim) view of host memory."""
        if not 0 <= block < self.n_blocks:
            raise IndexError(f"block {block} is not a completed block (have {self.n_blocks})")
        if self._last_flush is not None:
            self._last_flush.synchronize()  # staged on CUDA: the flush that wrote it may still be under way
        return self._slab(block)

    def block(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A completed block's (K, V), each (n_kv_heads, block_size, head_dim), views of host memory."""
        kv = self.slab(block)
        return kv[0], kv[1]

    def tokens(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of tokens start..end (any range within the store), each (n_kv_heads, end - start, head_dim)."""
        if not 0 <= start <= end <= self.n_tokens:
            raise IndexError(f"tokens {start}..{end} outside the store's {self.n_tokens}")
        self.settle()
        parts = []
        pos = start
        while pos < end:
            block, offset = divmod(pos, self.block_size)
            n = min(end - pos, self.block_size - offset)
            parts.append(self._slab(block)[:, :, offset : offset + n])  # (2, n_kv, n, d)
            pos += n
        if not parts:
            empty = torch.empty(self.n_kv_heads, 0, self.head_dim, dtype=self.host_dtype)
            return empty, empty.clone()
        kv = torch.cat(parts, dim=2)
        return kv[0], kv[1]

    def truncate(self, n_tokens: int) -> None:
        """Forget tokens from `n_tokens` on; segments past the end are released."""
        self.settle()
        self._gathers_done()
        self.n_tokens = min(self.n_tokens, n_tokens)
        keep_segments = -(-self.n_tokens // self.segment_tokens)
        del self.segments[keep_segments:]
        self._column_base = None  # it may name a segment just released
        self.representatives = self.representatives[: self.n_blocks]
        self._restage()  # the partial block goes on from its staging buffer

    def release(self) -> None:
        """Drop every segment (the memory is reset): pinned pages go back to the allocator at once rather than
        whenever the last reference to this store goes away."""
        self.settle()
        self._gathers_done()
        self.segments.clear()
        self._column_base = None
        self.n_tokens = 0
        self.representatives = self.representatives[:0]

    def gather(self, blocks: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor) -> None:
        """K and V of each KV head's completed blocks `blocks` (n_kv, k), ids on the device, into k_out and v_out
        (n_kv, k * block_size, head_dim), converted to their dtypes; nothing is read back. On CUDA the kernel runs
        after the flushes queued so far (an event the compute stream waits on, not the host); call only where
        `device_gather` is true there."""
        n_kv, k = blocks.shape
        if k == 0:
            return
        if self.device.type == "cuda":
            if self._last_flush is not None:
                torch.cuda.current_stream(self.device).wait_event(self._last_flush)
            from edgectx.kernels.block_gather import gather_blocks

            gather_blocks(self.segments[0], self._segment_offsets(), blocks, k_out, v_out, self.segment_blocks)
            self._gathered = True
            return
        seg, b = blocks.div(self.segment_blocks, rounding_mode="floor"), blocks.remainder(self.segment_blocks)
        heads = torch.arange(n_kv, device=blocks.device)[:, None].expand(n_kv, k)
        picked = None  # (n_kv, k, 2, block_size, head_dim): each segment's picks where the ids name it
        for i, segment in enumerate(self.segments):
            part = segment[b, :, heads]
            picked = part if picked is None else torch.where((seg == i)[..., None, None, None], part, picked)
        k_out.view(n_kv, k, self.block_size, self.head_dim).copy_(picked[:, :, 0])
        v_out.view(n_kv, k, self.block_size, self.head_dim).copy_(picked[:, :, 1])

    def gather_ids(self, ids: list[int], n_kv: int, k_out: torch.Tensor, v_out: torch.Tensor) -> None:
        """`gather` for ids on the host, row-major (n_kv, k) as Python ints, from a store in the memory that reads
        it (a CPU's): one indexing of each host segment touched, written into k_out and v_out (n_kv, k *
        block_size, head_dim), converted to their dtypes."""
        k = len(ids) // n_kv
        if k == 0:
            return
        by_segment: dict[int, tuple[list[int], list[int], list[int]]] = {}  # segment -> (its blocks, heads, columns)
        for i, block in enumerate(ids):
            seg, b = divmod(block, self.segment_blocks)
            blocks, heads, columns = by_segment.setdefault(seg, ([], [], []))
            blocks.append(b), heads.append(i // k), columns.append(i % k)
        self.settle()
        k_view = k_out.view(n_kv, k, self.block_size, self.head_dim)
        v_view = v_out.view(n_kv, k, self.block_size, self.head_dim)
        for seg, (blocks, heads, columns) in by_segment.items():
            head = torch.tensor(heads)
            picked = self.segments[seg][torch.tensor(blocks), :, head]  # (n, 2, block_size, head_dim)
            where = (head, torch.tensor(columns))
            k_view.index_put_(where, picked[:, 0].to(k_out.dtype))
            v_view.index_put_(where, picked[:, 1].to(v_out.dtype))

    def _segment_offsets(self) -> torch.Tensor:
        """The segments' distances from the first, in elements, on the device; uploaded again when one is added."""
        where = tuple(s.data_ptr() for s in self.segments)
        if self._offsets is None or self._offsets[0] != where:
            from edgectx.kernels.block_gather import segment_offsets

            self._offsets = (where, upload(torch.tensor(segment_offsets(self.segments)), self.device))
        return self._offsets[1]

    def _gathers_done(self) -> None:
        """Before segments are released: the kernels that read them have finished (CUDA)."""
        if self._gathered:
            torch.cuda.current_stream(self.device).synchronize()
            self._gathered = False

    @property
    def host_bytes(self) -> int:
        """Bytes of K and V held, counting whole allocated segments."""
        return sum(s.numel() * s.element_size() for s in self.segments)

    @property
    def device_gather(self) -> bool:
        """Whether `gather` may serve retrievals here: a CPU (torch indexing), or CUDA where a probe of the kernel
        reading pinned memory, tried once a process, gave the blocks it should."""
        if self.device.type != "cuda":
            return True
        return device_gather_works(self.device, (self.host_dtype, self.n_kv_heads, self.block_size, self.head_dim))

    @property
    def used_bytes(self) -> int:
        return 2 * self.n_tokens * self.n_kv_heads * self.head_dim * self.segments[0].element_size() if self.segments else 0

    @property
    def repr_bytes(self) -> int:
        return self.representatives.numel() * self.representatives.element_size()


_gather_probe: dict[tuple, bool] = {}
PROBE_LAYOUT = (torch.float16, 2, 4, 16)  # (host dtype, KV heads, block size, head_dim): a tiny store's


def device_gather_works(device: torch.device, layout: tuple = PROBE_LAYOUT) -> bool:
    """One gather from two pinned allocations of a store's `layout` checked against indexing on the host (once per
    device and layout: the launch compiles the kernel a retrieval of that store runs, so a compile that fails
    fails here, not mid-prefill); False, with one warning a device, if Triton cannot launch, the kernel fails, or it
    reads the wrong bytes (memory not mapped at its host address): retrieval then reads the block ids and copies
    through a pinned buffer, as before."""
    name = kernels._key(device)
    if (name, layout) not in _gather_probe:
        ok, why = False, "Triton is off or cannot launch"
        if kernels.available(device):
            try:
                ok = _probe_gather(torch.device(name), layout)
                why = "it read the wrong bytes"
            except Exception as e:  # noqa: BLE001 - whatever the driver or the toolchain raises
                why = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        if not ok and not any(key[0] == name and not works for key, works in _gather_probe.items()):
            log.warning("Retrieved blocks cannot be read from pinned memory by a kernel on %s (%s); a retrieval "
                        "reads its block ids back and copies through a pinned buffer instead.", name, why)
        _gather_probe[name, layout] = ok
    return _gather_probe[name, layout]


def _probe_gather(device: torch.device, layout: tuple) -> bool:
    from edgectx.kernels.block_gather import gather_blocks, segment_offsets

    dtype, n_kv, block_size, head_dim = layout
    gen = torch.Generator().manual_seed(0)
    shape = (2, 2, n_kv, block_size, head_dim)  # (blocks, K|V, n_kv, block_size, head_dim): two blocks a segment
    segments = [torch.randn(shape, generator=gen).to(dtype).pin_memory() for _ in range(2)]
    blocks = torch.tensor([[3, 0], [1, 2]] * n_kv)[:n_kv]  # each head its own two blocks, across both segments
    k_out = torch.empty(n_kv, 2 * block_size, head_dim, dtype=dtype, device=device)
    v_out = torch.empty_like(k_out)
    gather_blocks(segments[0], torch.tensor(segment_offsets(segments), device=device), blocks.to(device),
                  k_out, v_out, segment_blocks=2)
    torch.cuda.synchronize(device)
    for h in range(n_kv):
        for j, block in enumerate(blocks[h].tolist()):
            kv, cols = segments[block // 2][block % 2], slice(j * block_size, (j + 1) * block_size)
            if not (torch.equal(k_out[h, cols].cpu(), kv[0, h]) and torch.equal(v_out[h, cols].cpu(), kv[1, h])):
                return False
    return True
