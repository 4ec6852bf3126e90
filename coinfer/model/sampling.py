"""Next-token sampling (greedy, temperature, top-k, top-p, seed): the one place both sides use."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coinfer.codec import NonFiniteState

GREEDY_BELOW = 1e-5  # temperatures below this sample greedily


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut
    seed: int | None = None  # fixes the random stream of one request

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        # as vLLM: a temperature this close to 0 is greedy (logits / 5e-324 overflow to inf; found by
        # schemathesis against the REST API)
        return self.temperature < GREEDY_BELOW or self.top_k == 1


class Sampler:
    """Draws tokens for one request; holds its own seeded generator so requests don't interfere."""

    def __init__(self, params: SamplingParams | None = None) -> None:
        self.params = params or SamplingParams()
        self.generator = torch.Generator()
        if self.params.seed is not None:
            self.generator.manual_seed(self.params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> tuple[int, float]:
        """logits [V] -> (token id, its log-probability under the model's unmodified distribution)."""
        return sample_rows([self], logits[None])[0]

    def draw(self, logits: torch.Tensor) -> int:
        """A token from logits [V] (float32) under temperature, top-k and top-p."""
        probs = torch.softmax(filter_logits(logits / self.params.temperature, self.params), dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def sample_rows(samplers: list[Sampler], logits: torch.Tensor) -> list[tuple[int, float]]:
    """One token per row of logits [B, V], row b drawn by samplers[b]: [(token id, logprob)].
    Raises NonFiniteState for a row that cannot be sampled (see sample_each)."""
    rows = sample_each(samplers, logits)
    for row in rows:
        if isinstance(row, NonFiniteState):
            raise row
    return rows  # type: ignore[return-value]


def sample_each(samplers: list[Sampler], logits: torch.Tensor) -> list[tuple[int, float] | NonFiniteState]:
    """One token per row of logits [B, V], row b drawn by samplers[b]: (token id, logprob), or a
    NonFiniteState for a row with a NaN or infinite logit or whose draw raises (finite logits can
    still overflow once divided by a small temperature). Softmax and argmax run once for the whole
    batch; only rows that are not greedy draw on their own, each generator on its own row, so one
    session's bad state in a batched decode step fails that session alone and the other rows get
    what they would get alone.
    """
    logits = logits.float()
    finite = torch.isfinite(logits).all(dim=-1).tolist()  # [B]
    logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]
    greedy = torch.argmax(logits, dim=-1).tolist()  # [B]
    bad = "logits hold NaN or infinite values (the session's input overflowed in the model)"
    drawn = [
        _draw_row(s, logits[b], g) if ok else NonFiniteState(bad)
        for b, (s, g, ok) in enumerate(zip(samplers, greedy, finite, strict=True))
    ]
    tokens = torch.tensor([0 if isinstance(d, Exception) else d for d in drawn])
    picked = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    return [d if isinstance(d, Exception) else (d, p) for d, p in zip(drawn, picked, strict=True)]


def _draw_row(sampler: Sampler, logits: torch.Tensor, greedy: int) -> int | NonFiniteState:
    if sampler.params.greedy:
        return greedy
    try:
        return sampler.draw(logits)
    except Exception as e:  # torch.multinomial on NaN probabilities: RuntimeError
        return NonFiniteState(f"sampling failed: {e}")


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Set logits outside top-k and outside the top-p nucleus to -inf. logits [V]."""
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= params.top_p  # keep the token that crosses top_p
        drop[0] = False  # and always the most likely one: a top_p below float32's range (5e-324, found by
        #                  schemathesis) compares as 0 and would drop every token
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits
