"""What ``POST /v1/chat/completions`` answers, as pydantic models: a :class:`ChatCompletion`, or
:class:`ChatCompletionChunk` server-sent events; plus the ``explain`` extension and the grid step of
tile coordinates the slide routes report. (Errors: :class:`~wsi_llava.serve.errors.ErrorResponse`.)"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, model_serializer

from ..data.slides import Slide
from .generation import RowResult


class _OmitNone(BaseModel):
    """Drops the fields named in ``omit_none`` from the JSON when they are None (OpenAI leaves out,
    for example, ``usage`` in a content chunk, while ``finish_reason: null`` is sent)."""

    omit_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit(self, handler):
        data = handler(self)
        for name in self.omit_none:
            if data.get(name) is None:
                data.pop(name, None)
        return data


class Usage(BaseModel):
    prompt_tokens: int
    """Prompt tokens, visual tokens included."""
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, res: RowResult) -> Usage:
        return cls(prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens,
                   total_tokens=res.prompt_tokens + res.completion_tokens)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    """``stop``, ``length`` or ``cancelled``."""
    logprobs: None = None


class ChatCompletion(_OmitNone):
    omit_none = ("explain",)
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    explain: dict | None = None
    """Extension (request ``explain: true``): see :func:`explain_payload`."""


class Delta(_OmitNone):
    omit_none = ("role", "content")
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(_OmitNone):
    omit_none = ("usage", "explain")
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    """One choice; none in the last chunk of ``stream_options.include_usage``, which has ``usage``."""
    usage: Usage | None = None
    explain: dict | None = None


def sse(data: BaseModel | dict | str) -> bytes:
    """One server-sent event: ``data: <JSON>`` (or ``data: [DONE]``)."""
    if isinstance(data, BaseModel):
        data = data.model_dump_json()
    elif isinstance(data, dict):
        import json

        data = json.dumps(data, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def _r(x: float) -> float:
    return round(float(x), 6)


def rounded_coords(coords: np.ndarray) -> list[list[float]]:
    """[N, 2] tile coordinates as JSON numbers (6 decimals)."""
    return [[_r(c) for c in xy] for xy in coords]


def explain_payload(slide_id: str, slide: Slide, res: RowResult, selector: str) -> dict:
    """The ``explain`` object: selected tiles (indices into ``/tiles`` coords), their coordinates and
    scores, and every tile's score (None for selectors without scores)."""
    v = res.visual
    scores = v.scores
    return {
        "slide": slide_id,
        "selector": selector,
        "n_tiles": int(len(slide.coords)),
        "tile_indices": [int(i) for i in v.indices],
        "coords": rounded_coords(slide.coords[v.indices]),
        "tile_scores": [_r(scores[i]) for i in v.indices] if scores is not None else None,
        "scores": [_r(s) for s in scores] if scores is not None else None,
    }
