"""The layout's rules (../shared/ARCHITECTURE.md, "Layout"): the folder names the layer, imports point one way.

Every `import` in the source counts, at module level or inside a function: a lazy import is still an arrow.
`python tests/test_layout.py` prints the arrows between packages and the layers they fall in.
"""

from __future__ import annotations

import ast
import graphlib
import importlib.util
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"edgectx": ROOT / "edgectx", "edgectx.tui": ROOT / "tui", "edgectx.quant": ROOT / "quant",
           "edgectx.kernels": ROOT / "kernels"}

# Lowest first. A package imports only packages of a lower layer (and itself).
LAYERS = [
    {"errors"},  # the one-sentence errors: import nothing
    {"kernels"},  # Triton kernels: edgectx.errors at most
    {"quant"},  # weight and KV quantization: edgectx.errors, and the kernels (quant.gguf_cuda runs gguf_matmul)
    {"config", "cpu_share"},  # the data and config paths, the config file (it checks names against quant.formats);
    # the thread count that follows the free cores (sets ggml's too)
    {"model", "snapshot"},  # the transformer and its loaders; the .ectx file format
    {"memory", "store"},  # the long-context memory; the SQLite store
    {"engine"},
    {"chat", "train"},  # a conversation over the engine; training retaining heads
    {"bench"},
    {"tui", "server"},  # the faces: the terminal UI, the OpenAI API
    {"cli"},  # the command line, the face that starts the others
    {"__main__"},
]
RANK = {package: i for i, layer in enumerate(LAYERS) for package in layer}


def _modules() -> dict[str, Path]:
    modules = {}
    for prefix, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if prefix == "edgectx" and parts[0] in ("tui", "quant", "kernels"):
                continue
            name = ".".join((prefix, *parts[:-1], *(() if parts[-1] == "__init__" else (parts[-1],))))
            modules[name] = path
    return modules


MODULES = _modules()


def _imported(name: str, path: Path) -> set[str]:
    """The edgectx modules `name` imports (`from edgectx.x import y` counts as edgectx.x.y when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("edgectx"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgectx"):
            found.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names)
    found.discard("edgectx")  # `from edgectx import __version__`: the package's own metadata
    return found


GRAPH = {name: _imported(name, path) for name, path in MODULES.items()}


def package_of(module: str) -> str:
    """edgectx.memory.context -> memory; edgectx.engine -> engine; edgectx.tui.screens.chat -> tui."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "edgectx"


def package_arrows() -> dict[tuple[str, str], int]:
    arrows: dict[tuple[str, str], int] = defaultdict(int)
    for module, targets in GRAPH.items():
        for target in targets:
            if package_of(module) != package_of(target):
                arrows[package_of(module), package_of(target)] += 1
    return dict(arrows)


def test_every_package_has_a_layer():
    assert {package_of(m) for m in MODULES} - {"edgectx"} == set(RANK)


def test_no_import_circle_among_modules_or_packages():
    """graphlib refuses a graph with a cycle and names it."""
    graphlib.TopologicalSorter(GRAPH).prepare()
    packages = defaultdict(set)
    for a, b in package_arrows():
        packages[a].add(b)
    graphlib.TopologicalSorter(packages).prepare()


def test_imports_point_down_the_layers():
    upward = sorted(f"{module} -> {target}" for module, targets in GRAPH.items() for target in targets
                    if package_of(module) != package_of(target) and RANK[package_of(target)] >= RANK[package_of(module)])
    assert not upward


def test_the_model_never_builds_its_own_memory_or_reaches_the_store():
    reached = {package_of(t) for m, ts in GRAPH.items() if package_of(m) == "model" for t in ts}
    assert not reached & {"memory", "store", "chat", "engine", "snapshot"}, reached


def test_quant_and_kernels_never_import_the_engine():
    # edgectx.errors is a leaf (no imports): quant raises its one-sentence UsageError for a missing bitsandbytes
    for package, allowed in (("quant", {"kernels", "errors"}), ("kernels", {"errors"})):
        reached = {package_of(t) for m, ts in GRAPH.items() if package_of(m) == package for t in ts}
        assert reached <= {package} | allowed, (package, reached)


def test_config_imports_only_the_format_names():
    assert GRAPH["edgectx.config"] <= {"edgectx.errors", "edgectx.quant.formats"}
    assert not GRAPH["edgectx.quant.formats"]


def _third_party(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_core_never_imports_textual_or_tui():
    """Only `edgectx tui` (edgectx.cli.tui) starts the TUI, and only inside the function that runs it, so every
    other command (and the engine used as a library) never loads textual."""
    for module, path in MODULES.items():
        if package_of(module) == "tui":
            continue
        ui = {n for n in _third_party(path) if n.startswith(("textual", "edgectx.tui"))}
        assert module == "edgectx.cli.tui" or not ui, (module, ui)
    at_top = {n for n in _third_party(MODULES["edgectx.cli.tui"], top_level_only=True) if n.startswith(("textual", "edgectx.tui"))}
    assert not at_top


def test_only_the_server_imports_the_web_framework():
    """FastAPI, Starlette and uvicorn belong to `edgectx serve` (edgectx.server; edgectx.cli.serve inside `run`)."""
    web = ("fastapi", "starlette", "uvicorn")
    for module, path in MODULES.items():
        if package_of(module) == "server":
            continue
        used = {n for n in _third_party(path) if n.startswith(web)}
        assert module == "edgectx.cli.serve" or not used, (module, used)
    assert not {n for n in _third_party(MODULES["edgectx.cli.serve"], top_level_only=True) if n.startswith(web)}


def test_subpackages_live_inside_the_edgectx_namespace():
    for name in ("tui", "quant", "kernels"):
        assert importlib.util.find_spec(f"edgectx.{name}") is not None
        spec = importlib.util.find_spec(name)
        assert spec is None or "site-packages/" + name not in str(spec.origin), f"a top-level '{name}' module is installed"


def test_every_package_is_installed():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(("edgectx", *p.parent.relative_to(ROOT / "edgectx").parts)) for p in (ROOT / "edgectx").rglob("__init__.py")}
    assert folders <= listed, folders - listed


if __name__ == "__main__":
    arrows = package_arrows()
    for i, layer in reversed(list(enumerate(LAYERS))):
        for package in sorted(layer):
            targets = sorted((b for (a, b) in arrows if a == package), key=lambda b: (-RANK[b], b))
            n = sum(arrows[package, b] for b in targets)
            print(f"{i} {package:9} -> {', '.join(targets) or '(nothing)'}" + (f"   [{n} imports]" if n else ""))
    print(f"{len(MODULES)} modules in {len(RANK)} packages; {len(arrows)} arrows between packages; no circle, none upward")
