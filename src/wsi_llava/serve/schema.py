"""The OpenAI chat-completions request as pydantic models, and the checked :class:`ChatRequest`.

FastAPI validates the body of ``POST /v1/chat/completions`` against :class:`ChatCompletionRequest`;
:func:`validation_error` turns pydantic's errors into an :class:`~wsi_llava.serve.errors.ApiError`
400 whose ``param`` names the field (``messages[2].content[0].type``), as the OpenAI API does. The
rules that depend on the server's settings (``max_tokens`` limit, message count, the tokenizer's
special tokens) are checked by :meth:`ChatCompletionRequest.to_chat`. Pure: no model, no files.

The visual input of a conversation is one slide — a content part ``{"type": "slide", "slide": "<id or
relative path>"}`` in a user message, or the top-level ``slide`` field (the ``openai`` client's
``extra_body``) — or one ROI image: an ``{"type": "image_url", "image_url": {"url": ...}}`` part.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..infer.generation import GenerationSettings
from .errors import ApiError

#: OpenAI request fields this server cannot honour when set to anything but their neutral value
UNSUPPORTED = {
    "tools": None, "functions": None, "tool_choice": ("none",), "logprobs": (False,), "top_logprobs": (0,),
    "audio": None, "prediction": None,
}
MAX_STOP = 4
MAX_STOP_CHARS = 256
SYSTEM_ROLES = ("system", "developer")
#: ``ApiError.code`` values a validator may raise as a :class:`PydanticCustomError` type
CODES = ("invalid_value", "invalid_type", "missing_required_parameter", "unsupported_parameter", "invalid_unicode",
         "invalid_json")


def _fail(code: str, message: str, at: str | None = None) -> PydanticCustomError:
    """A validation error with an OpenAI error ``code``; ``at``: the field below the validator's
    location it is about (``content[1].type``)."""
    return PydanticCustomError(code, message, {"at": at} if at else None)


# ------------------------------------------------------------------------------------- Unicode


def _valid_text(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_unicode(body: object) -> None:
    """``invalid_unicode`` when a string (or key) of the decoded JSON holds an unpaired UTF-16
    surrogate (JSON ``"\\ud800"`` decodes to one, but it is not text: it cannot be encoded, tokenised
    or answered); ``at`` names where."""
    stack: list[tuple[object, str]] = [(body, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if not _valid_text(value):
                raise _fail("invalid_unicode", f"{where or 'the request body'} is not valid Unicode text (it holds an "
                            "unpaired UTF-16 surrogate, e.g. \\ud800)", where or None)
        elif isinstance(value, dict):
            for k, v in value.items():
                if not _valid_text(str(k)):
                    raise _fail("invalid_unicode", f"a key in {where or 'the request body'} is not valid Unicode text "
                                "(it holds an unpaired UTF-16 surrogate)", where or None)
                stack.append((v, f"{where}.{k}" if where else str(k)))
        elif isinstance(value, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(value))


# -------------------------------------------------------------------------------- the request


class _Strict(BaseModel):
    """JSON types as sent: no ``"0.5"`` for a number, no ``1`` for a boolean; unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class SlidePart(_Strict):
    type: Literal["slide"]
    slide: str = Field(min_length=1, description="a slide id from GET /v1/slides (or its relative path)")


class ImageUrl(_Strict):
    url: str = Field(min_length=1, description="data:image/png;base64,… / data:image/jpeg;base64,…, or a path of "
                                               "a PNG/JPEG/TIFF file under the slides root")
    detail: str | None = None
    """Accepted for compatibility; the image is always tiled at the tile encoder's resolution."""


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[Union[TextPart, SlidePart, ImagePart], Field(discriminator="type")]
#: content part ``type`` values (pydantic puts the tag of a part into error locations)
PART_TYPES = ("text", "slide", "image_url")


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: list[ContentPart] | None = None
    """A string is one text part."""

    @field_validator("content", mode="before")
    @classmethod
    def _string_is_text(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [{"type": "text", "text": v}]
        if v is not None and not isinstance(v, list):
            raise _fail("invalid_type", "must be a string or a list of content parts")
        return v

    @model_validator(mode="after")
    def _parts_fit_the_role(self) -> Message:
        if self.content is None and self.role != "assistant":
            raise _fail("missing_required_parameter", "the message content is missing", "content")
        for j, part in enumerate(self.content or ()):
            if not isinstance(part, TextPart) and self.role != "user":
                raise _fail("invalid_value", f"content[{j}]: {part.type} parts belong in user messages",
                            f"content[{j}].type")
        return self

    def text(self) -> str:
        """The text parts joined by newlines."""
        return "\n".join(p.text for p in self.content or () if isinstance(p, TextPart))


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ChatCompletionRequest(_Strict):
    """``POST /v1/chat/completions``: OpenAI's fields this server honours, the ones it refuses unless
    neutral (:data:`UNSUPPORTED`, ``n``, ``response_format``), and the extensions ``slide`` and
    ``explain``. Field order is check order: the first problem is the one reported."""

    model: str = Field(min_length=1)
    tools: Any = None
    functions: Any = None
    tool_choice: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    audio: Any = None
    prediction: Any = None
    response_format: Any = None
    n: int | None = None
    messages: list[Message] = Field(min_length=1)
    slide: str | None = Field(None, min_length=1)
    """Extension: the slide the conversation is about (instead of a slide content part)."""
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: list[str] | None = None
    """A string is a list of one."""
    explain: bool | None = None
    """Extension: also return the selected tiles and their scores."""

    @model_validator(mode="before")
    @classmethod
    def _json_text(cls, data: Any) -> Any:
        if isinstance(data, (bytes, str)):  # a body FastAPI did not decode (no or another Content-Type)
            try:
                data = json.loads(data)
            except (ValueError, RecursionError) as e:
                raise _fail("invalid_json", f"the request body is not valid JSON ({type(e).__name__})") from None
        if not isinstance(data, dict):
            raise _fail("invalid_type", "the request body must be a JSON object", "body")
        check_unicode(data)
        return data

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _neutral(cls, v: Any, info) -> Any:
        neutral = UNSUPPORTED[info.field_name]
        if v is None or v == [] or (neutral is not None and v in neutral):
            return v
        raise _fail("unsupported_parameter", f"'{info.field_name}' is not supported by this server")

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, v: Any) -> Any:
        if v is not None and not (isinstance(v, dict) and v.get("type") == "text"):
            raise _fail("unsupported_parameter", "only response_format {'type': 'text'} is supported")
        return v

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise _fail("unsupported_parameter", "only n = 1 is supported")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("stop")
    @classmethod
    def _stop_bounds(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not all(v):
            raise _fail("invalid_type", "'stop' must be a non-empty string or a list of non-empty strings")
        if v is not None and (len(v) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in v)):
            raise _fail("invalid_value", f"'stop' takes at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} "
                        "characters")
        return v

    @model_validator(mode="after")
    def _conversation(self) -> ChatCompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise _fail("invalid_value", "'stream_options' is only allowed with stream: true", "stream_options")
        turns: list[str] = []  # roles after the system messages
        for i, msg in enumerate(self.messages):
            if msg.role in SYSTEM_ROLES:
                if turns:
                    raise _fail("invalid_value", f"messages[{i}]: system messages must come before the conversation",
                                f"messages[{i}].role")
                continue
            expected = "user" if len(turns) % 2 == 0 else "assistant"
            if msg.role != expected:
                raise _fail("invalid_value", f"messages[{i}].role is {msg.role!r} but {expected!r} was expected: the "
                            "conversation must alternate user and assistant messages, starting and ending with user",
                            f"messages[{i}].role")
            turns.append(msg.role)
        if not turns or turns[-1] != "user":
            raise _fail("invalid_value", "the last message must be a user message", "messages")
        if not self.messages[-1].text().strip():
            raise _fail("invalid_value", "the last user message has no text",
                        f"messages[{len(self.messages) - 1}].content")
        refs = self.visual_refs()
        if len({(kind, value) for kind, value, _ in refs}) > 1:
            names = sorted({value if kind == "slide" else "an image" for kind, value, _ in refs})
            raise _fail("invalid_value", f"a conversation is about one slide or image; the request references {names}",
                        refs[-1][2])
        return self

    def visual_refs(self) -> list[tuple[str, str, str]]:
        """Every slide/image reference as ``(kind, value, param)``, kind ``slide`` or ``image``; the
        top-level ``slide`` first."""
        refs = [("slide", self.slide, "slide")] if self.slide is not None else []
        for i, msg in enumerate(self.messages):
            for j, part in enumerate(msg.content or ()):
                where = f"messages[{i}].content[{j}]"
                if isinstance(part, SlidePart):
                    refs.append(("slide", part.slide, f"{where}.slide"))
                elif isinstance(part, ImagePart):
                    refs.append(("image", part.image_url.url, f"{where}.image_url.url"))
        return refs

    def to_chat(self, max_tokens_limit: int, default_max_tokens: int, max_messages: int = 128,
                special_tokens: tuple[str, ...] = ()) -> ChatRequest:
        """The checked request under the server's limits; ApiError 400 when a limit is exceeded.

        ``special_tokens``: strings that may not appear in message text (the tokenizer's special
        tokens, which would forge turns or visual tokens)."""
        if len(self.messages) > max_messages:
            raise _api_error(f"'messages' has {len(self.messages)} entries; at most {max_messages} are accepted",
                             "messages")
        texts = [m.text() for m in self.messages]
        for i, text in enumerate(texts):
            for tok in special_tokens:
                if tok and tok in text:
                    raise _api_error(f"messages[{i}].content contains the special token {tok!r}, which is not allowed "
                                     "in message text", f"messages[{i}].content")
        param = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        if not 1 <= max_tokens <= max_tokens_limit:
            raise _api_error(f"'{param}' must be between 1 and {max_tokens_limit}, got {max_tokens}", param)
        system = [t for m, t in zip(self.messages, texts) if m.role in SYSTEM_ROLES]
        turns = [t for m, t in zip(self.messages, texts) if m.role not in SYSTEM_ROLES]
        refs = self.visual_refs()
        settings = GenerationSettings(
            max_new_tokens=max_tokens, temperature=0.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed or 0, stop=list(self.stop or []))
        return ChatRequest(
            model=self.model, question=turns[-1],
            history=[(turns[k], turns[k + 1]) for k in range(0, len(turns) - 1, 2)],
            system="\n\n".join(system) if system else None,
            slide=next((v for kind, v, _ in refs if kind == "slide"), None),
            image=next(((v, p) for kind, v, p in refs if kind == "image"), None),
            settings=settings, seeded=self.seed is not None, stream=bool(self.stream),
            include_usage=bool(self.stream_options and self.stream_options.include_usage), explain=bool(self.explain))


@dataclass
class ChatRequest:
    """A checked chat request."""

    model: str
    """Requested model id."""
    question: str
    """Text of the last user message."""
    history: list[tuple[str, str]] = field(default_factory=list)
    """Earlier (user, assistant) turns, oldest first."""
    system: str | None = None
    """System prompt from ``system``/``developer`` messages (None: the model's own)."""
    slide: str | None = None
    """The slide reference (not yet resolved)."""
    image: tuple[str, str] | None = None
    """The ROI image: (URL or path, the ``param`` naming it), not yet read."""
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    """Decoding options (``max_new_tokens`` from ``max_tokens``/``max_completion_tokens``)."""
    seeded: bool = False
    """Whether the request gave a ``seed`` (sampled requests with a seed run in a batch of their own,
    so the seed reproduces the answer)."""
    stream: bool = False
    """Answer with server-sent events."""
    include_usage: bool = False
    """``stream_options.include_usage``: a last chunk with token counts."""
    explain: bool = False
    """Return the selected tiles and their scores."""


# ---------------------------------------------------------------------------------- errors


def _api_error(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code=code, param=param)


def _param(loc: Sequence[str | int], at: str | None = None) -> str | None:
    """``("messages", 0, "content", 1, "text", "text")`` → ``messages[0].content[1].text`` (the tag
    pydantic adds after a content part's index is left out); ``at`` is appended."""
    out = ""
    for i, seg in enumerate(loc):
        if isinstance(seg, int):
            out += f"[{seg}]"
        elif i >= 2 and loc[i - 2] == "content" and isinstance(loc[i - 1], int) and seg in PART_TYPES:
            continue
        else:
            out += f".{seg}" if out else str(seg)
    if at:
        out = f"{out}{'.' if out and not at.startswith('[') else ''}{at}"
    return out or None


def _code(kind: str) -> str:
    if kind in CODES:
        return kind
    if kind == "missing":
        return "missing_required_parameter"
    if kind == "json_invalid":
        return "invalid_json"
    if kind.endswith("_type") or kind == "union_tag_not_found":
        return "invalid_type"
    return "invalid_value"


def validation_error(errors: Sequence[dict], prefix: tuple = ()) -> ApiError:
    """The ApiError 400 for the first of pydantic's ``errors`` (``ValidationError.errors()``, or
    FastAPI's ``RequestValidationError.errors()`` with ``prefix=("body",)`` stripped)."""
    first = dict(errors[0]) if errors else {"type": "invalid_value", "loc": (), "msg": "invalid request"}
    loc = tuple(first.get("loc", ()))
    if prefix and loc[: len(prefix)] == prefix:
        loc = loc[len(prefix):]
    kind = first.get("type", "invalid_value")
    ctx = first.get("ctx") or {}
    if kind == "missing" and not loc:
        return _api_error("the request body is empty: send a JSON object", None, "invalid_json")
    if kind == "json_invalid":
        return _api_error(f"the request body is not valid JSON ({ctx.get('error', 'decode error')})", None,
                          "invalid_json")
    at = ctx.get("at") or ("type" if kind in ("union_tag_invalid", "union_tag_not_found") else None)
    param = _param(loc, at)
    message = first.get("msg", "invalid")
    if kind not in CODES:
        message = f"invalid {param or 'request'}: {message}"
    return _api_error(message, param, _code(kind))


def parse_chat_request(body: object, max_tokens_limit: int, default_max_tokens: int, max_messages: int = 128,
                       special_tokens: tuple[str, ...] = ()) -> ChatRequest:
    """Check a decoded JSON body and return the request; ApiError 400 on any problem (what the route
    does with FastAPI's validation, for callers holding a decoded body)."""
    try:
        req = ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise validation_error(e.errors()) from None
    return req.to_chat(max_tokens_limit, default_max_tokens, max_messages, special_tokens)
