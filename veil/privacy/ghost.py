"""``privacy.grad_sample_mode=ghost``: Opacus' fast gradient (ghost) clipping (Li et al., arXiv:2110.05679):
per-sample norms without per-sample gradients, then a second backward of the re-weighted loss. Attached as hooks is
(:class:`veil.privacy.hooks.HooksTraining`); what differs is here.

Ghost clipping cannot zero one example's gradient after the fact (its clipping coefficients mix every example in the
second backward), so an example whose loss is not finite is dropped from the batch before the backward
(:meth:`GhostTraining.drop_nonfinite`): a dropped example contributes a zero gradient, as hooks mode's
:func:`veil.privacy.hooks.zero_nonfinite_samples` does; a non-finite per-sample norm gets a zero clip factor
(:func:`veil.privacy.opacus_compat.nan_safe_clipping_coef`). A deployed node never runs ghost
(:func:`veil.privacy.modes.resolve_owner_engine` says why).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader

from veil.privacy.hooks import HooksTraining
from veil.privacy.opacus_compat import clear_captured_activations, nan_safe_clipping_coef


@dataclass
class GhostTraining(HooksTraining):
    """Opacus' ghost clipping engine (a :class:`veil.privacy.dpsgd.PrivateTraining`)."""

    grad_sample_mode: str = "ghost"
    canary_mode: str = "sum"  # no per-sample rows: a canary joins the clipped sum in p.grad, before the noise

    @staticmethod
    def _opened(out: Any) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module, DataLoader[Any]]:
        module, optimizer, criterion, loader = out  # the returned criterion does the double backward (issue 732)
        nan_safe_clipping_coef(module)
        return module, optimizer, criterion, loader

    def mean_loss(self, per_example: torch.Tensor) -> Any:
        """Opacus' two-pass loss tensor, which clips between its two backwards."""
        return DPTensorFastGradientClipping(self.module, self.optimizer, per_example, "mean")

    def drop_nonfinite(self, per_example: torch.Tensor) -> torch.Tensor | None:
        keep = torch.isfinite(per_example.detach())  # (B,)
        if bool(keep.all()):
            return None
        clear_captured_activations(self.module)  # this forward is not followed by a backward
        return keep

    def after_backward(self) -> int:
        return 0  # nothing non-finite reached the backward

    def noise_only_step(self, before_step: Callable[[], None] | None = None) -> None:
        for p in self.module.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)  # the optimizer noises p.grad, the clipped sum: here of no example
        super().noise_only_step(before_step)
