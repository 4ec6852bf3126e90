"""One request end to end: choose the split, run the head, stream to the edge, detokenize.

Split k = N runs on the device alone; k = 0 sends token ids and the edge generates on its
own; 0 < k < N runs layers [0, k) here and sends one hidden-state frame per token
(device_agent/remote.py: prefix reuse, replay of lost sessions, retries when the edge is busy).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from coinfer import codec as codecs
from coinfer.model.sampling import Sampler, SamplingParams
from coinfer.model.tokenizer import Tokenizer
from device_agent.config import AgentSettings
from device_agent.edge_client import EdgeClient
from device_agent.head import HeadRunner
from device_agent.metrics import AgentMetrics
from device_agent.partitioner import Plan, PlanError
from device_agent.planning import Planner
from device_agent.remote import EdgeRunner
from device_agent.text import TextAssembler



class RequestError(ValueError):
    """The request cannot be served as asked (bad split, codec, length): a 400 for the user."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    split: int | str | None = None  # None -> the agent's default
    codec: str | None = None
    ignore_eos: bool = False
    min_agreement: float | None = None  # split "auto": accuracy budget (None -> the agent's setting)
    affinity: str = ""  # routes every turn of a conversation to one edge replica ("" -> the session id)
    cancel: threading.Event | None = None  # set when the client hung up: waits between attempts end early


@dataclass
class Delta:
    text: str
    token_id: int
    logprob: float


@dataclass
class RunStats:
    split: int
    codec: str
    reason: str
    device_weights: str = "fp32"
    bytes_up: int = 0  # all device -> edge messages (Open, Prefill, Steps, replays included)
    bytes_down: int = 0
    prefill_bytes_up: int = 0  # Prefill messages
    step_bytes_up: int = 0  # Step messages (one per generated token after the first)
    messages_up: int = 0
    messages_down: int = 0
    cached_tokens: int = 0  # prompt positions the edge still held from an earlier turn (not sent)
    replays: int = 0
    resumes: int = 0  # broken streams the edge went on from without a replay
    replica: str = ""  # the edge process (host:pid) that served the last stream
    busy_retries: int = 0
    fallback: bool = False
    device_compute: float = 0.0
    edge_compute: float = 0.0
    edge_queue: float = 0.0
    edge_decode: float = 0.0
    edge_wait: float = 0.0  # time blocked on the edge's replies
    ttft: float = 0.0
    total: float = 0.0
    plan: Plan | None = None  # split "auto": what the partitioner predicted

    def add_stream(self, s) -> None:
        self.bytes_up += s.bytes_up
        self.bytes_down += s.bytes_down
        self.messages_up += s.messages_up
        self.messages_down += s.messages_down

    def to_dict(self) -> dict:
        network = max(0.0, self.edge_wait - self.edge_compute - self.edge_queue - self.edge_decode)
        return {
            "split": self.split, "codec": self.codec, "split_reason": self.reason, "device_weights": self.device_weights,
            "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
            "prefill_bytes_up": self.prefill_bytes_up, "step_bytes_up": self.step_bytes_up,
            "messages_up": self.messages_up, "messages_down": self.messages_down,
            "cached_tokens": self.cached_tokens, "replays": self.replays, "resumes": self.resumes, "edge_replica": self.replica,
            "busy_retries": self.busy_retries,
            "local_fallback": self.fallback,
            "timings": {
                "ttft_seconds": self.ttft, "total_seconds": self.total,
                "device_compute_seconds": self.device_compute, "edge_compute_seconds": self.edge_compute,
                "edge_queue_seconds": self.edge_queue, "edge_decode_seconds": self.edge_decode,
                "network_seconds": network,
            },
            **({"predicted": {"ttft_seconds": self.plan.best.ttft, "per_token_seconds": self.plan.best.per_token,
                              "total_seconds": self.plan.best.total}} if self.plan else {}),
        }


@dataclass
class Result:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    stats: RunStats


class Engine:
    """Everything a request needs on the device: tokenizer, head weights, edge client, metrics."""

    def __init__(self, settings: AgentSettings, head: HeadRunner, tokenizer: Tokenizer,
                 edge: EdgeClient | None, metrics: AgentMetrics | None = None, planner: Planner | None = None) -> None:
        self.settings, self.head, self.tokenizer, self.edge = settings, head, tokenizer, edge
        self.metrics = metrics or AgentMetrics()
        self.num_layers = head.cfg.num_layers
        self.context = head.cfg.max_position_embeddings
        self.planner = planner or Planner(settings, head.cost_profile(settings.profile_dir or None), edge,
                                          self.metrics, head.fingerprint)
        self.remote = EdgeRunner(settings, head, edge, self.planner, self.metrics) if edge is not None else None

    def plan(self, prompt_tokens: int, max_tokens: int, codec: str | None = None,
             min_agreement: float | None = None, prompt_ids: list[int] | None = None
             ) -> tuple[int, str, str, Plan | None]:
        """Split "auto": (split, codec, reason, plan) from the partitioner over fresh estimates."""
        cached = self.remote.reusable(prompt_ids) if self.remote is not None and prompt_ids else None
        try:
            p = self.planner.plan(prompt_tokens, max_tokens, codec, min_agreement, cached)
            return p.split, codec or (p.codec if p.codec not in ("none", "token_ids") else self.settings.codec), \
                p.reason, p
        except PlanError as e:
            if self.edge is None or self.settings.min_device_layers > self.head.max_layers:
                raise RequestError(str(e)) from None
        k = max(self.settings.min_device_layers, self.head.max_layers)  # edge unknown: lean on it least
        return k, codec or self.settings.codec, f"auto: edge not reachable for planning; trying split {k}", None

    def resolve(self, split: int | str | None, codec: str | None, prompt_tokens: int = 1,
                max_tokens: int = 1, min_agreement: float | None = None,
                prompt_ids: list[int] | None = None) -> tuple[int, str, str, Plan | None]:
        """(split, codec, reason, plan) for a request; RequestError when it cannot be served."""
        if codec is not None and codec not in codecs.CODECS:
            raise RequestError(f"unknown codec {codec!r}; choose one of {', '.join(codecs.CODECS)}")
        split = self.settings.split if split is None else split
        n, plan = self.num_layers, None
        if split == "auto":
            k, codec, reason, plan = self.plan(prompt_tokens, max_tokens, codec, min_agreement, prompt_ids)
        else:
            try:
                k = int(split)
            except (TypeError, ValueError):
                raise RequestError(f"split must be an integer 0..{n} or 'auto', got {split!r}") from None
            reason, codec = "requested", codec or self.settings.codec
        if not 0 <= k <= n:
            raise RequestError(f"split {k} is out of range 0..{n}")
        if k > self.head.max_layers:
            raise RequestError(f"split {k} needs {k} layers on the device; it holds {self.head.max_layers}")
        if k < n and self.edge is None:
            raise RequestError(f"split {k} needs an edge server and none is configured")
        return k, codec, reason, plan

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens == 0:
            raise RequestError("the prompt is empty")
        if prompt_tokens + max_tokens > self.context:
            raise RequestError(f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the "
                               f"model's context of {self.context} tokens")

    def stream(self, req: GenerationRequest) -> Iterator[Delta | Result]:
        """Yields Delta per token as it arrives, then one Result. Raises RequestError, EdgeError."""
        self.check_length(len(req.prompt_ids), req.max_tokens)
        k, codec, reason, plan = self.resolve(req.split, req.codec, len(req.prompt_ids), req.max_tokens,
                                              req.min_agreement, req.prompt_ids)
        stats = RunStats(k, codec if 0 < k < self.num_layers else ("token_ids" if k == 0 else "none"), reason,
                         self.head.model.precision, plan=plan)
        text = TextAssembler(self.tokenizer, req.stop)
        self.metrics.split_layer.set(k)
        self.metrics.active_requests.inc()
        self.planner.begin()
        t0 = last = time.perf_counter()
        n, finish = 0, "length"
        try:
            source = self._local(req, req.prompt_ids, req.max_tokens, stats) if k == self.num_layers \
                else self.remote.tokens(req, k, codec, self._stop_ids(req), stats,
                                        lambda history, max_new: self._local(req, history, max_new, stats))
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
    def _local(self, req: GenerationRequest, history: list[int], max_new: int, stats: RunStats):
        view = self.head.view(self.num_layers)
        cache = view.new_cache()
        sampler, stops = Sampler(req.sampling), self._stop_ids(req)
        ids = list(history)
        for i in range(max_new):
            token, logprob, dt = self.head.next_token(view, ids, cache, sampler)
            stats.device_compute += dt
            finish = "stop" if token in stops else "length" if i + 1 == max_new else None
            yield token, logprob, finish
            if finish:
                return
            ids = [token]
