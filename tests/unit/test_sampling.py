"""Sampling: greedy, temperature, top-k, top-p and seeds, in the one shared place."""

import math

import pytest
import torch

from coinfer.model.sampling import Sampler, SamplingParams, filter_logits

LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5, -1.0])


def draws(params: SamplingParams, n: int = 300) -> list[int]:
    s = Sampler(params)
    return [s(LOGITS)[0] for _ in range(n)]


def test_greedy_is_argmax_with_true_logprob():
    token, logprob = Sampler(SamplingParams())(LOGITS)
    assert token == 1
    assert math.isclose(logprob, float(torch.log_softmax(LOGITS, -1)[1]), rel_tol=1e-6)


def test_seed_makes_sampling_reproducible():
    p = SamplingParams(temperature=1.0, seed=7)
    assert draws(p) == draws(p)
    assert len(set(draws(p))) > 2  # actually random, not argmax
    assert draws(p) != draws(SamplingParams(temperature=1.0, seed=8))


def test_top_k_limits_support():
    assert set(draws(SamplingParams(temperature=5.0, top_k=2, seed=1))) == {1, 2}
    assert set(draws(SamplingParams(temperature=5.0, top_k=1, seed=1))) == {1}


def test_top_p_keeps_the_nucleus():
    # probabilities ~ [0.08, 0.60, 0.22, 0.05, 0.01]: p=0.7 keeps tokens 1 and 2
    kept = filter_logits(LOGITS, SamplingParams(top_p=0.7)).isfinite().nonzero().flatten().tolist()
    assert kept == [1, 2]
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.7, seed=3))) == {1, 2}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.01, seed=3))) == {1}
    assert set(draws(SamplingParams(temperature=1.0, top_p=5e-324, seed=3))) == {1}  # rounds to 0 in float32


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)])
def test_invalid_params_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_a_vanishing_temperature_is_greedy_not_a_crash():
    import torch

    from coinfer.model.sampling import Sampler, SamplingParams

    logits = torch.randn(100, generator=torch.Generator().manual_seed(0)) * 30
    for t in (5e-324, 1e-9, 9e-6):
        token, logprob = Sampler(SamplingParams(temperature=t))(logits)
        assert token == int(logits.argmax()) and logprob <= 0
