"""Link estimator on synthetic transfers; cost profiles measured on the tiny model."""

from __future__ import annotations

import pytest

from coinfer import compute
from coinfer import profile as profiles
from coinfer.model import load_slice
from coinfer.planning.link import LinkEstimator, probe_plan
from coinfer.planning.partitioner import LinkEstimate


def transfer(
    est: LinkEstimator, up: int, down: int, bw_up: float, bw_down: float, rtt: float, edge: float, now: float
) -> None:
    est.observe(up, down, rtt + up / bw_up + down / bw_down + edge, edge, now=now)


def feed(est, bw, rtt, t0=0.0, requests=3, prompt_bytes=140_000, step_bytes=1200, steps=31):
    now = t0
    for _ in range(requests):
        transfer(est, prompt_bytes, 56, bw, bw, rtt, 0.05, now)
        for _ in range(steps):
            now += 0.1
            transfer(est, step_bytes, 56, bw, bw, rtt, 0.02, now)
    return now


@pytest.mark.parametrize("mbit,rtt", [(1, 0.04), (0.256, 0.05), (20, 0.005), (2, 0.05)])
def test_learns_bandwidth_and_rtt_from_requests(mbit, rtt):
    est = LinkEstimator()
    feed(est, mbit * 1e6 / 8, rtt)
    e = est.estimate()
    assert e.up_bytes_per_second == pytest.approx(mbit * 1e6 / 8, rel=0.05)
    assert e.rtt_seconds == pytest.approx(rtt, abs=0.002)


def test_follows_a_sudden_drop_within_one_request():
    est = LinkEstimator()
    now = feed(est, 20e6 / 8, 0.05)
    changes = est.snapshot()["changes"]
    feed(est, 256e3 / 8, 0.05, t0=now, requests=1)
    assert est.estimate().up_bytes_per_second == pytest.approx(256e3 / 8, rel=0.1)
    assert est.snapshot()["changes"] > changes


def test_a_single_late_reply_does_not_move_the_rtt():
    est = LinkEstimator()
    for i in range(20):
        est.observe(10, 10, 0.02, now=i)
    est.observe(10, 10, 0.5, now=21)  # one hiccup
    assert est.estimate().rtt_seconds == pytest.approx(0.02, abs=1e-3)
    est.observe(10, 10, 0.2, now=22)
    est.observe(10, 10, 0.2, now=23)  # two in a row far off: a change
    assert est.estimate().rtt_seconds > 0.1


def test_staleness():
    est = LinkEstimator()
    assert est.stale(30, now=0.0)
    feed(est, 1e6, 0.02, t0=100.0, requests=1)
    assert not est.stale(30, now=110.0)
    assert est.stale(30, now=200.0)


def test_probe_sizes_follow_the_estimate():
    slow = probe_plan(LinkEstimate(256e3 / 8, 256e3 / 8, 0.05))
    fast = probe_plan(LinkEstimate(100e6 / 8, 100e6 / 8, 0.001))
    assert slow[0] == (16, 16)
    assert slow[1][0] == 4800 and slow[2][1] == 4800  # 150 ms at 256 kbit/s
    assert fast[1][0] == 256 << 10  # capped


def test_downlink_learned_from_a_download():
    est = LinkEstimator()
    for i in range(5):
        transfer(est, 16, 16, 1e6, 2e5, 0.01, 0.0, i)
        transfer(est, 16, 50_000, 1e6, 2e5, 0.01, 0.0, i + 0.5)
    assert est.estimate().down_bytes_per_second == pytest.approx(2e5, rel=0.05)


# -- profiles ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_slice(tiny_dir):
    return compute.run(load_slice, tiny_dir, 0, 6, embed=True, head=True)


def test_measure_profile_of_a_slice(tiny_slice, tmp_path):
    p = compute.run(profiles.measure, tiny_slice, 1, 2, ("f16", "int8"), (4, 16))
    assert (p.start, p.stop, p.num_layers) == (0, 6, 6) and p.whole_model
    assert len(p.layer_prefill) == len(p.layer_decode) == 6
    assert all(d > 0 for d in p.layer_decode) and p.head > 0 and p.embed > 0
    assert p.prefill(0, 6, 64) >= p.prefill(0, 6, 4) > 0
    assert p.frame_bytes(3, "int8", 16) < p.frame_bytes(3, "f16", 16)
    assert p.frame_bytes(3, "f16", 16) > p.frame_bytes(3, "f16", 1)
    with pytest.raises(KeyError):
        p.frame_bytes(3, "int4", 1)
    with pytest.raises(ValueError):
        p.prefill(0, 7, 4)
    assert profiles.CostProfile.from_json(p.to_json()) == p


def test_profile_is_cached_per_model_and_host(tiny_slice, tmp_path):
    a = compute.run(profiles.load_or_measure, tiny_slice, "sha256:x", tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 1
    b = compute.run(profiles.load_or_measure, tiny_slice, "sha256:x", tmp_path)
    assert a == b  # read back, not measured again
    compute.run(profiles.load_or_measure, tiny_slice, "sha256:y", tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 2
    (tmp_path / next(tmp_path.glob("*.json")).name).write_text("{broken")
    compute.run(profiles.load_or_measure, tiny_slice, "sha256:x", tmp_path)  # unreadable cache: measured again


def test_tail_profile_wire_form_and_slowdown(tiny_dir):
    tail = compute.run(load_slice, tiny_dir, 2, 6, embed=False, head=True)
    p = compute.run(profiles.measure, tail, 1, 2, (), (4, 16))
    assert p.embed == 0 and p.start == 2 and not p.whole_model
    q = profiles.from_pb(profiles.to_pb(p))
    assert q.layer_decode == pytest.approx(p.layer_decode) and q.decode(2, 6) == pytest.approx(p.decode(2, 6))
    slow = p.slowed(4.0)
    assert slow.decode(2, 6) == pytest.approx(4 * p.decode(2, 6)) and slow.slowed(4.0).decode(2, 6) == pytest.approx(
        slow.decode(2, 6)
    )
    bad = profiles.to_pb(p)
    del bad.layer_decode_seconds[0]
    with pytest.raises(ValueError, match="decode entries"):
        profiles.from_pb(bad)


def test_line_fit():
    line = profiles.Line.fit([16, 64, 128], [0.016 + 1e-3, 0.064 + 1e-3, 0.128 + 1e-3])
    assert line.per_token == pytest.approx(1e-3) and line.fixed == pytest.approx(1e-3)
    assert profiles.Line.fit([1, 1], [2, 4]) == profiles.Line(3.0, 0.0)


def test_planner_learns_only_from_exchanges_that_had_the_link_alone():
    from coinfer.planning.settings import EnergySettings, PlannerSettings
    from device_agent.edge.client import Exchange
    from device_agent.planning import Planner
    from tests.support.profiles import profile

    p = Planner(PlannerSettings(), EnergySettings(), profile(), None)
    q = p.quiet(0)
    p.observe(Exchange(100, 100, 0.05), q)
    assert p.link.snapshot()["samples"]["up"] == 1
    before = p.link.estimate()
    q = p.quiet(0)
    p.begin()  # a request started while this Describe was in flight: its bytes were ahead of ours
    p.observe(Exchange(100, 100, 4.0), q)
    assert p.skipped == 1 and p.link.estimate() == before
    assert p.quiet(0) is None  # polls during a request are not samples
    q = p.quiet(1)  # the request's own exchanges are, while it is alone
    p.observe(Exchange(1200, 56, 0.06), q)
    assert p.link.snapshot()["samples"]["up"] == 2
    p.begin()
    assert p.quiet(1) is None  # two requests share the link
    p.end(), p.end()
    assert p.quiet(0) is not None and p.active == 0


def test_small_transfers_of_different_sizes_do_not_move_the_bandwidth():
    """Describe polls (a few bytes) and token-id prefills (a few hundred) with 2 ms of jitter: the
    RTT must come out right and the bandwidth learned from a real prefill must stay."""
    import random

    rnd = random.Random(0)
    est, bw, rtt = LinkEstimator(), 256e3 / 8, 0.05
    feed(est, bw, rtt, requests=1)
    for i in range(60):
        x = 2 if i % 2 else 400
        est.observe(x, 150, rtt + x / bw + 150 / bw + rnd.uniform(0, 0.002), 0.0, now=100 + i)
    e = est.estimate()
    assert e.up_bytes_per_second == pytest.approx(bw, rel=0.1)
    assert e.rtt_seconds == pytest.approx(rtt, abs=0.006)


def test_rtt_is_not_extrapolated_from_large_transfers():
    """Prefills of 140 KB whose speed wobbles by 2% and a handful of small exchanges: the RTT
    comes from the small ones (a 2% slope error on 4.4 s would be 88 ms of RTT)."""
    est, bw, rtt = LinkEstimator(), 256e3 / 8, 0.005
    for i, wobble in enumerate((1.02, 0.98, 1.02, 0.98, 1.01)):
        est.observe(140_000, 40, 0.2 + rtt + 140_000 / (bw * wobble), 0.2, now=10 * i)
        est.observe(300, 40, 0.2 + rtt + 300 / bw + 40 / bw, 0.2, now=10 * i + 5)
    assert est.estimate().rtt_seconds == pytest.approx(rtt, abs=0.003)
    assert est.estimate().up_bytes_per_second == pytest.approx(bw, rel=0.03)
