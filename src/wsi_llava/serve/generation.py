"""Serving's side of generation: cached visual tokens per slide, rows that stream and can be cancelled.

The decoding itself is the one engine, :func:`wsi_llava.infer.generation.generate` (per-row limits, stop
strings, cancellation, streaming). What serving adds:

* each slide's visual tokens (tower → selection → projector, the model's ``visual_tokens`` at B = 1, no
  padding) are computed once and kept in an LRU cache keyed by the slide file and — for selectors
  that read the question (``prompt_topk``) — the question's tokens; a follow-up turn on the same
  slide skips the tower entirely;
* a :class:`Row` carries the request's slide, cache key and callbacks; a :class:`RowResult` the
  answer with the visual tokens and selection used (for ``explain``).

Shapes: B rows, T prompt tokens, K' = ``config.num_image_tokens`` visual tokens, H LM width,
N tiles of a slide.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np
import torch

from ..data.prompts import Example
from ..data.slides import Slide
from ..infer.generation import GenerationSettings, Generated, Request, generate
from .caches import LRUCache


@dataclass
class Visual:
    """A slide's visual tokens for one prompt, and the selection behind them."""

    embeds: torch.Tensor
    """[K', H] projected visual tokens."""
    indices: list[int]
    """K selected tile indices (into the slide's loaded tiles)."""
    scores: np.ndarray | None
    """[N] float32 per-tile selector score (None for selectors without scores)."""

    def nbytes(self) -> int:
        """Memory held (for the cache bound)."""
        n = self.embeds.numel() * self.embeds.element_size() + 8 * len(self.indices)
        return n + (self.scores.nbytes if self.scores is not None else 0)


@dataclass
class Row:
    """One request in a generation batch."""

    example: Example
    """The tokenised generation prompt (input_ids [T], question_mask [T])."""
    slide: Slide
    """The loaded slide."""
    slide_key: Hashable
    """Identity of the slide file (path, mtime, size): the visual cache key."""
    settings: GenerationSettings
    """Decoding options; rows of one batch share temperature, top_p and seed."""
    on_delta: Callable[[str], None] | None = None
    """Called with each new piece of answer text (streaming), or None."""
    cancelled: Callable[[], bool] = lambda: False
    """Polled every step; True ends the row (finish reason ``cancelled``)."""


@dataclass
class RowResult(Generated):
    """What one row produced: the engine's answer and the visual tokens and selection used."""

    visual: Visual | None = None
    """The visual tokens and selection used."""


class VisualEncoder:
    """Visual tokens per (slide, question) through the model's ``visual_tokens`` with an LRU cache."""

    def __init__(self, model, cache: LRUCache[Visual]):
        self.model = model
        self.cache = cache

    def query_key(self, example: Example) -> tuple[int, ...] | None:
        """The question tokens when the selector reads them (``prompt_topk``), else None."""
        if self.model.text_query_projection is None:
            return None
        return tuple(i for i, q in zip(example.input_ids, example.question_mask) if q)

    @torch.inference_mode()
    def encode(self, row: Row) -> Visual:
        """features [N, D] of ``row.slide`` → :class:`Visual` (cached): the model's visual tokens at B = 1."""
        key = (row.slide_key, self.query_key(row.example))
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        m = self.model
        device = m.device
        feats = torch.from_numpy(np.ascontiguousarray(row.slide.features)).to(device)[None]
        coords = torch.from_numpy(np.ascontiguousarray(row.slide.coords)).to(device)[None]
        ids = torch.tensor([row.example.input_ids], device=device)
        qmask = torch.tensor([row.example.question_mask], device=device)
        out = m.visual_tokens(ids, feats, coords, question_mask=qmask)
        sel = out.selection
        scores = sel.scores[0].float().cpu().numpy() if sel.scores is not None else None
        vis = Visual(out.embeds[0].detach(), sel.indices[0].tolist(), scores)
        self.cache.put(key, vis)
        return vis


def generate_rows(model, tokenizer, rows: list[Row], visuals: list[Visual]) -> list[RowResult]:
    """Generate answers for ``rows`` (sharing temperature/top_p/seed) in one ``generate`` call of the
    engine; ``visuals[i].embeds`` [K', H] replace row i's ``<image>`` tokens."""
    if not rows:
        return []
    requests = [Request(r.example.input_ids, r.settings, r.on_delta, r.cancelled) for r in rows]
    results = generate(model, tokenizer, requests, torch.stack([v.embeds for v in visuals]))
    return [RowResult(**vars(g), visual=v) for g, v in zip(results, visuals)]
