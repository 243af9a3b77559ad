"""Parse and check an OpenAI chat-completions request body → :class:`ChatRequest`.

Every problem is an :class:`~wsi_llava.serve.errors.ApiError` 400 whose ``param`` names the field
(``messages[2].content[0].type``), as the OpenAI API does. Pure: no model, no files.

The slide is a content part ``{"type": "slide", "slide": "<id or relative path>"}`` in a user
message, or the top-level ``slide`` field (the ``openai`` client's ``extra_body``); a conversation
is about one slide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..infer.engine import GenerationSettings
from .errors import ApiError

#: OpenAI request fields this server cannot honour when set to anything but their neutral value
UNSUPPORTED = {
    "tools": None, "functions": None, "tool_choice": ("none",), "logprobs": (False,), "top_logprobs": (0,),
    "audio": None, "prediction": None,
}
MAX_STOP = 4
MAX_STOP_CHARS = 256
SYSTEM_ROLES = ("system", "developer")


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


def _err(message: str, param: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code=code, param=param)


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _err(f"'{name}' must be a number", name, "invalid_type")
    if v < lo or v > hi or (lo_open and v == lo):
        raise _err(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return float(v)


def _integer(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _err(f"'{name}' must be an integer", name, "invalid_type")
    return v


def _bool(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _err(f"'{name}' must be true or false", name, "invalid_type")
    return v


def _content(msg: dict, i: int, role: str, slides: list[tuple[str, str]]) -> str:
    """Text of a message; slide parts are collected into ``slides`` as (ref, param)."""
    param = f"messages[{i}].content"
    content = msg.get("content")
    if isinstance(content, str):
        return content
    if content is None:
        if role == "assistant":
            return ""
        raise _err(f"{param} is missing", param, "missing_required_parameter")
    if not isinstance(content, list):
        raise _err(f"{param} must be a string or a list of content parts", param, "invalid_type")
    texts = []
    for j, part in enumerate(content):
        p = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise _err(f"{p} must be an object", p, "invalid_type")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise _err(f"{p}.text must be a string", f"{p}.text", "invalid_type")
            texts.append(text)
        elif kind == "slide":
            if role != "user":
                raise _err(f"{p}: slide parts belong in user messages", f"{p}.type")
            slides.append((part.get("slide"), f"{p}.slide"))
        else:
            raise _err(f"{p}.type {kind!r} is not supported; use 'text', or "
                       "{'type': 'slide', 'slide': '<slide id>'} to reference a slide", f"{p}.type")
    return "\n".join(texts)


def _check_special(text: str, param: str, special_tokens: tuple[str, ...]) -> None:
    for tok in special_tokens:
        if tok and tok in text:
            raise _err(f"{param} contains the special token {tok!r}, which is not allowed in message text", param)


def _messages(body: dict, max_messages: int, special_tokens: tuple[str, ...]):
    msgs = body.get("messages")
    if msgs is None:
        raise _err("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise _err("'messages' must be a non-empty list", "messages", "invalid_type")
    if len(msgs) > max_messages:
        raise _err(f"'messages' has {len(msgs)} entries; at most {max_messages} are accepted", "messages")
    system: list[str] = []
    turns: list[tuple[str, str]] = []  # (role, text) after the system messages
    slides: list[tuple[str, str]] = []
    for i, msg in enumerate(msgs):
        if not isinstance(msg, dict):
            raise _err(f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
        role = msg.get("role")
        if role not in (*SYSTEM_ROLES, "user", "assistant"):
            raise _err(f"messages[{i}].role {role!r} is not supported; use system, developer, user or assistant",
                       f"messages[{i}].role")
        text = _content(msg, i, role, slides)
        _check_special(text, f"messages[{i}].content", special_tokens)
        if role in SYSTEM_ROLES:
            if turns:
                raise _err(f"messages[{i}]: system messages must come before the conversation", f"messages[{i}].role")
            system.append(text)
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise _err(f"messages[{i}].role is {role!r} but {expected!r} was expected: the conversation must "
                       "alternate user and assistant messages, starting and ending with user", f"messages[{i}].role")
        turns.append((role, text))
    if not turns or turns[-1][0] != "user":
        raise _err("the last message must be a user message", "messages")
    if not turns[-1][1].strip():
        raise _err("the last user message has no text", f"messages[{len(msgs) - 1}].content")
    history = [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns) - 1, 2)]
    return ("\n\n".join(system) if system else None), history, turns[-1][1], slides


def _slide(body: dict, slides: list[tuple[str, str]]) -> str | None:
    if body.get("slide") is not None:
        slides = [(body["slide"], "slide"), *slides]
    for ref, param in slides:
        if not isinstance(ref, str) or not ref:
            raise _err(f"{param} must be a non-empty string (a slide id from GET /v1/slides)", param, "invalid_type")
    refs = {ref for ref, _ in slides}
    if len(refs) > 1:
        raise _err(f"a conversation is about one slide; the request references {sorted(refs)}", slides[-1][1])
    return slides[0][0] if slides else None


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _err("'stop' must be a non-empty string or a list of non-empty strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise _err(f"'stop' takes at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters", "stop")
    return stops


def _unsupported(body: dict) -> None:
    for name, neutral in UNSUPPORTED.items():
        v = body.get(name)
        if v is None or v == [] or (neutral is not None and v in neutral):
            continue
        raise _err(f"'{name}' is not supported by this server", name, "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _err("only response_format {'type': 'text'} is supported", "response_format", "unsupported_parameter")
    n = _integer(body, "n")
    if n not in (None, 1):
        raise _err("only n = 1 is supported", "n", "unsupported_parameter")


def parse_chat_request(body: object, max_tokens_limit: int, default_max_tokens: int, max_messages: int = 128,
                       special_tokens: tuple[str, ...] = ()) -> ChatRequest:
    """Check a decoded JSON body and return the request; ApiError 400 on any problem.

    ``special_tokens``: strings that may not appear in message text (the tokenizer's special tokens,
    which would forge turns or visual tokens).
    """
    if not isinstance(body, dict):
        raise _err("the request body must be a JSON object", "body", "invalid_type")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _err("'model' is required (GET /v1/models lists it)", "model", "missing_required_parameter")
    _unsupported(body)
    system, history, question, slides = _messages(body, max_messages, special_tokens)
    slide = _slide(body, slides)
    max_tokens = _integer(body, "max_completion_tokens")
    param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = _integer(body, "max_tokens"), "max_tokens"
    if max_tokens is None:
        max_tokens = default_max_tokens
    if not 1 <= max_tokens <= max_tokens_limit:
        raise _err(f"'{param}' must be between 1 and {max_tokens_limit}, got {max_tokens}", param)
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = _integer(body, "seed")
    if seed is not None and not 0 <= seed < 2**63:
        raise _err("'seed' must be in [0, 2**63)", "seed")
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise _err("'stream_options' must be an object", "stream_options", "invalid_type")
        if not stream:
            raise _err("'stream_options' is only allowed with stream: true", "stream_options")
        include_usage = _bool(opts, "include_usage")
    settings = GenerationSettings(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                  seed=seed or 0, stop=_stop(body))
    return ChatRequest(model=model, question=question, history=history, system=system, slide=slide,
                       settings=settings, seeded=seed is not None, stream=stream, include_usage=include_usage,
                       explain=_bool(body, "explain"))
