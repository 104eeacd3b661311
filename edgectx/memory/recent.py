"""The last `n` queries of a layer (the attention-mass scorer's observation window), appended without copying
the window: a buffer with room past the window, compacted once it fills.

Kept as `torch.cat((window, q))[:, -n:]`, a decode step copied the whole window (32 heads x 512 queries x 64
dims: 4 MiB per layer per token, a quarter of a millisecond on a laptop CPU); here a step writes its own query
and every `room` steps the window moves to the front once.

    recent = RecentQueries(n_heads, head_dim, keep=512, device, dtype)
    recent.append(q)      # q (n_heads, T, d)
    recent.window         # (n_heads, <= keep, d): the last `keep` queries, oldest first (a view)
"""

from __future__ import annotations

import torch



class RecentQueries:
    def __init__(self, n_heads: int, head_dim: int, keep: int, device: torch.device, dtype: torch.dtype):
        self.keep = keep
        self._buf = torch.empty(n_heads, 0, head_dim, device=device, dtype=dtype)
        self._start = self._end = 0
        self._base: tuple | None = None  # next_column's: (the buffer it is of, its address, strides)

    @property
    def buffer(self) -> torch.Tensor:
        """The whole buffer (n_heads, size, head_dim), window and room: where `next_index` points."""
        return self._buf

    @property
    def window(self) -> torch.Tensor:
        return self._buf[:, self._start : self._end]

    def set(self, q: torch.Tensor) -> None:
        """Replace the window with the last `keep` of `q` (a restore, a truncation), in the buffer's dtype."""
        kept = q[:, q.shape[1] - min(q.shape[1], self.keep) :]
        self._buf = torch.empty(q.shape[0], 2 * self.keep, q.shape[2], device=q.device, dtype=self._buf.dtype)
        self._buf[:, : kept.shape[1]] = kept
        self._start, self._end = 0, kept.shape[1]

    def append(self, q: torch.Tensor) -> None:
        n_new = q.shape[1]
        if n_new >= self.keep:
            self.set(q)
            return
        self._room(n_new)
        self._buf[:, self._end : self._end + n_new] = q
        self.advance(n_new)

    def next_column(self) -> tuple[int, tuple[int, int]]:
        """Where the next query goes (a fused decode step writes it there): its address and (bytes between its rows,
        rows), one tuple for as long as the buffer stays; then `advance(1)`."""
        self._room(1)
        buf = self._buf
        if self._base is None or self._base[0] is not buf:
            step = buf.shape[2] * buf.element_size()  # (n_heads, size, head_dim), contiguous
            self._base = (buf, buf.data_ptr(), step, (buf.shape[1] * step, buf.shape[0]))
        _, ptr, step, rows = self._base
        return ptr + self._end * step, rows

    def next_index(self) -> int:
        """The column the next query goes to (a captured decode step writes it there; then `advance(1)`)."""
        self._room(1)
        return self._end

    def room(self) -> int:
        """Queries that `next_column` takes before the window moves."""
        return self._buf.shape[1] - self._end

    def advance(self, n_new: int) -> None:
        self._end += n_new
        self._start = max(self._start, self._end - self.keep)

    def _room(self, n_new: int) -> None:
        """Room for `n_new` more queries past the window's end; when the buffer is full, the window (unchanged: a
        step about to run may still observe all of it) moves to the front of a buffer."""
        if self._end + n_new <= self._buf.shape[1]:
            return
        kept = self._buf[:, self._start : self._end]
        size = max(2 * self.keep, kept.shape[1] + n_new)
        buf = self._buf if self._buf.shape[1] >= size else torch.empty(
            self._buf.shape[0], size, self._buf.shape[2], device=self._buf.device, dtype=self._buf.dtype)
        buf[:, : kept.shape[1]] = kept.clone() if buf is self._buf else kept
        self._buf, self._start, self._end = buf, 0, kept.shape[1]
