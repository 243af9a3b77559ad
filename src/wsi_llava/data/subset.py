"""Subsets without code: ``--category NAME`` (repeatable) and ``--limit N`` for predict and eval."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from ..errors import WsiLlavaError

T = TypeVar("T")


class SubsetError(WsiLlavaError, ValueError):
    """``--category`` names no category present, or ``--limit`` is not positive."""


def select(rows: Sequence[T], categories: Sequence[str] | None = None, limit: int | None = None,
           category_of: Callable[[T], str | None] = lambda r: getattr(r, "category", None), what: str = "rows") -> list[T]:
    """Rows whose category is one of ``categories`` (exact match; all when none given), then the
    first ``limit`` of them in file order. A category that matches nothing is an error naming the
    categories present."""
    out = list(rows)
    if limit is not None and limit <= 0:
        raise SubsetError(f"--limit must be a positive number of {what}, got {limit}")
    if categories:
        present = {category_of(r) for r in out}
        unknown = [c for c in categories if c not in present]
        if unknown:
            names = ", ".join(sorted(str(c) for c in present if c)) or "none (no category labels)"
            raise SubsetError(f"--category {', '.join(unknown)}: no {what} with that category; categories present: {names}")
        wanted = set(categories)
        out = [r for r in out if category_of(r) in wanted]
    return out[:limit] if limit is not None else out


def add_subset_arguments(parser) -> None:
    """``--category NAME`` (repeatable) and ``--limit N``."""
    parser.add_argument("--category", action="append", default=None, metavar="NAME",
                        help="only rows of this category (exact name; repeatable)")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N rows (after --category)")
