"""Shared fixtures: tiny offline LMs, a small synthetic cohort (built once per test session), and the
reference vectors of the original implementations.

The exactness tests use the compact reference vectors committed in ``tests/fixtures/reference`` (always
present). Larger vectors of the same kind are an optional extra check: :func:`larger_reference_dir` is
the one place that looks for them outside the repository; tests that need them request the
``larger_reference`` fixture, which skips with a reason when they are absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors import safe_open

from wsi_llava.data.synthetic import SynthConfig, make_cohort
from wsi_llava.model.slide_encoder import SlideEncoder, load_slide_encoder
from wsi_llava.tiny import TinyLMConfig, build_tiny_llm

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
    """The optional larger reference vectors: ``$WSI_LLAVA_REFERENCE_DIR``, else the development
    machine's folder beside the clone. Returns (folder or None, why not found)."""
    env = os.environ.get(LARGER_REFERENCE_ENV)
    where = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "reference"
    missing = [name for name in LARGER_REFERENCE_FILES if not (where / name).is_file()]
    if not missing:
        return where, ""
    source = f"${LARGER_REFERENCE_ENV}={env}" if env else f"{where} (${LARGER_REFERENCE_ENV} is not set)"
    problem = "no such folder" if not where.is_dir() else f"missing {', '.join(missing)}"
    return None, (f"optional larger reference vectors not available: {source}: {problem}; "
                  f"the committed compact vectors in tests/fixtures/reference are checked instead")


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
