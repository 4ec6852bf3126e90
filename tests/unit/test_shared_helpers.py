"""The small helpers every app shares: the finish rule and the decode loop (coinfer.model.generation),
comma-separated settings (coinfer.config_values) and an app process's life (coinfer.lifecycle).

Pure: run_until_signalled is driven through a stand-in for signal.signal, so no real signal is sent
and the test process's own handlers are never replaced."""

from __future__ import annotations

import os
import signal

import pytest

from coinfer import lifecycle
from coinfer.config_values import split_list
from coinfer.model.generation import decode_loop, finish_reason

# -- finish_reason -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "generated", "max_new", "stop_ids", "expected"),
    [
        (5, 1, 4, {2}, None),  # neither a stop id nor the last token: go on
        (5, 3, 4, set(), None),
        (5, 4, 4, {2}, "length"),  # the max_new-th token
        (5, 9, 4, {2}, "length"),  # past it (a caller that counts on) still ends
        (2, 1, 4, {2}, "stop"),
        (2, 4, 4, {2}, "stop"),  # a stop id on the last allowed token: "stop" wins over "length"
        (2, 4, 4, frozenset({1, 2}), "stop"),
        (2, 1, 4, (), None),  # no stop ids (ignore_eos)
        (0, 1, 1, {7}, "length"),  # max_new = 1: the first token is the last
    ],
)
def test_finish_reason(token, generated, max_new, stop_ids, expected):
    assert finish_reason(token, generated, max_new, stop_ids) == expected


# -- decode_loop ---------------------------------------------------------------------------------


class Scripted:
    """A next_token that answers from a script and records what it was fed."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens, self.fed = list(tokens), []

    def __call__(self, ids: list[int]) -> tuple[int, float]:
        self.fed.append(list(ids))
        token = self.tokens.pop(0)
        return token, -0.5 * token


def test_decode_loop_feeds_the_prompt_then_one_token_a_call():
    nt = Scripted([7, 8, 9])
    out = list(decode_loop(nt, [1, 2, 3], max_new=3))
    assert out == [(7, -3.5, None), (8, -4.0, None), (9, -4.5, "length")]
    assert nt.fed == [[1, 2, 3], [7], [8]]


def test_decode_loop_emits_the_stop_id_then_ends():
    nt = Scripted([7, 2, 9])
    out = list(decode_loop(nt, [1], max_new=10, stop_ids={2}))
    assert out == [(7, -3.5, None), (2, -1.0, "stop")]
    assert nt.tokens == [9]  # not asked for a token after the stop


def test_decode_loop_stop_on_the_last_token_is_stop():
    out = list(decode_loop(Scripted([7, 2]), [1], max_new=2, stop_ids={2}))
    assert [f for _, _, f in out] == [None, "stop"]


def test_decode_loop_without_stop_ids_runs_to_the_length():
    out = list(decode_loop(Scripted([2, 2, 2]), [1], max_new=3))
    assert [t for t, _, _ in out] == [2, 2, 2] and out[-1][2] == "length"


def test_decode_loop_max_new_zero_asks_for_nothing():
    nt = Scripted([7])
    assert list(decode_loop(nt, [1], max_new=0)) == []
    assert nt.fed == []


def test_decode_loop_leaves_the_prompt_alone_and_is_lazy():
    prompt = [1, 2]
    nt = Scripted([7, 8])
    loop = decode_loop(nt, prompt, max_new=2)
    assert nt.fed == []  # nothing runs before the first token is asked for
    assert next(loop) == (7, -3.5, None)
    assert nt.fed == [[1, 2]]
    loop.close()  # a consumer that stops early: no further call
    assert nt.fed == [[1, 2]] and prompt == [1, 2]


# -- split_list ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a, b,,c ", ["a", "b", "c"]),
        ("", []),
        (" , ,", []),
        ("x", ["x"]),
        ("host:50051,host2:50052,", ["host:50051", "host2:50052"]),
        (" two words , x ", ["two words", "x"]),  # only the blanks around an item go
    ],
)
def test_split_list(value, expected):
    assert split_list(value) == expected


# -- run_until_signalled -------------------------------------------------------------------------


class Signals:
    """Stands in for signal.signal: records the handlers; `deliver` (a signal number or None) is
    called as soon as its handler is installed, as if the signal arrived right then."""

    def __init__(self, deliver: int | None = None) -> None:
        self.handlers: dict[int, object] = {}
        self.deliver = deliver

    def __call__(self, sig, handler):
        self.handlers[sig] = handler
        if sig == self.deliver:
            handler(sig, None)


@pytest.fixture
def events():
    return []


def _start(events, fields="grpc=127.0.0.1:1 ops=127.0.0.1:2"):
    def start() -> str:
        events.append("start")
        return fields

    return start


def _stop(events):
    return lambda: events.append("stop")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_until_signalled_serves_until_a_signal(monkeypatch, capsys, events, sig):
    signals = Signals(deliver=sig)
    monkeypatch.setattr(lifecycle.signal, "signal", signals)
    assert lifecycle.run_until_signalled(_start(events), _stop(events), "app") == 0
    assert events == ["start", "stop"]
    assert set(signals.handlers) == {signal.SIGTERM, signal.SIGINT}
    out = capsys.readouterr()
    assert out.out == f"READY pid={os.getpid()} grpc=127.0.0.1:1 ops=127.0.0.1:2\n" and out.err == ""


def test_run_until_signalled_stops_when_the_server_dies(monkeypatch, capsys, events):
    signals = Signals()  # no signal comes: alive() turning False ends it
    monkeypatch.setattr(lifecycle.signal, "signal", signals)
    checks = []

    def alive() -> bool:
        checks.append(1)
        return False

    assert lifecycle.run_until_signalled(_start(events), _stop(events), "app", alive=alive) == 0
    assert events == ["start", "stop"] and checks == [1]
    assert capsys.readouterr().out.startswith("READY pid=")


def test_run_until_signalled_signal_wins_over_alive(monkeypatch, capsys, events):
    monkeypatch.setattr(lifecycle.signal, "signal", Signals(deliver=signal.SIGTERM))
    assert lifecycle.run_until_signalled(_start(events), _stop(events), "app", alive=lambda: True) == 0
    assert events == ["start", "stop"]


@pytest.mark.parametrize("error", [OSError("address already in use"), ValueError("bad model dir")])
def test_run_until_signalled_start_failure_exits_1(monkeypatch, capsys, events, error):
    signals = Signals()
    monkeypatch.setattr(lifecycle.signal, "signal", signals)

    def start() -> str:
        raise error

    assert lifecycle.run_until_signalled(start, _stop(events), "edge-server") == 1
    assert events == [] and signals.handlers == {}  # never stopped what never started; no handler installed
    out = capsys.readouterr()
    assert out.out == "" and out.err == f"edge-server: {error}\n"


def test_run_until_signalled_lets_other_errors_through(monkeypatch, events):
    monkeypatch.setattr(lifecycle.signal, "signal", Signals())

    def start() -> str:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        lifecycle.run_until_signalled(start, _stop(events), "app")
    assert events == []
