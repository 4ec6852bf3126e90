"""The device agent's FastAPI app: routes, OpenAI-style error bodies, request metrics."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from device_agent.api.errors import APIError
from device_agent.api.logic import ServingLogic
from device_agent.api.routes import completions, models, ops
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


def create_app(engine: Engine, model_name: str) -> FastAPI:
    app = FastAPI(title="coinfer device agent", version="1", docs_url="/docs", redoc_url=None)
    app.state.logic = ServingLogic(engine, model_name)
    for r in (completions.router, models.router, ops.router):
        app.include_router(r)

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

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        engine.metrics.requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    return app
