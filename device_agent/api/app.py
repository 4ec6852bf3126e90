"""The device agent's FastAPI app: routes, OpenAI-style error bodies, request metrics, and the limits
that keep one client from taking the agent down: body size, concurrent generations, worker threads."""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import anyio.to_thread
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from device_agent.api import request_id
from device_agent.api.errors import APIError
from device_agent.api.logic import ServingLogic
from device_agent.api.routes import completions, models, ops, plan
from device_agent.generate import Engine

log = logging.getLogger("coinfer.device")

# worker threads beyond one per generation slot (a generation uses one at a time: tokenizing, then running),
# for the routes that need one: /v1/plan, /readyz's edge probe
SPARE_THREADS = 16


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    e = errs[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return f"request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    where = ".".join(loc) or "body"
    msg = e.get("msg")
    if e.get("type") == "extra_forbidden":  # pydantic's words ("Extra inputs are not permitted") name no reason
        msg = "unknown field: this server does not implement it (docs/openai.md lists the fields it takes)"
    return f"{where}: {msg}" + (f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""), where


def require_api_key(request: Request) -> None:
    """With --api-key set, every /v1 call needs `Authorization: Bearer <key>` (as OpenAI clients send it)."""
    key = request.app.state.logic.engine.settings.api.api_key
    if not key:
        return
    given = request.headers.get("authorization", "")
    if not (given.startswith("Bearer ") and hmac.compare_digest(given[len("Bearer ") :].encode(), key.encode())):
        raise APIError(
            401,
            "missing or wrong API key: send Authorization: Bearer <key>",
            "invalid_request_error",
            "invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _thread_pool(threads: int) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Lifespan that sizes the worker thread pool (anyio's default limiter, 40 tokens, per event loop) to
    `threads`: generations hold one thread each, so with the cap below the pool size they cannot take
    every thread from the routes that need one."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = threads
        yield

    return lifespan


def create_app(engine: Engine, model_name: str) -> FastAPI:
    settings = engine.settings.api
    threads = max(40, settings.max_concurrent_requests + SPARE_THREADS)
    app = FastAPI(
        title="coinfer device agent", version="1", docs_url="/docs", redoc_url=None, lifespan=_thread_pool(threads)
    )
    app.state.logic = ServingLogic(engine, model_name)
    for r in (completions.router, models.router, plan.router):
        app.include_router(r, dependencies=[Depends(require_api_key)])
    app.include_router(ops.router)  # health, readiness and metrics stay open for probes and scrapers

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        # the exception's text may hold paths, addresses or request data: it goes to the log under the
        # request's id, which the client gets, never into the body. This handler runs outside every
        # middleware, so it sets the X-Request-Id header itself.
        rid = request_id.of_scope(request.scope)
        log.error("internal error on %s [request %s]", request.url.path, rid, exc_info=exc)
        return APIError(
            500, f"internal error; request id {rid}", "server_error", "internal_error", headers={"X-Request-Id": rid}
        ).response()

    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestCounter, metrics=engine.metrics)  # outside BodyLimit, so it counts 413s
    app.add_middleware(request_id.RequestId)  # added last: outermost, so every response has the header
    request_id.install_log_filter(log)
    return app


class BodyLimit:
    """413 for a request body over `max_bytes`, whether its Content-Length says so (answered before
    reading any of it) or a chunked upload adds up to it (answered as soon as it does). Plain ASGI, as
    RequestCounter. It reads the body before the app does and hands it on whole: the JSON routes read
    it whole anyway, and so the refusal can still be a clean 413 rather than a route failing half way."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            return await self._refuse(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left while uploading: nobody to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:  # the body once, then the server's own messages (the disconnect)
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Connection: close, so the server drops the rest of the body instead of reading it
        err = APIError(
            413,
            f"request body is larger than {self.max_bytes} bytes",
            code="request_too_large",
            headers={"Connection": "close"},
        )
        await err.response()(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class RequestCounter:
    """Counts requests by route and status. Plain ASGI on purpose: starlette's BaseHTTPMiddleware
    relays streamed bodies through its own channel, so an SSE client that hangs up was never seen
    and its generation (and edge session) ran on to max_tokens."""

    def __init__(self, app, metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = []

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status[0]) if status else "aborted").inc()
