"""POST /v1/chat/completions and /v1/completions (OpenAI schema; `stream: true` -> SSE)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from device_agent.api import protocol as p
from device_agent.api.logic import ServingLogic

router = APIRouter()


def _logic(request: Request) -> ServingLogic:
    return request.app.state.logic


async def _sse(chunks: Iterator[str]) -> AsyncIterator[str]:
    try:
        async for c in iterate_in_threadpool(chunks):
            yield c
    finally:
        chunks.close()  # client gone or done: closes the edge stream and frees the session


async def _respond(request: Request, body: p._Request, to_request, respond, stream):
    """Shared flow: body -> GenerationRequest; whole response, or SSE that starts after the first token."""
    logic = _logic(request)
    req = await run_in_threadpool(to_request, body)
    # a conversation's turns go to the edge replica that kept its prefix (X-Session-Id as in vLLM's router)
    req.affinity = (request.headers.get("x-session-id") or body.user or "")[:256]
    if not body.stream:
        return await run_in_threadpool(respond, req)
    first, events = await run_in_threadpool(logic.start, req)
    usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(_sse(stream(first, events, usage)), media_type="text/event-stream")


@router.post("/v1/chat/completions", response_model=p.ChatCompletion)
async def chat_completions(body: p.ChatCompletionRequest, request: Request):
    logic = _logic(request)
    return await _respond(request, body, logic.chat_request, logic.chat_response, logic.chat_stream)


@router.post("/v1/completions", response_model=p.Completion)
async def completions(body: p.CompletionRequest, request: Request):
    logic = _logic(request)
    return await _respond(request, body, logic.completion_request, logic.completion_response,
                          logic.completion_stream)
