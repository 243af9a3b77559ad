"""One batched ``generate`` for the server: cached visual tokens, per-row limits, token streaming.

Differences from :meth:`SlideAssistant.answer` that serving needs:

* each slide's visual tokens (tower → selection → projector, :meth:`encode_slides` at B = 1, no
  padding) are computed once and kept in an LRU cache keyed by the slide file and — for selectors
  that read the question (``prompt_topk``) — the question's tokens; a follow-up turn on the same
  slide skips the tower entirely;
* the merged prompt embeddings go to the language model's own ``generate`` (what
  ``WsiLlavaForConditionalGeneration.generate`` does after its prefill step);
* every row has its own ``max_tokens`` and ``stop`` strings and can be cancelled; a
  :class:`RowController` (a ``StoppingCriteria``) decodes each new token, streams the row's text
  delta, and ends rows independently, so one long answer does not hold the batch's short ones.

Shapes: B rows, T prompt tokens, K' = ``config.num_image_tokens`` visual tokens, H LM width,
N tiles of a slide.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..data.prompts import Example
from ..data.slides import Slide
from ..infer.engine import GenerationSettings
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
class RowResult:
    """What one row produced."""

    text: str
    """The answer (stop strings cut, whitespace stripped)."""
    finish_reason: str
    """``stop`` (end of turn or a stop string), ``length`` (max_tokens) or ``cancelled``."""
    prompt_tokens: int
    """Prompt tokens, visual tokens included."""
    completion_tokens: int
    """Generated tokens (the end-of-turn token included)."""
    visual: Visual
    """The visual tokens and selection used."""


class VisualEncoder:
    """Visual tokens per (slide, question) through the model's ``encode_slides`` with an LRU cache."""

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
        """features [N, D] of ``row.slide`` → :class:`Visual` (cached)."""
        key = (row.slide_key, self.query_key(row.example))
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        m = self.model
        device = m.device
        feats = torch.from_numpy(np.ascontiguousarray(row.slide.features)).to(device)[None]
        coords = torch.from_numpy(np.ascontiguousarray(row.slide.coords)).to(device)[None]
        mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=device)
        query = None
        if m.text_query_projection is not None:
            ids = torch.tensor([row.example.input_ids], device=device)
            qmask = torch.tensor([row.example.question_mask], device=device)
            query = m.question_query(ids, qmask)
        out = m.encode_slides(feats, coords, mask, query=query)
        sel = out.selection
        scores = sel.scores[0].float().cpu().numpy() if sel.scores is not None else None
        vis = Visual(out.embeds[0].detach(), sel.indices[0].tolist(), scores)
        self.cache.put(key, vis)
        return vis


@dataclass
class _RowState:
    ids: list
    sent: str = ""
    text: str = ""
    done: bool = False
    finish_reason: str | None = None
    n_generated: int = 0


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of ``text`` that might start a stop string or an unfinished character."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    while hold < len(text) and text[len(text) - hold - 1] == "\ufffd":
        hold += 1
    return hold


class RowController(StoppingCriteria):
    """Per-row end of generation and streaming, called by ``generate`` after every new token.

    For each live row: an end-of-turn token ends it (``stop``); otherwise the token is appended, the
    row's text decoded, a stop string ends it (the text is cut before it), reaching the row's
    ``max_new_tokens`` ends it (``length``), ``cancelled()`` ends it (``cancelled``). The new text is
    passed to ``on_delta``, holding back what could still become a stop string, an unfinished UTF-8
    character or trailing whitespace, so the deltas add up to exactly the final text.
    """

    def __init__(self, tokenizer, rows: list[Row], eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.rows = rows
        self.eos_ids = eos_ids
        self.state = [_RowState(ids=[]) for _ in rows]

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()
        for row, st, tok in zip(self.rows, self.state, last):
            if not st.done:
                self._step(row, st, int(tok))
        return torch.tensor([st.done for st in self.state], dtype=torch.bool, device=input_ids.device)

    def _step(self, row: Row, st: _RowState, tok: int) -> None:
        st.n_generated += 1
        if tok in self.eos_ids:
            self._finish(row, st, "stop")
            return
        st.ids.append(tok)
        text = self.tokenizer.decode(st.ids, skip_special_tokens=True).lstrip()
        cuts = [text.index(s) for s in row.settings.stop if s in text]
        if cuts:
            st.text = text[: min(cuts)]
            self._finish(row, st, "stop")
            return
        st.text = text
        if st.n_generated >= row.settings.max_new_tokens:
            self._finish(row, st, "length")
        elif row.cancelled():
            self._finish(row, st, "cancelled")
        else:
            visible = text.rstrip()
            self._send(row, st, visible[: len(visible) - _held_back(visible, row.settings.stop)].rstrip())

    def _finish(self, row: Row, st: _RowState, reason: str) -> None:
        st.text = st.text.rstrip()
        st.done, st.finish_reason = True, reason
        self._send(row, st, st.text)

    def _send(self, row: Row, st: _RowState, upto: str) -> None:
        if row.on_delta is None or len(upto) <= len(st.sent) or not upto.startswith(st.sent):
            return
        delta, st.sent = upto[len(st.sent):], upto
        row.on_delta(delta)

    def finish_unended(self) -> None:
        """Rows still live when ``generate`` returned (it hit the batch's longest limit) end as ``length``."""
        for row, st in zip(self.rows, self.state):
            if not st.done:
                self._finish(row, st, "length")


def eos_token_ids(model, tokenizer) -> set[int]:
    """End-of-turn ids: the model's generation config plus the tokenizer's eos."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


@torch.inference_mode()
def generate_rows(model, tokenizer, rows: list[Row], visuals: list[Visual]) -> list[RowResult]:
    """Generate answers for ``rows`` (sharing temperature/top_p/seed) in one ``generate`` call.

    Prompts are left-padded to T; ``visuals[i].embeds`` [K', H] replace row i's ``<image>`` tokens.
    """
    if not rows:
        return []
    pad = tokenizer.pad_token_id
    device = model.device
    t = max(len(r.example.input_ids) for r in rows)
    input_ids = torch.full((len(rows), t), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.example.input_ids)
        input_ids[i, t - n:] = torch.tensor(r.example.input_ids)
        attention[i, t - n:] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    embeds = model.get_input_embeddings()(input_ids)
    embeds = model.merge(input_ids, embeds, torch.stack([v.embeds for v in visuals]).to(device))
    controller = RowController(tokenizer, rows, eos_token_ids(model, tokenizer))
    first = rows[0].settings
    gen = copy.deepcopy(model.generation_config)
    gen.update(max_new_tokens=max(r.settings.max_new_tokens for r in rows), pad_token_id=pad,
               eos_token_id=sorted(controller.eos_ids) or None)
    if first.temperature > 0:
        torch.manual_seed(first.seed)
        gen.update(do_sample=True, temperature=first.temperature, top_p=first.top_p, top_k=None)
    else:
        gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    model.language_model.generate(input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention,
                                  generation_config=gen, stopping_criteria=StoppingCriteriaList([controller]))
    controller.finish_unended()
    return [RowResult(st.text, st.finish_reason, len(r.example.input_ids), st.n_generated, v)
            for r, st, v in zip(rows, controller.state, visuals)]
