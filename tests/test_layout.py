"""Dependencies point one way (tui -> core -> quant, kernels) and no top-level tui/quant/kernels ship."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(folder: str) -> set[str]:
    names = set()
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
    return names


def test_core_never_imports_textual_or_tui():
    bad = {n for n in _imports("edgectx") if n.startswith(("textual", "edgectx.tui"))}
    assert not bad


def test_quant_and_kernels_never_import_the_engine():
    for folder in ("quant", "kernels"):
        engine_side = {n for n in _imports(folder) if n.startswith("edgectx.") and not n.startswith(("edgectx.quant", "edgectx.kernels"))}
        assert not engine_side, (folder, engine_side)


def test_subpackages_live_inside_the_edgectx_namespace():
    for name in ("tui", "quant", "kernels"):
        assert importlib.util.find_spec(f"edgectx.{name}") is not None
        spec = importlib.util.find_spec(name)
        assert spec is None or "site-packages/" + name not in str(spec.origin), f"a top-level '{name}' module is installed"
