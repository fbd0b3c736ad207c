"""DP-SGD for a Transformer through Opacus (Abadi et al., "Deep Learning with Differential Privacy",
arXiv:1607.00133): Poisson sampling, per-sample clipping to C, Gaussian noise of std sigma*C per step.

:func:`make_private` attaches one DP engine to a model, optimizer and data loader and hands back one object,
a :class:`PrivateTraining`, that the training loop (:mod:`veil.client.trainer`) calls without knowing which engine it
is: ``hooks`` (:mod:`veil.privacy.hooks`), ``ghost`` (:mod:`veil.privacy.ghost`) or ``bk`` (book-keeping,
:mod:`veil.privacy.bk`). The accounting lives in :mod:`veil.privacy.accounting`; every private Opacus name the engines
need, in :mod:`veil.privacy.opacus_compat`.

Rules that protect the data owner, in every engine:

* The Gaussian noise *and the Poisson sampling* are drawn from generators seeded from the OS's entropy, never
  from the run's seed: the run config comes from the coordinator, noise it could reproduce is noise it could
  subtract, and batches it could predict void the amplification by subsampling the accountant counts on.
* A per-sample gradient that is not finite contributes zero (:meth:`PrivateTraining.after_backward`,
  :meth:`PrivateTraining.drop_nonfinite`): Opacus clips a NaN to a NaN, and weights crafted so that only one text
  overflows would otherwise turn "the update is NaN" into a membership test. Zeroing one example's gradient keeps the
  sensitivity at C.
* An empty Poisson batch still releases the noise (:meth:`PrivateTraining.noise_only_step`).
* The noisy sum is divided by a divisor fixed before any batch is drawn, never by the batch drawn (arXiv 2605.15648).
* A wrapped model is never wrapped again (Opacus issue 608): each round wraps a fresh copy of the template model.

Full fine-tuning (trainable embeddings) goes through :mod:`veil.privacy.exact`, which makes the per-sample clipped
gradients equal a per-example loop in every mode: explicit (B, T) position and token type ids, and embedding samplers
that respect ``padding_idx``.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from veil.errors import ConfigError
from veil.privacy.bk import unsupported_layer
from veil.privacy.bk.training import BookKeepingTraining
from veil.privacy.exact import inexact_layer
from veil.privacy.ghost import GhostTraining
from veil.privacy.hooks import HooksTraining
from veil.privacy.modes import resolve_grad_sample_mode
from veil.privacy.opacus_compat import require_tested_opacus

# A frozen encoder under a trained head (model.tuning=head): the head's input needs no gradient, and torch says so at
# every backward through Opacus' hooks. Expected, harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to "
                        "module outputs since no inputs require gradients")


class PrivateTraining(Protocol):
    """One DP engine attached to a model, optimizer and loader: everything the training loop calls, the same for
    every engine. A step is ``mean_loss`` (or ``noise_only_step`` for an empty batch), ``backward()``,
    ``after_backward``, ``optimizer.step()``."""

    module: nn.Module  # called as module(input_ids=..., attention_mask=...)
    optimizer: torch.optim.Optimizer  # its step() clips (hooks), noises and divides by the expected batch size
    loader: DataLoader[Any]  # Poisson batches, drawn from an OS-seeded generator
    criterion: nn.Module
    sample_rate: float  # Poisson rate q
    steps_per_epoch: int  # = len(loader): one subsampled-Gaussian release each
    grad_sample_mode: str  # hooks | ghost | bk
    canary_mode: str  # where an audit's canary gradient goes: "rows" (p.grad_sample) or "sum" (p.grad, clipped sum)

    def mean_loss(self, per_example: torch.Tensor) -> Any:
        """The batch loss to call ``backward()`` on, from the (B,) per-example losses; ``.detach()`` gives its mean."""

    def drop_nonfinite(self, per_example: torch.Tensor) -> torch.Tensor | None:
        """The (B,) mask of examples to keep when this engine must drop the examples whose loss is not finite before
        the backward (forgetting this forward: the loop runs the kept ones again); None to go on with all of them."""

    def after_backward(self) -> int:
        """Zero the examples whose gradient is not finite; how many (for the node's own log only)."""

    def noise_only_step(self, before_step: Callable[[], None] | None = None) -> None:
        """Release a step with no example (an empty Poisson batch): zero gradients, ``before_step``, the noisy step."""


def make_private(*, module: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader[Any],
                 noise_multiplier: float, max_grad_norm: float, grad_sample_mode: str = "hooks",
                 device: torch.device | None = None, sample_rate: float | None = None,
                 expected_batch_size: int | None = None) -> PrivateTraining:
    """Attach DP-SGD (Poisson sampling, flat clipping, mean loss) to ``module``/``optimizer``/``loader``.

    ``grad_sample_mode`` is "hooks" (per-sample gradients), "ghost" (ghost clipping: per-sample norms, a second
    backward), "bk" (book-keeping: one backward, :mod:`veil.privacy.bk`) or "auto" (the fastest exact one
    for this model, :mod:`veil.privacy.modes`).
    The returned ``module`` is called as ``module(input_ids=..., attention_mask=...)`` either way.

    ``sample_rate`` fixes the Poisson rate q (default: Opacus' 1 / number of batches of ``loader``) and
    ``expected_batch_size`` the divisor of every noisy sum (default: Opacus' ⌊N·q⌋). Both are fixed before any batch
    is drawn, in every engine: the noisy sum is never divided by the batch actually drawn (arXiv 2605.15648).
    """
    require_tested_opacus()
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
    # Opacus' Poisson sampler falls back to the loader's generator (secure_mode off): give it one of its own,
    # seeded from the OS, so that nobody who knows the run's seed knows the batches.
    loader = DataLoader(loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn,
                        generator=os_generator("cpu"))
    return ENGINES[grad_sample_mode](
        module=module, optimizer=optimizer, loader=loader, generator=os_generator(device or "cpu"),
        sampler_generator=os_generator("cpu"), noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        sample_rate=sample_rate, expected_batch_size=expected_batch_size)


ENGINES: dict[str, Callable[..., PrivateTraining]] = {  # each exact mode's attach (modes.MODES names them)
    "hooks": HooksTraining.attach, "ghost": GhostTraining.attach, "bk": BookKeepingTraining.attach,
}


def os_generator(device: torch.device | str) -> torch.Generator:
    """A torch generator seeded with 63 bits from the OS's entropy (``secrets``)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63))
    return generator
