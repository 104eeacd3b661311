"""The flags several commands share, and what they become: a MemoryConfig, SamplingParams, a loaded Engine.

Every value comes from the flag when given, else from the config file, else from the built-in default.

    add_model_args(parser); add_memory_args(parser)
    memory = memory_config_from(args, config)   # None: plain full attention
    engine = load_engine(args, config, status)  # with a spinner on the status console
"""

from __future__ import annotations

import argparse
import math

from edgectx.config import Config
from edgectx.errors import UsageError
from edgectx.memory.config import LIMITS, POSITIONS, SCORERS, MemoryConfig, default_chunk_tokens
from edgectx.quant.formats import WEIGHT_FORMATS

DEFAULT_BUDGET = MemoryConfig().budget_tokens
DEFAULT_MAX_TOKENS = 512
BENCH_SCORERS = SCORERS + ("oracle", "oracle-logprob")  # edgectx.bench.oracle: eviction by the true labels
# Upper bounds keep a typo from sizing buffers or overflowing a conversion: each is far past any useful value.
MAX_TOKENS = 1 << 24  # token counts (contexts, answers, training text): 16M, past any model's context
MAX_BUDGET = LIMITS["budget_tokens"]
MAX_ID = 2**63 - 1  # SQLite's largest integer: a larger id is no id
MAX_FILE_MIB = float(2**20)  # 1 TiB: a document limit, read into memory as text
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes


def int_range(low: int, high: int):
    """An argparse type: a whole number from `low` to `high`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number from {low:,} to {high:,}, got {text}")
        return value
    return parse


def float_range(low: float, high: float = math.inf, above: bool = False):
    """An argparse type: a finite number from `low` (or, with `above`, greater than `low`) to `high`."""
    if high != math.inf:
        bounds = f" from {low:g} to {high:g}" if not above else f" greater than {low:g} and at most {high:g}"
    else:
        bounds = f" greater than {low:g}" if above else f", at least {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (above and value == low) or value > high:
            raise argparse.ArgumentTypeError(f"must be a finite number{bounds}, got {text}")
        return value
    return parse


def file_mib(text: str) -> float:
    """A file-size limit in MiB (an argparse type): at least one byte once converted to bytes, at most 1 TiB."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size in MiB, got {text!r}") from None
    if not (math.isfinite(value) and int(value * 2**20) >= 1 and value <= MAX_FILE_MIB):
        raise argparse.ArgumentTypeError(f"must be a size in MiB from 0.000001 (one byte) to {MAX_FILE_MIB:.0f} (1 TiB), got {text}")
    return value


def token_counts(text: str) -> list[int]:
    """'512,4096' -> [512, 4096] (an argparse type)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {text!r}") from None
    if not values or min(values) < 2 or max(values) > MAX_TOKENS:
        raise argparse.ArgumentTypeError(f"token counts must be from 2 to {MAX_TOKENS:,}, got {text!r}")
    return values


def budget_tokens(text: str) -> int:
    """A memory budget in tokens (an argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count, got {text!r}") from None
    if not 64 <= value <= MAX_BUDGET:
        raise argparse.ArgumentTypeError(f"the budget must be from 64 to {MAX_BUDGET:,} tokens, got {text}")
    return value


def _budgets(text: str) -> list[int]:
    """'2048,1024' -> [2048, 1024]: one run each."""
    values = [v for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {text!r}")
    return [budget_tokens(v) for v in values]


def _budget(text: str) -> int | str:
    if text == "full":
        return text
    if not text.strip().lstrip("+-").isdigit():
        raise argparse.ArgumentTypeError(f"expected a token count or 'full', got {text!r}")
    return budget_tokens(text)


def _scorers(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in BENCH_SCORERS]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"scorers are {', '.join(BENCH_SCORERS)}; got {text!r}")
    return values


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="a .gguf file, a Hugging Face model directory, or a name `edgectx models` lists (default: the embedded SmolLM2)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 or auto (default: auto)")
    p.add_argument("--threads", type=int_range(1, 4096), help="CPU threads for the engine (default: PyTorch's choice)")
    p.add_argument("--ctx", type=int_range(1, MAX_TOKENS), help="context window in tokens (default: the model's trained context)")
    p.add_argument("--weights", choices=WEIGHT_FORMATS,
                   help="weight format: gguf (a GGUF file's own quantization, multiplied by ggml's kernels on the CPU and "
                   "edgectx's Triton kernels on CUDA), 16-bit, or 4-bit nf4 / 8-bit int8 through bitsandbytes (default auto: "
                   "gguf for GGUF files, else nf4 on CUDA for big models when bitsandbytes is installed, else fp16)")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", metavar="URL", help="use a remote engine that serves the OpenAI chat API (e.g. "
                   "http://127.0.0.1:8000/v1: vLLM, llama.cpp's server, Ollama, edgectx serve) instead of loading a "
                   "model; its API key from EDGECTX_ENGINE_API_KEY or OPENAI_API_KEY (config key: engine_url)")
    p.add_argument("--engine-model", metavar="NAME", help="the remote engine's model (default: the first it lists)")


def engine_url_from(args: argparse.Namespace, config: Config) -> str | None:
    return getattr(args, "engine", None) or config.engine_url


def connect_remote(url: str, args: argparse.Namespace, status):
    """The remote engine at `url`, checked (it answers, and lists a model), with a line on `status`."""
    from edgectx.chat.remote import RemoteEngine, api_key_from_env

    with status.status(f"Connecting to {url} ..."):
        engine = RemoteEngine.connect(url, api_key_from_env(), model=getattr(args, "engine_model", None))
    status.print(f"[dim]{engine.describe()}[/dim]", highlight=False)
    return engine


def add_decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step in the background and use it once ready (experimental: on a 2-core "
                   "CPU it measured slower than eager decode, see the README)")


def add_memory_args(p: argparse.ArgumentParser, allow_full: bool = True, lists: bool = False) -> None:
    """The memory flags; with `lists`, --budget and --scorer take comma-separated values (one run each)."""
    full = "; 'full' for plain full attention" if allow_full else ""
    several = " (comma-separated: one run each)" if lists else ""
    p.add_argument("--budget", type=_budgets if lists else _budget if allow_full else budget_tokens,
                   help=f"device KV budget in tokens per layer and KV head (default {DEFAULT_BUDGET}{full}){several}")
    p.add_argument("--positions", choices=POSITIONS, help="how the kept context is numbered (default compact)")
    p.add_argument("--chunk", type=int_range(1, LIMITS["chunk_tokens"]),
                   help="prefill chunk in tokens; eviction runs after each (default 512 on a CPU, 2048 on a GPU)")
    p.add_argument("--scorer", type=_scorers if lists else None, choices=None if lists else SCORERS,
                   help="eviction scores: Locret retaining heads, attention mass, or recency (window) "
                   f"(default auto: attention mass; heads only by name){several}"
                   + ("; oracle / oracle-logprob: the true labels heads learn, read from the future (a ceiling)" if lists else ""))


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Unset flags fall back to the config file, then to the defaults named here."""
    # The same ranges as the config file's keys (edgectx.config).
    p.add_argument("--temperature", type=float_range(0, 5), help="0 for greedy (default 0.7)")
    p.add_argument("--top-k", type=int_range(0, MAX_TOKENS), help="default 40; 0 disables")
    p.add_argument("--top-p", type=float_range(0, 1), help="default 0.9; 1 disables")
    p.add_argument("--repeat-penalty", type=float_range(0, above=True), help="default 1.1; 1 disables")
    p.add_argument("--seed", type=int_range(0, MAX_SEED), help="fix the sampling seed for reproducible answers")
    p.add_argument("--max-tokens", type=int_range(1, MAX_TOKENS), help=f"longest answer in tokens (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--no-thinking", action="store_true",
                   help="ask a reasoning model (Qwen3) to answer without thinking first (its template's enable_thinking)")


def chunk_from(args: argparse.Namespace, device: str | None = None, config: Config | None = None) -> int:
    """--chunk, else the default of the device the command runs on: `device` (a type: plan's "cuda"), else
    --device's, else the config file's, else the one auto picks."""
    if args.chunk:
        return args.chunk
    if device is None:
        from edgectx.engine import pick_device

        device = pick_device(getattr(args, "device", None) or (config.device if config else None)).type
    return default_chunk_tokens(device)


def memory_config_from(args: argparse.Namespace, config: Config | None = None,
                       device: str | None = None) -> MemoryConfig | None:
    """The memory the flags (then the config file) ask for, for `device` (else --device); None means plain full
    attention."""
    budget = args.budget or (config.budget if config else None) or DEFAULT_BUDGET
    if budget == "full":
        return None
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 64:
        raise UsageError(f"The memory budget must be a token count of at least 64, or 'full' (got {budget!r}).")
    positions = args.positions or (config.positions if config else None) or "compact"
    scorer = getattr(args, "scorer", None) or (config.scorer if config else None) or "auto"
    return MemoryConfig.for_budget(int(budget), positions=positions, chunk_tokens=chunk_from(args, device, config),
                                   scorer=scorer)


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


def load_engine(args: argparse.Namespace, config: Config, status, compile_step: bool = False):
    """Load the model the flags name, with a spinner on `status` (a rich Console on stderr); `compile_step`:
    start compiling the decode step in the background when --compile asks (edgectx.model.step)."""
    from edgectx.engine import Engine
    from edgectx.model.discover import resolve_model

    path = resolve_model(args.model, config)
    with status.status(f"Loading {path.name} ..."):
        engine = Engine.load(path, **engine_options(args, config))
    if compile_step and getattr(args, "compile", False):
        engine.compile_step()
    status.print(f"[dim]{engine.spec.describe()} on {engine.device.type}, {engine.weights} weights[/dim]", highlight=False)
    return engine
