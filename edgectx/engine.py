"""The engine: owns the model, tokenizer, chat template, device and the conversation's KV memory.

`prefill` runs tokens through the model in chunks (progress callback, cancellation between chunks);
`sync` reuses the longest cached prefix and prefills only the rest, so a second chat turn pays only
for its new tokens; `generate` streams text. The KV memory sits behind the `KVMemory` interface.
`snapshot` writes the long-context memory to a file, `restore` reads it back, and `prefill_with_snapshot`
reopens a document: it restores a snapshot whose tokens start the new ids and prefills only the rest.

    engine = Engine.load(Path("model.gguf"))  # or a Hugging Face checkpoint directory
    engine.sync(engine.tokenizer.encode(prompt))
    for piece in engine.generate(SamplingParams(temperature=0), max_tokens=64):
        print(piece, end="")
    engine.snapshot("doc.edgectxs", codec="int4")  # tomorrow: engine.prefill_with_snapshot(ids, "doc.edgectxs")
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from edgectx.cpu_share import ThreadGovernor
from edgectx.model.chat_template import ChatTemplate
from edgectx.model.cuda_graph import with_cuda_graphs
from edgectx.model.decode import CompiledDecode
from edgectx.model.step import CompiledStep
from edgectx.errors import EdgectxError, SnapshotError, UsageError
from edgectx.memory.heads import HeadsError, HeadsScorer, RetainingHeads, find_heads, load_heads
from edgectx.model.kv import FullKVCache, KVMemory, kv_storage_dtype
from edgectx.memory.context import ContextMemory
from edgectx.memory.block_store import upload
from edgectx.memory.config import SCORERS, MemoryConfig
from edgectx.memory import device as device_memory
from edgectx.memory.plan import available_ram_bytes
from edgectx.quant.formats import SNAPSHOT_CODECS
from edgectx.memory.state import load_memory, memory_meta, memory_sections
from edgectx.model.source import open_model
from edgectx.quant.linear import resolve_weights
from edgectx.model.rope import Rope
from edgectx.model.sampling import Sampler, SamplingParams
from edgectx.memory.scoring import AttentionMassScorer, EvictionScorer, WindowScorer
from edgectx.snapshot.file import open_snapshot, read_header, write_snapshot
from edgectx.model.spec import ModelSpec
from edgectx.model.stops import StopMatcher
from edgectx.model.tokenizer import TextTokenizer

Progress = Callable[[int, int], None]
Cancel = Callable[[], bool]


class Cancelled(EdgectxError):
    exit_code = 130


class ContextFullError(EdgectxError):
    """The conversation no longer fits the model's context window."""


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # tokens the turn's prompt occupies in memory
    reused_tokens: int = 0  # of those, already cached from earlier turns
    prefill_s: float = 0.0
    generated_tokens: int = 0
    decode_s: float = 0.0
    stop_reason: str = ""  # eog | stop_string | max_tokens | context | cancelled
    retrieved: list[dict] = field(default_factory=list)  # blocks the answer attended to most (citations)

    @property
    def decode_tok_s(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s else 0.0


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    codec: str
    snapshot_bytes: int  # the file's size
    n_tokens: int
    elapsed_s: float


@dataclass
class HeldMemory:
    """A conversation's memory taken out of the engine (`Engine.take_memory`), to be put back later."""

    memory: KVMemory
    tokens: list[int]
    next_logits: torch.Tensor | None

    @property
    def ram_bytes(self) -> int:
        """What it occupies: its device tiers and its host store (both RAM on a CPU)."""
        stats = self.memory.stats()
        return stats.get("device_kv_bytes", 0) + stats.get("host_kv_bytes", 0)


@dataclass(frozen=True)
class RestoreInfo:
    n_tokens: int
    elapsed_s: float


@dataclass(frozen=True)
class ReuseInfo:
    reused_tokens: int  # restored from the snapshot (0: it was not used)
    prefilled_tokens: int  # run through the model
    problem: str | None = None  # why a snapshot that should have been used was not (reported once)


def pick_device(name: str | None = None) -> torch.device:
    """The device `name` (auto: CUDA where there is one); a GPU named by its index becomes the current device,
    since Triton launches its kernels on the current device whatever their tensors' (a kernel launched for
    cuda:1 from device 0 fails its probe, and the kernels and CUDA graphs would quietly turn off)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EdgectxError("CUDA was requested but PyTorch sees no CUDA GPU: use --device cpu, or run `edgectx doctor`.")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"Unknown device {name!r}: use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise UsageError(f"There is no {name}: PyTorch sees {torch.cuda.device_count()} CUDA GPU(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
        torch.cuda.set_device(device)
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # bf16/fp16 matmuls are emulated and slow on CPUs without AVX512-BF16/AMX


# Contexts the long-context memory accepts by default: the host store holds them in RAM (fp16 K and V;
# about 23 GB per million tokens for the embedded model), far past what any document needs.
MEMORY_MAX_TOKENS = 1 << 20
# What `--scorer auto` (the default) means: attention mass, which beat the shipped retaining heads on held-out
# prose and code (docs/recall.md, "The default scorer"); a string so that a test can change it
AUTO_SCORER = "attention"
UNEXPECTED = "an unexpected failure"  # in a SnapshotError that no explicit check raised (the fuzz tests look for it)


class Engine:
    def __init__(self, path: Path, model, spec: ModelSpec, tokenizer: TextTokenizer, template: ChatTemplate,
                 device: torch.device, dtype: torch.dtype, n_ctx: int | None = None,
                 memory_config: MemoryConfig | None = None, fingerprint: str = "", heads_path: Path | None = None):
        self.path, self.model, self.spec = path, model, spec
        self.fingerprint = fingerprint  # the weights' fingerprint: ties heads and snapshots to this model
        self.heads_path = heads_path  # explicit retaining heads; None looks them up by fingerprint
        self._heads: RetainingHeads | None = None
        self.tokenizer, self.template = tokenizer, template
        self.device, self.dtype = device, dtype
        self.weights = "fp16"  # the linear layers' format (Engine.load sets it: gguf, fp16, nf4 or int8)
        # What runs a chunk: the model, on CUDA wrapped to replay one-token steps as CUDA graphs (edgectx.model.
        # cuda_graph; EDGECTX_CUDA_GRAPHS=0: eager), or `compile_decode`'s / `compile_step`'s wrapper when asked for.
        self.step = with_cuda_graphs(model, device)
        self.governor: ThreadGovernor | None = None  # on the CPU (Engine.load): threads sized to the free cores
        self._prompt_logits: tuple[list[int], torch.Tensor] | None = None  # the last synced prompt and its logits
        self.last_stats = GenerationStats()
        self.tokens: list[int] = []  # the token ids held in memory, in order
        self.configure_memory(memory_config, n_ctx)

    def configure_memory(self, memory_config: MemoryConfig | None, n_ctx: int | None = None,
                         scorer: EvictionScorer | None = None) -> None:
        """Switch between the long-context memory (a config) and plain full attention (None); resets the chat.
        `scorer` replaces the one the config names (benchmarks hand in their own)."""
        self.memory_config = memory_config
        self.scorer_override = scorer
        self.n_ctx = n_ctx or (self.spec.context_length if memory_config is None else MEMORY_MAX_TOKENS)
        self.rope = self._rope_for(memory_config, self.n_ctx)
        self.reset()

    def _rope_for(self, memory_config: MemoryConfig | None, n_ctx: int) -> Rope:
        positions_reach = n_ctx
        if memory_config is not None and memory_config.positions == "compact":
            positions_reach = memory_config.budget_tokens + memory_config.chunk_tokens
        trained = self.spec.rope_scaling.original_context or self.spec.context_length
        return Rope(self.spec, self.device, long_context=positions_reach > trained)

    @classmethod
    def load(cls, path: Path, device: str | None = None, n_ctx: int | None = None, n_threads: int | None = None,
             progress: Progress | None = None, memory_config: MemoryConfig | None = None,
             heads_path: Path | None = None, weights: str = "auto") -> "Engine":
        """`weights`: auto | gguf | fp16 | nf4 | int8. gguf keeps a GGUF file's quantized blocks and multiplies by
        them (ggml's kernels on the CPU, edgectx's Triton kernels on CUDA); auto = gguf for GGUF files where the
        device has those kernels, else nf4 on CUDA for big models when bitsandbytes is installed, else fp16."""
        if n_threads:
            torch.set_num_threads(n_threads)
        dev = pick_device(device)
        dtype = default_dtype(dev)
        source = open_model(path)  # a .gguf file or a Hugging Face checkpoint directory
        # Resolved before the long load, so a missing bitsandbytes fails at once.
        weights = resolve_weights(dev, weights, fp16_bytes=source.spec.weight_bytes("fp16"), blocks=source.kind == "gguf")
        if weights == "gguf" and dev.type == "cpu":
            from edgectx.quant.ggml_cpu import set_threads

            set_threads(n_threads or torch.get_num_threads())
        tokenizer = source.tokenizer()
        template = source.chat_template(tokenizer)
        model = source.load_model(dev, dtype, progress=progress, weights=weights)
        engine = cls(source.path, model, source.spec, tokenizer, template, dev, dtype, n_ctx, memory_config,
                     fingerprint=source.fingerprint(), heads_path=heads_path)
        engine.weights = weights
        if dev.type == "cpu":
            engine.governor = ThreadGovernor(n_threads or torch.get_num_threads(), ggml=weights == "gguf")
        return engine

    def compile_decode(self) -> CompiledDecode:
        """Run one-token steps through a compiled graph from now on; the first such step compiles it."""
        if not isinstance(self.step, CompiledDecode):
            self.step = CompiledDecode(self.model)
        return self.step

    def compile_step(self, wait: bool = False) -> CompiledStep:
        """Compile the one-token step for any memory in a background thread (`wait`: until done); steps run
        eager until it is ready (edgectx.model.step)."""
        if not isinstance(self.step, CompiledStep):
            self.step = CompiledStep(self.model)
        return self.step.start(wait)

    def heads(self) -> RetainingHeads | None:
        """This model's retaining heads (given, the user's, or shipped), loaded once; None if it has none."""
        if self._heads is None:
            path = self.heads_path or find_heads(self.fingerprint)
            if path is None:
                return None
            self._heads, _ = load_heads(path, self.spec, self.fingerprint, self.device, self.dtype)
        return self._heads

    def scorer(self, name: str) -> EvictionScorer:
        """`auto` is attention mass (AUTO_SCORER); heads only when asked for by name."""
        name = AUTO_SCORER if name == "auto" else name
        if name == "window":
            return WindowScorer()
        if name == "attention":
            return AttentionMassScorer()
        heads = self.heads()
        if heads is None:
            raise HeadsError(f"{self.path.name} has no retaining heads: train them with `edgectx heads train`, "
                             "or use --scorer attention.")
        return HeadsScorer(heads)

    @property
    def kv_dtype(self) -> torch.dtype:
        """What new memories store K and V in: EDGECTX_KV_DTYPE = auto | float32 | float16 | bfloat16; auto is
        float16 where the model computes in float32 (the CPU; llama.cpp's f16 KV), else the compute dtype."""
        return kv_storage_dtype(os.environ.get("EDGECTX_KV_DTYPE", "auto"), self.device, self.dtype)

    @property
    def context_dtype(self) -> torch.dtype:
        """What a ContextMemory assembles its attention context in: float16 where K and V are stored so and the
        model's fused decode step attends a float16 context (edgectx.kernels.cpu_attention), else the compute dtype."""
        decoder = getattr(self.model, "decoder", None)
        if self.kv_dtype == torch.float16 and self.device.type == "cpu" and decoder is not None and decoder.reads_half:
            return torch.float16
        return self.dtype

    def new_memory(self) -> KVMemory:
        if self.memory_config is None:
            return FullKVCache(self.spec, self.rope, self.device, self.dtype, self.kv_dtype)
        return ContextMemory(self.spec, self.rope, self.device, self.dtype, self.memory_config, kv_dtype=self.kv_dtype,
                             scorer=self.scorer_override or self.scorer(self.memory_config.scorer),
                             context_dtype=self.context_dtype)

    @property
    def next_logits(self) -> torch.Tensor | None:
        """Logits (vocab,) after the last token in memory; None before anything ran."""
        return self._next_logits

    def reset(self) -> None:
        self._drop_memory()  # first: an "auto" block cache is sized from free device memory
        self.memory = self.new_memory()
        self.tokens = []
        self._prompt_logits = None
        self._next_logits = None

    def _drop_memory(self) -> None:
        """Let go of the memory this engine holds (`self.memory` becomes None) and give its host RAM back
        (`empty_host_cache`), with no reference to it left in any caller's frame."""
        old, self.memory = getattr(self, "memory", None), None
        if isinstance(old, ContextMemory):
            old.release()  # now, even if something still refers to it
        del old
        device_memory.empty_host_cache(self.device)  # unpin its segments (issue 21), return glibc's free pages

    def take_memory(self) -> HeldMemory:
        """Hand out the conversation held now (several conversations take turns on one engine); a fresh,
        empty memory takes its place."""
        held = HeldMemory(self.memory, self.tokens, self._next_logits)
        self.memory = self.new_memory()
        self.tokens, self._next_logits, self._prompt_logits = [], None, None
        return held

    def discard(self, held: HeldMemory) -> None:
        """Let go for good of a conversation `take_memory` handed out (spilled to disk, or dropped): its host store's
        RAM goes back now (pinned on CUDA, where PyTorch's host allocator would keep it pinned), not whenever the
        last reference to it goes."""
        if held.memory is self.memory:
            raise ValueError("the engine holds this conversation: reset it instead")
        if isinstance(held.memory, ContextMemory):
            held.memory.release()
        device_memory.empty_host_cache(self.device)

    def put_memory(self, held: HeldMemory) -> None:
        """Hold `held` (from `take_memory` on this engine, with the same memory config) as the conversation."""
        self.memory, self.tokens, self._next_logits = held.memory, held.tokens, held.next_logits
        self._prompt_logits = None

    @torch.inference_mode()
    def forward(self, ids: list[int], all_logits: bool = False) -> torch.Tensor:
        """One chunk through the model; the memory commits only if the whole forward succeeds."""
        if len(self.tokens) + len(ids) > self.n_ctx:
            raise ContextFullError(
                f"The conversation needs {len(self.tokens) + len(ids)} tokens but the context holds {self.n_ctx}: "
                "start a new chat or shorten the input."
            )
        if self.governor is not None:
            self.governor.apply()  # fewer threads while other processes hold the cores (edgectx.cpu_share)
        with device_memory.device_scope(self.device):  # this thread's, for Triton's launches
            if isinstance(self.memory, ContextMemory):
                self.memory.begin(len(ids), token_ids=ids)  # the ids let retrieval match the question's words
            else:
                self.memory.begin(len(ids))
            # through pinned memory on CUDA: a copy from pageable memory would make the host wait for the stream
            logits = self.step(upload(torch.tensor(ids), self.device), self.memory, all_logits=all_logits)
            self.memory.commit()
        self.tokens.extend(ids)
        self._next_logits = logits[-1]  # always the logits after the last token in memory
        return logits

    def prefill(self, ids: list[int], chunk_tokens: int | None = None, progress: Progress | None = None,
                cancel: Cancel | None = None) -> torch.Tensor:
        """Append `ids` in chunks; returns the logits (vocab,) after the last one."""
        chunk_tokens = chunk_tokens or (self.memory_config.chunk_tokens if self.memory_config else 512)
        logits = None
        for start in range(0, len(ids), chunk_tokens):
            if cancel and cancel():
                raise Cancelled("Cancelled; the tokens read so far stay in memory.")
            logits = self.forward(ids[start : start + chunk_tokens])
            if self.device.type == "cpu":
                device_memory.return_free_heap()  # the chunk's freed transients, left between the memory's tensors
            if progress:
                progress(min(start + chunk_tokens, len(ids)), len(ids))
        if isinstance(self.memory, ContextMemory):
            with torch.inference_mode():
                self.memory.ready()  # the context the first decode step reads, built now (not in that step)
        return logits[-1]

    def sync(self, ids: list[int], progress: Progress | None = None, cancel: Cancel | None = None) -> int:
        """Make memory hold exactly `ids`, reusing the longest common prefix; returns the reused count.

        At least the last token is re-run so that fresh logits exist for generation, unless `ids` is the prompt
        the last sync ended with (a regenerated answer): its logits were kept, and a token re-run alone would
        not give them back exactly (a chunk's products are not a single token's: ggml's decode kernels, and
        for Q4_1/Q5_1 files exact float32 prefill products against 8-bit decode ones).
        """
        self.clear_retrieval_record()
        t0 = time.perf_counter()
        reused = self.reusable(ids)
        if reused == len(ids):  # the prompt the last sync ended with: its logits were kept
            if len(self.tokens) > reused:
                self.memory.truncate(reused)
                del self.tokens[reused:]
            self._next_logits = self._prompt_logits[1]
        else:
            if reused < len(self.tokens):
                self.memory.truncate(reused)
                del self.tokens[reused:]
                self._next_logits = None  # until the prefill below runs a chunk
            self._prompt_logits = None
            self._next_logits = self.prefill(ids[reused:], progress=progress, cancel=cancel)
            self._prompt_logits = (list(ids), self._next_logits)
        self.last_stats = GenerationStats(prompt_tokens=len(ids), reused_tokens=reused, prefill_s=time.perf_counter() - t0)
        return reused

    def reusable(self, ids: list[int]) -> int:
        """How many of `ids` `sync` would take from memory: all of them for the prompt the last sync ended with
        (its logits were kept), else the common prefix, short of the last token."""
        kept = self._prompt_logits
        if kept is not None and kept[0] == ids and self.tokens[: len(ids)] == ids:
            return len(ids)
        reused, limit = 0, min(len(ids) - 1, len(self.tokens))  # keep one token to run: generation needs its logits
        while reused < limit and ids[reused] == self.tokens[reused]:
            reused += 1
        return reused

    def generate(self, params: SamplingParams, max_tokens: int = 512, stop: tuple[str, ...] = (),
                 cancel: Cancel | None = None) -> Iterator[str]:
        """Stream the answer to what `sync` put in memory; stops at an end-of-turn token, a stop string,
        `max_tokens`, a full context, or `cancel()`. Details land in `self.last_stats`."""
        stats = self.last_stats
        sampler = Sampler(params)
        decoder = self.tokenizer.stream_decoder()
        stops = StopMatcher(stop)
        logits = self._next_logits
        if logits is None:
            raise RuntimeError("generate() needs sync() first: there is nothing to answer")
        t0 = time.perf_counter()
        stats.stop_reason = "max_tokens"
        for _ in range(max_tokens):
            if cancel and cancel():
                stats.stop_reason = "cancelled"
                break
            token = sampler.sample(logits, self.tokens)
            if token in self.tokenizer.eog_ids:
                stats.stop_reason = "eog"
                break
            if len(self.tokens) >= self.n_ctx:
                stats.stop_reason = "context"
                break
            logits = self.forward([token])[-1]
            stats.generated_tokens += 1
            text, hit = stops.feed(decoder.feed(token))
            if text:
                yield text
            if hit:
                stats.stop_reason = "stop_string"
                break
        if stats.stop_reason != "stop_string":
            tail, _ = stops.feed(decoder.flush(), final=True)
            if tail:
                yield tail
        stats.decode_s = time.perf_counter() - t0
        stats.retrieved = self.retrieved_blocks()
        self._next_logits = logits

    def retrieved_blocks(self, n: int = 8) -> list[dict]:
        """The blocks the answer attended to most since the turn began, retrieved or resident, best first (empty
        under full attention, and until the memory first evicts)."""
        record = getattr(self.memory, "record", None)
        return record.top(n) if record is not None else []

    def clear_retrieval_record(self) -> None:
        record = getattr(self.memory, "record", None)
        if record is not None:
            record.clear()

    def stats(self) -> dict[str, int]:
        return {**self.memory.stats(), "context_tokens": self.n_ctx}

    # -- snapshots ----------------------------------------------------------------------------------

    def snapshot(self, path: Path | str, codec: str = "int4") -> SnapshotInfo:
        """Write the long-context memory, its token ids and the next-token logits to `path`, atomically.
        `codec`: "fp16" (lossless: a restore continues bit for bit), "int8" or "int4" (the host store
        quantized, KIVI-style; see edgectx.memory.state)."""
        if not isinstance(self.memory, ContextMemory):
            raise UsageError("Only the long-context memory can be saved as a snapshot: set a --budget instead of 'full'.")
        if codec not in SNAPSHOT_CODECS:
            raise UsageError(f"The snapshot codec must be one of {', '.join(SNAPSHOT_CODECS)}, not {codec!r}.")
        if self.tokens and self._next_logits is None:
            raise UsageError("The last turn was cancelled before any of it ran: finish it, then save the snapshot.")
        t0 = time.perf_counter()
        path = write_snapshot(path, memory_sections(self.memory, codec, self._next_logits), token_ids=self.tokens,
                              model_fingerprint=self.fingerprint, model_name=self.path.name,
                              memory_config=self.memory_config.to_dict(), meta=memory_meta(self.memory, codec))
        return SnapshotInfo(path, codec, path.stat().st_size, len(self.tokens), time.perf_counter() - t0)

    def restore(self, path: Path | str) -> RestoreInfo:
        """Replace the conversation with the snapshot's. The engine adopts the snapshot's memory config
        (its tiers, budget and positions are what the saved state means); the context limit stays.
        A damaged snapshot, or one made for another model or scorer, raises SnapshotError and leaves
        the engine as it was. A snapshot is untrusted input (it may come from anyone): whatever goes wrong
        while reading one ends in a SnapshotError, which `prefill_with_snapshot` answers by reading again."""
        try:
            return self._restore(path)
        except SnapshotError:
            raise
        except MemoryError:
            raise SnapshotError(f"{path} asks for more memory than this machine has: read the document again.") from None
        except Exception as e:  # got past every check: still one sentence, and the caller's fallback
            raise SnapshotError(f"{path} cannot be restored ({UNEXPECTED}: {type(e).__name__}: "
                                f"{' '.join(str(e).split())[:200]}): read the document again.") from None

    def _restore(self, path: Path | str) -> RestoreInfo:
        t0 = time.perf_counter()
        with open_snapshot(path, expect_fingerprint=self.fingerprint) as snap:
            try:
                config = MemoryConfig(**snap.header.memory_config)
            except (TypeError, EdgectxError):
                raise SnapshotError(f"{snap.path} holds a memory config this edgectx cannot use: read the document again.") from None
            n_ctx = self.n_ctx if self.memory_config is not None else MEMORY_MAX_TOKENS
            n_tokens = snap.header.n_tokens
            if n_tokens > n_ctx:
                raise SnapshotError(f"{snap.path} holds {n_tokens} tokens but the context holds {n_ctx}: "
                                    "raise the context limit to restore it.")
            host_bytes = n_tokens * self.spec.kv_bytes_per_token(getattr(torch, config.host_dtype).itemsize)
            if host_bytes > available_ram_bytes():
                raise SnapshotError(f"{snap.path} holds {n_tokens:,} tokens, whose host store needs "
                                    f"{host_bytes / 2**30:.1f} GiB: more RAM than is free now.")
            tokens = snap.tokens().tolist()  # checked against the token chain before any KV is read
            rope = self._rope_for(config, n_ctx)  # fresh: load_memory grows its tables as the live ones were
            made_with = snap.header.meta.get("scorer") if isinstance(snap.header.meta, dict) else None
            try:  # "auto" once meant the heads: a snapshot goes on with the scorer it was made with
                scorer = self.scorer(made_with if config.scorer == "auto" and made_with in SCORERS else config.scorer)
            except HeadsError as e:
                raise SnapshotError(f"{snap.path} cannot be restored: {e}") from None
            memory = ContextMemory(self.spec, rope, self.device, self.dtype, config, scorer=scorer, kv_dtype=self.kv_dtype,
                                   context_dtype=self.context_dtype)
            with device_memory.device_scope(self.device):
                logits = load_memory(snap, memory)
        self._drop_memory()
        self.memory_config, self.n_ctx, self.rope, self.memory = config, n_ctx, rope, memory
        self.tokens, self._next_logits, self._prompt_logits = tokens, logits, None
        return RestoreInfo(len(tokens), time.perf_counter() - t0)

    def prefill_with_snapshot(self, ids: list[int], path: Path | str, progress: Progress | None = None,
                              cancel: Cancel | None = None, on_problem: Callable[[str], None] | None = None) -> ReuseInfo:
        """Make memory hold exactly `ids`: restore the snapshot at `path` if its tokens start `ids` and
        prefill only the rest, else prefill `ids` from an empty memory. Ready for `generate` either way.

        Only a snapshot that is wholly a prefix is used: a memory that has evicted cannot be cut back to
        an earlier length exactly (later evictions dropped tokens the shorter memory still held), so
        matching only the first chunks of the token chain is a miss. A miss is silent; a snapshot that is
        unreadable, damaged or for another model is reported once (`on_problem(sentence)`, else a
        RuntimeWarning), and the result is then exactly a plain prefill."""
        if not ids:
            raise ValueError("prefill_with_snapshot needs at least one token")
        t0 = time.perf_counter()
        reused, problem = 0, None
        try:
            header = read_header(path)
            n = header.n_tokens
            if header.model_fingerprint != self.fingerprint:
                raise SnapshotError(f"{path} was made for another model ({header.model_name or 'unnamed'}): "
                                    "the document is read again.")
            if 0 < n <= len(ids) and header.reusable_tokens(ids[:n]) == n:  # ids[:n]: the last chunk may be partial
                self.restore(path)
                if self._next_logits is None and n == len(ids):
                    raise SnapshotError(f"{path} lacks the last token's logits, which a reply needs.")
                reused = n
        except SnapshotError as e:
            problem = str(e)
            if on_problem is not None:
                on_problem(problem)
            else:
                warnings.warn(problem, RuntimeWarning, stacklevel=2)
        if not reused:
            self.reset()
        self.clear_retrieval_record()  # a new turn starts, as in `sync`
        if len(ids) > reused:
            self.prefill(ids[reused:], progress=progress, cancel=cancel)
        self.last_stats = GenerationStats(prompt_tokens=len(ids), reused_tokens=reused, prefill_s=time.perf_counter() - t0)
        return ReuseInfo(reused, len(ids) - reused, problem)
