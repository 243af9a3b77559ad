"""``SelectOptions``: the knobs of the visual token selectors (``select_options`` in a config).

A plain dataclass without torch, at the configuration layer, so that a config file's
``select_options`` is checked (names, value types, ranges) when the file is loaded and when a
``WsiLlavaConfig`` is built, not at the first forward step. The selectors themselves are in
:mod:`wsi_llava.model.select`.
"""

from __future__ import annotations

import difflib
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


@dataclass
class SelectOptions:
    """Per-selector knobs. Fields a selector does not use are ignored by it."""

    budget: str = "fixed"
    """PruMerge(+): ``"fixed"`` keeps exactly ``k`` attention tiles (PruMerge+ keeps
    ``round(k * plus_topk_fraction)``); ``"adaptive"`` keeps as many as the original IQR outlier
    rule finds in the row (capped at ``k``), see :func:`~wsi_llava.model.select.adaptive_keep_counts`.
    For ``prumerge`` the remaining slots repeat the kept tokens
    (:func:`~wsi_llava.model.select.fill_by_cycling`); for ``prumerge_plus`` they are filled with
    spatially uniform tiles."""
    merge_neighbours: int = 32
    """PruMerge(+): how many most key-similar other real tiles are merged into each kept token
    (the original uses 32 at inference). 0 disables merging (plain top CLS-attention tiles)."""
    iqr_whisker: float = 1.5
    """Adaptive budget: a tile is an outlier when its CLS attention exceeds ``Q3 + whisker * IQR``
    of its slide's real tiles (the original's 1.5)."""
    plus_topk_fraction: float = 0.5
    """PruMerge+ with the fixed budget: fraction of the ``k`` slots taken by top CLS-attention
    tiles; the rest are spatially uniform tiles (the original's fixed-ratio variant uses half)."""
    similarity_weighting: bool = False
    """Prompt top-K: multiply each kept token by ``K * softmax(sim / similarity_temperature)``
    over the kept tokens (mean weight 1). This is the only path by which gradients reach the
    query (and so ``text_query_projection``): top-K itself is not differentiable."""
    similarity_temperature: float = 0.5
    """Prompt top-K weighting temperature (> 0); smaller means sharper weights."""
    order: str = "spatial"
    """Order of the kept tokens: ``"spatial"`` (ascending tile index) or ``"score"`` (descending
    score; PruMerge+ puts its spatial tiles after the attention tiles, as the original does).
    ``none`` and ``random_sample`` are always spatial."""

    def __post_init__(self) -> None:
        if self.budget not in ("fixed", "adaptive"):
            raise ValueError(f"SelectOptions.budget must be 'fixed' or 'adaptive', got {self.budget!r}")
        if self.order not in ("spatial", "score"):
            raise ValueError(f"SelectOptions.order must be 'spatial' or 'score', got {self.order!r}")
        if int(self.merge_neighbours) != self.merge_neighbours or self.merge_neighbours < 0:
            raise ValueError(
                f"SelectOptions.merge_neighbours must be an integer >= 0, got {self.merge_neighbours!r}"
            )
        if not 0.0 <= self.plus_topk_fraction <= 1.0:
            raise ValueError(
                f"SelectOptions.plus_topk_fraction must lie in [0, 1], got {self.plus_topk_fraction!r}"
            )
        if not self.similarity_temperature > 0:
            raise ValueError(
                f"SelectOptions.similarity_temperature must be > 0, got {self.similarity_temperature!r}"
            )
        if not (math.isfinite(self.iqr_whisker) and self.iqr_whisker >= 0):
            raise ValueError(f"SelectOptions.iqr_whisker must be finite and >= 0, got {self.iqr_whisker!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> SelectOptions:
        """Build from a config mapping. An unknown key raises ``ValueError`` naming the closest valid
        one (``unknown key 'merge_neighbour'; did you mean 'merge_neighbours'?``); a value of the wrong
        type (``merge_neighbours: "8"``, ``similarity_weighting: 1``) raises naming the key and the
        type it needs (an int is a valid float; a bool is never a number)."""
        if values is not None and not isinstance(values, Mapping):
            raise ValueError(f"expected a mapping of option names to values, got {type(values).__name__}")
        values = dict(values or {})
        names = [f.name for f in fields(cls)]
        hints = typing.get_type_hints(cls)
        for key, value in values.items():
            if key not in names:
                hint = difflib.get_close_matches(str(key), names, n=1)
                more = f"; did you mean {hint[0]!r}?" if hint else f"; valid keys: {', '.join(names)}"
                raise ValueError(f"unknown key {key!r}{more}")
            want = hints[key]
            ok = (isinstance(value, bool) if want is bool
                  else isinstance(value, (int, float)) and not isinstance(value, bool) if want is float
                  else isinstance(value, want) and not isinstance(value, bool) if want is int
                  else isinstance(value, want))
            if not ok:
                article = "an" if want is int else "a"
                raise ValueError(f"{key} must be {article} {want.__name__}, got {value!r} ({type(value).__name__})")
        return cls(**values)
