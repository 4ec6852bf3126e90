"""Serving logic between the OpenAI protocol and the Engine: requests in, bodies and SSE chunks out.

Synchronous on purpose: it runs in the threadpool (the model and gRPC calls block).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Generator
from typing import cast

import jinja2
from pydantic import BaseModel

from coinfer.model.sampling import SamplingParams
from device_agent.api import protocol as p
from device_agent.api.errors import APIError, from_edge
from device_agent.edge.client import EdgeError
from device_agent.generate import Engine
from device_agent.generation_types import Delta, GenerationRequest, RequestError, Result, RunStats

# the engine's events: Delta per text piece, then one Result; closing it ends the generation
Events = Generator[Delta | Result, None, None]

log = logging.getLogger("coinfer.device")


def sse(obj: BaseModel | dict | str) -> str:
    data = (
        obj if isinstance(obj, str) else json.dumps(obj if isinstance(obj, dict) else obj.model_dump(exclude_none=True))
    )
    return f"data: {data}\n\n"


def coinfer_stats(s: RunStats) -> p.CoinferStats:
    """The REST `coinfer` object of a generation's stats."""
    plan = s.plan.best if s.plan is not None else None
    return p.CoinferStats(
        split=s.split,
        codec=s.codec,
        split_reason=s.reason,
        device_weights=s.device_weights,
        bytes_up=s.bytes_up,
        bytes_down=s.bytes_down,
        prefill_bytes_up=s.prefill_bytes_up,
        step_bytes_up=s.step_bytes_up,
        messages_up=s.messages_up,
        messages_down=s.messages_down,
        cached_tokens=s.cached_tokens,
        replays=s.replays,
        resumes=s.resumes,
        edge_replica=s.replica,
        busy_retries=s.busy_retries,
        local_fallback=s.fallback,
        timings=p.CoinferTimings(
            ttft_seconds=s.ttft,
            total_seconds=s.total,
            device_compute_seconds=s.device_compute,
            edge_compute_seconds=s.edge_compute,
            edge_queue_seconds=s.edge_queue,
            edge_decode_seconds=s.edge_decode,
            network_seconds=s.network,
        ),
        predicted=None
        if plan is None
        else p.CoinferPrediction(ttft_seconds=plan.ttft, per_token_seconds=plan.per_token, total_seconds=plan.total),
    )


def _usage(r: Result) -> p.Usage:
    return p.Usage(
        prompt_tokens=r.prompt_tokens,
        completion_tokens=r.completion_tokens,
        total_tokens=r.prompt_tokens + r.completion_tokens,
        prompt_tokens_details=p.PromptTokensDetails(cached_tokens=r.stats.cached_tokens),
    )


class GenerationSlots:
    """At most `limit` generations at once. One more is refused at once (503 + Retry-After), never queued:
    a queue would hold a connection and, once it ran, a worker thread per waiting client, so a burst
    would take every thread (health included) and answer its last requests after their clients gave up."""

    def __init__(self, limit: int) -> None:
        self.limit, self.active = limit, 0
        self._lock = threading.Lock()  # released from the event loop and from worker threads alike

    def acquire(self) -> Callable[[], None]:
        """A slot, or APIError 503; returns its release, which may be called more than once."""
        with self._lock:
            if self.active >= self.limit:
                raise APIError(
                    503,
                    f"the device agent is at its limit of {self.limit} concurrent generations; retry later",
                    "server_error",
                    "overloaded",
                    headers={"Retry-After": "1"},
                )
            self.active += 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if not released.is_set():
                    released.set()
                    self.active -= 1

        return release


class ServingLogic:
    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name
        self.created = int(time.time())
        self.slots = GenerationSlots(engine.settings.api.max_concurrent_requests)

    # -- requests --------------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                code="model_not_found",
                param="model",
            )

    def _request(
        self, body: p._Request, prompt_ids: list[int], max_tokens: int | None, default: int
    ) -> GenerationRequest:
        ctx = self.engine.context
        if max_tokens is None:  # as vLLM: the default, but never past the context
            max_tokens = max(1, min(default, ctx - len(prompt_ids)))
        try:
            sampling = SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=body.seed)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        stop = cast("list[str]", body.stop)  # its validator made it a list
        return GenerationRequest(
            prompt_ids, max_tokens, sampling, stop, body.split, body.codec, body.ignore_eos, body.min_agreement
        )

    def chat_request(self, body: p.ChatCompletionRequest) -> GenerationRequest:
        self.check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = self.engine.tokenizer.encode_chat(messages)
        except jinja2.TemplateError as e:  # raise_exception() of the template (e.g. roles it rejects): its words
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
        except Exception:  # anything else the template tripped over: the messages' fault, but not our text to echo
            log.warning("chat template failed on a request", exc_info=True)
            raise APIError(400, "cannot apply the chat template to these messages", param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        return self._request(body, ids, max_tokens, self.engine.settings.api.default_max_tokens)

    def completion_request(self, body: p.CompletionRequest) -> GenerationRequest:
        self.check_model(body.model)
        if isinstance(body.prompt, str):
            ids = self.engine.tokenizer.encode(body.prompt)
        else:
            vocab = self.engine.head.cfg.vocab_size
            ids = list(cast("list[int]", body.prompt))  # its validator made a one-string list that string
            if any(not 0 <= i < vocab for i in ids):
                raise APIError(400, f"prompt token ids must be in 0..{vocab - 1}", param="prompt")
        return self._request(body, ids, body.max_tokens, 16)  # OpenAI's default for completions

    # -- running ---------------------------------------------------------------------------
    def start(self, req: GenerationRequest) -> tuple[Delta | Result, Events]:
        """Validate and run up to the first event, so that errors become a status code, not a broken stream."""
        events = self.engine.stream(req)
        try:
            return next(events), events
        except RequestError as e:
            raise APIError(400, str(e), code=e.code) from None
        except EdgeError as e:
            raise from_edge(e) from None

    def collect(self, req: GenerationRequest, cancel: threading.Event | None = None) -> tuple[str, Result]:
        """The whole generation. `cancel` set (the client hung up) stops it at the next token: closing the
        engine's iterator ends the edge session, so nobody computes tokens that no one will read."""
        req.cancel = cancel
        first, events = self.start(req)
        text, result = [], None
        try:
            for ev in _chain(first, events):
                if cancel is not None and cancel.is_set():
                    raise APIError(499, "the client closed the request", code="client_closed_request")
                if isinstance(ev, Delta):
                    text.append(ev.text)
                else:
                    result = ev
        except EdgeError as e:
            raise from_edge(e) from None
        finally:
            events.close()
        if result is None:  # Engine.stream ends with a Result unless it raises
            raise RuntimeError("the generation ended without a result")
        return "".join(text), result

    def chat_response(self, req: GenerationRequest, cancel: threading.Event | None = None) -> p.ChatCompletion:
        text, r = self.collect(req, cancel)
        return p.ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.model_name,
            choices=[p.ChatChoice(message=p.ResponseMessage(content=text), finish_reason=r.finish_reason)],
            usage=_usage(r),
            coinfer=coinfer_stats(r.stats),
        )

    def completion_response(self, req: GenerationRequest, cancel: threading.Event | None = None) -> p.Completion:
        text, r = self.collect(req, cancel)
        return p.Completion(
            id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.model_name,
            choices=[p.CompletionChoice(text=text, finish_reason=r.finish_reason)],
            usage=_usage(r),
            coinfer=coinfer_stats(r.stats),
        )

    # -- streaming -------------------------------------------------------------------------
    def chat_stream(self, first, events, include_usage: bool) -> Generator[str, None, None]:
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: p.Delta | None, finish: str | None = None, **extra) -> str:
            choices = [] if delta is None else [p.ChatChunkChoice(delta=delta, finish_reason=finish)]
            return sse(p.ChatCompletionChunk(id=cid, created=created, model=self.model_name, choices=choices, **extra))

        yield chunk(p.Delta(role="assistant", content=""))
        yield from self._stream(
            first,
            events,
            include_usage,
            lambda text, finish=None, **kw: chunk(p.Delta(content=text or None), finish, **kw),
            lambda usage: chunk(None, usage=usage),
        )

    def completion_stream(self, first, events, include_usage: bool) -> Generator[str, None, None]:
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str | None, finish: str | None = None, **extra) -> str:
            choices = [] if text is None else [p.CompletionChoice(text=text, finish_reason=finish)]
            return sse(p.Completion(id=cid, created=created, model=self.model_name, choices=choices, **extra))

        yield from self._stream(first, events, include_usage, chunk, lambda usage: chunk(None, usage=usage))

    def _stream(self, first, events, include_usage: bool, text_chunk, usage_chunk) -> Generator[str, None, None]:
        """One chunk per text piece, a final chunk with finish_reason + coinfer, [usage chunk], [DONE]."""
        for ev in self._guarded(first, events):
            if isinstance(ev, str):
                yield ev
            elif isinstance(ev, Delta):
                if ev.text:
                    yield text_chunk(ev.text)
            else:
                yield text_chunk("", ev.finish_reason, coinfer=coinfer_stats(ev.stats))
                if include_usage:
                    yield usage_chunk(_usage(ev))
        yield sse("[DONE]")

    def _guarded(self, first, events) -> Generator[Delta | Result | str, None, None]:
        """Events; an error after the stream started becomes one SSE error event (the status is already 200)."""
        try:
            yield from _chain(first, events)
        except EdgeError as e:
            yield sse(from_edge(e).body())
        except RequestError as e:
            yield sse(APIError(400, str(e), code=e.code).body())
        finally:
            events.close()


def _chain(first, events) -> Events:
    yield first
    yield from events
