"""Independent references the tests check veil against: dp-accounting's PLD accountant, and a per-example loop
for clipped gradients. Nothing here imports veil's privacy code."""

from __future__ import annotations

import dp_accounting
import torch
from dp_accounting.pld import pld_privacy_accountant
from torch import nn


def pld_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Reference: dp-accounting's PLD accountant on the same Poisson-subsampled Gaussian events."""
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:  # composing k then m equal events is composing k + m of them
        merged[(sigma, q)] = merged.get((sigma, q), 0) + steps
    accountant = pld_privacy_accountant.PLDAccountant()
    for (sigma, q), steps in merged.items():
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return float(accountant.get_epsilon(delta))


def clipped_mean_gradient(model: nn.Module, batch: dict[str, torch.Tensor], *, clip: float) -> list[torch.Tensor]:
    """Per-example loop with plain autograd: clip each example's whole gradient to ``clip``, average."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    n = batch["labels"].shape[0]
    for i in range(n):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["input_ids"][i : i + 1], attention_mask=batch["attention_mask"][i : i + 1]).logits
        nn.functional.cross_entropy(logits, batch["labels"][i : i + 1]).backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        factor = torch.clamp(clip / (norm + 1e-6), max=1.0)
        for t, g in zip(total, grads, strict=True):
            t += g * factor
    return [t / n for t in total]
