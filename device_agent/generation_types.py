"""What one generation is made of: the request, its route, the pieces it yields, its stats, its result.

Both the Engine (generate.py) and the edge session runner (edge/session_runner.py) use these, so they live
apart from both: the runner can name its arguments without importing the engine that imports it.
How the stats reach a REST client (the `coinfer` object) is the API layer's business
(device_agent.api.protocol.CoinferStats).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Literal, Protocol

from coinfer.model.sampling import SamplingParams
from coinfer.planning.partitioner import Plan

# why a request cannot be served as asked; the REST error body's `code`
RequestErrorCode = Literal[
    "invalid_codec",  # a codec the agent does not know
    "invalid_split",  # a split that is not an integer 0..N or "auto"
    "split_unavailable",  # a valid split this agent cannot run: more layers than it holds, or no edge
    "no_feasible_split",  # split "auto": no split satisfies the constraints
    "empty_prompt",
    "context_length_exceeded",  # prompt + max_tokens over the model's context
]


class RequestError(ValueError):
    """The request cannot be served as asked (bad split, codec, length): a 400 for the user, with `code`."""

    def __init__(self, message: str, code: RequestErrorCode) -> None:
        super().__init__(message)
        self.code: RequestErrorCode = code


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


@dataclass(frozen=True)
class Route:
    """Where a request runs: split k (layers on the device), the codec of its hidden-state frames, why,
    and for split "auto" what the partitioner predicted (None otherwise, or when it could not plan)."""

    split: int
    codec: str
    reason: str
    plan: Plan | None = None


@dataclass
class Delta:
    text: str
    token_id: int
    logprob: float


class StreamCounts(Protocol):
    """What an edge stream counted (device_agent.edge.client.EdgeStream)."""

    bytes_up: int
    bytes_down: int
    messages_up: int
    messages_down: int


@dataclass
class RunStats:
    split: int
    codec: str  # on the wire: a frame codec, "token_ids" at split 0, "none" at split N
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

    def add_stream(self, s: StreamCounts) -> None:
        self.bytes_up += s.bytes_up
        self.bytes_down += s.bytes_down
        self.messages_up += s.messages_up
        self.messages_down += s.messages_down

    @property
    def network(self) -> float:
        """Time blocked on the edge that its own timings do not account for: the link's share."""
        return max(0.0, self.edge_wait - self.edge_compute - self.edge_queue - self.edge_decode)


@dataclass
class Result:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    stats: RunStats
