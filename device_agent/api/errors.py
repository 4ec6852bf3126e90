"""Errors in OpenAI's body shape, {"error": {message, type, param, code}}, with the right HTTP status."""

from __future__ import annotations

import logging
import math

import grpc
from fastapi.responses import JSONResponse

from device_agent.api.protocol import ErrorBody, ErrorResponse
from device_agent.edge.client import EdgeError, MessageTooLarge

log = logging.getLogger("coinfer.device")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return ErrorResponse(
            error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        ).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_edge(e: EdgeError) -> APIError:
    """Map an edge status to what the app should do: fix the request (4xx) or retry later (5xx)."""
    c = grpc.StatusCode
    if e.too_large:  # before RESOURCE_EXHAUSTED: the request's size, not a busy edge
        return APIError(400, MessageTooLarge.of(e).details, code="prompt_too_large")
    if e.code == c.INVALID_ARGUMENT:
        return APIError(400, f"edge rejected the request: {e.details}", code="edge_invalid_argument")
    if e.code == c.RESOURCE_EXHAUSTED:
        retry = max(1, math.ceil(e.retry_after)) if e.retry_after is not None else 1
        return APIError(
            503, f"edge is busy: {e.details}", "server_error", "edge_busy", headers={"Retry-After": str(retry)}
        )
    # from here on the details are the edge's or the channel's own text (addresses, exception messages
    # of an edge handler): logged here, only the status name goes to the client
    log.warning("edge error %s: %s", e.code.name, e.details)
    if e.code in (c.UNAVAILABLE, c.DEADLINE_EXCEEDED, c.ABORTED, c.NOT_FOUND):
        return APIError(
            503,
            f"edge unavailable ({e.code.name}); retry later",
            "server_error",
            "edge_unavailable",
            headers={"Retry-After": "2"},
        )
    return APIError(502, f"edge error {e.code.name}", "server_error", "edge_error")
