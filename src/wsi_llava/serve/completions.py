"""``POST /v1/chat/completions``: a validated request → its slide or ROI image → a queued generation
row → a :class:`~wsi_llava.serve.responses.ChatCompletion` or a stream of chunks. A client that
disconnects, or a request past its deadline, cancels its row."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..data.prompts import PromptError
from ..data.slides import Slide
from .batching import Job, QueueFull
from .errors import ApiError
from .generation import Row, RowResult
from .responses import (AssistantMessage, ChatCompletion, ChatCompletionChunk, Choice, ChunkChoice, Delta, Usage,
                        explain_payload, sse)
from .schema import ChatCompletionRequest, ChatRequest
from .server import SlideServer, batch_key

log = logging.getLogger("wsi_llava.serve")


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects (call after the body was read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def load_visual(server: SlideServer, req: ChatRequest) -> tuple[str, Slide, tuple]:
    """The request's slide or ROI image: (public id, tiles, visual cache key)."""
    if req.image is not None:
        slide, key, image_id = await server.load_image(*req.image)
        return image_id, slide, key
    if req.slide is None:
        raise ApiError(400, "no slide referenced: add a content part {'type': 'slide', 'slide': '<id>'} (or an "
                       "'image_url' part) to a user message or a top-level 'slide' field (GET /v1/slides lists "
                       "the ids)", code="missing_slide", param="slide")
    ref, slide, key = await server.open_slide(req.slide)
    return ref.id, slide, key


async def chat_completion(server: SlideServer, request: Request, body: ChatCompletionRequest) -> Response:
    """Answer one chat request (see the module docstring)."""
    config = server.config
    deadline = time.monotonic() + config.request_timeout
    req = body.to_chat(config.max_tokens_limit, config.default_max_tokens, config.max_messages, server.special_tokens)
    if req.model != server.model_name:
        raise ApiError(404, f"model {req.model[:100]!r} does not exist; this server serves {server.model_name!r}",
                       code="model_not_found", param="model")
    if req.settings.temperature > 0 and not req.seeded:
        req.settings.seed = secrets.randbits(63)
    visual_id, slide, key = await load_visual(server, req)
    try:
        example = server.builder(req.system).build_generation(req.question, req.history, where=f"slide {visual_id!r}")
    except PromptError as e:
        code = "context_length_exceeded" if "cutoff_len" in str(e) else "invalid_prompt"
        raise ApiError(400, str(e), code=code, param="messages") from None

    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def notify(kind: str, value: object) -> None:
        loop.call_soon_threadsafe(events.put_nowait, (kind, value))

    cancelled = threading.Event()
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    row = Row(example, slide, key, req.settings, on_delta=(lambda d: notify("delta", d)) if req.stream else None,
              cancelled=cancelled.is_set)
    job = Job(payload=row, key=batch_key(req, cid), notify=notify, cancelled=cancelled)
    try:
        server.queue.put(job)
    except QueueFull as e:
        raise ApiError(429, f"the server is busy ({e}); retry shortly", code="queue_full") from None
    except RuntimeError:
        raise ApiError(503, "the server is shutting down", code="shutting_down") from None
    created = int(time.time())
    timeout_error = ApiError(504, f"the request took longer than {config.request_timeout:g} s", code="timeout")
    selector = server.assistant.model.config.vision_feature_select_mode

    def explained(res: RowResult) -> dict | None:
        return explain_payload(visual_id, slide, res, selector) if req.explain else None

    async def next_event() -> tuple[str, object]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise asyncio.TimeoutError
        return await asyncio.wait_for(events.get(), remaining)

    if not req.stream:
        async def answer() -> ChatCompletion:
            while True:
                kind, value = await next_event()
                if kind == "done":
                    choice = Choice(message=AssistantMessage(content=value.text), finish_reason=value.finish_reason)
                    return ChatCompletion(id=cid, created=created, model=server.model_name, choices=[choice],
                                          usage=Usage.of(value), explain=explained(value))
                if kind == "error":
                    raise value

        waiter = asyncio.ensure_future(answer())
        watcher = asyncio.ensure_future(client_gone(request))
        try:
            done, _ = await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if waiter in done:
                return JSONResponse(waiter.result().model_dump())
            server.abandoned += 1  # nobody is waiting for this answer: stop generating it
            log.info("client of %s disconnected; its generation was cancelled", cid)
            return Response(status_code=499)
        except asyncio.TimeoutError:
            raise timeout_error from None
        finally:
            cancelled.set()
            waiter.cancel()
            watcher.cancel()

    def chunk(delta: Delta, finish_reason: str | None = None, **extra) -> bytes:
        return sse(ChatCompletionChunk(id=cid, created=created, model=server.model_name,
                                       choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)], **extra))

    async def stream():
        try:
            yield chunk(Delta(role="assistant", content=""))
            while True:
                kind, value = await next_event()
                if kind == "delta":
                    yield chunk(Delta(content=value))
                elif kind == "error":
                    yield sse(value.body())
                    return
                elif kind == "done":
                    yield chunk(Delta(), value.finish_reason, explain=explained(value))
                    if req.include_usage:
                        yield sse(ChatCompletionChunk(id=cid, created=created, model=server.model_name, choices=[],
                                                      usage=Usage.of(value)))
                    yield sse("[DONE]")
                    return
        except asyncio.TimeoutError:
            yield sse(timeout_error.body())
        finally:
            cancelled.set()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
