"""The FastAPI application: OpenAI-compatible chat completions about slides, slide listing, the viewer.

Routes (all ``/v1`` routes need ``Authorization: Bearer <key>`` when a key is configured):

* ``POST /v1/chat/completions`` — OpenAI chat format; the slide is a ``{"type": "slide"}`` content
  part or the top-level ``slide`` field; ``stream``, ``explain`` (selected tiles and scores);
* ``GET /v1/models``, ``GET /v1/models/{id}``;
* ``GET /v1/slides`` (what is under the slides root), ``GET /v1/slides/{id}`` (tile count, width),
  ``GET /v1/slides/{id}/tiles`` (coordinates of the tiles the model sees, for thumbnails/heatmaps);
* ``GET /health`` (no auth), ``GET /`` and ``/static/*`` (the web viewer, no auth).

Every error is ``{"error": {"message", "type", "param", "code"}}``; unexpected exceptions are logged
and answered 500 without details. Without an API key, requests must carry an allowed ``Host`` (DNS
rebinding) and POSTs ``Content-Type: application/json`` (blind cross-origin form posts)
(:class:`RequestGuard`). Slide files are read off the event loop with a per-file timeout
(:class:`~wsi_llava.serve.slide_reader.SlideReader`); a client that disconnects cancels its request.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import logging
import os
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.prompts import PromptBuilder, PromptError
from ..data.slides import Slide, SlideError, load_slide
from ..infer.engine import SlideAssistant
from .batching import BatchQueue, BatchWorker, Job, QueueFull
from .caches import LRUCache
from .config import ServeConfig
from .errors import ApiError, internal_error
from .generation import Row, RowResult, VisualEncoder, generate_rows
from .schema import ChatRequest, parse_chat_request
from .security import SlideRef, bearer_ok, list_slides, real_root, resolve_slide
from .slide_reader import SlideReader, SlideReaderCrashed, SlideReadTimeout

log = logging.getLogger("wsi_llava.serve")

#: the viewer's files: name -> media type
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
}


def tile_size(coords: np.ndarray, default: float = 256.0) -> float:
    """Grid step of tile coordinates [N, 2]: the smallest positive gap between distinct x (or y)
    values; ``default`` when no two tiles share a row or column."""
    gaps = []
    for axis in (0, 1):
        values = np.unique(np.asarray(coords, dtype=np.float64)[:, axis])
        if len(values) > 1:
            gaps.append(float(np.diff(values).min()))
    return min(gaps) if gaps else float(default)


def batch_key(req: ChatRequest, job_id: str) -> tuple:
    """Requests with equal keys can share a ``generate`` call: all greedy ones; sampled ones with the
    same temperature and top_p; a sampled request with its own seed always runs alone."""
    s = req.settings
    if s.temperature == 0:
        return ("greedy",)
    if req.seeded:
        return ("seeded", job_id)
    return ("sample", s.temperature, s.top_p)


def _r(x: float) -> float:
    return round(float(x), 6)


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
        "coords": [[_r(c) for c in slide.coords[i]] for i in v.indices],
        "tile_scores": [_r(scores[i]) for i in v.indices] if scores is not None else None,
        "scores": [_r(s) for s in scores] if scores is not None else None,
    }


async def read_json(request: Request, limit: int) -> object:
    """The request body decoded as JSON; 413 beyond ``limit`` bytes (checked while reading), 400 if
    it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                       code="request_too_large")
    size, chunks = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({type(e).__name__})", code="invalid_json") from None
    check_unicode(body)
    return body


def _valid_text(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_unicode(body: object) -> None:
    """ApiError 400 ``invalid_unicode`` when a string (or key) of the decoded JSON holds an unpaired
    UTF-16 surrogate (JSON ``"\\ud800"`` decodes to one, but it is not text: it cannot be encoded,
    tokenised or answered); ``param`` names where."""
    stack: list[tuple[object, str]] = [(body, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if not _valid_text(value):
                raise ApiError(400, f"{where or 'the request body'} is not valid Unicode text (it holds an unpaired "
                               "UTF-16 surrogate, e.g. \\ud800)", code="invalid_unicode", param=where or None)
        elif isinstance(value, dict):
            for k, v in value.items():
                if not _valid_text(str(k)):
                    raise ApiError(400, f"a key in {where or 'the request body'} is not valid Unicode text (it holds "
                                   "an unpaired UTF-16 surrogate)", code="invalid_unicode", param=where or None)
                stack.append((v, f"{where}.{k}" if where else str(k)))
        elif isinstance(value, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(value))


def default_allowed_hosts(bound: str) -> tuple[str, ...]:
    """``localhost``, ``127.0.0.1``, ``[::1]`` and the bound host (unless it is a wildcard address)."""
    hosts = ["localhost", "127.0.0.1", "[::1]"]
    bound = bound.strip().lower()
    if bound and bound not in ("0.0.0.0", "::", "[::]"):
        hosts.append(f"[{bound}]" if ":" in bound and not bound.startswith("[") else bound)
    return tuple(dict.fromkeys(hosts))


def host_name(header: str | None) -> str | None:
    """The host of a ``Host`` header without the port, lower case (``[::1]:8000`` → ``[::1]``)."""
    if not header:
        return None
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        return header[: end + 1] if end > 0 else None
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class RequestGuard:
    """ASGI middleware: ``Host`` must be in ``allowed_hosts`` (None: no check; ``*``: any), and with
    ``json_only`` every POST/PUT/PATCH must say ``Content-Type: application/json``. Refusals are
    OpenAI-shaped errors: 403 ``host_not_allowed``, 415 ``unsupported_media_type``."""

    def __init__(self, app, allowed_hosts: tuple[str, ...] | None, json_only: bool):
        self.app = app
        self.allowed = None if allowed_hosts is None or "*" in allowed_hosts else frozenset(allowed_hosts)
        self.json_only = json_only

    def problem(self, method: str, headers: Headers) -> ApiError | None:
        if self.allowed is not None:
            host = host_name(headers.get("host"))
            if host not in self.allowed:
                return ApiError(403, f"Host {(headers.get('host') or '')[:100]!r} is not served here (allowed: "
                                f"{', '.join(sorted(self.allowed))}; see --allowed-hosts)", code="host_not_allowed")
        if self.json_only and method in ("POST", "PUT", "PATCH"):
            media = (headers.get("content-type") or "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                return ApiError(415, f"Content-Type must be application/json, got {media[:100] or 'none'!r}",
                                code="unsupported_media_type")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            err = self.problem(scope["method"], Headers(scope=scope))
            if err is not None:
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects (call after the body was read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def file_loader(assistant: SlideAssistant):
    """``path -> Slide`` as :meth:`SlideAssistant.load` reads slide files, picklable (for worker processes)."""
    cfg = assistant.model.config
    return functools.partial(load_slide, patches_per_wsi=assistant.patches_per_wsi, rng=None,
                             expected_dim=cfg.feature_dim)


class SlideServer:
    """What a running server holds: the model, the caches, the request queue and its worker."""

    def __init__(self, config: ServeConfig, assistant: SlideAssistant | None = None,
                 slide_loader=None):
        self.config = config
        self.root = real_root(config.slides_root)
        self.assistant = assistant or SlideAssistant.from_pretrained(
            config.model, device=config.device, precision=config.precision, force_precision=config.force_precision)
        self.model_name = config.model_name or Path(config.model).resolve().name
        self.created = int(time.time())
        tok = self.assistant.tokenizer
        self.special_tokens = tuple(t for t in tok.all_special_tokens if t)
        #: prompts are tokenised on the event-loop thread with this copy, while the worker thread
        #: decodes with the original (a fast tokenizer must not be used from two threads at once)
        self.prompt_tokenizer = copy.deepcopy(tok)
        self.slides: LRUCache[Slide] = LRUCache(config.slide_cache_items, config.slide_cache_bytes,
                                                lambda s: s.features.nbytes + s.coords.nbytes)
        #: reads slide files off the event loop, each bounded by ``slide_timeout``
        self.reader = SlideReader(slide_loader or file_loader(self.assistant), config.slide_readers,
                                  config.slide_timeout, config.slide_reader)
        self._loading: dict[tuple, asyncio.Future] = {}
        self._timed_out: dict[tuple, float] = {}
        self.abandoned = 0
        """Requests whose client disconnected before the answer (their generation was cancelled)."""
        self.rows_cancelled = 0
        """Queued or running rows stopped because their request was cancelled (disconnect, timeout)."""
        self.encoder = VisualEncoder(self.assistant.model,
                                     LRUCache(config.visual_cache_items, config.visual_cache_bytes, lambda v: v.nbytes()))
        self.queue = BatchQueue(config.queue_size)
        self.worker = BatchWorker(self.queue, self.run_batch, config.max_batch, on_start=self._worker_start)
        base = self.assistant.builder
        self._builders: dict[str | None, PromptBuilder] = {
            None: PromptBuilder(self.prompt_tokenizer, base.num_image_tokens, base.cutoff_len, base.system_prompt)}
        self._builders_lock = threading.Lock()

    # -- slides ----------------------------------------------------------------------------------
    def _public(self, message: str, ref: SlideRef) -> str:
        return message.replace(ref.path, ref.id).replace(self.root, "<slides-root>")

    async def load_slide(self, ref: SlideRef) -> tuple[Slide, tuple]:
        """The slide's sampled tiles (cached per file version) and its cache key. The file is read by
        :attr:`reader` (off the event loop, bounded by ``slide_timeout``); concurrent requests for the
        same file share one read; a file whose read timed out is refused for ``slide_timeout`` seconds."""
        try:
            st = await asyncio.to_thread(os.stat, ref.path)
        except OSError:
            raise ApiError(404, f"slide {ref.id!r} not found", code="slide_not_found", param="slide") from None
        key = (ref.path, st.st_mtime_ns, st.st_size)
        slide = self.slides.get(key)
        if slide is not None:
            return slide, key
        until = self._timed_out.get(key)
        if until is not None and time.monotonic() < until:
            raise self._timeout_error(ref, again=True)
        future = self._loading.get(key)
        if future is None:
            future = asyncio.ensure_future(self._read(ref, key))
            self._loading[key] = future
            future.add_done_callback(lambda f: (self._loading.pop(key, None), f.cancelled() or f.exception()))
        return await asyncio.shield(future), key

    def _timeout_error(self, ref: SlideRef, again: bool = False) -> ApiError:
        t = self.config.slide_timeout
        return ApiError(504, f"reading slide {ref.id!r} took longer than {t:g} s" +
                        (f" recently; it is not tried again for {t:g} s" if again else "; the read was abandoned"),
                        code="slide_timeout", param="slide")

    async def _read(self, ref: SlideRef, key: tuple) -> Slide:
        try:
            slide = await self.reader.read(ref.path)
        except SlideError as e:
            raise ApiError(400, f"slide {ref.id!r} cannot be used: {self._public(str(e), ref)}",
                           code="invalid_slide_file", param="slide") from None
        except SlideReadTimeout:
            self._timed_out[key] = time.monotonic() + self.config.slide_timeout
            for k in [k for k, until in self._timed_out.items() if until < time.monotonic()]:
                del self._timed_out[k]
            raise self._timeout_error(ref) from None
        except SlideReaderCrashed:
            raise ApiError(400, f"slide {ref.id!r} cannot be used: reading it crashed the reader process (the file is "
                           "probably damaged)", code="invalid_slide_file", param="slide") from None
        self.slides.put(key, slide)
        return slide

    def builder(self, system: str | None) -> PromptBuilder:
        """The prompt builder for a system prompt (None: the model's own)."""
        with self._builders_lock:
            b = self._builders.get(system)
            if b is None:
                base = self.assistant.builder
                b = PromptBuilder(self.prompt_tokenizer, base.num_image_tokens, base.cutoff_len, system)
                if len(self._builders) < 64:
                    self._builders[system] = b
            return b

    # -- the worker ------------------------------------------------------------------------------
    def _worker_start(self) -> None:
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)

    def run_batch(self, jobs: list[Job]) -> None:
        """Worker thread: visual tokens per job (cached), then one ``generate`` for the live jobs."""
        live, visuals = [], []
        for job in jobs:
            if job.cancelled.is_set():
                self.rows_cancelled += 1
                job.emit("error", ApiError(504, "cancelled", code="cancelled"))
                continue
            try:
                with self.assistant.autocast():
                    visuals.append(self.encoder.encode(job.payload))
                live.append(job)
            except Exception:
                log.exception("encoding slide %s failed", job.payload.slide.path)
                job.emit("error", internal_error())
        if not live:
            return
        with self.assistant.autocast():
            results = generate_rows(self.assistant.model, self.assistant.tokenizer, [j.payload for j in live], visuals)
        for job, res in zip(live, results):
            self.rows_cancelled += res.finish_reason == "cancelled"
            job.emit("done", res)

    def stats(self) -> dict:
        return {"worker": {**self.worker.stats(), "abandoned": self.abandoned, "rows_cancelled": self.rows_cancelled},
                "slide_cache": self.slides.stats(), "visual_cache": self.encoder.cache.stats(),
                "slide_reader": self.reader.stats()}


# ------------------------------------------------------------------------------------ responses


def error_response(err: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else {}
    if err.status == 429:
        headers["Retry-After"] = "1"
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _completion(server: SlideServer, cid: str, created: int, req: ChatRequest, ref: SlideRef, slide: Slide,
                res: RowResult) -> dict:
    body = {
        "id": cid, "object": "chat.completion", "created": created, "model": server.model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                     "finish_reason": res.finish_reason, "logprobs": None}],
        "usage": _usage(res),
    }
    if req.explain:
        body["explain"] = explain_payload(ref.id, slide, res, server.assistant.model.config.vision_feature_select_mode)
    return body


def _usage(res: RowResult) -> dict:
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
            "total_tokens": res.prompt_tokens + res.completion_tokens}


def _sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


# ------------------------------------------------------------------------------------ the app


def create_app(config: ServeConfig, assistant: SlideAssistant | None = None, slide_loader=None) -> FastAPI:
    """Build the app (loads the model now); the batch worker runs while the app's lifespan does.
    ``slide_loader``: ``path -> Slide`` instead of the model's own (picklable for ``slide_reader:
    process``)."""
    server = SlideServer(config, assistant, slide_loader)
    static = {name: (resources.files("wsi_llava") / "static" / name).read_bytes() for name in STATIC_FILES}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.worker.stop)
            await asyncio.to_thread(server.reader.close)

    app = FastAPI(title="WSI-LLaVA", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    guarded = config.allowed_hosts is not None or not config.api_key
    app.state.allowed_hosts = (config.allowed_hosts if config.allowed_hosts is not None
                               else default_allowed_hosts(config.host)) if guarded else None
    app.add_middleware(RequestGuard, allowed_hosts=app.state.allowed_hosts, json_only=not config.api_key)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, "error")
        return error_response(ApiError(exc.status_code, message, code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(ApiError(400, f"invalid {param or 'request'}: {first.get('msg', 'invalid')}",
                                       code="invalid_value", param=param or None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(internal_error())

    async def require_key(request: Request) -> None:
        if not bearer_ok(request.headers.get("authorization"), config.api_key):
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    # -- viewer and health -----------------------------------------------------------------------
    def static_response(name: str) -> Response:
        return Response(static[name], media_type=STATIC_FILES[name], headers=SECURITY_HEADERS)

    @app.get("/", include_in_schema=False)
    async def index():
        return static_response("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str):
        if name not in STATIC_FILES:
            raise ApiError(404, f"no static file {name[:100]!r}", code="not_found")
        return static_response(name)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_name, "auth": bool(config.api_key), **server.stats()}

    # -- models ----------------------------------------------------------------------------------
    def model_card() -> dict:
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "wsi-llava"}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != server.model_name:
            raise ApiError(404, f"model {model_id[:100]!r} does not exist; this server serves {server.model_name!r}",
                           code="model_not_found", param="model")
        return model_card()

    # -- slides ----------------------------------------------------------------------------------
    def listing() -> tuple[list[dict], bool]:
        refs, truncated = list_slides(server.root, config.max_listed_slides)
        data = []
        for r in refs:
            try:
                data.append({"id": r.id, "object": "slide", "bytes": os.path.getsize(r.path)})
            except OSError:
                continue  # removed meanwhile
        return data, truncated

    @v1.get("/slides")
    async def slides():
        data, truncated = await asyncio.to_thread(listing)
        return {"object": "list", "truncated": truncated, "data": data}

    async def loaded(ref_text: str) -> tuple[SlideRef, Slide, tuple]:
        ref = await asyncio.to_thread(resolve_slide, server.root, ref_text)
        slide, key = await server.load_slide(ref)
        return ref, slide, key

    @v1.get("/slides/{ref:path}/tiles")
    async def slide_tiles(ref: str):
        sref, slide, _ = await loaded(ref)
        return {"id": sref.id, "object": "slide.tiles", "n_total": int(slide.n_total), "n_used": int(len(slide.coords)),
                "tile_size": tile_size(slide.coords), "coords": [[_r(x), _r(y)] for x, y in slide.coords]}

    @v1.get("/slides/{ref:path}")
    async def slide_info(ref: str):
        sref, slide, _ = await loaded(ref)
        return {"id": sref.id, "object": "slide", "n_total": int(slide.n_total), "n_used": int(len(slide.coords)),
                "dim": int(slide.features.shape[1]), "tile_size": tile_size(slide.coords)}

    # -- chat ------------------------------------------------------------------------------------
    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        deadline = time.monotonic() + config.request_timeout
        body = await read_json(request, config.max_body_bytes)
        req = parse_chat_request(body, config.max_tokens_limit, config.default_max_tokens, config.max_messages,
                                 server.special_tokens)
        if req.model != server.model_name:
            raise ApiError(404, f"model {req.model[:100]!r} does not exist; this server serves {server.model_name!r}",
                           code="model_not_found", param="model")
        if req.slide is None:
            raise ApiError(400, "no slide referenced: add a content part {'type': 'slide', 'slide': '<id>'} to a user "
                           "message or a top-level 'slide' field (GET /v1/slides lists the ids)",
                           code="missing_slide", param="slide")
        if req.settings.temperature > 0 and not req.seeded:
            req.settings.seed = secrets.randbits(63)
        ref, slide, key = await loaded(req.slide)
        try:
            example = server.builder(req.system).build_generation(req.question, req.history, where=f"slide {ref.id!r}")
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

        async def next_event() -> tuple[str, object]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(events.get(), remaining)

        if not req.stream:
            async def answer() -> dict:
                while True:
                    kind, value = await next_event()
                    if kind == "done":
                        return _completion(server, cid, created, req, ref, slide, value)
                    if kind == "error":
                        raise value

            waiter = asyncio.ensure_future(answer())
            watcher = asyncio.ensure_future(client_gone(request))
            try:
                done, _ = await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if waiter in done:
                    return waiter.result()
                server.abandoned += 1  # nobody is waiting for this answer: stop generating it
                log.info("client of %s disconnected; its generation was cancelled", cid)
                return Response(status_code=499)
            except asyncio.TimeoutError:
                raise timeout_error from None
            finally:
                cancelled.set()
                waiter.cancel()
                watcher.cancel()

        def chunk(delta: dict, finish_reason: str | None = None, **extra) -> bytes:
            return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": server.model_name,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
                         **extra})

        async def stream():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, value = await next_event()
                    if kind == "delta":
                        yield chunk({"content": value})
                    elif kind == "error":
                        yield _sse(value.body())
                        return
                    elif kind == "done":
                        extra = {}
                        if req.explain:
                            extra["explain"] = explain_payload(ref.id, slide, value,
                                                               server.assistant.model.config.vision_feature_select_mode)
                        yield chunk({}, value.finish_reason, **extra)
                        if req.include_usage:
                            yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                        "model": server.model_name, "choices": [], "usage": _usage(value)})
                        yield _sse("[DONE]")
                        return
            except asyncio.TimeoutError:
                yield _sse(timeout_error.body())
            finally:
                cancelled.set()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    app.include_router(v1)
    return app
