"""The shuffled-slide ablation pairs each slide with a random other slide (never itself)."""

from __future__ import annotations

import pytest

from wsi_llava.infer.predict import shuffle_partner


def test_partner_is_a_seeded_derangement_unrelated_to_id_order():
    ids = [f"SYN-{i:04d}" for i in range(64)]
    pairs = shuffle_partner(ids + ids[:5])  # repeated ids count once
    assert sorted(pairs) == ids and sorted(pairs.values()) == ids  # a permutation of the slides
    assert all(a != b for a, b in pairs.items())  # nobody keeps its own features
    assert pairs == shuffle_partner(list(reversed(ids)))  # deterministic, independent of row order
    assert pairs != shuffle_partner(ids, seed=1)
    # labels that follow the id order (label = index % 4, as in the synthetic cohort) are not carried over:
    # "the next id" would give the partner label + 1 every time; a random partner agrees about 1/4 of the time
    same = sum(int(a[-4:]) % 4 == int(b[-4:]) % 4 for a, b in pairs.items())
    assert 0 < same < 32
    shifted = sum((int(b[-4:]) - int(a[-4:])) % 64 == 1 for a, b in pairs.items())
    assert shifted < 8


def test_one_slide_cannot_be_shuffled():
    with pytest.raises(ValueError, match="two different slides"):
        shuffle_partner(["a", "a"])
