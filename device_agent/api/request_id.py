"""`X-Request-Id` on every REST response, and in the agent's log lines about that request.

Why: a client that reports a failure needs one string that finds the request in the agent's log. A
client (or a proxy in front) that sends a sane `X-Request-Id` gets it back, so its own id works end to
end; otherwise the agent makes one. Plain ASGI, as the app's other middleware (no relaying of
streamed bodies). The id lives in the request's scope (for the 500 handler, which runs outside every
middleware) and in a context variable, which starlette's worker threads inherit, so any record of the
`coinfer.device` logger written while the request runs names it (`RequestIdFilter`).
"""

from __future__ import annotations

import contextvars
import logging
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-request-id"
SCOPE_KEY = "coinfer.request_id"
MAX_LENGTH = 128
current: contextvars.ContextVar[str | None] = contextvars.ContextVar("coinfer_request_id", default=None)


def sane(value: str) -> bool:
    """1-128 printable ASCII characters: safe to echo in a header and to write in a log line."""
    return 0 < len(value) <= MAX_LENGTH and all(" " <= ch <= "~" for ch in value)


def of_scope(scope: Scope) -> str:
    """The request's id as RequestId set it; a fresh one for a request it never saw."""
    return scope.get(SCOPE_KEY) or uuid.uuid4().hex


class RequestId:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == HEADER.encode()), "")
        rid = given.strip() if sane(given.strip()) else uuid.uuid4().hex
        scope[SCOPE_KEY] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(k.lower() == HEADER.encode() for k, _ in headers):
                    headers.append((HEADER.encode(), rid.encode()))
                message["headers"] = headers
            await send(message)

        token = current.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current.reset(token)


class RequestIdFilter(logging.Filter):
    """Appends `[request <id>]` to a record written while a request runs (in its task or a worker
    thread it started); records written elsewhere (start-up, the planner's poller) pass unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = current.get()
        if rid is not None and not getattr(record, "request_id", None):
            record.request_id = rid
            # the id is the client's text: escaped where the message is %-formatted with args
            record.msg = f"{record.msg} [request {rid.replace('%', '%%') if record.args else rid}]"
        return True


def install_log_filter(logger: logging.Logger) -> None:
    """Adds the filter to `logger` once (apps are created more than once in one process by tests)."""
    if not any(isinstance(f, RequestIdFilter) for f in logger.filters):
        logger.addFilter(RequestIdFilter())
