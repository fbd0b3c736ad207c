"""DP-SGD for a Transformer classifier through Opacus (Abadi et al., "Deep Learning with Differential Privacy",
arXiv:1607.00133): Poisson sampling, per-sample clipping to C, Gaussian noise of std sigma*C per step.

This module only attaches Opacus to a model, optimizer and data loader and hands back what the training loop
needs; the loop lives in :mod:`veil.client.trainer`, the accounting in :mod:`veil.privacy.accounting`.

Two rules that protect the data owner:

* The Gaussian noise *and the Poisson sampling* are drawn from generators seeded from the OS's entropy, never
  from the run's seed: the run config comes from the coordinator, noise it could reproduce is noise it could
  subtract, and batches it could predict void the amplification by subsampling the accountant counts on.
* A per-sample gradient that is not finite is zeroed before clipping (:func:`zero_nonfinite_samples`): Opacus
  clips a NaN to a NaN, and weights crafted so that only one text overflows would otherwise turn "the update is
  NaN" into a membership test. Zeroing one example's gradient keeps the sensitivity at C.
* A wrapped model is never wrapped again (Opacus issue 608): each round wraps a fresh copy of the template model.

Full fine-tuning (trainable embeddings) goes through :mod:`veil.privacy.exact`, which makes the per-sample clipped
gradients equal a per-example loop in both supported modes ("hooks", "ghost"): explicit (B, T) position and token
type ids, and embedding samplers that respect ``padding_idx``.
"""

from __future__ import annotations

import logging
import secrets
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader

from veil.errors import ConfigError
from veil.privacy.bookkeeping import (
    BookKeeping, BookKeepingCriterion, BookKeepingLoss, BookKeepingOptimizer, unsupported_layer,
)
from veil.privacy.exact import inexact_layer, install_samplers, keep_padding_rows, make_exact
from veil.privacy.modes import resolve_grad_sample_mode

log = logging.getLogger("veil.privacy")
# A frozen encoder under a trained head (model.tuning=head): the head's input needs no gradient, and torch says so at
# every backward through Opacus' hooks. Expected, harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to "
                        "module outputs since no inputs require gradients")


@dataclass
class PrivateTraining:
    """What the training loop needs after Opacus is attached."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    criterion: nn.Module
    sample_rate: float  # Poisson rate q = 1 / len(loader)
    steps_per_epoch: int  # = len(loader): one subsampled-Gaussian release each
    grad_sample_mode: str = "hooks"
    bookkeeping: BookKeeping | None = None  # grad_sample_mode="bk" only

    def mean_loss(self, per_example: torch.Tensor) -> Any:
        """The batch loss to call ``backward()`` on, from the (B,) per-example losses (the mean, as Opacus expects;
        in ghost mode Opacus' two-pass loss tensor, which clips in between; in bk mode book-keeping's one pass)."""
        if self.bookkeeping is not None:
            return BookKeepingLoss(self.bookkeeping, per_example)
        if self.grad_sample_mode != "ghost":
            return per_example.mean()
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        return DPTensorFastGradientClipping(self.module, self.optimizer, per_example, "mean")  # type: ignore[arg-type]


def make_private(*, module: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                 noise_multiplier: float, max_grad_norm: float, grad_sample_mode: str = "hooks",
                 device: torch.device | None = None, sample_rate: float | None = None,
                 expected_batch_size: int | None = None) -> PrivateTraining:
    """Attach Opacus DP-SGD (Poisson sampling, flat clipping, mean loss) to ``module``/``optimizer``/``loader``.

    ``grad_sample_mode`` is "hooks" (per-sample gradients), "ghost" (ghost clipping: per-sample norms, a second
    backward), "bk" (book-keeping: one backward, :mod:`veil.privacy.bookkeeping`) or "auto" (the fastest exact one
    for this model, :mod:`veil.privacy.modes`).
    The returned ``module`` is called as ``module(input_ids=..., attention_mask=...)`` either way.

    ``sample_rate`` fixes the Poisson rate q (default: Opacus' 1 / number of batches of ``loader``) and
    ``expected_batch_size`` the divisor of every noisy sum (default: Opacus' ⌊N·q⌋). Both are fixed before any batch
    is drawn, in every engine: the noisy sum is never divided by the batch actually drawn (arXiv 2605.15648).
    """
    grad_sample_mode = resolve_grad_sample_mode(grad_sample_mode, module)  # "auto": the faster exact mode
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier={noise_multiplier} must be >= 0")
    if max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm={max_grad_norm} must be > 0")
    reason = inexact_layer(module, grad_sample_mode=grad_sample_mode)
    if reason is None and grad_sample_mode == "bk":
        reason = unsupported_layer(module)
    if reason is not None:  # never train with per-sample gradients that are not the true ones
        raise ConfigError(reason)
    generator = os_generator(device or "cpu")  # noise the coordinator cannot reproduce
    # Opacus' Poisson sampler falls back to the loader's generator (secure_mode off): give it one of its own,
    # seeded from the OS, so that nobody who knows the run's seed knows the batches.
    loader = DataLoader(loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn,
                        generator=os_generator("cpu"))
    if grad_sample_mode == "bk":
        return _make_bookkeeping(module=module, optimizer=optimizer, loader=loader, generator=generator,
                                 noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                 sample_rate=sample_rate, expected_batch_size=expected_batch_size)
    with warnings.catch_warnings():
        # Opacus warns that its secure_mode (torchcsprng) is off; what it guards against, a generator the run could
        # reproduce, is handled here: the sampler and the noise both get OS-seeded generators (tests pin both).
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        engine = PrivacyEngine(accountant="prv")  # veil accounts in its own ledger; this one is unused
    criterion: nn.Module = nn.CrossEntropyLoss()
    out = engine.make_private(
        module=make_exact(module), optimizer=optimizer, criterion=criterion, data_loader=loader,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, poisson_sampling=True,
        grad_sample_mode=grad_sample_mode, noise_generator=generator,
    )
    if grad_sample_mode == "ghost":
        module, optimizer, criterion, loader = out  # the returned criterion does the double backward (issue 732)
        _nan_safe_ghost_coef(module)
    else:
        module, optimizer, loader = out
    if sample_rate is not None:
        loader = DPDataLoader(loader.dataset, sample_rate=sample_rate, generator=os_generator("cpu"))
    if expected_batch_size is not None:
        optimizer.expected_batch_size = int(expected_batch_size)  # type: ignore[attr-defined]
    install_samplers(module)  # padding-aware, layout-safe embedding samplers for this wrapped model only
    keep_padding_rows(module, optimizer)  # no noise on rows nn.Embedding never updates (post-processing)
    return PrivateTraining(
        module=module, optimizer=optimizer, loader=loader, criterion=criterion,
        sample_rate=loader.sample_rate, steps_per_epoch=len(loader), grad_sample_mode=grad_sample_mode,
    )


def _make_bookkeeping(*, module: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                      generator: torch.Generator, noise_multiplier: float, max_grad_norm: float,
                      sample_rate: float | None, expected_batch_size: int | None) -> PrivateTraining:
    """Book-keeping with Opacus' Poisson loader and its noise-and-average optimizer (ghost clipping's, noising in
    place: N(0, (sigma C)^2) added to the clipped sum in ``p.grad``, then division by the expected batch size)."""
    wrapped = make_exact(module)
    bookkeeping = BookKeeping(wrapped, max_grad_norm=max_grad_norm)
    if sample_rate is None:
        loader = DPDataLoader.from_data_loader(loader)  # the loader's OS-seeded generator draws the batches
    else:
        loader = DPDataLoader(loader.dataset, sample_rate=sample_rate, generator=os_generator("cpu"))
    sample_rate = loader.sample_rate
    if expected_batch_size is None:
        expected_batch_size = int(len(loader.dataset) * sample_rate)  # type: ignore[arg-type]
    optimizer = BookKeepingOptimizer(
        optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        expected_batch_size=int(expected_batch_size), loss_reduction="mean",
        generator=generator,
    )
    keep_padding_rows(wrapped, optimizer)
    return PrivateTraining(
        module=wrapped, optimizer=optimizer, loader=loader, criterion=BookKeepingCriterion(bookkeeping),
        sample_rate=sample_rate, steps_per_epoch=len(loader), grad_sample_mode="bk", bookkeeping=bookkeeping,
    )


def _nan_safe_ghost_coef(module: nn.Module) -> None:
    """Ghost clipping's clip factors with a non-finite per-sample norm set to 0 (review N3b): Opacus computes
    ``C / (nan + 1e-6)`` = nan, which turns the whole second backward, and the update, into NaN or zeros."""
    original = module.get_clipping_coef  # type: ignore[operator]

    def get_clipping_coef() -> torch.Tensor:
        coef = original()  # (B,)
        return torch.where(torch.isfinite(coef), coef, torch.zeros_like(coef))

    module.get_clipping_coef = get_clipping_coef  # type: ignore[method-assign]


def os_generator(device: torch.device | str) -> torch.Generator:
    """A torch generator seeded with 63 bits from the OS's entropy (``secrets``)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63))
    return generator


def zero_nonfinite_samples(module: nn.Module) -> int:
    """Zero, in every trainable parameter, the per-sample gradient rows of examples whose gradient is not finite.

    Call between ``loss.backward()`` and ``optimizer.step()`` in hooks mode. Returns how many examples were
    zeroed (for the node's own log only: the count depends on the data).
    """
    params = [p for p in module.parameters()
              if p.requires_grad and isinstance(getattr(p, "grad_sample", None), torch.Tensor)]
    bad: torch.Tensor | None = None
    for p in params:
        rows = ~torch.isfinite(p.grad_sample.reshape(p.grad_sample.shape[0], -1)).all(dim=1)  # (B,)
        bad = rows if bad is None else bad | rows
    if bad is None or not bool(bad.any()):
        return 0
    for p in params:
        p.grad_sample[bad] = 0.0
    return int(bad.sum())


def clear_captured_activations(module: nn.Module) -> None:
    """Drop the activations Opacus' hooks captured in a forward pass that will not be followed by a backward."""
    for sub in module.modules():
        if isinstance(getattr(sub, "activations", None), list):
            sub.activations.clear()
    for p in module.parameters():
        if hasattr(p, "_forward_counter"):  # Opacus counts forwards per parameter until their backward
            p._forward_counter = 0
