"""The autoregressive loop and its finish rule, shared by every place that generates: the local
`coinfer generate` and benchmarks (generate), the device generating alone (device_agent's
Engine, through decode_loop) and the edge's session (finish_reason, inside its streamed loop).

Why one rule: a stop id must end a generation the same way on the device and on the edge (it is
emitted, then "stop", and wins over the length), or a request's finish reason, its token count
and what the edge keeps for the next turn would depend on where it ran.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Iterator

import torch

from coinfer.model.llama import ModelSlice
from coinfer.model.sampling import Sampler, SamplingParams

# ids [1, T] -> logits [V] of the last position; advances whatever caches sit behind it
StepFn = Callable[[torch.Tensor], torch.Tensor]
# the ids not yet fed (the prompt, then the last token) -> (next token id, its logprob)
NextToken = Callable[[list[int]], tuple[int, float]]


def finish_reason(token: int, generated: int, max_new: int, stop_ids: Container[int]) -> str | None:
    """Why generation ends after `token`, the `generated`-th new token: "stop" on a stop id (the
    token is still emitted), "length" once `max_new` tokens are out, None to go on."""
    if token in stop_ids:
        return "stop"
    if generated >= max_new:
        return "length"
    return None


def decode_loop(
    next_token: NextToken, prompt_ids: list[int], max_new: int, stop_ids: Container[int] = ()
) -> Iterator[tuple[int, float, str | None]]:
    """Yield (token id, logprob, finish reason or None) until finish_reason ends it. `next_token`
    gets the prompt first, then one token a call: it owns the caches, the model and the sampler."""
    ids = list(prompt_ids)
    for generated in range(1, max_new + 1):
        token, logprob = next_token(ids)
        finish = finish_reason(token, generated, max_new, stop_ids)
        yield token, logprob, finish
        if finish:
            return
        ids = [token]


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
    sampler = Sampler(sampling)
    with torch.inference_mode():
        for token, logprob, _ in decode_loop(
            lambda ids: sampler(step(torch.tensor([ids]))), prompt_ids, max_new_tokens, frozenset(stop_ids)
        ):
            yield token, logprob


def model_step(model: ModelSlice) -> StepFn:
    """Step function of a whole model (embedding .. lm_head) with a fresh KV cache."""
    if not (model.has_embed and model.has_head):
        raise ValueError("model_step needs a slice with both the embedding and the lm_head")
    cache = model.new_cache()
    return lambda ids: model(ids, cache, last_only=True)[0, -1]
