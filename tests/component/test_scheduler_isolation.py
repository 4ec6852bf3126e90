"""One session's NaN (or a sampler that fails) fails that session alone: the other rows of its
decode batch get exactly the tokens they get when it is not there. Sessions decode in threads, so
steps form real batches. (Row-wise sampling alone: tests/unit/test_scheduler_isolation.py.)"""

from __future__ import annotations

import threading
from contextlib import ExitStack

import pytest
import torch

from coinfer.codec import NonFiniteState
from coinfer.model.sampling import Sampler, SamplingParams
from edge_server.scheduler import Scheduler
from edge_server.sessions import SessionStore
from edge_server.tail import TailRunner

STEPS = 6
PROMPT = [11, 40, 7, 23, 5, 88]
D = 64  # the tiny model's hidden size
GOOD = {"greedy": SamplingParams(), "sampled": SamplingParams(temperature=0.9, seed=7)}


@pytest.fixture(scope="module")
def runner(tiny_dir):
    return TailRunner(tiny_dir, min_split=0, measure_profile=False)


def _hidden(d: int, shape: tuple, seed: int) -> torch.Tensor:
    return torch.randn(*shape, d, generator=torch.Generator().manual_seed(seed))


def _good(sched, s, out):
    """A k = 0 session: prompt ids, then each token fed back."""
    token = out[s.session_id][-1]
    for _ in range(STEPS):
        token, _, _ = sched.step(s, torch.tensor([token]))
        out[s.session_id].append(token)


def _bad(sched, s, out, poison):
    """A k = 3 session: finite hidden states for two steps, then `poison` (a hidden state [1, d])."""
    try:
        for i in range(STEPS):
            x = poison if i == 2 else _hidden(poison.shape[-1], (1,), 100 + i)
            out[s.session_id].append(sched.step(s, x)[0])
    except Exception as e:
        out[s.session_id].append(e)
    finally:
        sched.finished(s)


def _run(runner, bad: dict | None = None) -> tuple[dict, list[int]]:
    """Sessions of GOOD (and one bad one) decode in threads; steps form batches of every live
    session (the gather waits for all of them). -> (tokens or the exception per session, batch sizes)."""
    store, sizes = SessionStore(max_sessions=8, budget_bytes=64 << 20), []
    sched = Scheduler(
        runner.model,
        store,
        max_batch=8,
        max_wait=2.0,
        on_batch=lambda kind, n, q, t: sizes.append(n) if kind == "decode" else None,
    )
    sched.gap = 2.0  # a batch waits for every decoding session, however loaded this machine is
    out: dict[str, list] = {}
    try:
        with ExitStack() as stack:
            threads = []
            for name, params in GOOD.items():
                s = stack.enter_context(store.hold(name, runner.new_session(0, "f32", params, name, STEPS)))
                out[name] = [sched.prefill(s, torch.tensor([PROMPT]))[0]]
                threads.append(threading.Thread(target=_good, args=(sched, s, out)))
            if bad is not None:
                s = stack.enter_context(store.hold("bad", runner.new_session(3, "f32", bad["params"], "bad", STEPS)))
                if bad.get("sampler") is not None:
                    s.sampler = bad["sampler"]
                out["bad"] = []
                try:
                    out["bad"].append(sched.prefill(s, bad.get("prefill", _hidden(D, (1, 4), 1)))[0])
                    threads.append(threading.Thread(target=_bad, args=(sched, s, out, bad["poison"])))
                except Exception as e:
                    out["bad"].append(e)
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
    finally:
        sched.close()
    return out, sizes


@pytest.fixture(scope="module")
def alone(runner):
    return _run(runner)[0]


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["all", "one channel"])
def test_a_poisoned_row_fails_alone_and_the_batch_decodes_as_without_it(runner, alone, poison, where):
    """The tail is fed what a codec would refuse (NaN, inf): the scheduler's own guard still holds."""
    x = torch.full((1, D), poison) if where == "all" else _hidden(D, (1,), 9).index_fill(1, torch.tensor([3]), poison)
    out, sizes = _run(runner, {"params": SamplingParams(), "poison": x})
    assert 3 in sizes  # the bad row shared a batch with the good ones
    *fine, err = out["bad"]
    assert len(fine) == 3 and all(isinstance(t, int) for t in fine)  # prefill + 2 finite steps
    assert isinstance(err, NonFiniteState) and isinstance(err, ValueError), err
    assert {k: out[k] for k in GOOD} == alone


def test_a_failing_sampler_fails_its_session_alone(runner, alone):
    sampler = Sampler(SamplingParams(temperature=1.0))

    def draw(logits):
        if len(sampler.calls) == 2:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        sampler.calls.append(1)
        return 0

    sampler.calls, sampler.draw = [], draw
    out, sizes = _run(runner, {"params": sampler.params, "sampler": sampler, "poison": _hidden(D, (1,), 5)})
    assert isinstance(out["bad"][-1], NonFiniteState) and "sampling failed" in str(out["bad"][-1])
    assert 3 in sizes and {k: out[k] for k in GOOD} == alone


def test_a_nan_prefill_fails_alone(runner, alone):
    x = _hidden(D, (1, 4), 1)
    x[0, 2, 5] = float("nan")
    out, _ = _run(runner, {"params": SamplingParams(), "prefill": x, "poison": x[0, :1]})
    assert len(out["bad"]) == 1 and isinstance(out["bad"][0], NonFiniteState)
    assert {k: out[k] for k in GOOD} == alone
