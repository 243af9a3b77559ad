"""Choice-order robustness (CircularEval, as in MMBench): ask each multiple-choice question under
every rotation of its options.

Rotation ``r`` of options ``(o_0 … o_{k-1})`` shows ``(o_r, …, o_{k-1}, o_0, …, o_{r-1})``: letter
``j`` then names original option ``(j + r) mod k``, and the gold letter moves to
``(g − r) mod k``. A k-option question is asked k times (rotation 0 is the ordinary run).

* **circular accuracy** — share of questions answered right under *every* rotation;
* **consistency** — share of questions where the same original option is chosen under every rotation
  (right or wrong; an unreadable answer breaks it);
* ``accuracy_rotation_0`` (the ordinary accuracy) and ``mean_rotation_accuracy`` beside them.

A model that always answers "A" is right under at most one rotation and picks a different original
option each time: circular accuracy 0, consistency 0 (for k ≥ 2).

:func:`rotate_records` builds the rotated manifest records (``predict`` answers them like any other);
:func:`circular_metrics` scores prediction rows grouped by rotation.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from ..data.choices import LETTERS, choice_letter, option_texts
from .extract import extract_choice
from .stats import proportion_intervals


def rotate(choices: Sequence[str], r: int) -> list[str]:
    """Options shown under rotation ``r``."""
    k = len(choices)
    r %= k
    return list(choices[r:]) + list(choices[:r])


def rotate_records(records: Sequence) -> dict[int, list]:
    """``{r: [records rotated by r]}`` for r = 1 … k_max − 1 (a question with k options appears in
    rotations 1 … k − 1). Only multiple-choice records; the answer becomes the rotated gold letter."""
    out: dict[int, list] = defaultdict(list)
    for rec in records:
        if not rec.choices:
            continue
        k = len(rec.choices)
        letter = choice_letter(rec.answer, rec.choices)
        if letter is None:
            continue
        g = LETTERS.index(letter)
        for r in range(1, k):
            out[r].append(replace(rec, choices=tuple(rotate(rec.choices, r)), answer=LETTERS[(g - r) % k]))
    return dict(sorted(out.items()))


def _row_id(row: Mapping) -> object:
    return ("row", row["row"]) if isinstance(row.get("row"), int) else ("key", row.get("key"))


def circular_metrics(rows_by_rotation: Mapping[int, Sequence[Mapping]], confidence: float = 0.95,
                     group_of=None) -> dict[str, object]:
    """Circular accuracy and consistency from prediction rows (as ``predict`` writes them) keyed by
    rotation (0 = the ordinary run). Questions missing a rotation are counted in
    ``n_incomplete`` and not scored. ``group_of(category)`` (default: the WSI-Bench groups of
    :func:`~wsi_llava.eval.baselines.group_of`) gives ``by_group``."""
    if group_of is None:
        from .baselines import group_of
    answers: dict[object, dict[int, tuple[int | None, int]]] = defaultdict(dict)
    meta: dict[object, dict] = {}
    for r, rows in rows_by_rotation.items():
        for row in rows:
            if row.get("kind") != "mc" or not row.get("choices"):
                continue
            choices = option_texts(row["choices"])
            k = len(choices)
            gold = choice_letter(str(row.get("reference", "")), choices)
            if gold is None:
                continue
            picked = extract_choice(row.get("prediction"), choices)
            rid = _row_id(row)
            answers[rid][r] = (None if picked is None else (LETTERS.index(picked) + r) % k, (LETTERS.index(gold) + r) % k)
            if r == 0 or rid not in meta:
                meta[rid] = {"k": k, "category": row.get("category")}
    complete, incomplete = {}, 0
    for rid, by_r in answers.items():
        k = meta[rid]["k"]
        if set(by_r) >= set(range(k)):
            complete[rid] = [by_r[r] for r in range(k)]
        else:
            incomplete += 1

    def summary(ids: Sequence[object]) -> dict[str, object]:
        right = np.array([float(all(p == g for p, g in complete[i])) for i in ids])
        same = np.array([float(complete[i][0][0] is not None and len({p for p, _ in complete[i]}) == 1) for i in ids])
        first = np.array([float(complete[i][0][0] == complete[i][0][1]) for i in ids])
        each = np.array([np.mean([p == g for p, g in complete[i]]) for i in ids])
        exact = proportion_intervals(right, confidence)
        return {
            "n": len(ids), "circular_accuracy": float(right.mean()), "circular_accuracy_wilson": exact["wilson"],
            "circular_accuracy_clopper_pearson": exact["clopper_pearson"],
            "consistency": float(same.mean()), "consistency_wilson": proportion_intervals(same, confidence)["wilson"],
            "accuracy_rotation_0": float(first.mean()), "mean_rotation_accuracy": float(each.mean()),
            "n_unparsed_answers": int(sum(p is None for i in ids for p, _ in complete[i])),
        }

    ids = sorted(complete, key=str)
    out: dict[str, object] = {"n_incomplete": incomplete, "rotations": sorted(rows_by_rotation)}
    if not ids:
        return {**out, "n": 0}
    out.update(summary(ids))
    by_cat: dict[str, list] = defaultdict(list)
    by_group: dict[str, list] = defaultdict(list)
    for i in ids:
        cat = meta[i]["category"]
        if cat:
            by_cat[cat].append(i)
            group = group_of(cat) if group_of else None
            if group:
                by_group[group].append(i)
    if by_cat:
        out["by_category"] = {c: summary(v) for c, v in sorted(by_cat.items())}
    if by_group:
        out["by_group"] = {g: summary(v) for g, v in sorted(by_group.items())}
    return out
