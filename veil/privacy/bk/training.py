"""``privacy.grad_sample_mode=bk`` as a DP engine (a :class:`veil.privacy.dpsgd.PrivateTraining`): book-keeping's one
backward (:class:`veil.privacy.bk.engine.BookKeeping`) under Opacus' Poisson loader and a noise-and-average optimizer
(:class:`veil.privacy.opacus_compat.FusedNoiseOptimizer`, ghost clipping's, noising in place: N(0, (sigma C)^2)
added to the clipped sum in ``p.grad``, then division by the expected batch size).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader

from veil.privacy.bk.engine import BookKeeping
from veil.privacy.exact import keep_padding_rows, make_exact
from veil.privacy.opacus_compat import FusedNoiseOptimizer


class BookKeepingLoss:
    """The batch loss the training loop calls ``backward()`` on: the mean of the per-example losses for logging,
    book-keeping's one backward of their sum (clipping is per example's own loss) for ``backward()``."""

    def __init__(self, bookkeeping: BookKeeping, per_example: torch.Tensor) -> None:
        self.bookkeeping, self.per_example = bookkeeping, per_example  # (B,)

    def detach(self) -> torch.Tensor:
        return self.per_example.detach().mean()

    def item(self) -> float:
        return float(self.detach())

    def backward(self) -> None:
        self.bookkeeping.backward(self.per_example)


class BookKeepingCriterion(nn.Module):
    """Cross-entropy of logits and labels as a :class:`BookKeepingLoss` (Opacus' ghost criterion's counterpart)."""

    def __init__(self, bookkeeping: BookKeeping) -> None:
        super().__init__()
        self.bookkeeping = bookkeeping

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> BookKeepingLoss:
        per_example = nn.functional.cross_entropy(logits, labels, reduction="none")  # (B,)
        return BookKeepingLoss(self.bookkeeping, per_example)


@dataclass
class BookKeepingTraining:
    """The book-keeping engine."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader[Any]
    criterion: nn.Module
    sample_rate: float
    steps_per_epoch: int
    bookkeeping: BookKeeping
    grad_sample_mode: str = "bk"
    canary_mode: str = "sum"  # no per-sample rows: a canary joins the clipped sum in p.grad, before the noise

    @classmethod
    def attach(cls, *, module: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader[Any],
               generator: torch.Generator, sampler_generator: torch.Generator, noise_multiplier: float,
               max_grad_norm: float, sample_rate: float | None, expected_batch_size: int | None) -> BookKeepingTraining:
        """Book-keeping hooks on ``module``, Opacus' Poisson loader, the fused noise-and-average optimizer."""
        wrapped = make_exact(module)
        bookkeeping = BookKeeping(wrapped, max_grad_norm=max_grad_norm)
        if sample_rate is None:
            loader = DPDataLoader.from_data_loader(loader)  # the loader's OS-seeded generator draws the batches
        else:
            loader = DPDataLoader(loader.dataset, sample_rate=sample_rate, generator=sampler_generator)
        rate = float(loader.sample_rate)  # type: ignore[attr-defined]
        if expected_batch_size is None:
            expected_batch_size = int(len(loader.dataset) * rate)  # type: ignore[arg-type]
        noisy = FusedNoiseOptimizer(
            optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            expected_batch_size=int(expected_batch_size), loss_reduction="mean", generator=generator,
        )
        keep_padding_rows(wrapped, noisy)
        return cls(module=wrapped, optimizer=noisy, loader=loader, criterion=BookKeepingCriterion(bookkeeping),
                   sample_rate=rate, steps_per_epoch=len(loader), bookkeeping=bookkeeping)

    def mean_loss(self, per_example: torch.Tensor) -> Any:
        return BookKeepingLoss(self.bookkeeping, per_example)

    def drop_nonfinite(self, per_example: torch.Tensor) -> torch.Tensor | None:
        return None  # book-keeping zeroes them itself, in its one backward

    def after_backward(self) -> int:
        return self.bookkeeping.take_zeroed()

    def noise_only_step(self, before_step: Callable[[], None] | None = None) -> None:
        for p in self.module.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)  # the optimizer noises p.grad, the clipped sum: here of no example
        if before_step is not None:
            before_step()
        self.optimizer.step()
