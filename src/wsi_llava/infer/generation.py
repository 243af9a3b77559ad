"""The one generation engine: prompt ids + visual tokens → one batched ``generate`` → per-row answers.

Every answer the toolkit generates goes through :func:`generate` (chat, predict, ``eval --model`` and
heatmap through :class:`~wsi_llava.infer.engine.SlideAssistant`; the server through
:func:`wsi_llava.serve.generation.generate_rows`); this is the only module that calls a ``generate``.

* prompts are left-padded to T; the visual tokens [B, K', H] replace each row's ``<image>`` tokens
  (:meth:`~wsi_llava.model.wsi_llava.WsiLlavaForConditionalGeneration.merge`) and the merged embeddings go
  to the language model's own ``generate`` (what the model's ``generate`` does after its prefill step);
* decoding: greedy unless ``temperature > 0``; sampling is seeded (``seed``), nucleus ``top_p``, no top-k;
* every row has its own ``max_new_tokens`` and ``stop`` strings and can be cancelled: a
  :class:`RowController` (a ``StoppingCriteria``) decodes each new token and ends rows independently, so
  one long answer does not hold the batch's short ones;
* a :class:`DeltaStreamer` (a ``BaseStreamer``, ``generate``'s ``streamer=``) passes each row's new text to
  its ``on_delta``; the deltas of a row add up to exactly its final text.

Shapes: B rows, T prompt tokens, K' = ``config.num_image_tokens`` visual tokens, H LM width.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation import BaseStreamer


@dataclass
class GenerationSettings:
    """Decoding options. Greedy unless ``temperature > 0``; sampling is seeded (deterministic)."""

    max_new_tokens: int = 256
    """Longest answer in tokens."""
    temperature: float = 0.0
    """0 = greedy decoding; > 0 = sampling at this temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass (with temperature > 0)."""
    seed: int = 0
    """Seed of the sampling RNG."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the answer (the answer is cut before them)."""


@dataclass
class Request:
    """One row of a generation batch."""

    prompt_ids: list[int]
    """[T_i] the tokenised generation prompt, ``num_image_tokens`` ``<image>`` tokens included."""
    settings: GenerationSettings
    """Decoding options; the rows of one batch share temperature, top_p and seed (the first row's)."""
    on_delta: Callable[[str], None] | None = None
    """Called with each new piece of answer text (streaming), or None."""
    cancelled: Callable[[], bool] = lambda: False
    """Polled every step; True ends the row (finish reason ``cancelled``)."""


@dataclass
class Generated:
    """What one row produced."""

    text: str
    """The answer (stop strings cut, whitespace stripped)."""
    finish_reason: str
    """``stop`` (end of turn or a stop string), ``length`` (max_new_tokens) or ``cancelled``."""
    prompt_tokens: int
    """Prompt tokens, visual tokens included."""
    completion_tokens: int
    """Generated tokens (the end-of-turn token included)."""


@dataclass
class _RowState:
    ids: list = field(default_factory=list)
    sent: str = ""
    visible: str = ""
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
    """Per-row end of generation, called by ``generate`` after every new token.

    For each live row: an end-of-turn token ends it (``stop``); otherwise the token is appended and, when
    the row has stop strings or streams, its text decoded: a stop string ends it (the text is cut before it), reaching the row's
    ``max_new_tokens`` ends it (``length``), ``cancelled()`` ends it (``cancelled``). ``visible`` is the text
    safe to stream: it holds back what could still become a stop string, an unfinished UTF-8 character
    or trailing whitespace; a finished row's ``visible`` is its final text. A row with neither stop strings nor
    streaming is decoded once, when it ends.
    """

    def __init__(self, tokenizer, requests: list[Request], eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.requests = requests
        self.eos_ids = eos_ids
        self.state = [_RowState() for _ in requests]

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        """input_ids [B, T + t] (the newest token last) → [B] True for rows that have ended."""
        last = input_ids[:, -1].tolist()
        for req, st, tok in zip(self.requests, self.state, last):
            if not st.done:
                self._step(req, st, int(tok))
        return torch.tensor([st.done for st in self.state], dtype=torch.bool, device=input_ids.device)

    def _step(self, req: Request, st: _RowState, tok: int) -> None:
        st.n_generated += 1
        if tok in self.eos_ids:
            self._finish(st, "stop")
            return
        st.ids.append(tok)
        watched = bool(req.settings.stop) or req.on_delta is not None
        if watched:  # stop strings to find or text to stream: decode now (else once, at the end)
            text = self._decode(st)
            cuts = [text.index(s) for s in req.settings.stop if s and s in text]
            if cuts:
                self._finish(st, "stop", text[: min(cuts)])
                return
        if st.n_generated >= req.settings.max_new_tokens:
            self._finish(st, "length")
        elif req.cancelled():
            self._finish(st, "cancelled")
        elif watched:
            visible = text.rstrip()
            st.visible = visible[: len(visible) - _held_back(visible, req.settings.stop)].rstrip()

    def _decode(self, st: _RowState) -> str:
        return self.tokenizer.decode(st.ids, skip_special_tokens=True).lstrip()

    def _finish(self, st: _RowState, reason: str, text: str | None = None) -> None:
        """End the row with ``text`` (default: all its tokens decoded)."""
        st.text = st.visible = (self._decode(st) if text is None else text).rstrip()
        st.done, st.finish_reason = True, reason

    def finish_unended(self) -> None:
        """Rows still live when ``generate`` returned (it hit the batch's longest limit) end as ``length``."""
        for st in self.state:
            if not st.done:
                self._finish(st, "length")


class DeltaStreamer(BaseStreamer):
    """Batch-aware streamer: after each decoding step, every row's new visible text goes to its ``on_delta``.

    ``generate`` calls ``put`` with the prompt [B, T] first, then with each step's tokens [B] (finished rows
    get padding), and ``end`` once; the text itself is the :class:`RowController`'s (it sees the same
    tokens), so a row's deltas add up to its final text whatever order ``generate`` calls the two in.
    """

    def __init__(self, controller: RowController):
        self.controller = controller
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        """value: the prompt ids [B, T] (first call, skipped) or one step's new tokens [B]."""
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.flush()

    def end(self) -> None:
        """Generation is over: rows not ended yet end as ``length``; their last text is sent."""
        self.controller.finish_unended()
        self.flush()

    def flush(self) -> None:
        """Send each row the visible text it has not been sent yet."""
        for req, st in zip(self.controller.requests, self.controller.state):
            upto = st.visible
            if req.on_delta is None or len(upto) <= len(st.sent) or not upto.startswith(st.sent):
                continue
            delta, st.sent = upto[len(st.sent):], upto
            req.on_delta(delta)


def eos_token_ids(model, tokenizer) -> set[int]:
    """End-of-turn ids: the model's generation config plus the tokenizer's eos."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts [T_i] → input_ids [B, T] left-padded with ``pad_token_id`` and attention_mask [B, T] (1 = real)."""
    t = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), t), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), t), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, t - len(p):] = torch.tensor(p, dtype=torch.long)
        attention[i, t - len(p):] = 1
    return input_ids, attention


def decoding_config(model, requests: list[Request], pad_token_id: int, eos_ids: set[int]):
    """The model's generation config with this batch's decoding options (the first row's temperature,
    top_p and seed; the longest ``max_new_tokens``). Seeds the sampling RNG when sampling."""
    first = requests[0].settings
    gen = copy.deepcopy(model.generation_config)
    gen.update(max_new_tokens=max(r.settings.max_new_tokens for r in requests), pad_token_id=pad_token_id,
               eos_token_id=sorted(eos_ids) or None)
    if first.temperature > 0:
        torch.manual_seed(first.seed)
        gen.update(do_sample=True, temperature=first.temperature, top_p=first.top_p, top_k=None)
    else:
        gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return gen


@torch.inference_mode()
def generate(model, tokenizer, requests: list[Request], visual: torch.Tensor) -> list[Generated]:
    """Answer ``requests`` in one ``generate`` call.

    ``model``: a :class:`~wsi_llava.model.wsi_llava.WsiLlavaForConditionalGeneration`; ``visual`` [B, K', H]:
    row i's visual tokens (they replace its ``<image>`` tokens). Run it under the model's autocast if any.
    """
    if not requests:
        return []
    if visual.shape[0] != len(requests):
        raise ValueError(f"{len(requests)} prompts but visual tokens for {visual.shape[0]} slides")
    device = model.device
    pad = tokenizer.pad_token_id
    input_ids, attention = (t.to(device) for t in left_pad([r.prompt_ids for r in requests], pad))
    embeds = model.merge(input_ids, model.get_input_embeddings()(input_ids), visual.to(device))
    controller = RowController(tokenizer, requests, eos_token_ids(model, tokenizer))
    gen = decoding_config(model, requests, pad, controller.eos_ids)
    model.language_model.generate(input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention,
                                  generation_config=gen, stopping_criteria=StoppingCriteriaList([controller]),
                                  streamer=DeltaStreamer(controller))
    controller.finish_unended()
    return [Generated(st.text, st.finish_reason, len(r.prompt_ids), st.n_generated)
            for r, st in zip(requests, controller.state)]
