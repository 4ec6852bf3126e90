"""The device agent's FastAPI app: routes, OpenAI-style error bodies, request metrics."""

from __future__ import annotations

import hmac
import logging

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from device_agent.api.errors import APIError
from device_agent.api.logic import ServingLogic
from device_agent.api.routes import completions, models, ops, plan
from device_agent.generate import Engine

log = logging.getLogger("coinfer.device")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    e = errs[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return f"request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    where = ".".join(loc) or "body"
    return f"{where}: {e.get('msg')}" + (f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""), where


def require_api_key(request: Request) -> None:
    """With --api-key set, every /v1 call needs `Authorization: Bearer <key>` (as OpenAI clients send it)."""
    key = request.app.state.logic.engine.settings.api_key
    if not key:
        return
    given = request.headers.get("authorization", "")
    if not (given.startswith("Bearer ") and hmac.compare_digest(given[len("Bearer "):].encode(), key.encode())):
        raise APIError(401, "missing or wrong API key: send Authorization: Bearer <key>", "invalid_request_error",
                       "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def create_app(engine: Engine, model_name: str) -> FastAPI:
    app = FastAPI(title="coinfer device agent", version="1", docs_url="/docs", redoc_url=None)
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
        log.exception("internal error on %s", request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()

    app.add_middleware(RequestCounter, metrics=engine.metrics)
    return app


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
