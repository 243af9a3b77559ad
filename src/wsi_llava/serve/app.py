"""The FastAPI application: OpenAI-compatible chat completions about slides, slide listing, the viewer.

Routes (all ``/v1`` routes need ``Authorization: Bearer <key>`` when a key is configured):

* ``POST /v1/chat/completions`` — OpenAI chat format (:class:`~wsi_llava.serve.schema.ChatCompletionRequest`,
  validated by FastAPI); the slide is a ``{"type": "slide"}`` content part or the top-level ``slide``
  field, or an ROI image an ``image_url`` part; ``stream``, ``explain`` (selected tiles and scores)
  (:mod:`~wsi_llava.serve.completions`);
* ``GET /v1/models``, ``GET /v1/models/{id}``;
* ``GET /v1/slides`` (what is under the slides root), ``GET /v1/slides/{id}`` (tile count, width),
  ``GET /v1/slides/{id}/tiles`` (coordinates of the tiles the model sees, for thumbnails/heatmaps, and
  the id of the slide's raw image, if any);
* ``GET /v1/slides/{id}/deepzoom.dzi`` and ``GET /v1/slides/{id}/deepzoom_files/{level}/{col}_{row}.jpeg``:
  the slide's raw image as a Deep Zoom pyramid, for the viewer (:mod:`~wsi_llava.serve.deepzoom`);
* ``GET /health`` (no auth), ``GET /`` and ``/static/*`` (the web viewer, no auth).

Every error is ``{"error": {"message", "type", "param", "code"}}`` (validation errors included: 400
with ``param`` naming the field); unexpected exceptions are logged and answered 500 without details.
Every request passes :class:`~wsi_llava.serve.guard.RequestGuard` (Host allow-list and JSON-only
POSTs without an API key, body size).
"""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..infer.engine import SlideAssistant
from .completions import chat_completion
from .config import ServeConfig
from .deepzoom import SlideImages
from .errors import ApiError, internal_error
from .guard import RequestGuard, default_allowed_hosts, error_response
from .responses import rounded_coords
from .schema import ChatCompletionRequest, validation_error
from .security import bearer_ok, list_slides
from .server import SlideServer

log = logging.getLogger("wsi_llava.serve")

#: the viewer's files: name -> media type
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "viewer.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
}


def create_app(config: ServeConfig, assistant: SlideAssistant | None = None, slide_loader=None) -> FastAPI:
    """Build the app (loads the model now); the batch worker runs while the app's lifespan does.
    ``slide_loader``: ``path -> Slide`` instead of the model's own (picklable for ``slide_reader:
    process``)."""
    server = SlideServer(config, assistant, slide_loader)
    images = SlideImages(server.root, timeout=config.slide_timeout, resolve=server.names.resolve)
    static = {name: (resources.files("wsi_llava") / "static" / name).read_bytes() for name in STATIC_FILES}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.worker.stop)
            await asyncio.to_thread(server.reader.close)
            images.close()

    app = FastAPI(title="WSI-LLaVA", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.state.slide_images = images
    guarded = config.allowed_hosts is not None or not config.api_key
    app.state.allowed_hosts = (config.allowed_hosts if config.allowed_hosts is not None
                               else default_allowed_hosts(config.host)) if guarded else None
    app.add_middleware(RequestGuard, allowed_hosts=app.state.allowed_hosts, json_only=not config.api_key,
                       max_body_bytes=config.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {400: f"the request body cannot be read as JSON ({exc.detail})",  # FastAPI's body parsing
                   404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, "error")
        return error_response(ApiError(exc.status_code, message, code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(validation_error(exc.errors(), prefix=("body",)))

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
        return {"status": "ok", "model": server.model_name, "auth": bool(config.api_key), **server.stats(),
                "deepzoom": images.stats()}

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

    @v1.get("/slides/{ref:path}/tiles")
    async def slide_tiles(ref: str):
        sref, slide, key = await server.open_slide(ref)
        size, source = await server.tile_size(sref, slide, key)
        return {"id": sref.id, "object": "slide.tiles", "n_total": int(slide.n_total), "n_used": int(len(slide.coords)),
                "tile_size": size, "tile_size_source": source, "coords": rounded_coords(slide.coords),
                "image": await images.image_of(sref.id)}

    @v1.get("/slides/{ref:path}/deepzoom.dzi")
    async def slide_dzi(ref: str):
        return Response(await images.dzi(ref), media_type="application/xml")

    @v1.get("/slides/{ref:path}/deepzoom_files/{level}/{name}")
    async def slide_dz_tile(ref: str, level: str, name: str):
        return Response(await images.tile(ref, level, name), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=300"})

    @v1.get("/slides/{ref:path}")
    async def slide_info(ref: str):
        sref, slide, key = await server.open_slide(ref)
        size, source = await server.tile_size(sref, slide, key)
        return {"id": sref.id, "object": "slide", "n_total": int(slide.n_total), "n_used": int(len(slide.coords)),
                "dim": int(slide.features.shape[1]), "tile_size": size, "tile_size_source": source}

    # -- chat ------------------------------------------------------------------------------------
    @v1.post("/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        return await chat_completion(server, request, body)

    app.include_router(v1)
    return app
