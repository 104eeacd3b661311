"""`edgectx heads train`: self-supervised training of Locret retaining heads on any long text.

The backbone stays frozen. It reads the text in sequences of `seq_len` tokens with full attention;
at every layer we keep each token's pre-RoPE [Q, K, V] (the heads' input) and its label, the causal
importance Locret trains on: the largest pre-softmax attention logit the token receives from later
queries, maximised over the query heads of its KV group. The queries counted are those from
`offset` to `offset + span` tokens later. With `offset` = the memory's local window (512), the label
measures what eviction actually decides: whether queries still want the token after it has left the
window (nearer queries see it in the window anyway, and their large, positional logits would
otherwise dominate the maximum); `--offset 0` gives Locret's all-later-queries label. `--label logprob`
subtracts each query's log-normalizer first, so the label is the token's largest log attention
probability: a better eviction target (evicting by the true labels of held-out typing.py, budget 512:
top-1 agreement 0.898 vs 0.891 for logits) that the heads, however, learn less well.

The heads (one MLP per layer, trained all at once as a batched matmul) then fit these labels with
SmoothL1 plus a small smoothness term between neighbouring tokens' predictions, AdamW, on windows of
consecutive tokens. Errors on tokens more important than average weigh more (`top_weight`): eviction
only asks which tokens are the most important (heads trained on the same 105K tokens, held-out
argparse.py and typing.py at budgets 1024 and 512: NLL lower in all four cases, top-1 within 0.3
points). Inputs are scaled per feature by their RMS during training; the scale is folded into fc1
when saving, so the file holds plain Locret-shaped fc1/fc2 weights. Labels are standardized
per layer and KV head (eviction ranks tokens within one head of one layer, so an affine change per
head changes nothing it decides, and the fit starts near the answer instead of ten logits away). A held-out share of the
sequences (never trained on) gives the loss curve and the top-10% recall (how many of the truly most
important tenth of tokens the heads rank in their own top tenth, as Locret reports).

    result = train_heads(engine, ids, TrainSettings(), progress=print)
    save_heads(result.heads, path, result.info(engine))
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from edgectx.engine import Engine
from edgectx.errors import UsageError
from edgectx.train.cache import SequenceCache
from edgectx.memory.heads import HeadsInfo, RetainingHeads, qkv_features
from edgectx.model.kv import FullKVCache

# Features kept in RAM for training (fp16), at most: sets the default token count for large models.
FEATURE_RAM_BYTES = 4 << 30
LABELS = ("logit", "logprob")


@dataclass(frozen=True)
class TrainSettings:
    hidden: int = 128  # the MLP's width (Locret uses 1024 for 4096-wide models; inputs here are 960 wide)
    tokens: int = 0  # text read, held-out share included; 0 = 65536, fewer if the features would pass 4 GB
    seq_len: int = 4096  # full-attention sequences the labels come from (within the trained context)
    offset: int = 512  # first later query counted in a label (the local window: nearer ones see it anyway)
    span: int = 1024  # later queries counted from `offset` on
    label: str = "logit"  # "logit": the max pre-softmax logit (Locret); "logprob": minus each query's log-normalizer
    skip_first: int = 64  # sequence starts (attention sinks, always kept) are not trained on
    heldout: float = 0.125  # share of sequences kept out of training for the loss curve
    steps: int = 1200
    batch: int = 4  # windows per step
    window: int = 256  # consecutive tokens per window (the smoothness term needs neighbours)
    lr: float = 1e-3
    smooth: float = 0.0025  # weight of the neighbour smoothness term (Locret's value)
    # Each token's error weighs 1 + top_weight * (its standardized label, if above the mean): eviction only asks
    # which tokens are the most important, so errors among the unimportant bulk matter less (0 = Locret's loss).
    top_weight: float = 1.0
    eval_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.seq_len < self.skip_first + self.offset + self.span + self.window:
            raise UsageError(f"--seq-len {self.seq_len} leaves no tokens with a full label span: it must exceed "
                             f"{self.skip_first + self.offset + self.span + self.window}.")
        if min(self.hidden, self.steps, self.batch, self.window, self.span, self.eval_every) < 1 or min(self.offset, self.top_weight) < 0:
            raise UsageError("hidden, steps, batch, window, span and eval_every must be positive, and offset and top_weight >= 0.")
        if self.label not in LABELS:
            raise UsageError(f"label must be one of {', '.join(LABELS)}, not {self.label!r}.")
        if not 0 < self.heldout < 1:
            raise UsageError("heldout must be a fraction between 0 and 1.")

    def n_tokens(self, spec) -> int:
        if self.tokens:
            return self.tokens
        labelled = (self.seq_len - self.skip_first - self.offset - self.span) / self.seq_len
        per_token = spec.n_layers * (spec.q_dim + 2 * spec.kv_dim) * 2 * labelled
        fit = int(FEATURE_RAM_BYTES / per_token) // self.seq_len * self.seq_len
        return max(2 * self.seq_len, min(65536, fit))


class _LabellingLayer:
    """Full attention for one layer, recording the heads' inputs and their causal-importance labels."""

    def __init__(self, inner, owner: "LabellingCache"):
        self.inner, self.owner = inner, owner

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        o, s = self.owner, self.owner.settings
        out = self.inner.attend(q, k, v)
        n = q.shape[1]
        keep = slice(0, n) if o.every_token else slice(s.skip_first, n - s.offset - s.span)
        if not o.every_token:
            o.features.append(qkv_features(q, k, v)[keep].to(torch.float16))
        q_rot = o.rope.rotate(q, *o.rope_tables)  # positions 0..n-1 (one sequence from empty)
        k_rot = self.inner.k[:, :n]
        n_kv, head_dim = k_rot.shape[0], k_rot.shape[2]
        qg = q_rot.reshape(n_kv, -1, n, head_dim)  # (n_kv, group, n, d)
        lse = log_normalizers(qg, k_rot) if s.label == "logprob" else None  # (n_kv, group, n)
        o.labels.append(causal_importance(qg, k_rot, keep.start, keep.stop, s.offset, s.span, lse))  # (n_kv, kept)
        return out


def causal_importance(qg: torch.Tensor, k_rot: torch.Tensor, first: int, last: int, offset: int, span: int,
                      lse: torch.Tensor | None = None) -> torch.Tensor:
    """Labels (n_kv, last - first) of keys first..last-1: the largest logit (minus the query's `lse`, if
    given) from queries i with offset <= i - j < offset + span, over the KV group's query heads; -inf for
    a key no such query reaches (the sequence ends first). qg (n_kv, group, n, d) and k_rot rotated."""
    n, head_dim = qg.shape[2], qg.shape[3]
    labels = []
    # Key blocks bound the (group, queries, block) logits.
    for start in range(first, last, 512):
        stop = min(start + 512, last)
        q_lo, q_hi = min(n, start + offset), min(n, stop + offset + span - 1)
        logits = torch.einsum("hgqd,hkd->hgqk", qg[:, :, q_lo:q_hi], k_rot[:, start:stop]).float() / math.sqrt(head_dim)
        if lse is not None:
            logits = logits - lse[:, :, q_lo:q_hi, None]
        i = torch.arange(q_lo, q_hi, device=qg.device)[:, None]
        j = torch.arange(start, stop, device=qg.device)[None, :]
        valid = (i - j >= offset) & (i - j < offset + span)
        labels.append(logits.masked_fill(~valid, -torch.inf).amax(dim=(1, 2)) if q_hi > q_lo
                      else torch.full((qg.shape[0], stop - start), -torch.inf, device=qg.device))
    return torch.cat(labels, dim=1)


def log_normalizers(qg: torch.Tensor, k_rot: torch.Tensor, block: int = 512) -> torch.Tensor:
    """Each query's causal log-sum-exp of attention logits (n_kv, group, n): log p = logit - lse."""
    n, head_dim = qg.shape[2], qg.shape[3]
    out = []
    for start in range(0, n, block):
        stop = min(start + block, n)
        logits = torch.einsum("hgqd,hkd->hgqk", qg[:, :, start:stop], k_rot[:, :stop]).float() / math.sqrt(head_dim)
        causal = torch.arange(start, stop, device=qg.device)[:, None] >= torch.arange(stop, device=qg.device)[None, :]
        out.append(torch.logsumexp(logits.masked_fill(~causal, -torch.inf), dim=-1))
    return torch.cat(out, dim=2)


class LabellingCache(FullKVCache):
    """A full-attention cache for one sequence from empty that labels its tokens at every layer: those
    with a whole label span (and their features, for training), or `every_token` (labels only; -inf
    where no counted query reaches the token)."""

    def __init__(self, engine: Engine, settings: TrainSettings, every_token: bool = False):
        super().__init__(engine.spec, engine.rope, engine.device, engine.dtype)
        self.settings, self.every_token = settings, every_token
        self.features: list[torch.Tensor] = []  # per layer (kept, in) fp16
        self.labels: list[torch.Tensor] = []  # per layer (n_kv, kept)
        self.layers = [_LabellingLayer(layer, self) for layer in self.layers]


@dataclass
class TrainResult:
    heads: RetainingHeads
    settings: TrainSettings
    curve: list[dict] = field(default_factory=list)  # {step, train_loss, heldout_loss, heldout_recall}
    collect_s: float = 0.0
    train_s: float = 0.0
    train_tokens: int = 0
    heldout_tokens: int = 0

    def info(self, engine: Engine) -> HeadsInfo:
        training = {"settings": asdict(self.settings), "collect_s": round(self.collect_s, 1),
                    "train_s": round(self.train_s, 1), "train_tokens": self.train_tokens,
                    "heldout_tokens": self.heldout_tokens, "curve": self.curve}
        return HeadsInfo(engine.fingerprint, engine.path.name, "trained", training)


Progress = Callable[[str, int, int, dict], None]  # (phase, done, total, figures)


def collect(engine: Engine, ids: list[int], settings: TrainSettings, progress: Progress | None = None,
            cache: SequenceCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (n_layers, n_seq, kept, in) fp16 and labels (n_layers, n_seq, kept, n_kv) from full-attention
    passes, or from `cache` for sequences read before (and saved there when read now)."""
    n_seq = len(ids) // settings.seq_len
    spec = engine.spec
    kept = settings.seq_len - settings.skip_first - settings.offset - settings.span
    # Filled in place: the features are most of training's RAM, so they never exist twice.
    feats = torch.empty(spec.n_layers, n_seq, kept, spec.q_dim + 2 * spec.kv_dim, dtype=torch.float16)
    labels = torch.empty(spec.n_layers, n_seq, kept, spec.n_kv_heads)
    with torch.inference_mode():
        for i in range(n_seq):
            seq = ids[i * settings.seq_len : (i + 1) * settings.seq_len]
            hit = cache.load(seq, feats[:, i].shape, labels[:, i].shape) if cache else None
            if hit:
                feats[:, i], labels[:, i] = hit
            else:
                feats[:, i], labels[:, i] = _read_sequence(engine, seq, settings)
                if cache:
                    cache.save(seq, feats[:, i], labels[:, i])
            if progress:
                progress("reading", (i + 1) * settings.seq_len, n_seq * settings.seq_len, {})
    return feats, labels


def _read_sequence(engine: Engine, seq: list[int], settings: TrainSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """One full-attention pass: features (n_layers, kept, in) fp16 and labels (n_layers, kept, n_kv)."""
    cache = LabellingCache(engine, settings)
    cache.begin(len(seq))
    engine.model(torch.tensor(seq, device=engine.device), cache)
    out = torch.stack(cache.features).cpu(), torch.stack(cache.labels).transpose(1, 2).cpu()
    # The cache's layers point back at it: a cycle that only the garbage collector frees, and each one
    # holds a sequence's features; collect it now rather than hold dozens at once.
    del cache
    gc.collect()
    return out


def feature_rms(x: torch.Tensor) -> torch.Tensor:
    """Per-layer, per-feature RMS of fp16 features (L, n_seq, kept, in) -> (L, 1, in), one sequence at a time."""
    sum_sq = torch.zeros(x.shape[0], x.shape[-1])
    for s in range(x.shape[1]):
        sum_sq += x[:, s].float().pow(2).sum(dim=1)
    return (sum_sq / (x.shape[1] * x.shape[2])).sqrt().clamp(min=1e-6)[:, None, :]


def _losses(pred: torch.Tensor, target: torch.Tensor, smooth: float, top_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """pred/target (L, B, W, n_kv), targets standardized: the weighted SmoothL1 fit and the total loss with
    the neighbour smoothness term."""
    weight = 1 + top_weight * target.clamp(min=0)
    fit = (F.smooth_l1_loss(pred, target, reduction="none") * weight).mean() / weight.mean()
    return fit, fit + smooth * F.mse_loss(pred[:, :, 1:], pred[:, :, :-1])


def standardize(train_y: torch.Tensor, test_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels in units of the training labels' spread, per layer and KV head: ranking-equivalent, easier to fit."""
    mean = train_y.mean(dim=(1, 2), keepdim=True)
    std = train_y.std(dim=(1, 2), keepdim=True).clamp(min=1e-6)
    return (train_y - mean) / std, (test_y - mean) / std


@torch.no_grad()
def evaluate(heads: RetainingHeads, feats: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> dict:
    """Held-out SmoothL1 and top-10% recall, per sequence, layer and KV head."""
    losses, recalls = [], []
    for s in range(feats.shape[1]):
        x = feats[:, s].float() / scale
        pred = heads(x)  # (L, kept, n_kv)
        target = labels[:, s]
        losses.append(float(F.smooth_l1_loss(pred, target)))
        k = max(1, pred.shape[1] // 10)
        top_pred = torch.zeros_like(pred, dtype=torch.bool).scatter_(1, pred.topk(k, dim=1).indices, True)
        top_true = torch.zeros_like(pred, dtype=torch.bool).scatter_(1, target.topk(k, dim=1).indices, True)
        recalls.append(float((top_pred & top_true).sum() / top_true.sum()))
    return {"heldout_loss": sum(losses) / len(losses), "heldout_recall": sum(recalls) / len(recalls)}


def fit(heads: RetainingHeads, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
        settings: TrainSettings, progress: Progress | None = None) -> list[dict]:
    """Train `heads` in place; returns the curve. Features are fp16 (L, n_seq, kept, in)."""
    gen = torch.Generator().manual_seed(settings.seed)
    train_y, test_y = standardize(train_y, test_y)
    # Per-layer, per-feature RMS: the heads see unit-scale inputs; `fold_scale` moves it into fc1 afterwards.
    scale = feature_rms(train_x)  # (L, 1, in)
    opt = torch.optim.AdamW(heads.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, settings.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, step / settings.steps)))))
    n_layers, n_seq, kept, _ = train_x.shape
    curve, running = [], []
    for step in range(1, settings.steps + 1):
        seqs = torch.randint(n_seq, (settings.batch,), generator=gen)
        starts = torch.randint(kept - settings.window + 1, (settings.batch,), generator=gen)
        rows = [slice(int(a), int(a) + settings.window) for a in starts]
        x = torch.stack([train_x[:, s, r] for s, r in zip(seqs.tolist(), rows)], dim=1).float() / scale[:, None]
        y = torch.stack([train_y[:, s, r] for s, r in zip(seqs.tolist(), rows)], dim=1)  # (L, B, W, n_kv)
        pred = heads(x.reshape(n_layers, -1, x.shape[-1])).reshape(y.shape)
        fit_loss, loss = _losses(pred, y, settings.smooth, settings.top_weight)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(heads.parameters(), 1.0)
        opt.step()
        sched.step()
        running.append(float(fit_loss.detach()))
        if step % settings.eval_every == 0 or step == settings.steps:
            point = {"step": step, "train_loss": sum(running) / len(running), **evaluate(heads, test_x, test_y, scale)}
            curve.append(point)
            running = []
            if progress:
                progress("training", step, settings.steps, point)
        elif progress and step % 10 == 0:
            progress("training", step, settings.steps, {})
    fold_scale(heads, scale)
    return curve


@torch.no_grad()
def fold_scale(heads: RetainingHeads, scale: torch.Tensor) -> None:
    """silu((x / scale) @ fc1.T) == silu(x @ (fc1 / scale).T): plain fc1/fc2 heads take raw projections."""
    heads.fc1.div_(scale)


def train_heads(engine: Engine, ids: list[int], settings: TrainSettings, progress: Progress | None = None,
                cache: SequenceCache | None = None) -> TrainResult:
    n_seq = len(ids) // settings.seq_len
    n_heldout = max(1, round(n_seq * settings.heldout))
    if n_seq - n_heldout < 1:
        raise UsageError(f"The text has {len(ids)} tokens: training needs at least {2 * settings.seq_len} "
                         f"(two sequences of --seq-len {settings.seq_len}); pass more text.")
    torch.manual_seed(settings.seed)
    t0 = time.perf_counter()
    feats, labels = collect(engine, ids[: n_seq * settings.seq_len], settings, progress, cache)
    collect_s = time.perf_counter() - t0
    # The held-out sequences are the text's last ones: other files than most of the training text.
    train_x, test_x = feats[:, : n_seq - n_heldout], feats[:, n_seq - n_heldout :]
    train_y, test_y = labels[:, : n_seq - n_heldout], labels[:, n_seq - n_heldout :]
    heads = RetainingHeads(engine.spec, settings.hidden)
    t0 = time.perf_counter()
    curve = fit(heads, train_x, train_y, test_x, test_y, settings, progress)
    heads.requires_grad_(False)
    return TrainResult(heads, settings, curve, collect_s, time.perf_counter() - t0,
                       train_tokens=train_x.shape[1] * train_x.shape[2], heldout_tokens=test_x.shape[1] * test_x.shape[2])
