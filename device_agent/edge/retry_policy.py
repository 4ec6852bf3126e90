"""What the device does after an edge attempt fails: one pure decision for every gRPC status.

Why a pure function: the rules (resume, replay, fail over, wait, finish locally, give up) are
few, but mixed into a loop of sleeps, failovers, metrics and logging they are easy to get wrong,
and a wrong one turns a pool of full edges into an open/refuse storm. Here they depend on numbers
only (time comes in as `Failure.at`, jitter as a random number), so every status x pool x budget
combination is a table test, and every path either makes progress, waits or is bounded;
session_runner.py carries the actions out.

The rules, by category of STATUS:
- LOST (UNAVAILABLE, CANCELLED): the stream or the edge is gone. Another edge of the pool takes a
  replay at once; with none, the same edge is reopened after a short backoff, as a resume from
  the exact position when the device can (head caches kept, the session's resume token held):
  the session may live on there.
- EVICTED (ABORTED): the edge is up but dropped the session: replay at once, no sleep.
- MISSING (NOT_FOUND): after a resume, the replica does not hold the session: replay at once;
  otherwise the session was lost: replay after the backoff.
- BUSY (RESOURCE_EXHAUSTED): each other edge is tried at most once per round (pool size - 1
  failovers), then the device waits the edge's retry hint (bounded by a jittered exponential
  backoff) and a new round starts.
- TOO_LARGE (a message over the gRPC size limit, our check or grpc's RESOURCE_EXHAUSTED "... message
  larger than max"): the request's fault, never retried.
- EXPIRED (DEADLINE_EXCEEDED: the request's own deadline) and FATAL (bad request, auth, internal
  errors, anything unknown): give up.
Lost sessions spend `replays` (attempts in a row without a new token); full edges spend
`busy_wait_seconds`, counted from the first RESOURCE_EXHAUSTED since the last new token. With
either spent, a device holding every layer finishes the request itself; otherwise it gives up.
Every retry either follows a new token, sleeps, or is bounded by the pool size or `replays`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import grpc


class Category(enum.Enum):
    LOST = "lost"
    EVICTED = "evicted"
    MISSING = "missing"
    BUSY = "busy"
    TOO_LARGE = "too_large"
    EXPIRED = "expired"
    FATAL = "fatal"


_C = grpc.StatusCode
STATUS: dict[grpc.StatusCode, Category] = {  # a status not listed is FATAL
    _C.UNAVAILABLE: Category.LOST,
    _C.CANCELLED: Category.LOST,  # we never read after cancelling ourselves: the edge dropped the stream
    _C.ABORTED: Category.EVICTED,
    _C.NOT_FOUND: Category.MISSING,
    _C.RESOURCE_EXHAUSTED: Category.BUSY,
    _C.DEADLINE_EXCEEDED: Category.EXPIRED,
}
# statuses after which the session is gone but the edge (or another) may take a replay
RETRYABLE = frozenset(c for c, cat in STATUS.items() if cat in (Category.LOST, Category.EVICTED, Category.MISSING))
# the edge itself is gone or not answering: another edge may serve (EdgePool.open hands over on these)
FAILOVER = frozenset(c for c, cat in STATUS.items() if cat in (Category.LOST, Category.EXPIRED))

LOSS_BACKOFF, LOSS_BACKOFF_CAP = 0.2, 2.0  # s: reopening an edge that lost the session
BUSY_BACKOFF, BUSY_BACKOFF_CAP = 0.1, 2.0  # s: waiting for a full edge (doubles per wait)
HINT_FACTOR = 4  # the edge's retry hint is honoured up to this many backoffs
MIN_WAIT = 0.05  # s: no wait is shorter; a busy budget with less left than this is spent


class Kind(enum.Enum):
    RESUME = "resume"  # reopen the same session from the exact position the device kept
    REPLAY = "replay"  # reopen and send the token history again
    FAIL_OVER = "fail_over"  # make another edge of the pool active, then `then`
    WAIT = "wait"  # sleep `delay`, then `then`
    FINISH_LOCALLY = "finish_locally"  # the device runs the rest itself
    GIVE_UP = "give_up"  # raise the edge's error
    TOO_LARGE = "too_large"  # raise a client error (400): never retried


@dataclass(frozen=True)
class Failure:
    """The facts of one failed attempt."""

    code: grpc.StatusCode
    at: float = 0.0  # when it happened, monotonic seconds
    retry_after: float | None = None  # the edge's hint (retry-after-ms), s
    too_large: bool = False  # a message over the gRPC size limit
    resumed: bool = False  # the attempt was a resume (Open.resume_tokens > 0)


@dataclass(frozen=True)
class Action:
    kind: Kind
    then: Kind | None = None  # FAIL_OVER, WAIT: how the next attempt opens (REPLAY or RESUME)
    delay: float = 0.0  # s to sleep before the next attempt
    busy: bool = False  # answers a full edge: a busy retry, not a replay
    counted: bool = False  # spends one of `replays`
    why: str = ""

    @property
    def resumes(self) -> bool:
        return Kind.RESUME in (self.kind, self.then)

    @property
    def replays(self) -> bool:
        """The next attempt replays a lost session's history (REST `coinfer.replays`)."""
        return not self.busy and Kind.REPLAY in (self.kind, self.then)


@dataclass
class AttemptState:
    """What the decisions of one request depend on: settings, the device, and counters."""

    pool_size: int = 1
    holds_all_layers: bool = False
    can_resume: bool = False  # head caches kept and a resume token held: the session can go on where it was
    replays_allowed: int = 3
    busy_wait_seconds: float = 10.0
    idle_replays: int = 0  # lost sessions in a row without a new token
    busy_since: float | None = None  # first RESOURCE_EXHAUSTED since the last new token
    busy_retries: int = 0  # waits so far: the backoff's exponent
    failovers: int = 0  # other edges tried in this busy round
    no_other_edge: bool = False  # a failover for this failure found no edge that answered

    def progressed(self) -> None:
        """A new token arrived: budgets start again."""
        self.idle_replays, self.busy_since, self.failovers = 0, None, 0

    def after(self, failure: Failure, action: Action) -> None:
        """Account for `action`, taken for `failure`."""
        if category(failure) is Category.BUSY and self.busy_since is None:
            self.busy_since = failure.at
        self.idle_replays += action.counted
        if action.kind is Kind.FAIL_OVER and action.busy:
            self.failovers += 1
        if action.kind is Kind.WAIT:
            self.busy_retries, self.failovers = self.busy_retries + 1, 0  # a new round
        self.no_other_edge = False


def category(failure: Failure) -> Category:
    if failure.too_large:
        return Category.TOO_LARGE
    return STATUS.get(failure.code, Category.FATAL)


def decide(failure: Failure, state: AttemptState, jitter: float = 0.5) -> Action:
    """The next step after `failure`; `jitter` in [0, 1) spreads waits over 0.8..1.2 of their length."""
    cat = category(failure)
    if cat is Category.TOO_LARGE:
        return Action(Kind.TOO_LARGE, why="a message over the gRPC size limit")
    if cat is Category.BUSY:
        return _busy(failure, state, jitter)
    if cat in (Category.LOST, Category.EVICTED, Category.MISSING):
        return _lost(cat, failure, state)
    return Action(Kind.GIVE_UP, why=f"{failure.code.name} is not retried")


def _spent(state: AttemptState, why: str, busy: bool = False) -> Action:
    if state.holds_all_layers:
        return Action(Kind.FINISH_LOCALLY, busy=busy, why=f"{why}; the device finishes alone")
    return Action(Kind.GIVE_UP, busy=busy, why=why)


def _lost(cat: Category, failure: Failure, state: AttemptState) -> Action:
    if cat is Category.MISSING and failure.resumed:  # the resume was counted by the loss before it
        return Action(Kind.REPLAY, why="the edge does not hold the session")
    if state.idle_replays >= state.replays_allowed:
        return _spent(state, f"{state.idle_replays} replays in a row without a token")
    if cat is Category.LOST and state.pool_size > 1 and not state.no_other_edge:
        return Action(Kind.FAIL_OVER, then=Kind.REPLAY, counted=True, why="the edge is gone; another takes over")
    delay = 0.0 if cat is Category.EVICTED else min(LOSS_BACKOFF * 2 ** (state.idle_replays + 1), LOSS_BACKOFF_CAP)
    if cat is Category.LOST and state.can_resume:
        return Action(Kind.RESUME, delay=delay, counted=True, why="the stream broke; the edge may hold the session")
    return Action(Kind.REPLAY, delay=delay, counted=True, why="the session was lost")


def _busy(failure: Failure, state: AttemptState, jitter: float) -> Action:
    since = failure.at if state.busy_since is None else state.busy_since
    left = state.busy_wait_seconds - (failure.at - since)
    if left < MIN_WAIT:
        return _spent(state, f"edges full for {failure.at - since:.1f} s (busy_wait_seconds)", busy=True)
    if state.failovers < state.pool_size - 1 and not state.no_other_edge:
        return Action(Kind.FAIL_OVER, then=Kind.REPLAY, busy=True, why="the edge is full; another may have room")
    backoff = min(BUSY_BACKOFF * 2**state.busy_retries, BUSY_BACKOFF_CAP)
    hint = backoff if failure.retry_after is None else failure.retry_after
    delay = max(min(hint, HINT_FACTOR * backoff), MIN_WAIT) * (0.8 + 0.4 * min(max(jitter, 0.0), 1.0))
    if delay > left - MIN_WAIT:  # nothing useful would be left after it: wait out the budget
        delay = left
    return Action(Kind.WAIT, then=Kind.REPLAY, delay=delay, busy=True, why="every edge tried is full")
