"""Independent references the tests check veil against: dp-accounting's PLD accountant, and a per-example loop
for clipped gradients. Nothing here imports veil's privacy code."""

from __future__ import annotations

from collections.abc import Callable

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


def _cross_entropy(model: nn.Module, one: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=one["input_ids"], attention_mask=one["attention_mask"]).logits
    return nn.functional.cross_entropy(logits, one["labels"])


def clipped_mean_gradient(model: nn.Module, batch: dict[str, torch.Tensor], *, clip: float,
                          loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] = _cross_entropy,
                          ) -> list[torch.Tensor]:
    """Per-example loop with plain autograd: clip each example's whole gradient to ``clip``, average.
    ``loss`` gives one example's scalar loss (default: cross-entropy of a classifier's logits)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    n = batch["labels"].shape[0]
    for i in range(n):
        model.zero_grad(set_to_none=True)
        loss(model, {k: v[i : i + 1] for k, v in batch.items()}).backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        factor = torch.clamp(clip / (norm + 1e-6), max=1.0)
        for t, g in zip(total, grads, strict=True):
            t += g * factor
    return [t / n for t in total]
