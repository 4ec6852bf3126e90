"""Accuracy of a lossy setting against the exact fp32 model: teacher-forced greedy-token
agreement and mean KL(reference || candidate) over every position of a text."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from coinfer.model.llama import ModelSlice


@dataclass(frozen=True)
class Agreement:
    agreement: float  # fraction of positions whose argmax token equals the reference's
    mean_kl: float  # nats per position
    positions: int


def full_logits(ids: list[int], *slices: ModelSlice) -> torch.Tensor:
    """Logits [T, V] of ids through consecutive slices (head then tail, or one whole model), f32 in between."""
    x = torch.tensor([ids])
    with torch.inference_mode():
        for s in slices:
            x = s(x).float()
    return x[0]


def decode_logits(ids: list[int], model: ModelSlice) -> torch.Tensor:
    """Logits [T, V] of a whole model fed ids one token at a time: the decode path (a compiled
    model's compiled step), where full_logits runs one prefill."""
    cache, rows = model.new_cache(), []
    with torch.inference_mode():
        for t in ids:
            rows.append(model(torch.tensor([[t]]), cache)[0, -1].float())
    return torch.stack(rows)


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> Agreement:
    """reference, candidate: logits [T, V]."""
    ref_lp, cand_lp = F.log_softmax(reference.float(), -1), F.log_softmax(candidate.float(), -1)
    agree = (reference.argmax(-1) == candidate.argmax(-1)).float().mean().item()
    kl = F.kl_div(cand_lp, ref_lp, log_target=True, reduction="none").sum(-1).mean().item()
    return Agreement(agree, kl, reference.shape[0])
