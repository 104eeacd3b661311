"""The flags several commands share, and what they become: a MemoryConfig, SamplingParams, a loaded Engine.

Every value comes from the flag when given, else from the config file, else from the built-in default.

    add_model_args(parser); add_memory_args(parser)
    memory = memory_config_from(args, config)   # None: plain full attention
    engine = load_engine(args, config, status)  # with a spinner on the status console
"""

from __future__ import annotations

import argparse

from edgectx.config import Config
from edgectx.errors import UsageError
from edgectx.memory.config import POSITIONS, SCORERS, MemoryConfig
from edgectx.quant.formats import WEIGHT_FORMATS

DEFAULT_BUDGET = MemoryConfig().budget_tokens
DEFAULT_MAX_TOKENS = 512
BENCH_SCORERS = SCORERS + ("oracle", "oracle-logprob")  # edgectx.bench.oracle: eviction by the true labels


def token_counts(text: str) -> list[int]:
    """'512,4096' -> [512, 4096] (an argparse type)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {text!r}") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError("context lengths must be at least 2 tokens")
    return values


def _budget(text: str) -> int | str:
    if text == "full":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count or 'full', got {text!r}") from None
    if value < 64:
        raise argparse.ArgumentTypeError("the budget must be at least 64 tokens")
    return value


def _scorers(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in BENCH_SCORERS]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"scorers are {', '.join(BENCH_SCORERS)}; got {text!r}")
    return values


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="a .gguf file, a Hugging Face model directory, or a name `edgectx models` lists (default: the embedded SmolLM2)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 or auto (default: auto)")
    p.add_argument("--threads", type=int, help="CPU threads for the engine (default: PyTorch's choice)")
    p.add_argument("--ctx", type=int, help="context window in tokens (default: the model's trained context)")
    p.add_argument("--weights", choices=WEIGHT_FORMATS,
                   help="weight format: 16-bit, or 4-bit nf4 / 8-bit int8 through bitsandbytes (default auto: nf4 on CUDA "
                   "when bitsandbytes is installed, else fp16)")


def add_memory_args(p: argparse.ArgumentParser, allow_full: bool = True, lists: bool = False) -> None:
    """The memory flags; with `lists`, --budget and --scorer take comma-separated values (one run each)."""
    full = "; 'full' for plain full attention" if allow_full else ""
    several = " (comma-separated: one run each)" if lists else ""
    p.add_argument("--budget", type=token_counts if lists else _budget if allow_full else int,
                   help=f"device KV budget in tokens per layer and KV head (default {DEFAULT_BUDGET}{full}){several}")
    p.add_argument("--positions", choices=POSITIONS, help="how the kept context is numbered (default compact)")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk in tokens; eviction runs after each (default 512)")
    p.add_argument("--scorer", type=_scorers if lists else None, choices=None if lists else SCORERS,
                   help="eviction scores: Locret retaining heads, attention mass, or recency (window) "
                   f"(default auto: heads when the model has them){several}"
                   + ("; oracle / oracle-logprob: the true labels heads learn, read from the future (a ceiling)" if lists else ""))


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Unset flags fall back to the config file, then to the defaults named here."""
    p.add_argument("--temperature", type=float, help="0 for greedy (default 0.7)")
    p.add_argument("--top-k", type=int, help="default 40")
    p.add_argument("--top-p", type=float, help="default 0.9")
    p.add_argument("--repeat-penalty", type=float, help="default 1.1")
    p.add_argument("--seed", type=int, help="fix the sampling seed for reproducible answers")
    p.add_argument("--max-tokens", type=int, help=f"longest answer in tokens (default {DEFAULT_MAX_TOKENS})")


def memory_config_from(args: argparse.Namespace, config: Config | None = None) -> MemoryConfig | None:
    """The memory the flags (then the config file) ask for; None means plain full attention."""
    budget = args.budget or (config.budget if config else None) or DEFAULT_BUDGET
    if budget == "full":
        return None
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 64:
        raise UsageError(f"The memory budget must be a token count of at least 64, or 'full' (got {budget!r}).")
    positions = args.positions or (config.positions if config else None) or "compact"
    scorer = getattr(args, "scorer", None) or (config.scorer if config else None) or "auto"
    return MemoryConfig.for_budget(int(budget), positions=positions, chunk_tokens=args.chunk, scorer=scorer)


def first(*values):
    """The first value that is not None."""
    return next(v for v in values if v is not None)


def sampling_from(args: argparse.Namespace, config: Config):
    """SamplingParams from the flags, then the config file, then the built-in defaults."""
    from edgectx.model.sampling import SamplingParams  # imports torch: not while the parser is built

    d = SamplingParams()
    return SamplingParams(temperature=first(args.temperature, config.temperature, d.temperature),
                          top_p=first(args.top_p, config.top_p, d.top_p), top_k=first(args.top_k, config.top_k, d.top_k),
                          repeat_penalty=first(args.repeat_penalty, d.repeat_penalty), seed=args.seed)


def max_tokens_from(args: argparse.Namespace, config: Config) -> int:
    return first(args.max_tokens, config.max_tokens, DEFAULT_MAX_TOKENS)


def engine_options(args: argparse.Namespace, config: Config) -> dict:
    """Engine.load's keyword arguments for the model flags, the memory flags and the config file."""
    return dict(device=args.device or config.device, n_ctx=args.ctx, n_threads=args.threads or config.threads,
                memory_config=memory_config_from(args, config), weights=args.weights or config.weights or "auto")


def load_engine(args: argparse.Namespace, config: Config, status):
    """Load the model the flags name, with a spinner on `status` (a rich Console on stderr)."""
    from edgectx.engine import Engine
    from edgectx.model.discover import resolve_model

    path = resolve_model(args.model, config)
    with status.status(f"Loading {path.name} ..."):
        engine = Engine.load(path, **engine_options(args, config))
    status.print(f"[dim]{engine.spec.describe()} on {engine.device.type}[/dim]", highlight=False)
    return engine
