"""Autoregressive loop over any next-token-logits function (whole model, or head -> link -> tail)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from coinfer.model.llama import ModelSlice
from coinfer.model.sampling import Sampler, SamplingParams

# ids [1, T] -> logits [V] of the last position; advances whatever caches sit behind it
StepFn = Callable[[torch.Tensor], torch.Tensor]


def generate(
    step: StepFn,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    stop_ids: Iterable[int] = (),
) -> Iterator[tuple[int, float]]:
    """Yield (token id, logprob) until max_new_tokens or a stop id (which is yielded, then ends)."""
    if not prompt_ids:
        raise ValueError("prompt_ids is empty")
    sampler, stops = Sampler(sampling), frozenset(stop_ids)
    with torch.inference_mode():
        logits = step(torch.tensor([prompt_ids]))
        for n in range(max_new_tokens):
            token, logprob = sampler(logits)
            yield token, logprob
            if token in stops or n + 1 == max_new_tokens:
                return
            logits = step(torch.tensor([[token]]))


def model_step(model: ModelSlice) -> StepFn:
    """Step function of a whole model (embedding .. lm_head) with a fresh KV cache."""
    if not (model.has_embed and model.has_head):
        raise ValueError("model_step needs a slice with both the embedding and the lm_head")
    cache = model.new_cache()
    return lambda ids: model(ids, cache, last_only=True)[0, -1]
