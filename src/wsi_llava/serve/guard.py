"""What every HTTP request passes before a route: the ``Host`` allow-list (DNS rebinding), JSON-only
POSTs on a keyless server (blind cross-origin form posts), and the body size limit (checked while
reading, also without ``Content-Length``). Refusals are OpenAI-shaped errors (:func:`error_response`)."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from .errors import ApiError

BODY_METHODS = ("POST", "PUT", "PATCH")


def error_response(err: ApiError) -> JSONResponse:
    """The JSON response of an :class:`ApiError` (401 adds ``WWW-Authenticate``, 429 ``Retry-After``)."""
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else {}
    if err.status == 429:
        headers["Retry-After"] = "1"
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


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


def _too_large(limit: int, declared: str | None = None) -> ApiError:
    size = f"of {declared} bytes " if declared else ""
    return ApiError(413, f"request body {size}exceeds the limit of {limit} bytes", code="request_too_large")


class RequestGuard:
    """ASGI middleware: ``Host`` must be in ``allowed_hosts`` (None: no check; ``*``: any); with
    ``json_only`` every POST/PUT/PATCH must say ``Content-Type: application/json``; a body over
    ``max_body_bytes`` is refused before the app sees it. Refusals: 403 ``host_not_allowed``, 415
    ``unsupported_media_type``, 413 ``request_too_large``."""

    def __init__(self, app, allowed_hosts: tuple[str, ...] | None, json_only: bool, max_body_bytes: int):
        self.app = app
        self.allowed = None if allowed_hosts is None or "*" in allowed_hosts else frozenset(allowed_hosts)
        self.json_only = json_only
        self.max_body_bytes = max_body_bytes

    def problem(self, method: str, headers: Headers) -> ApiError | None:
        if self.allowed is not None:
            host = host_name(headers.get("host"))
            if host not in self.allowed:
                return ApiError(403, f"Host {(headers.get('host') or '')[:100]!r} is not served here (allowed: "
                                f"{', '.join(sorted(self.allowed))}; see --allowed-hosts)", code="host_not_allowed")
        if self.json_only and method in BODY_METHODS:
            media = (headers.get("content-type") or "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                return ApiError(415, f"Content-Type must be application/json, got {media[:100] or 'none'!r}",
                                code="unsupported_media_type")
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return _too_large(self.max_body_bytes, declared)
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            err = self.problem(scope["method"], Headers(scope=scope))
            if err is None and scope["method"] in BODY_METHODS:
                body, err = await self._read_body(receive)
                if body is None and err is None:
                    return  # the client left while sending
                receive = _replay(body, receive)
            if err is not None:
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _read_body(self, receive) -> tuple[bytes | None, ApiError | None]:
        """The whole body, or (None, 413 error) as soon as it passes the limit."""
        size, chunks = 0, []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None, _too_large(self.max_body_bytes)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _replay(body: bytes | None, receive):
    """``receive`` that first hands out the body read by the guard, then waits on the connection
    (for ``http.disconnect``)."""
    pending = [{"type": "http.request", "body": body or b"", "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed
