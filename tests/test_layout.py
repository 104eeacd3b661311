"""Dependencies point one way (tui -> core -> quant, kernels) and no top-level tui/quant/kernels ship."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _names(nodes) -> set[str]:
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _imports(folder: str, skip: tuple[str, ...] = ()) -> set[str]:
    names = set()
    for path in (ROOT / folder).rglob("*.py"):
        if path.name not in skip:
            names |= _names(ast.walk(ast.parse(path.read_text(encoding="utf-8"))))
    return names


def _is_ui(name: str) -> bool:
    return name.startswith(("textual", "edgectx.tui"))


def test_core_never_imports_textual_or_tui():
    """Only the command-line entry point starts the TUI, and only inside the function that runs it, so every
    other command (and the engine used as a library) never loads textual."""
    assert not {n for n in _imports("edgectx", skip=("cli.py",)) if _is_ui(n)}
    cli = ast.parse((ROOT / "edgectx" / "cli.py").read_text(encoding="utf-8"))
    assert not {n for n in _names(cli.body) if _is_ui(n)}  # nothing at module level
    ui_in_functions = {n for f in cli.body if isinstance(f, ast.FunctionDef) for n in _names(ast.walk(f)) if _is_ui(n)}
    assert ui_in_functions == {"edgectx.tui.app"}


def test_quant_and_kernels_never_import_the_engine():
    # edgectx.errors is a leaf (no imports): quant raises its one-sentence UsageError for a missing bitsandbytes
    allowed = ("edgectx.quant", "edgectx.kernels", "edgectx.errors")
    for folder in ("quant", "kernels"):
        engine_side = {n for n in _imports(folder) if n.startswith("edgectx.") and not n.startswith(allowed)}
        assert not engine_side, (folder, engine_side)


def test_subpackages_live_inside_the_edgectx_namespace():
    for name in ("tui", "quant", "kernels"):
        assert importlib.util.find_spec(f"edgectx.{name}") is not None
        spec = importlib.util.find_spec(name)
        assert spec is None or "site-packages/" + name not in str(spec.origin), f"a top-level '{name}' module is installed"
