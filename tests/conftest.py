"""Shared fixtures: tiny offline LMs and a small synthetic cohort (built once per test session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_llava.data.synthetic import SynthConfig, make_cohort
from wsi_llava.tiny import TinyLMConfig, build_tiny_llm

SHARED = Path(__file__).resolve().parents[2] / "shared"


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
