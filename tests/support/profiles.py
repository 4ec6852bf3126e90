"""Synthetic cost profiles and links for the partitioner and the planner: round numbers, no model."""

from __future__ import annotations

from coinfer.planning import partitioner as part
from coinfer.planning.cost_profile import CostProfile, Line

N = 30  # layers of the synthetic model


def profile(
    start=0,
    stop=N,
    layer_decode=1e-3,
    per_token=4e-5,
    fixed=1e-3,
    head=4e-3,
    embed=1e-4,
    f16_per_token=1100.0,
    int8_per_token=600.0,
) -> CostProfile:
    n = stop - start
    wire = {"f16": [Line(80.0, f16_per_token)] * n, "int8": [Line(90.0, int8_per_token)] * n}
    return CostProfile(
        start,
        stop,
        [Line(fixed, per_token)] * n,
        [layer_decode] * n,
        embed if start == 0 else 0.0,
        head if stop == N else 0.0,
        wire=wire,
        num_layers=N,
    )


def link(mbit=10.0, rtt_ms=20.0) -> part.LinkEstimate:
    return part.LinkEstimate(mbit * 1e6 / 8, mbit * 1e6 / 8, rtt_ms / 1e3)
