"""Prediction rows → validated :class:`Item` rows, each classed as multiple choice, yes/no or open.

Input rows are the objects ``predict`` writes (one per JSONL line)::

    {"key", "slide_id", "question", "reference", "prediction", "choices", "kind", "category",
     "dataset", "row"}

* ``kind == "mc"``: closed; ``reference`` is the gold letter (or the option text), ``choices`` the
  options (or, if null, parsed from ``A) … B) …`` in the question); the gold letter comes from
  :func:`~wsi_llava.data.choices.match_choice`.
* ``kind == "vqa"`` whose reference is exactly Yes/No (any case): closed yes/no.
* every other ``vqa`` row and every ``report`` row: open-ended.

A bad row is an :class:`EvalInputError` naming the source, line (or item) and field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..data.choices import ChoiceError, match_choice, option_texts, parse_inline_options
from ..errors import WsiLlavaError
from .extract import yes_no_label

KINDS = ("mc", "vqa", "report")


class EvalInputError(WsiLlavaError, ValueError):
    """A prediction row cannot be scored (the message names the source, line/row and field)."""


@dataclass(frozen=True)
class Item:
    """One validated prediction row.

    ``kind`` here is the scoring class: ``"mc"``, ``"yes_no"`` or ``"open"``.
    """

    key: str
    row: int | None
    slide_id: str
    question: str
    kind: str
    prediction: str
    reference: str
    choices: tuple[str, ...] | None = None
    category: str | None = None
    dataset: str | None = None


def _where(row: Mapping, index: int, source: str) -> str:
    if "_line" in row:
        return f"{source}, line {row['_line']}"
    return f"{source}, item {index} (row {row.get('row')!r}, key {row.get('key')!r})"


def _text_field(row: Mapping, name: str, where: str, *, required: bool = True) -> str:
    value = row.get(name)
    if value is None:
        if required:
            raise EvalInputError(f"{where}: field {name!r} is missing")
        return ""
    if not isinstance(value, str):
        raise EvalInputError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _optional_label(row: Mapping, name: str) -> str | None:
    value = row.get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    value = str(value).strip()
    return value or None


def prepare_items(rows: Sequence[Mapping], source: str = "predictions") -> list[Item]:
    """Validate prediction rows and classify each as ``mc``, ``yes_no`` or ``open``.

    Raises :class:`EvalInputError` naming the source, line (or item) and field of the first bad row.
    """
    items = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise EvalInputError(f"{source}, item {i}: expected an object, got {type(row).__name__}")
        where = _where(row, i, source)
        kind = row.get("kind")
        if kind not in KINDS:
            raise EvalInputError(f"{where}: field 'kind' must be one of {list(KINDS)}, got {kind!r}")
        prediction = _text_field(row, "prediction", where)
        reference = _text_field(row, "reference", where)
        question = _text_field(row, "question", where, required=False)
        if not reference.strip():
            raise EvalInputError(f"{where}: field 'reference' is empty")
        choices = row.get("choices")
        if choices is not None:
            if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
                raise EvalInputError(f"{where}: field 'choices' must be a list of strings or null")
            choices = tuple(option_texts(choices))
        if kind == "mc":
            if not choices:
                parsed = parse_inline_options(question)
                if parsed is None:
                    raise EvalInputError(
                        f"{where}: field 'choices' is empty and the question has no inline 'A) … B) …' options"
                    )
                choices = tuple(parsed[1])
            if len(choices) < 2:
                raise EvalInputError(f"{where}: field 'choices' needs at least two options, got {list(choices)}")
            try:
                gold = match_choice(reference, choices)
            except ChoiceError as e:
                raise EvalInputError(
                    f"{where}: field 'reference': {reference!r} gives no single option: {e} (options {list(choices)})"
                ) from None
            scoring, reference = "mc", gold
        elif kind == "vqa" and yes_no_label(reference) is not None:
            scoring, reference = "yes_no", yes_no_label(reference)
        else:
            scoring = "open"
        key = row.get("key")
        items.append(
            Item(
                key=str(key) if key is not None else f"item-{i}",
                row=row.get("row") if isinstance(row.get("row"), int) else None,
                slide_id=str(row.get("slide_id") or ""),
                question=question,
                kind=scoring,
                prediction=prediction,
                reference=reference,
                choices=choices,
                category=_optional_label(row, "category"),
                dataset=_optional_label(row, "dataset"),
            )
        )
    return items
