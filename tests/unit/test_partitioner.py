"""The partitioner on synthetic profiles: pure numbers, no sockets."""

from __future__ import annotations

import pytest

from coinfer.planning import partitioner as part
from tests.support.profiles import N, link, profile

DEVICE, EDGE = profile(), part.EdgeView(profile())


def test_huge_bandwidth_and_fast_edge_offloads_everything():
    edge = part.EdgeView(profile(layer_decode=1e-4, per_token=4e-6, head=4e-4))
    p = part.plan(DEVICE, edge, link(10_000, 1), 128, 32)
    assert p.split == 0
    assert "edge only" in p.reason


def test_huge_bandwidth_with_privacy_floor_offloads_as_far_as_allowed():
    edge = part.EdgeView(profile(layer_decode=1e-4, per_token=4e-6, head=4e-4))
    p = part.plan(DEVICE, edge, link(10_000, 1), 128, 32, part.Constraints(min_device_layers=3))
    assert p.split == 3


def test_tiny_bandwidth_runs_locally():
    p = part.plan(DEVICE, EDGE, link(0.01, 200), 128, 32, part.Constraints(min_device_layers=2))
    assert p.split == N and p.codec == "none"
    assert p.best.bytes_up == 0


def test_device_without_all_layers_never_plans_device_only():
    device = profile(stop=10)
    p = part.plan(device, EDGE, link(0.01, 200), 128, 32)
    assert p.split < N and all(c.split <= 10 for c in p.candidates)


@pytest.mark.parametrize("floor,cap", [(0, None), (2, None), (4, 12), (7, 7), (0, 5)])
@pytest.mark.parametrize("mbit,rtt", [(0.256, 50), (2, 5), (20, 50), (1000, 1)])
def test_constraints_never_violated(floor, cap, mbit, rtt):
    device = profile(stop=cap) if cap is not None else DEVICE
    c = part.Constraints(min_device_layers=floor, max_device_layers=cap)
    p = part.plan(device, EDGE, link(mbit, rtt), 128, 32, c)
    for cand in p.candidates:
        assert cand.split >= floor
        assert cand.split <= (cap if cap is not None else N)


def test_edge_min_split_is_respected():
    edge = part.EdgeView(profile(start=6))
    p = part.plan(DEVICE, edge, link(1000, 1), 128, 32)
    assert min(c.split for c in p.candidates) == 6


def test_infeasible_constraints_raise_with_a_reason():
    with pytest.raises(part.PlanError, match="min_device_layers=12"):
        part.plan(profile(stop=10), EDGE, link(), 128, 32, part.Constraints(min_device_layers=12))
    with pytest.raises(part.PlanError, match="no edge"):
        part.plan(profile(stop=10), None, link(), 128, 32)


def test_no_edge_means_device_only():
    p = part.plan(DEVICE, None, link(), 128, 32)
    assert p.split == N and len(p.candidates) == 1


def test_busy_edge_makes_device_layers_cheap():
    idle = part.plan(profile(layer_decode=4e-3, per_token=1.6e-4, head=1.6e-2), EDGE, link(20, 5), 128, 32)
    busy = part.plan(
        profile(layer_decode=4e-3, per_token=1.6e-4, head=1.6e-2),
        part.EdgeView(EDGE.profile, 0.5),
        link(20, 5),
        128,
        32,
    )
    assert idle.split == 0  # a 4x slower device offloads to an idle edge
    assert busy.split == N  # 0.5 s per edge work item: the device alone is faster


def test_cost_terms_add_up_and_k0_has_no_per_token_round_trip():
    lk = link(2, 50)
    c0 = part.cost(DEVICE, EDGE, lk, 0, "-", 128, 32)
    c15 = part.cost(DEVICE, EDGE, lk, 15, "f16", 128, 32)
    assert c0.breakdown["rtt"] == pytest.approx(2 * 0.05)  # open + prefill only
    assert c15.breakdown["rtt"] == pytest.approx(2 * 0.05 + 31 * 0.05)
    for c in (c0, c15):
        assert sum(c.breakdown.values()) == pytest.approx(c.total)
        assert c.total == pytest.approx(c.ttft + 31 * c.per_token)
    # uplink at 15: a 128-token frame + 31 one-token frames at 1100 B/token
    assert c15.bytes_up == pytest.approx(80 + 1100 * 128 + 20 + 31 * (80 + 1100 + 20) + 60, rel=0.01)


def test_cheaper_codec_wins_on_a_thin_link_when_allowed():
    c = part.Constraints(min_device_layers=2, codecs=("f16", "int8"))
    edge = part.EdgeView(profile(layer_decode=1e-4, per_token=4e-6, head=4e-4))
    device = profile(layer_decode=4e-3, per_token=1.6e-4, head=1.6e-2)
    p = part.plan(device, edge, link(2, 5), 128, 32, c)
    assert 0 < p.split < N and p.codec == "int8"


# calibrated agreement: int8 is fine in early layers, below 99% from layer 12 on; f16 everywhere
AGREEMENT = {"int8": {k: 0.995 if k < 12 else 0.97 for k in range(1, N)}, "f16": {k: 1.0 for k in range(1, N)}}


@pytest.mark.parametrize("mbit", [0.3, 1, 3, 10, 100])
@pytest.mark.parametrize("budget", [0.0, 0.98, 0.99, 0.999])
def test_accuracy_budget_is_never_broken(mbit, budget):
    edge = part.EdgeView(profile(layer_decode=2e-4, per_token=8e-6))
    c = part.Constraints(codecs=("f16", "int8"), min_agreement=budget, agreement=AGREEMENT)
    p = part.plan(DEVICE, edge, link(mbit, 20), 256, 64, c)
    for cand in p.candidates:
        if 0 < cand.split < N:
            assert AGREEMENT[cand.codec][cand.split] >= budget, (cand.split, cand.codec)
    if budget >= 0.99:
        assert not any(cand.codec == "int8" and cand.split >= 12 for cand in p.candidates)


def test_accuracy_budget_moves_a_thin_link_off_the_cheap_codec():
    edge = part.EdgeView(profile(layer_decode=2e-4, per_token=8e-6))
    device = profile(layer_decode=5e-3)  # a slow device: keep few layers
    free = part.plan(
        device,
        edge,
        link(0.5, 20),
        128,
        32,
        part.Constraints(min_device_layers=14, codecs=("f16", "int8"), agreement=AGREEMENT),
    )
    assert free.codec == "int8" and free.split == 14
    strict = part.plan(
        device,
        edge,
        link(0.5, 20),
        128,
        32,
        part.Constraints(min_device_layers=14, codecs=("f16", "int8"), min_agreement=0.99, agreement=AGREEMENT),
    )
    assert strict.codec != "int8" or strict.split < 12


def test_accuracy_budget_without_a_table_keeps_only_f32():
    c = part.Constraints(codecs=("f16", "f32"), min_agreement=0.99)
    assert c.accurate_enough("f32", 5) and not c.accurate_enough("f16", 5)
    edge = part.EdgeView(profile(layer_decode=1e-4, per_token=4e-6, head=4e-4))
    with pytest.raises(part.PlanError, match="min_agreement"):
        part.plan(
            DEVICE,
            edge,
            link(10),
            64,
            8,
            part.Constraints(min_device_layers=3, max_device_layers=10, codecs=("int8",), min_agreement=0.99),
        )


def test_a_prefix_the_edge_still_holds_makes_its_split_cheap():
    """Turn 2 of a chat on a thin link: the split whose caches hold turn 1 sends 16 positions, not 512."""
    device = profile(layer_decode=3e-3, per_token=1.2e-4)
    edge = part.EdgeView(profile(layer_decode=2e-4, per_token=8e-6))
    c = part.Constraints(min_device_layers=2)
    cold = part.plan(device, edge, link(0.5, 20), 512, 32, c)
    warm = part.plan(device, edge, link(0.5, 20), 512, 32, c, cached={15: 496})
    assert cold.split != 15 and warm.split == 15

    def at15(p):
        return next(x for x in p.candidates if x.split == 15)

    assert at15(warm).bytes_up < at15(cold).bytes_up / 10 and at15(warm).ttft < at15(cold).ttft / 5
    # other splits are priced as before
    assert {x.split: x.total for x in cold.candidates if x.split != 15} == {
        x.split: x.total for x in warm.candidates if x.split != 15
    }


def test_energy_objective_moves_the_cut():
    """Costly radio -> energy keeps work on the device; costly compute -> it offloads more."""
    lk, req = link(2, 20), (128, 32)
    c = part.Constraints(min_device_layers=2)
    lat = part.plan(DEVICE, EDGE, lk, *req, c)
    radio = part.plan(DEVICE, EDGE, lk, *req, c, part.Objective("energy", tx_joules_per_byte=1e-3, compute_watts=0.5))
    compute = part.plan(
        DEVICE, EDGE, lk, *req, c, part.Objective("energy", tx_joules_per_byte=1e-9, compute_watts=20.0, idle_watts=0.0)
    )
    assert radio.split == N
    assert compute.split == 2
    assert radio.best.energy <= min(x.energy for x in radio.candidates) + 1e-12
    assert lat.objective == "latency" and radio.objective == "energy"


def test_weighted_objective_sits_between():
    lk, c = link(2, 20), part.Constraints(min_device_layers=2)
    obj = part.Objective("weighted", energy_weight=1.0, tx_joules_per_byte=1e-4)
    p = part.plan(DEVICE, EDGE, lk, 128, 32, c, obj)
    best = p.best
    assert best.score == pytest.approx(best.total + best.energy)
    assert all(best.score <= x.score for x in p.candidates)


def test_plan_is_explained():
    p = part.plan(DEVICE, EDGE, link(2, 50), 128, 32, part.Constraints(min_device_layers=2))
    d = p.to_dict()
    assert d["split"] == p.split and d["reason"].startswith("latency: split")
    assert "next best split" in p.reason and "RTT 50 ms" in p.reason and "2 Mbit/s" in p.reason
    assert {c["split"] for c in d["candidates"]} == set(range(2, N + 1))


def test_format_rate():
    assert part.format_rate(256e3 / 8) == "256 kbit/s"
    assert part.format_rate(20e6 / 8) == "20 Mbit/s"


def test_coinfer_plan_cli_prints_a_table_and_draws_a_png(tiny_dir, tmp_path, capsys):
    from coinfer.cli import main

    png, out = tmp_path / "plan.png", tmp_path / "plan.json"
    assert (
        main(
            [
                "plan",
                "--model",
                str(tiny_dir),
                "--bandwidth",
                "2mbit",
                "--rtt",
                "40ms",
                "--prompt-tokens",
                "16",
                "--max-tokens",
                "8",
                "--min-device-layers",
                "2",
                "--png",
                str(png),
                "--json",
                str(out),
                "--profile-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "<- chosen" in text and text.splitlines()[0].split()[:2] == ["split", "codec"]
    assert png.stat().st_size > 1000
    import json

    d = json.loads(out.read_text())
    assert d["split"] >= 2 and {c["split"] for c in d["candidates"]} == set(range(2, 7))
    assert main(["plan", "--model", str(tiny_dir), "--bandwidth", "fast"]) == 2
    assert "cannot read a rate" in capsys.readouterr().err
    # an accuracy budget with no calibrated table in the dir: lossy codecs are out, only the ends remain
    assert (
        main(
            [
                "plan",
                "--model",
                str(tiny_dir),
                "--codecs",
                "f16,int8",
                "--min-agreement",
                "0.99",
                "--json",
                str(out),
                "--profile-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert {c["split"] for c in json.loads(out.read_text())["candidates"]} == {0, 6}
    assert main(["plan", "--model", str(tiny_dir), "--min-agreement", "2"]) == 2
