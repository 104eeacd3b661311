"""Device-side buffers of one layer's ContextMemory: the resident tokens and the assembled context.

`Resident` holds sinks + retained + window per KV head, pre-RoPE, sorted by original index, with the
eviction scores; it grows in place and is compacted by `keep`. `Assembly` is what attention reads:
resident tokens and retrieved blocks with keys rotated at their assigned positions, plus room past
its committed length where the current chunk is written before commit (so decoding appends in place
instead of re-rotating the whole context every step).

    r = Resident(n_kv=3, head_dim=64, device=cpu, dtype=torch.float16)  # K and V in the KV dtype
    r.append(k, v, idx, scores); r.keep(cols, headroom=513)
"""

from __future__ import annotations

import torch

from edgectx.model.kv import chunk_mask

AHEAD = 64  # columns whose original indices are written ahead of the decode steps that fill them


class _Ahead:
    """Original indices written ahead into the columns that a run of decode steps fills, column c getting index
    c + offset (a step's token is the next index at the next column), so that a step writes none itself: one
    small write per layer and step cost 5 µs, a tenth of a fused step's Python. The owner calls `reset` whenever
    anything else writes those columns or replaces the buffer."""

    def __init__(self):
        self.state: tuple | None = None  # (idx buffer, first column, end column, index - column)

    def reset(self) -> None:
        self.state = None

    def ensure(self, idx: torch.Tensor, col: int, index: int, zeros: tuple[torch.Tensor, ...] = ()) -> int:
        """Make column `col` of `idx` hold `index`, writing it and the next columns' ahead if they do not; `zeros`:
        buffers whose same columns are zeroed with them. -> how many columns from `col` on hold theirs."""
        s = self.state
        if s is None or s[0] is not idx or not s[1] <= col < s[2] or s[3] != index - col:
            end = min(idx.shape[1], col + AHEAD)
            idx[:, col:end] = torch.arange(index, index + end - col, device=idx.device)
            for t in zeros:
                t[:, col:end] = 0
            s = self.state = (idx, col, end, index - col)
        return s[2] - col


class Resident:
    def __init__(self, n_kv: int, head_dim: int, device: torch.device, dtype: torch.dtype):
        self.n_kv, self.head_dim, self.device, self.dtype = n_kv, head_dim, device, dtype
        self.n = 0
        self._bases: tuple | None = None  # next_column's: (the K buffer they are of, its address, row bytes, rows)
        self._ahead = _Ahead()  # a decode step's index and (zero) score, written ahead
        self._alloc(256)

    def _alloc(self, capacity: int) -> None:
        # K and V in one buffer, (2, n_kv, capacity, head_dim): a token's K rows and V rows evenly spaced, so that a
        # fused step writes both with one copy (next_column)
        self.k, self.v = torch.empty(2, self.n_kv, capacity, self.head_dim, device=self.device, dtype=self.dtype).unbind(0)
        self.idx = torch.empty(self.n_kv, capacity, device=self.device, dtype=torch.long)
        self.score = torch.empty(self.n_kv, capacity, device=self.device, dtype=torch.float32)
        self._ahead.reset()

    def reserve(self, n_total: int) -> None:
        if n_total <= self.k.shape[1]:
            return
        old = (self.k, self.v, self.idx, self.score)
        self._alloc(max(n_total, 2 * self.k.shape[1]))
        for new, prev in zip((self.k, self.v, self.idx, self.score), old):
            new[:, : self.n] = prev[:, : self.n]

    def append(self, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, score: torch.Tensor) -> None:
        """Append (n_kv, T, d) k and v, (n_kv, T) idx and score."""
        n_new = k.shape[1]
        self.reserve(self.n + n_new)
        end = self.n + n_new
        self.k[:, self.n : end], self.v[:, self.n : end] = k, v
        self.idx[:, self.n : end], self.score[:, self.n : end] = idx, score
        self.n = end
        self._ahead.reset()

    def truncate(self, n: int) -> None:
        """Keep the first `n` columns (a cut of the conversation that every head's tiers share)."""
        self.n = n
        self._ahead.reset()

    def next_column(self) -> tuple[int, tuple[int, int]]:
        """Where the next token's K and V go (a fused decode step writes them): the address of its first K row and
        (bytes between its rows, rows): n_kv K rows then n_kv V rows, one tuple for as long as the buffer stays.
        Then `advance` records its index and score."""
        self.reserve(self.n + 1)
        if self._bases is None or self._bases[0] is not self.k:
            step = self.head_dim * self.k.element_size()
            self._bases = (self.k, self.k.data_ptr(), step, (self.k.shape[1] * step, 2 * self.n_kv))
        _, k_ptr, step, rows = self._bases
        return k_ptr + self.n * step, rows

    def next_index(self) -> int:
        """The column the next token's K and V go to (a captured decode step writes them there; then `advance`)."""
        self.reserve(self.n + 1)
        return self.n

    def room(self) -> int:
        """Tokens that fit before the buffers grow."""
        return self.k.shape[1] - self.n

    def indexed_ahead(self, index: int) -> int:
        """How many of the next columns hold their decode steps' indices (from `index` on) and zero scores."""
        return self._ahead.ensure(self.idx, self.n, index, (self.score,))

    def advance(self, idx: int, score: torch.Tensor | None) -> None:
        """The token `next_column` pointed at has been written: its original index, its scores (n_kv, 1) or None
        for zeros (written ahead with the indices)."""
        self._ahead.ensure(self.idx, self.n, idx, (self.score,))
        if score is not None:
            self.score[:, self.n : self.n + 1] = score
        self.n += 1

    def gather(self, cols: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(k, v, idx, score) of columns `cols` (n_kv, m) per head. K and V as rows of their (n_kv x capacity,
        head_dim) views picked by `index_select`: `gather` with the index widened over head_dim reads an index per
        element (0.41 against 0.03 ms for 3 x 1,600 of 2,700 columns, each eviction of every layer)."""
        n_kv, capacity = cols.shape[0], self.k.shape[1]
        rows = (cols + torch.arange(n_kv, device=cols.device)[:, None] * capacity).flatten()
        k, v = (t.view(-1, self.head_dim).index_select(0, rows).view(n_kv, -1, self.head_dim) for t in (self.k, self.v))
        return k, v, self.idx.gather(1, cols), self.score.gather(1, cols)

    def keep(self, cols: torch.Tensor, headroom: int) -> None:
        """Keep only columns `cols` (n_kv, m), in that order; room for `headroom` more tokens."""
        self.rebuild([self.gather(cols)], headroom)

    def rebuild(self, parts: list[tuple], headroom: int) -> None:
        """Refill from parts: (k, v, idx, score) tuples, or (k, v, first_index) runs of consecutive tokens
        read back from the host store (their scores restart at zero)."""
        full = []
        for part in parts:
            if len(part) == 3:
                k, v, first = part
                idx = torch.arange(first, first + k.shape[1], device=self.device).expand(self.n_kv, -1)
                part = (k.to(self.device, self.dtype), v.to(self.device, self.dtype), idx,
                        torch.zeros(self.n_kv, k.shape[1], device=self.device))
            full.append(part)
        self._make_room(sum(p[0].shape[1] for p in full) + headroom)
        for part in full:
            self.append(*part)

    def refill(self, n: int, headroom: int) -> tuple[torch.Tensor, ...]:
        """Hold `n` columns the caller writes, with room for `headroom` more (an eviction of every layer at once,
        edgectx.memory.together.evict, from copies it gathered): their (k, v, idx, score) views."""
        self._make_room(n + headroom)
        self.n = n
        return self.k[:, :n], self.v[:, :n], self.idx[:, :n], self.score[:, :n]

    def _make_room(self, need: int) -> None:
        """Empty, with room for `need` columns. What is refilled is a copy already (gathered, read back): the buffers
        are refilled in place where they fit, not much bigger, so that an eviction keeps them where a captured decode
        step writes (edgectx.memory.graph_step)."""
        self.n = 0
        self._ahead.reset()
        writable = torch.is_inference_mode_enabled() or not self.k.is_inference()  # (a truncation runs outside it)
        if not (writable and need <= self.k.shape[1] <= need + 2 * REUSE_SLACK):
            self._alloc(need)

    @property
    def device_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.idx, self.score))


# At most this many columns of room for the decode steps ahead (Assembly's `ahead`), and twice that, how much bigger
# than its need a reused context may be: the decode steps between two evictions grow the resident tokens by up to
# `evict_every` (64), and every retrieval among them then takes over the same buffers (a new 4 MB context per layer
# at each retrieval, its pages touched for the first time, cost a third of a retrieval step at 4,096 tokens)
REUSE_SLACK = 64  # edgectx.memory.plan.DECODE_ROOM counts the room


class Assembly:
    """One layer's attention context: `length` committed keys (rotated) and values, room for more."""

    def __init__(self, k_rot: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor | None,
                 next_pos: int, key: tuple, n_resident: int, headroom: int, dtype: torch.dtype | None = None,
                 reuse: "Assembly | None" = None, always_valid: bool = False):
        """`dtype`: what the context holds (default k_rot's); k_rot and v are converted as they are copied in.
        `reuse`: the context this one replaces, whose buffers it takes over when they are big enough and at most
        2 x REUSE_SLACK columns bigger (its data is overwritten): a context rebuilt at every retrieval then keeps its
        addresses and shapes, so the decode step captured as a CUDA graph over it replays instead of being captured
        again. `always_valid`: hold a validity buffer even when every column is valid (all true), so that its presence
        does not change either."""
        n_kv, n_keys, head_dim = k_rot.shape
        self._allocate(n_kv, n_keys, head_dim, headroom, dtype or k_rot.dtype, dtype or v.dtype, k_rot.device, reuse)
        self.k[:, :n_keys], self.v[:, :n_keys], self.idx[:, :n_keys] = k_rot, v, idx
        self.finish(n_keys, valid, next_pos, key, n_resident, always_valid)

    @classmethod
    def empty(cls, n_kv: int, n_keys: int, head_dim: int, headroom: int, dtype: torch.dtype, device: torch.device,
              reuse: "Assembly | None" = None, ahead: int = 0) -> "Assembly":
        """Buffers for `n_keys` columns and `headroom` more (`reuse`'s, as in the constructor), not yet filled: the
        caller writes k, v and idx in place (no staging copy of the whole context), then calls `finish`. `ahead`:
        columns the rebuilds of this context may add before it shrinks again (decode steps' tokens), room the buffers
        must have besides `headroom`."""
        asm = cls.__new__(cls)
        asm._allocate(n_kv, n_keys, head_dim, headroom, dtype, dtype, device, reuse, ahead)
        return asm

    def _allocate(self, n_kv: int, n_keys: int, head_dim: int, headroom: int, k_dtype: torch.dtype,
                  v_dtype: torch.dtype, device: torch.device, reuse: "Assembly | None", ahead: int = 0) -> None:
        capacity = n_keys + headroom
        if reuse is not None and capacity + ahead <= reuse.capacity <= capacity + 2 * REUSE_SLACK \
                and reuse.k.shape[0] == n_kv \
                and (reuse.k.dtype, reuse.v.dtype, reuse.k.device) == (k_dtype, v_dtype, device):
            self.k, self.v, self.idx, self._valid_buf = reuse.k, reuse.v, reuse.idx, reuse._valid_buf
        else:
            capacity += ahead
            self.k = torch.empty(n_kv, capacity, head_dim, dtype=k_dtype, device=device)
            self.v = torch.empty(n_kv, capacity, head_dim, dtype=v_dtype, device=device)
            self.idx = torch.empty(n_kv, capacity, dtype=torch.long, device=device)
            self._valid_buf = None
        self._ahead = _Ahead()  # a decode step's index, written ahead (`index_column`)

    def finish(self, n_keys: int, valid: torch.Tensor | None, next_pos: "int | torch.Tensor", key: tuple, n_resident: int,
               always_valid: bool = False, bound: int | None = None) -> None:
        """The first `n_keys` columns are written: take `valid` (n_kv, n_keys) or None (all valid) and the rest.
        `bound`: where `next_pos` is a device count, a host bound on it (`position_bound`)."""
        if isinstance(next_pos, torch.Tensor) and bound is None:
            raise ValueError("a position counted on the device needs a bound known on the host")
        if valid is not None or always_valid:
            valid_buf = self._valid_buf
            if valid_buf is None or valid_buf.shape[1] != self.capacity:
                valid_buf = torch.ones(self.k.shape[0], self.capacity, dtype=torch.bool, device=self.k.device)
            else:
                valid_buf[:, n_keys:] = True  # columns written later are valid until a rebuild says otherwise
            valid_buf[:, :n_keys] = True if valid is None else valid
            self._valid_buf = valid_buf  # all true where `valid` is None; kept for the next rebuild either way
        self.valid = self._valid_buf if valid is not None else None  # None: every column valid (attention needs no mask)
        self.length = n_keys
        self._next_pos = next_pos  # position the next token takes (see `next_pos`)
        self._pos_bound = bound  # >= _next_pos while that is a device count (moves with it)
        self.key = key  # (resident version, retrieved blocks): what this assembly was built from
        self.n_resident = n_resident  # columns [0, n_resident) and [n_keys_at_build, length) are resident tokens
        self.n_built = n_keys
        self._head_mask: torch.Tensor | None = None  # head_mask's, until the capacity changes
        self._ahead.reset()

    def write(self, start: int, k_rot: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> None:
        """Write a chunk's keys and values at `start` (scratch until `advance`), growing if needed."""
        end = start + k_rot.shape[1]
        if end > self.k.shape[1]:
            self.reserve(end + self.k.shape[1] // 2)
        self.k[:, start:end], self.v[:, start:end], self.idx[:, start:end] = k_rot, v, idx
        self._ahead.reset()

    def index_column(self, index: int) -> int:
        """The original index of the token a decode step wrote at column `length` (uncommitted, as `write`'s). -> how
        many columns from `length` on hold their decode steps' indices (this one's on)."""
        return self._ahead.ensure(self.idx, self.length, index)

    def reserve(self, capacity: int) -> None:
        """Grow the buffers to `capacity` columns, keeping the committed ones."""
        if capacity <= self.k.shape[1]:
            return
        for name in ("k", "v", "idx", "_valid_buf"):
            old = getattr(self, name)
            if old is None:
                continue
            shape = (old.shape[0], capacity) + old.shape[2:]
            new = old.new_ones(shape) if name == "_valid_buf" else old.new_empty(shape)
            new[:, : self.length] = old[:, : self.length]
            setattr(self, name, new)
        self._ahead.reset()
        if self.valid is not None:
            self.valid = self._valid_buf

    @property
    def valid_buffer(self) -> torch.Tensor | None:
        """`valid`, or where every column is valid the all-true buffer kept for reuse (None if there is none): what
        a captured step reads, so that a context with duplicates and one without share a graph."""
        return self._valid_buf

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def advance(self, n_new: int) -> None:
        self.length += n_new
        self._next_pos = self._next_pos + n_new
        if self._pos_bound is not None:
            self._pos_bound += n_new

    @property
    def next_pos(self) -> int:
        """The position the next token takes, on the host. A context built on the device from a retrieval
        (LayerMemory._build, compact positions) counts it there; reading it here waits for the device once, so the
        memory reads every layer's in one go where the host needs them (ContextMemory._read_device_state)."""
        if isinstance(self._next_pos, torch.Tensor):
            self._next_pos = int(self._next_pos)
        return self._next_pos

    @next_pos.setter
    def next_pos(self, value: int) -> None:
        self._next_pos = value

    @property
    def next_position(self) -> "int | torch.Tensor":
        """`next_pos` as it is held: a host int, or a 0-d device tensor not read yet."""
        return self._next_pos

    def position_bound(self, n_new: int) -> int:
        """A bound on the host of the positions of this context's columns and of `n_new` more (all below it)."""
        pos = self._next_pos
        return (pos if isinstance(pos, int) else self._pos_bound) + n_new

    def mask(self, start: int, n_new: int) -> torch.Tensor | None:
        """Attention mask for a chunk of `n_new` queries written at `start`: the context (minus duplicate
        copies), and the chunk causally. (T, S) when every head sees the same keys, else (n_kv, T, S)."""
        return chunk_mask(start, n_new, self.valid, self.k.device)

    def head_mask(self, n_heads: int) -> torch.Tensor | None:
        """`valid` per query head as an additive float16 mask (n_heads, capacity): 0 where a head may attend,
        -inf where not (a fused decode step's attention reads it), or None when every column is valid."""
        if self.valid is None:
            return None
        if self._head_mask is None or self._head_mask.shape[1] != self.capacity:
            group = n_heads // self.valid.shape[0]
            zero = torch.zeros((), dtype=torch.float16, device=self.valid.device)
            self._head_mask = torch.where(self.valid, zero, -torch.inf).repeat_interleave(group, dim=0).contiguous()
        return self._head_mask

    def resident_columns(self, per_column: torch.Tensor) -> torch.Tensor:
        """Pick the resident tokens' entries (in resident order) from a (n_kv, length) per-column tensor."""
        return torch.cat((per_column[:, : self.n_resident], per_column[:, self.n_built :]), dim=1)

    @property
    def device_bytes(self) -> int:
        tensors = [self.k, self.v, self.idx] + ([self.valid] if self.valid is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)
