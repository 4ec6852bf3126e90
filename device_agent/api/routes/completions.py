"""POST /v1/chat/completions and /v1/completions (OpenAI schema; `stream: true` -> SSE)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Generator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.types import Receive, Scope, Send

from device_agent.api import protocol as p
from device_agent.api.errors import APIError
from device_agent.api.logic import Events, ServingLogic

router = APIRouter()


def _logic(request: Request) -> ServingLogic:
    return request.app.state.logic


def _affinity(request: Request, body: p._Request) -> str:
    """The conversation's affinity key (X-Session-Id as in vLLM's router, else `user`), checked here because
    it goes into gRPC metadata, which takes printable ASCII only (`user` is checked by its validator)."""
    header = request.headers.get("x-session-id")
    if not header:  # absent or empty: as before, `user` (or nothing) keys the conversation
        return body.user or ""
    try:
        return p.metadata_value(header, "header X-Session-Id")
    except ValueError as e:
        raise APIError(400, str(e), param="X-Session-Id", code="invalid_session_id") from None


async def _sse(chunks: Generator[str, None, None]) -> AsyncIterator[str]:
    try:
        async for c in iterate_in_threadpool(chunks):
            yield c
    finally:
        chunks.close()  # client gone or done: closes the edge stream and frees the session


class GenerationStream(StreamingResponse):
    """SSE that holds its generation slot until the stream has ended, however it ends: done, the client
    hung up, or it was never started (a disconnect before the first chunk leaves `_sse` unstarted, so
    the engine's iterator, which already holds an edge session, is closed here too)."""

    def __init__(self, chunks: Generator[str, None, None], events: Events, release: Callable[[], None]) -> None:
        super().__init__(_sse(chunks), media_type="text/event-stream")
        self._chunks, self._events, self._release = chunks, events, release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                self._chunks.close()
                self._events.close()
            finally:
                self._release()


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    """Sets `cancel` when the client hangs up. The body has been read, so the next message is the
    disconnect (the server sends none before the response is done, when this watcher is gone)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    cancel.set()


async def _whole(request: Request, respond, req) -> object:
    """A non-streamed response, computed in a worker thread that stops when the client goes away."""
    cancel = threading.Event()
    watcher = asyncio.ensure_future(_watch_disconnect(request, cancel))
    try:
        return await run_in_threadpool(respond, req, cancel)
    finally:
        watcher.cancel()


async def _respond(request: Request, body: p._Request, to_request, respond, stream):
    """Shared flow: body -> GenerationRequest; whole response, or SSE that starts after the first token.
    A generation holds one of the agent's slots from here until its response (or stream) is done."""
    logic = _logic(request)
    affinity = _affinity(request, body)
    release = logic.slots.acquire()
    handed_over = False
    try:
        req = await run_in_threadpool(to_request, body)
        # a conversation's turns go to the edge replica that kept its prefix
        req.affinity = affinity
        if not body.stream:
            return await _whole(request, respond, req)
        first, events = await run_in_threadpool(logic.start, req)
        usage = bool(body.stream_options and body.stream_options.include_usage)
        response = GenerationStream(stream(first, events, usage), events, release)
        handed_over = True
        return response
    finally:
        if not handed_over:
            release()


@router.post("/v1/chat/completions", response_model=p.ChatCompletion)
async def chat_completions(body: p.ChatCompletionRequest, request: Request):
    logic = _logic(request)
    return await _respond(request, body, logic.chat_request, logic.chat_response, logic.chat_stream)


@router.post("/v1/completions", response_model=p.Completion)
async def completions(body: p.CompletionRequest, request: Request):
    logic = _logic(request)
    return await _respond(request, body, logic.completion_request, logic.completion_response, logic.completion_stream)
