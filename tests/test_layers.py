"""The package's layers, enforced: ``config``/``data`` → ``model`` → ``train``/``infer`` → ``eval``/``serve``
→ ``cli``, never upward; and no module over 450 lines (one concern per module)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "wsi_llava"

#: top-level name under ``wsi_llava`` → its line in docs/architecture.md's "Layering" diagram. A module
#: imports its own package, the other packages of its own line, and the lines above (lower numbers);
#: the packages named in NOT_SIDEWAYS do not import the other packages of their line.
LAYERS: dict[str, int] = {
    "errors": 0, "fileio": 0, "precision": 0, "tiny": 0, "models_offline": 0,
    "config": 1, "arguments": 1, "select_options": 1,
    "data": 2,
    "model": 3,
    "train": 4, "infer": 4,
    "eval": 5, "serve": 5,
    "cli": 6, "demo": 6, "docs": 6, "__init__": 6,
}
NOT_SIDEWAYS = {"train", "infer", "eval", "serve"}
MAX_LINES = 450


def modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py"))


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """``(line, top-level wsi_llava name)`` for every import of the package inside ``path``."""
    rel = path.relative_to(SRC).with_suffix("")
    package = list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
                if not target:
                    out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
                    continue
            elif node.module and node.module.split(".")[0] == "wsi_llava":
                target = node.module.split(".")[1:] or [a.name for a in node.names]
            else:
                continue
            out.append((node.lineno, target[0]))
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "wsi_llava" and len(parts) > 1:
                    out.append((node.lineno, parts[1]))
    return out


def layer_violations() -> list[str]:
    bad = []
    for path in modules():
        me = path.relative_to(SRC).parts[0].removesuffix(".py")
        assert me in LAYERS, f"{path}: add {me!r} to LAYERS in this test"
        for line, target in imported_packages(path):
            if target == me:
                continue
            assert target in LAYERS, f"{path}:{line}: unknown package {target!r}"
            lower = LAYERS[target] < LAYERS[me]
            sideways_ok = LAYERS[target] == LAYERS[me] and me not in NOT_SIDEWAYS
            if not (lower or sideways_ok):
                bad.append(f"{path.relative_to(SRC.parent)}:{line}: {me} (layer {LAYERS[me]}) imports "
                           f"{target} (layer {LAYERS[target]})")
    return bad


def test_no_upward_or_sideways_imports():
    assert layer_violations() == []


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker is not vacuous: an upward import written into a copy of the tree is reported."""
    import shutil

    copy = tmp_path / "wsi_llava"
    shutil.copytree(SRC, copy)
    (copy / "data" / "upward_probe.py").write_text("from ..serve.app import create_app\n", encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "SRC", copy)
    assert any("upward_probe.py" in v for v in layer_violations())


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_module_size(path):
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(SRC)} has {n} lines (> {MAX_LINES}): split it by concern"
