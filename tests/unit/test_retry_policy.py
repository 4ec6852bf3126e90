"""The retry policy as a table: every status x pool size x device holds all layers x budget spent,
and the all-edges-full case iterated with a fake clock. Pure: no sockets, no threads, no sleeps."""

from __future__ import annotations

import itertools
import random

import grpc
import pytest

from device_agent.api.errors import from_edge
from device_agent.edge import retry_policy as rp
from device_agent.edge.client import EdgeError, MessageTooLarge
from device_agent.edge.retry_policy import Action, AttemptState, Failure, Kind, decide

C = grpc.StatusCode
NOW, BUDGET, REPLAYS, HINT = 1000.0, 10.0, 3, 0.3
LOCAL = "local"  # FINISH_LOCALLY when the device holds all layers, else GIVE_UP
BACKOFF_1 = 2 * rp.LOSS_BACKOFF  # the first loss backoff: 0.2 * 2 ** 1

# per failure: the expected action with a fresh budget on 1 edge, on 3 edges, and with the budget spent
# (kind, then, delay, busy, counted); LOCAL resolves per device
REPLAY_NOW = (Kind.REPLAY, None, 0.0, False, True)
RESUME_LATER = (Kind.RESUME, None, BACKOFF_1, False, True)
FAIL_OVER = (Kind.FAIL_OVER, Kind.REPLAY, 0.0, False, True)
GIVE_UP = (Kind.GIVE_UP, None, 0.0, False, False)
TOO_LARGE = (Kind.TOO_LARGE, None, 0.0, False, False)
TABLE = {
    "UNAVAILABLE": (Failure(C.UNAVAILABLE), RESUME_LATER, FAIL_OVER, LOCAL),
    "CANCELLED": (Failure(C.CANCELLED), RESUME_LATER, FAIL_OVER, LOCAL),
    "DEADLINE_EXCEEDED": (Failure(C.DEADLINE_EXCEEDED), GIVE_UP, GIVE_UP, GIVE_UP),
    "ABORTED": (Failure(C.ABORTED), REPLAY_NOW, REPLAY_NOW, LOCAL),
    "NOT_FOUND after a resume": (
        Failure(C.NOT_FOUND, resumed=True),
        (Kind.REPLAY, None, 0.0, False, False),
        (Kind.REPLAY, None, 0.0, False, False),
        (Kind.REPLAY, None, 0.0, False, False),
    ),
    "NOT_FOUND": (
        Failure(C.NOT_FOUND),
        (Kind.REPLAY, None, BACKOFF_1, False, True),
        (Kind.REPLAY, None, BACKOFF_1, False, True),
        LOCAL,
    ),
    "RESOURCE_EXHAUSTED busy": (
        Failure(C.RESOURCE_EXHAUSTED, retry_after=HINT),
        (Kind.WAIT, Kind.REPLAY, HINT, True, False),
        (Kind.FAIL_OVER, Kind.REPLAY, 0.0, True, False),
        LOCAL,
    ),
    "RESOURCE_EXHAUSTED too large": (Failure(C.RESOURCE_EXHAUSTED, too_large=True), TOO_LARGE, TOO_LARGE, TOO_LARGE),
    "INVALID_ARGUMENT": (Failure(C.INVALID_ARGUMENT), GIVE_UP, GIVE_UP, GIVE_UP),
    "FAILED_PRECONDITION": (Failure(C.FAILED_PRECONDITION), GIVE_UP, GIVE_UP, GIVE_UP),
    "UNAUTHENTICATED": (Failure(C.UNAUTHENTICATED), GIVE_UP, GIVE_UP, GIVE_UP),
    "INTERNAL": (Failure(C.INTERNAL), GIVE_UP, GIVE_UP, GIVE_UP),
    "UNKNOWN": (Failure(C.UNKNOWN), GIVE_UP, GIVE_UP, GIVE_UP),
}


def _state(pool: int, holds_all: bool, spent: bool, can_resume: bool = True) -> AttemptState:
    return AttemptState(
        pool_size=pool,
        holds_all_layers=holds_all,
        can_resume=can_resume,
        replays_allowed=REPLAYS,
        busy_wait_seconds=BUDGET,
        idle_replays=REPLAYS if spent else 0,
        busy_since=NOW - BUDGET if spent else None,
    )


@pytest.mark.parametrize(
    "name,pool,holds_all,spent", list(itertools.product(TABLE, (1, 3), (True, False), (False, True)))
)
def test_every_status_pool_device_and_budget(name, pool, holds_all, spent):
    failure, one, many, when_spent = TABLE[name]
    failure = Failure(failure.code, NOW, failure.retry_after, failure.too_large, failure.resumed)
    want = when_spent if spent else one if pool == 1 else many
    busy = failure.code == C.RESOURCE_EXHAUSTED and not failure.too_large
    if want == LOCAL:
        want = (Kind.FINISH_LOCALLY if holds_all else Kind.GIVE_UP, None, 0.0, busy, False)
    act = decide(failure, _state(pool, holds_all, spent))
    assert (act.kind, act.then, act.busy, act.counted) == (want[0], want[1], want[3], want[4]), act
    assert act.delay == pytest.approx(want[2]), act


def test_a_lost_stream_without_head_caches_replays_instead_of_resuming():
    act = decide(Failure(C.UNAVAILABLE, NOW), _state(1, True, False, can_resume=False))
    assert (act.kind, act.delay, act.replays, act.resumes) == (Kind.REPLAY, BACKOFF_1, True, False)
    act = decide(Failure(C.UNAVAILABLE, NOW), _state(1, True, False))
    assert (act.resumes, act.replays) == (True, False)


def test_when_no_other_edge_answers_the_decision_is_made_again_without_failing_over():
    state = _state(3, False, False)
    assert decide(Failure(C.UNAVAILABLE, NOW), state).kind is Kind.FAIL_OVER
    state.no_other_edge = True
    assert decide(Failure(C.UNAVAILABLE, NOW), state).kind is Kind.RESUME
    busy = Failure(C.RESOURCE_EXHAUSTED, NOW, retry_after=HINT)
    assert decide(busy, state).kind is Kind.WAIT
    state.after(busy, decide(busy, state))
    assert not state.no_other_edge and state.failovers == 0  # a new round may try the others again


def test_busy_waits_honour_the_hint_within_a_growing_backoff_with_jitter():
    state = _state(1, False, False)
    at = lambda hint: Failure(C.RESOURCE_EXHAUSTED, NOW, retry_after=hint)  # noqa: E731
    assert decide(at(None), state).delay == pytest.approx(rp.BUSY_BACKOFF)  # no hint: the backoff
    assert decide(at(30.0), state).delay == pytest.approx(rp.HINT_FACTOR * rp.BUSY_BACKOFF)  # a hint, capped
    assert decide(at(0.0), state).delay == pytest.approx(rp.MIN_WAIT)  # never a wait of nothing
    assert decide(at(None), state, jitter=0.0).delay == pytest.approx(0.8 * rp.BUSY_BACKOFF)
    assert decide(at(None), state, jitter=0.999999).delay == pytest.approx(1.2 * rp.BUSY_BACKOFF)
    state.busy_retries = 10
    assert decide(at(None), state).delay == pytest.approx(rp.BUSY_BACKOFF_CAP)
    state.busy_since = NOW - BUDGET + 0.5  # 0.5 s of budget left: the wait ends with it
    assert decide(at(30.0), state).delay == pytest.approx(0.5)


def test_the_busy_budget_counts_from_the_first_refusal_and_restarts_with_a_token():
    state = _state(1, False, False)
    first = Failure(C.RESOURCE_EXHAUSTED, NOW)
    state.after(first, decide(first, state))
    assert state.busy_since == NOW and state.busy_retries == 1
    late = Failure(C.RESOURCE_EXHAUSTED, NOW + BUDGET)
    assert decide(late, state).kind is Kind.GIVE_UP
    state.progressed()
    assert decide(late, state).kind is Kind.WAIT and state.busy_since is None


def test_a_zero_busy_budget_never_retries_a_full_edge():
    state = AttemptState(pool_size=3, busy_wait_seconds=0.0, holds_all_layers=True)
    assert decide(Failure(C.RESOURCE_EXHAUSTED, NOW), state).kind is Kind.FINISH_LOCALLY


def _all_edges_full(
    pool: int, hint: float | None, holds_all: bool, failover_works: bool, open_seconds: float
) -> tuple[list[Action], int, float, float]:
    """Every edge answers RESOURCE_EXHAUSTED. Returns (actions, Opens, seconds waited, seconds elapsed)."""
    rng, clock, state = (
        random.Random(7),
        NOW,
        AttemptState(pool_size=pool, holds_all_layers=holds_all, busy_wait_seconds=BUDGET),
    )
    actions, opens, waited = [], 0, 0.0
    for _ in range(10_000):  # far beyond any bound below: a loop that never ends fails here, not hangs
        opens += 1
        clock += open_seconds
        failure = Failure(C.RESOURCE_EXHAUSTED, clock, retry_after=hint)
        act = decide(failure, state, rng.random())
        if act.kind is Kind.FAIL_OVER and not failover_works:
            state.no_other_edge = True
            act = decide(failure, state, rng.random())
        state.after(failure, act)
        actions.append(act)
        if act.kind is Kind.WAIT:
            clock += act.delay
            waited += act.delay
        elif act.kind is not Kind.FAIL_OVER:
            break
    return actions, opens, waited, clock - NOW - open_seconds


@pytest.mark.parametrize(
    "pool,hint,holds_all,failover_works,open_seconds",
    [
        (1, None, False, True, 0.0),
        (2, None, False, True, 0.0),
        (3, 0.3, True, True, 0.0),
        (5, 0.0, False, True, 0.0),
        (3, 30.0, False, True, 0.0),
        (3, None, False, False, 0.0),
        (4, 1.0, True, True, 0.2),
        (3, None, False, True, 5.0),
    ],
)
def test_all_edges_full_waits_out_the_budget_with_a_bounded_number_of_opens(
    pool, hint, holds_all, failover_works, open_seconds
):
    actions, opens, waited, elapsed = _all_edges_full(pool, hint, holds_all, failover_works, open_seconds)
    waits = sum(a.kind is Kind.WAIT for a in actions)
    assert actions[-1].kind is (Kind.FINISH_LOCALLY if holds_all else Kind.GIVE_UP)
    assert opens <= pool * (1 + waits)
    run = 0  # Opens since the last wait: never more than one per edge
    for a in actions:
        run = 0 if a.kind is Kind.WAIT else run + 1
        assert run <= pool
    longest = rp.HINT_FACTOR * rp.BUSY_BACKOFF_CAP * 1.2
    if open_seconds == 0:
        assert BUDGET - 1e-9 <= waited <= BUDGET + longest
    assert BUDGET - 1e-9 <= elapsed <= BUDGET + longest + pool * open_seconds


def test_lost_sessions_in_a_row_end_after_the_replays_allowed():
    for pool, can_resume in itertools.product((1, 3), (True, False)):
        state = AttemptState(pool_size=pool, can_resume=can_resume, replays_allowed=REPLAYS)
        resumed, attempts = False, 0
        while attempts < 100:
            attempts += 1  # the edge loses every session; a resume is answered NOT_FOUND
            failure = Failure(C.NOT_FOUND if resumed else C.UNAVAILABLE, NOW, resumed=resumed)
            act = decide(failure, state)
            state.after(failure, act)
            if act.kind in (Kind.GIVE_UP, Kind.FINISH_LOCALLY):
                break
            resumed = act.resumes
        assert act.kind is Kind.GIVE_UP and attempts <= 2 * REPLAYS + 1


def test_the_status_table_keeps_the_retryable_and_failover_sets():
    assert rp.RETRYABLE == {C.UNAVAILABLE, C.ABORTED, C.NOT_FOUND, C.CANCELLED}
    assert rp.FAILOVER == {C.UNAVAILABLE, C.DEADLINE_EXCEEDED, C.CANCELLED}
    assert all(rp.category(Failure(c)) is rp.Category.FATAL for c in C if c not in rp.STATUS)


@pytest.mark.parametrize(
    "details", ["Sent message larger than max (70000 vs. 65536)", "Received message larger than max (70000 vs. 65536)"]
)
def test_grpcs_message_too_large_is_a_400_never_a_busy_edge(details):
    e = EdgeError(C.RESOURCE_EXHAUSTED, details)
    assert e.too_large and not e.retryable and not EdgeError(C.RESOURCE_EXHAUSTED, "edge is full").too_large
    assert decide(Failure(e.code, NOW, too_large=e.too_large), _state(3, True, False)).kind is Kind.TOO_LARGE
    api = from_edge(e)
    assert api.status == 400 and "Retry-After" not in api.headers
    assert api.message == (
        "prompt too large for one message to the edge: 70000 bytes > limit 65536; use a shorter "
        "prompt, a smaller codec or raise max_message_bytes"
    )
    assert MessageTooLarge.of(EdgeError(C.RESOURCE_EXHAUSTED, "Sent message larger than max")).size is None
    assert from_edge(MessageTooLarge(5000, 4096)).status == 400
