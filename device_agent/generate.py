"""One request end to end: choose the split, run the head, stream to the edge, detokenize.

Split k = N runs on the device alone; k = 0 sends token ids and the edge generates on its
own; 0 < k < N runs layers [0, k) here and sends one hidden-state frame per token
(device_agent/edge/: prefix reuse, replay of lost sessions, retries when the edge is busy).
"""

from __future__ import annotations

import time
from collections.abc import Generator

from coinfer import codec as codecs
from coinfer import wire
from coinfer.model.generation import decode_loop
from coinfer.model.sampling import Sampler
from coinfer.model.tokenizer import Tokenizer
from coinfer.planning.partitioner import PlanError
from device_agent.config import AgentSettings
from device_agent.edge.pool import EdgePool
from device_agent.edge.session_runner import EdgeRunner, TokenSource
from device_agent.generation_types import Delta, GenerationRequest, RequestError, Result, Route, RunStats
from device_agent.head import HeadRunner
from device_agent.metrics import AgentMetrics
from device_agent.planning import Planner
from device_agent.text import TextAssembler

# the request and result types live in generation_types (the edge session runner uses them too);
# many callers import them here
__all__ = ["Delta", "Engine", "GenerationRequest", "RequestError", "Result", "Route", "RunStats"]


class Engine:
    """Everything a request needs on the device: tokenizer, head weights, the edge pool (maybe of one), metrics."""

    def __init__(
        self,
        settings: AgentSettings,
        head: HeadRunner,
        tokenizer: Tokenizer,
        edge: EdgePool | None,
        metrics: AgentMetrics | None = None,
        planner: Planner | None = None,
    ) -> None:
        self.settings, self.head, self.tokenizer, self.edge = settings, head, tokenizer, edge
        self.metrics = metrics or AgentMetrics()
        self.num_layers = head.cfg.num_layers
        self.context = head.cfg.max_position_embeddings
        self.planner = planner or _planner(settings, head, edge, self.metrics)
        self.remote = (
            EdgeRunner(
                settings.resilience,
                settings.prefix,
                settings.connection.max_message_bytes,
                head,
                edge,
                self.planner,
                self.metrics,
            )
            if edge is not None
            else None
        )

    def plan(
        self,
        prompt_tokens: int,
        max_tokens: int,
        codec: str | None = None,
        min_agreement: float | None = None,
        prompt_ids: list[int] | None = None,
    ) -> Route:
        """Split "auto": the route the partitioner chooses over fresh estimates."""
        cached = self.remote.reusable(prompt_ids) if self.remote is not None and prompt_ids else None
        try:
            p = self.planner.plan(prompt_tokens, max_tokens, codec, min_agreement, cached)
            return Route(
                p.split,
                codec or (p.codec if p.codec not in wire.PSEUDO_CODECS else self.settings.routing.codec),
                p.reason,
                p,
            )
        except PlanError as e:
            if self.edge is None or self.settings.planner.min_device_layers > self.head.max_layers:
                raise RequestError(str(e), "no_feasible_split") from None
        k = max(self.settings.planner.min_device_layers, self.head.max_layers)  # edge unknown: lean on it least
        return Route(
            k, codec or self.settings.routing.codec, f"auto: edge not reachable for planning; trying split {k}"
        )

    def resolve(
        self,
        split: int | str | None,
        codec: str | None,
        prompt_tokens: int = 1,
        max_tokens: int = 1,
        min_agreement: float | None = None,
        prompt_ids: list[int] | None = None,
    ) -> Route:
        """The route of a request; RequestError when it cannot be served."""
        if codec is not None and codec not in codecs.CODECS:
            raise RequestError(f"unknown codec {codec!r}; choose one of {', '.join(codecs.CODECS)}", "invalid_codec")
        split = self.settings.routing.split if split is None else split
        n = self.num_layers
        if split == "auto":
            route = self.plan(prompt_tokens, max_tokens, codec, min_agreement, prompt_ids)
        else:
            try:
                k = int(split)
            except (TypeError, ValueError):
                raise RequestError(
                    f"split must be an integer 0..{n} or 'auto', got {split!r}", "invalid_split"
                ) from None
            route = Route(k, codec or self.settings.routing.codec, "requested")
        k = route.split
        if not 0 <= k <= n:
            raise RequestError(f"split {k} is out of range 0..{n}", "invalid_split")
        if k > self.head.max_layers:
            raise RequestError(
                f"split {k} needs {k} layers on the device; it holds {self.head.max_layers}", "split_unavailable"
            )
        if k < n and self.edge is None:
            raise RequestError(f"split {k} needs an edge server and none is configured", "split_unavailable")
        return route

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens == 0:
            raise RequestError("the prompt is empty", "empty_prompt")
        if prompt_tokens + max_tokens > self.context:
            raise RequestError(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"model's context of {self.context} tokens",
                "context_length_exceeded",
            )

    def stream(self, req: GenerationRequest) -> Generator[Delta | Result, None, None]:
        """Yields Delta per token as it arrives, then one Result. Raises RequestError, EdgeError."""
        self.check_length(len(req.prompt_ids), req.max_tokens)
        route = self.resolve(
            req.split, req.codec, len(req.prompt_ids), req.max_tokens, req.min_agreement, req.prompt_ids
        )
        k, codec = route.split, route.codec
        stats = RunStats(
            k, wire.split_codec(k, self.num_layers, codec), route.reason, self.head.model.precision, plan=route.plan
        )
        text = TextAssembler(self.tokenizer, req.stop)
        self.metrics.split_layer.set(k)
        self.metrics.active_requests.inc()
        self.planner.begin()
        t0 = last = time.perf_counter()
        n, finish = 0, "length"
        try:
            if k == self.num_layers:
                source = self._local(req, req.prompt_ids, req.max_tokens, stats)
            elif self.remote is None:  # resolve() refuses a split below N without an edge
                raise RequestError(f"split {k} needs an edge server and none is configured", "split_unavailable")
            else:
                source = self.remote.tokens(
                    req,
                    k,
                    codec,
                    self._stop_ids(req),
                    stats,
                    lambda history, max_new: self._local(req, history, max_new, stats),
                )
            try:
                for token, logprob, done in source:
                    now = time.perf_counter()
                    if n == 0:
                        stats.ttft = now - t0
                        self.metrics.ttft.observe(stats.ttft)
                    else:
                        self.metrics.itl.observe(now - last)
                    last, n = now, n + 1
                    piece = text.push(token)
                    if text.stopped:
                        finish = "stop"
                        if piece:
                            yield Delta(piece, token, logprob)
                        break
                    yield Delta(piece, token, logprob)
                    if done:
                        finish = done
            finally:
                source.close()
            if rest := text.flush():
                yield Delta(rest, -1, 0.0)
        finally:
            self.planner.end()
            self.metrics.active_requests.dec()
            self.metrics.tokens.labels("device" if k == self.num_layers else "edge" if k == 0 else "split").inc(n)
            self.metrics.wire_bytes.labels("up").inc(stats.bytes_up)
            self.metrics.wire_bytes.labels("down").inc(stats.bytes_down)
            self.metrics.cached_tokens.inc(stats.cached_tokens)
        stats.total = time.perf_counter() - t0
        yield Result(finish, len(req.prompt_ids), n, stats)

    def _stop_ids(self, req: GenerationRequest) -> frozenset[int]:
        return frozenset() if req.ignore_eos else self.tokenizer.eos_token_ids

    # -- token sources: yield (token id, logprob, finish reason or None) ---------------------
    def _local(self, req: GenerationRequest, history: list[int], max_new: int, stats: RunStats) -> TokenSource:
        """The whole model on the device, from `history` (the prompt, or what the edge got to)."""
        view = self.head.view(self.num_layers)
        cache = view.new_cache()
        sampler = Sampler(req.sampling)

        def next_token(ids: list[int]) -> tuple[int, float]:
            token, logprob, dt = self.head.next_token(view, ids, cache, sampler)
            stats.device_compute += dt
            return token, logprob

        yield from decode_loop(next_token, history, max_new, self._stop_ids(req))


def _planner(settings: AgentSettings, head: HeadRunner, edge: EdgePool | None, metrics: AgentMetrics) -> Planner:
    """The planner from its settings groups, the device's measured profile and the edge it polls."""
    return Planner(
        settings.planner,
        settings.energy,
        head.cost_profile(settings.runtime.profile_dir or None),
        edge,
        metrics,
        head.fingerprint,
        model_dir=settings.runtime.model_dir,
        connection=settings.connection,
    )
