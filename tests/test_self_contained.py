"""The repository is self-contained: the exactness tests' reference vectors are committed and always
collected, and nothing in the sources, tests, benches or docs depends on folders beside the clone."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "reference"
FIXTURE_FILES = {
    "gigapath_mini_state_dict.safetensors", "gigapath_mini_N300_fp32.safetensors",
    "gigapath_mini_N1500_fp32.safetensors", "prumerge_prumerge_N576_C32_adaptive.safetensors",
    "prumerge_plus_N576_C32_adaptive.safetensors",
}

# (module, test function, how many parametrized cases at least) of the exactness tests on the fixtures
EXACTNESS_TESTS = [
    ("test_select", "test_prumerge_reference_reproduces_original", 2),
    ("test_select", "test_slide_prumerge_agrees_with_reference", 2),
    ("test_slide_encoder", "test_reproduces_mini_reference", 2),
]

# Written so that this file does not match itself.
FORBIDDEN = [
    re.compile(r"\.\./" r"shared"),  # a folder beside the clone
    re.compile(r"shared" r"""["']?\s*[/,]\s*["']?(?:reference|benchmarks)"""),  # its contents, also as path parts
    re.compile(r"DESIGN" r"\.md"),  # the design notes that live outside the repository
]
SCANNED = ["src", "tests", "bench", "experiments", "docs", "configs", ".ci", "README.md", "Makefile", "pyproject.toml"]
SKIPPED_DIRS = {"__pycache__", ".venv", ".pytest_cache"}
BINARY = {".safetensors", ".png", ".jpg", ".h5", ".pt", ".pth", ".bin", ".pyc", ".gz", ".zip"}
# No exception: the optional larger reference vectors are found only through $WSI_LLAVA_REFERENCE_DIR.
ALLOWED: dict[str, int] = {}


def load_test_module(name: str):
    spec = importlib.util.spec_from_file_location(f"_self_contained_{name}", ROOT / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parametrized_values(func) -> list:
    marks = [m for m in getattr(func, "pytestmark", []) if m.name == "parametrize"]
    assert marks, f"{func.__name__} is not parametrized"
    return list(marks[0].args[1])


def scanned_files():
    for entry in SCANNED:
        path = ROOT / entry
        if path.is_file():
            yield path
        elif path.is_dir():
            for p in sorted(path.rglob("*")):
                rel = p.relative_to(ROOT).parts
                if (p.is_file() and p.suffix not in BINARY
                        and not any(part in SKIPPED_DIRS or part.endswith(".egg-info") for part in rel)):
                    yield p


def test_fixture_files_exist_and_are_readable():
    assert (FIXTURES / "README.md").stat().st_size > 0
    present = {p.name for p in FIXTURES.glob("*.safetensors")}
    assert FIXTURE_FILES <= present, f"missing fixtures: {sorted(FIXTURE_FILES - present)}"
    for name in FIXTURE_FILES:
        path = FIXTURES / name
        assert path.stat().st_size > 1000, name
        with safe_open(str(path), "pt") as f:
            assert len(list(f.keys())) > 0, name


@pytest.mark.parametrize("module,func,at_least", EXACTNESS_TESTS, ids=lambda x: str(x))
def test_exactness_tests_collect_the_fixtures(module, func, at_least):
    cases = parametrized_values(getattr(load_test_module(module), func))
    assert len(cases) >= at_least, f"{module}.{func} collects {len(cases)} case(s)"
    for case in cases:
        assert isinstance(case, Path) and case.is_file() and case.is_relative_to(FIXTURES), case


def test_nothing_depends_on_folders_beside_the_clone():
    offenders, allowed_seen = [], {}
    for path in scanned_files():
        rel = path.relative_to(ROOT).as_posix()
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if any(p.search(line) for p in FORBIDDEN):
                if rel in ALLOWED:
                    allowed_seen[rel] = allowed_seen.get(rel, 0) + 1
                    if allowed_seen[rel] <= ALLOWED[rel]:
                        continue
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert not offenders, "references to folders outside the repository:\n" + "\n".join(offenders)


def test_scan_covers_the_tree():
    """Guard against the scan silently scanning nothing (a renamed folder, a wrong root)."""
    files = {p.relative_to(ROOT).as_posix() for p in scanned_files()}
    assert {"README.md", "Makefile", "tests/conftest.py", "src/wsi_llava/cli.py", "bench/eval_scoring.py"} <= files
