"""`edgectx doctor`: what works on this machine and what to do about what does not.

Each check is (name, ok, detail, advice). With `engine_url` in the config, the remote engine is checked too. Optional parts (CUDA, bitsandbytes, triton) are reported
but only a broken required part makes the command exit non-zero.

    edgectx doctor --json
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys
from dataclasses import asdict, dataclass

from edgectx.config import Config, config_path, data_dir, load_config
from edgectx.errors import EdgectxError


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    advice: str = ""
    required: bool = True


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_checks() -> list[Check]:
    import torch  # not at import: the parser of every command imports this module

    from edgectx.model.discover import resolve_model

    checks = [
        Check("python", sys.version_info >= (3, 11), platform.python_version()),
        Check("torch", True, f"{torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"),
    ]
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        name = torch.cuda.get_device_name()
        checks.append(Check("cuda", True, f"{name}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free", required=False))
    else:
        checks.append(Check("cuda", False, "no CUDA GPU visible to PyTorch; edgectx runs on the CPU",
                            "for a GPU, install a CUDA build of torch (pip install torch --index-url https://download.pytorch.org/whl/cu126)", required=False))
    for package, purpose in (("bitsandbytes", "4-bit weights on the GPU"), ("triton", "GPU kernels")):
        version = _version(package)
        checks.append(Check(package, version is not None, version or "not installed",
                            "" if version else f"optional, for {purpose}: pip install 'edgectx[gpu]'", required=False))
    from edgectx.quant.linear import fp16_packing_available

    packed = fp16_packing_available()
    checks.append(Check("fp16 weights", packed, "FBGEMM fp16-packed linears" if packed else "FBGEMM missing: float32 weights (slower decode)", required=False))
    from edgectx.kernels import cpu_attention

    library, why = cpu_attention.status()
    checks.append(Check("cpu attention", library is not None, f"compiled: {library}" if library else why,
                        "" if library else "optional: decode over long contexts is slower without it (needs a C compiler, "
                        "x86-64 with AVX2; set CC)", required=False))
    llama = _version("llama-cpp-python")
    checks.append(Check("llama-cpp-python", llama is not None, llama or "not installed", "" if llama else "pip install llama-cpp-python (the tokenizer)"))
    checks.append(Check("data dir", True, str(data_dir()), "set EDGECTX_HOME to move it"))
    try:
        config = load_config()
        checks.append(Check("config", True, str(config_path())))
    except EdgectxError as e:
        config = Config()
        checks.append(Check("config", False, str(config_path()), str(e)))
    if config.engine_url:
        checks.append(_engine_check(config.engine_url))
    try:
        model = resolve_model(None, config)
        from edgectx.model.source import open_model

        spec = open_model(model).spec
        checks.append(Check("default model", True, f"{model} ({spec.describe()})"))
    except EdgectxError as e:
        checks.append(Check("default model", False, "cannot be loaded", str(e)))
    return checks


def _engine_check(url: str) -> Check:
    """The remote engine the config names (engine_url): does it answer, with the key from the environment?"""
    from edgectx.chat.remote import RemoteEngine, api_key_from_env

    try:
        engine = RemoteEngine.connect(url, api_key_from_env())
    except EdgectxError as e:
        return Check("engine", False, url, str(e))
    engine.close()
    return Check("engine", True, engine.describe())


def add_parser(sub) -> None:
    doctor = sub.add_parser("doctor", help="check torch, CUDA, optional GPU packages, paths and the default model")
    doctor.add_argument("--json", action="store_true")


def run(args) -> int:
    as_json = args.json
    checks = run_checks()
    failed = [c for c in checks if c.required and not c.ok]
    if as_json:
        print(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=2))
        return 1 if failed else 0
    from rich.console import Console

    console = Console()
    for c in checks:
        mark = "[green]ok[/green]" if c.ok else ("[red]FAIL[/red]" if c.required else "[yellow]--[/yellow]")
        console.print(f"{mark:>22} [bold]{c.name}[/bold]: {c.detail}", highlight=False)
        if c.advice and not c.ok:
            console.print(f"{'':>8}-> {c.advice}", highlight=False)
    console.print("All required parts work." if not failed else f"{len(failed)} required part(s) need attention.")
    return 1 if failed else 0
