"""llama.cpp (through llama-cpp-python) as the reference, on the same GGUF file and thread count.

    ref = LlamaCppReference(path, n_ctx=4200, n_threads=2, all_logits=True)
    ref.eval(ids); ref.logits(0, len(ids))  # (n, vocab) float32

Without `all_logits`, `eval_logits` hands back the logits of each stretch of ids as it goes, so a long
run never holds llama-cpp-python's (n_ctx, vocab) array (800 MB for 4K tokens of a 49K vocabulary).
`f32_kv` keeps the KV cache in F32 instead of llama.cpp's default F16 (the 32-bit reference uses it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgectx.model.tokenizer import quiet_stderr


class LlamaCppReference:
    def __init__(self, path: Path, n_ctx: int, n_threads: int, all_logits: bool = False, n_batch: int = 512,
                 f32_kv: bool = False):
        import llama_cpp

        kv_type = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_kv else {}
        with quiet_stderr():
            self.llama = llama_cpp.Llama(
                str(path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, n_batch=n_batch,
                logits_all=all_logits, verbose=False, **kv_type,
            )

    def reset(self) -> None:
        self.llama.reset()  # the next eval drops every cached position from 0 on

    def eval(self, ids: list[int]) -> None:
        self.llama.eval(ids)

    def eval_logits(self, ids: list[int], copy: bool = True) -> np.ndarray:
        """Evaluate `ids` after those already in and return their logits (len(ids), vocab) float32, in pieces
        of n_batch as `Llama.eval` does, without storing them. With `copy=False`, ids that fit one batch come
        back as a view of llama.cpp's own output buffer (100 MB fewer for 512 rows of a 49K vocabulary),
        valid until this reference's next eval."""
        llama = self.llama
        n_vocab = llama.n_vocab()
        out = None if not copy and len(ids) <= llama.n_batch else np.empty((len(ids), n_vocab), dtype=np.float32)
        for i in range(0, len(ids), llama.n_batch):
            piece = ids[i : i + llama.n_batch]
            n_past = llama.n_tokens
            llama._batch.set_batch(batch=piece, n_past=n_past, logits_all=True)
            llama._ctx.decode(llama._batch)
            logits = np.ctypeslib.as_array(llama._ctx.get_logits(), shape=(len(piece), n_vocab))
            llama.input_ids[n_past : n_past + len(piece)] = piece
            llama.n_tokens += len(piece)
            if out is None:
                return logits
            out[i : i + len(piece)] = logits
        return out

    def last_logits(self) -> np.ndarray:
        """Logits (vocab,) after the last eval; valid without `all_logits`."""
        return np.ctypeslib.as_array(self.llama._ctx.get_logits(), shape=(self.llama.n_vocab(),))

    def logits(self, start: int, end: int) -> np.ndarray:
        """Rows start..end of the logits kept by an `all_logits` reference."""
        return np.asarray(self.llama.scores[start:end], dtype=np.float32)

    def weight_bytes(self) -> int:
        """Bytes of the model's tensors as llama.cpp holds them."""
        import llama_cpp

        return int(llama_cpp.llama_model_size(self.llama._model.model))

    def close(self) -> None:
        self.llama.close()
