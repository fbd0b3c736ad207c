"""``privacy.grad_sample_mode=hooks``: Opacus' per-sample gradients (its ``GradSampleModule`` hooks, Abadi et al.,
arXiv:1607.00133), clipped, summed and noised by its ``DPOptimizer``. Also the Opacus attachment that ghost clipping
(:mod:`veil.privacy.ghost`) shares.

A per-sample gradient that is not finite is zeroed before clipping (:func:`zero_nonfinite_samples`), so one crafted
example contributes nothing instead of turning the update into NaN.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader

from veil.privacy.exact import install_samplers, keep_padding_rows, make_exact


@dataclass
class HooksTraining:
    """Opacus' hooks engine (a :class:`veil.privacy.dpsgd.PrivateTraining`)."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader[Any]
    criterion: nn.Module
    sample_rate: float
    steps_per_epoch: int
    grad_sample_mode: str = "hooks"
    canary_mode: str = "rows"  # a canary is one more row of p.grad_sample, clipped and summed with the batch's

    @classmethod
    def attach(cls, *, module: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader[Any],
               generator: torch.Generator, sampler_generator: torch.Generator, noise_multiplier: float,
               max_grad_norm: float, sample_rate: float | None, expected_batch_size: int | None) -> HooksTraining:
        """Opacus' ``make_private`` in this engine's mode, with veil's OS-seeded generators (``generator`` for the
        noise, ``sampler_generator`` for the Poisson sampler when ``sample_rate`` fixes q), the exactness fixes of
        :mod:`veil.privacy.exact`, and the fixed divisor ``expected_batch_size`` when given."""
        with warnings.catch_warnings():
            # Opacus warns that its secure_mode (torchcsprng) is off; what it guards against, a generator the run could
            # reproduce, is handled here: the sampler and the noise both get OS-seeded generators (tests pin both).
            warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
            engine = PrivacyEngine(accountant="prv")  # Opacus requires one; veil accounts in its own ledger
        out = engine.make_private(
            module=make_exact(module), optimizer=optimizer, criterion=nn.CrossEntropyLoss(), data_loader=loader,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, poisson_sampling=True,
            grad_sample_mode=cls.grad_sample_mode, noise_generator=generator,
        )
        module, optimizer, criterion, loader = cls._opened(out)
        if sample_rate is not None:
            loader = DPDataLoader(loader.dataset, sample_rate=sample_rate, generator=sampler_generator)
        if expected_batch_size is not None:
            optimizer.expected_batch_size = int(expected_batch_size)  # type: ignore[attr-defined]
        install_samplers(module)  # padding-aware, layout-safe embedding samplers for this wrapped model only
        keep_padding_rows(module, optimizer)  # no noise on rows nn.Embedding never updates (post-processing)
        return cls(module=module, optimizer=optimizer, loader=loader, criterion=criterion,
                   sample_rate=loader.sample_rate, steps_per_epoch=len(loader))  # type: ignore[attr-defined]

    @staticmethod
    def _opened(out: Any) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module, DataLoader[Any]]:
        """Opacus' ``make_private`` result as (module, optimizer, criterion, loader)."""
        module, optimizer, loader = out
        return module, optimizer, nn.CrossEntropyLoss(), loader

    def mean_loss(self, per_example: torch.Tensor) -> Any:
        return per_example.mean()  # (B,) -> scalar, as Opacus expects

    def drop_nonfinite(self, per_example: torch.Tensor) -> torch.Tensor | None:
        return None  # zeroed after the backward, per example (after_backward)

    def after_backward(self) -> int:
        return zero_nonfinite_samples(self.module)

    def noise_only_step(self, before_step: Callable[[], None] | None = None) -> None:
        for p in self.module.parameters():
            if p.requires_grad:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # type: ignore[attr-defined]
        if before_step is not None:
            before_step()
        self.optimizer.step()


def zero_nonfinite_samples(module: nn.Module) -> int:
    """Zero, in every trainable parameter, the per-sample gradient rows of examples whose gradient is not finite.

    Call between ``loss.backward()`` and ``optimizer.step()`` in hooks mode. Returns how many examples were
    zeroed (for the node's own log only: the count depends on the data).
    """
    samples = [s for p in module.parameters()
               if p.requires_grad and isinstance(s := getattr(p, "grad_sample", None), torch.Tensor)]  # (B, ...) each
    bad: torch.Tensor | None = None
    for s in samples:
        rows = ~torch.isfinite(s.reshape(s.shape[0], -1)).all(dim=1)  # (B,)
        bad = rows if bad is None else bad | rows
    if bad is None or not bool(bad.any()):
        return 0
    for s in samples:
        s[bad] = 0.0
    return int(bad.sum())
