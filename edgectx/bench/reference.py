"""llama.cpp (through llama-cpp-python) as the reference, on the same GGUF file and thread count.

    ref = LlamaCppReference(path, n_ctx=4200, n_threads=2, all_logits=True)
    ref.eval(ids); ref.logits(0, len(ids))  # (n, vocab) float32
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgectx.model.tokenizer import quiet_stderr


class LlamaCppReference:
    def __init__(self, path: Path, n_ctx: int, n_threads: int, all_logits: bool = False, n_batch: int = 512):
        import llama_cpp

        with quiet_stderr():
            self.llama = llama_cpp.Llama(
                str(path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, n_batch=n_batch,
                logits_all=all_logits, verbose=False,
            )

    def reset(self) -> None:
        self.llama.reset()  # the next eval drops every cached position from 0 on

    def eval(self, ids: list[int]) -> None:
        self.llama.eval(ids)

    def last_logits(self) -> np.ndarray:
        """Logits (vocab,) after the last eval; valid without `all_logits`."""
        return np.ctypeslib.as_array(self.llama._ctx.get_logits(), shape=(self.llama.n_vocab(),))

    def logits(self, start: int, end: int) -> np.ndarray:
        """Rows start..end of the logits kept by an `all_logits` reference."""
        return np.asarray(self.llama.scores[start:end], dtype=np.float32)

    def close(self) -> None:
        self.llama.close()
