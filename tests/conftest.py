"""Shared fixtures: tiny offline LMs, a small synthetic cohort (built once per test session), and the
reference vectors of the original implementations.

The exactness tests use the compact reference vectors committed in ``tests/fixtures/reference`` (always
present). Larger vectors of the same kind are an optional extra check: :func:`larger_reference_dir` is
the one place that looks for them outside the repository; tests that need them request the
``larger_reference`` fixture, which skips with a reason when they are absent.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from safetensors import safe_open

from wsi_llava.data.synthetic import SynthConfig, make_cohort
from wsi_llava.model.slide_encoder import SlideEncoder, load_slide_encoder
from wsi_llava.tiny import TinyLMConfig, build_tiny_llm

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
"""Experiments built on the package (``python experiments/NAME.py``), outside ``src/``; on ``sys.path``
so their tests can import them by module name."""
if str(EXPERIMENTS) not in sys.path:
    sys.path.insert(0, str(EXPERIMENTS))

FIXTURE_REFERENCE = Path(__file__).resolve().parent / "fixtures" / "reference"
"""The committed compact reference vectors (see its README.md)."""


@pytest.fixture(scope="session")
def mini_reference_encoder() -> SlideEncoder:
    """The committed "mini" GigaPath slide encoder (eval mode); its config is the weights' safetensors
    metadata (JSON values)."""
    weights = FIXTURE_REFERENCE / "gigapath_mini_state_dict.safetensors"
    with safe_open(str(weights), "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    return load_slide_encoder(weights, **meta)


LARGER_REFERENCE_ENV = "WSI_LLAVA_REFERENCE_DIR"
LARGER_REFERENCE_FILES = (
    "gigapath_small_state_dict.safetensors", "gigapath_small_N300_fp32.safetensors",
    "gigapath_small_N3000_fp32.safetensors", "prumerge_prumerge_N144_C64_adaptive.safetensors",
    "prumerge_prumerge_clipL_N576_C1024_adaptive.safetensors",
    "prumerge_plus_clipL_N576_C1024_adaptive.safetensors",
)


def larger_reference_dir() -> tuple[Path | None, str]:
    """The optional larger reference vectors: the folder ``$WSI_LLAVA_REFERENCE_DIR`` names (nothing
    outside the repository is looked at otherwise). Returns (folder or None, why not found)."""
    env = os.environ.get(LARGER_REFERENCE_ENV)
    fallback = "the committed compact vectors in tests/fixtures/reference are checked instead"
    if not env:
        return None, f"optional larger reference vectors not given (${LARGER_REFERENCE_ENV} is not set); {fallback}"
    where = Path(env)
    missing = [name for name in LARGER_REFERENCE_FILES if not (where / name).is_file()]
    if not missing:
        return where, ""
    problem = "no such folder" if not where.is_dir() else f"missing {', '.join(missing)}"
    return None, f"optional larger reference vectors not available: ${LARGER_REFERENCE_ENV}={env}: {problem}; {fallback}"


@pytest.fixture(scope="session")
def larger_reference() -> Path:
    """Folder of the optional larger reference vectors; skips the requesting test (with the reason)
    when it is absent."""
    where, why = larger_reference_dir()
    if where is None:
        pytest.skip(why)
    return where


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory) -> Path:
    """A tiny random Llama (tied embeddings) + tokenizer with a Llama-3 chat template."""
    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llm"))


@pytest.fixture(scope="session")
def tiny_llm_untied(tmp_path_factory) -> Path:
    """Same, with an untied output head."""
    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llm_untied"), TinyLMConfig(tie_word_embeddings=False, seed=1))


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    """12 train + 4 test synthetic slides, 16-d features, 40–120 tiles each."""
    return make_cohort(tmp_path_factory.mktemp("cohort"),
                       SynthConfig(n_train=12, n_test=4, feature_dim=16, min_tiles=40, max_tiles=120, seed=3))


@pytest.fixture()
def small_tmpfs(tmp_path):
    """``mount(size)`` → a fresh tmpfs of ``size`` (e.g. "1m") under ``tmp_path``: a real disk that fills up,
    unmounted after the test. Where mounting is not allowed (not root) the test is skipped with the reason;
    under CI (``$CI`` set, run as root) it fails instead, so the disk-full tests can never quietly not run."""
    with contextlib.ExitStack() as stack:

        def mount(size: str) -> Path:
            where = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
            where.mkdir()
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"tmpfs-{where.name}", str(where)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                why = f"cannot mount a small tmpfs here ({proc.stderr.strip() or proc.returncode})"
                if os.environ.get("CI"):
                    pytest.fail(why + "; CI runs as root and must run the disk-full tests")
                pytest.skip(why)
            stack.callback(_unmount, where)
            return where

        yield mount


def _unmount(where: Path) -> None:
    gc.collect()  # a writer's file object held by a traceback keeps the mount busy
    if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(where)], check=False)
