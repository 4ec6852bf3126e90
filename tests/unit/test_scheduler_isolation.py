"""Sampling a batch row by row: each row's tokens stand alone (a failing row fails only itself). (Whole
decode batches of sessions in threads: tests/component/test_scheduler_isolation.py.)"""

from __future__ import annotations

import torch

from coinfer.codec import NonFiniteState
from coinfer.model.sampling import Sampler, SamplingParams, sample_each, sample_rows


def test_sample_each_rows_stand_alone():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    logits[1, 3] = float("nan")
    logits[2, 7] = float("-inf")
    params = [SamplingParams(temperature=0.7, seed=s) for s in range(4)]
    got = sample_each([Sampler(p) for p in params], logits)
    assert isinstance(got[1], NonFiniteState) and isinstance(got[2], NonFiniteState)
    ref = sample_rows([Sampler(params[0]), Sampler(params[3])], logits[[0, 3]])
    assert [got[0], got[3]] == ref
