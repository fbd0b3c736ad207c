"""Every private Opacus name veil uses, in one module, behind a check of ``opacus.__version__``.

veil's DP engines (:mod:`veil.privacy.dpsgd`) use Opacus' public API: ``PrivacyEngine.make_private``, ``DPDataLoader``,
the ``DPOptimizer`` family, ``DPTensorFastGradientClipping``, its grad samplers. Four things they need have no public
API in Opacus 1.6; each is one named piece here, so a new Opacus release is checked in one file:

1. :func:`clear_captured_activations`: ghost clipping drops an example whose loss is not finite and runs the forward
   again without it, so the first forward must leave nothing behind. Opacus' hooks keep what they captured in
   ``module.activations`` and count forwards per parameter in ``p._forward_counter`` until their backward.
2. :func:`shadow_samplers` and :func:`grad_samplers`: veil's padding-aware embedding samplers and its bias-less
   LayerNorm sampler (:mod:`veil.privacy.exact`, traps 3 and 4) must apply to one wrapped model only, never globally.
   ``GradSampleModule`` looks samplers up as ``self.GRAD_SAMPLERS[type(module)]`` (``self.NORM_SAMPLERS`` for ghost
   norms) at backward time, so an instance attribute shadows the class registry for that one model. Book-keeping
   reads the same class registry for its small layers.
3. :class:`FusedNoiseOptimizer`: Opacus' optimizer for gradients already clipped and summed in ``p.grad`` (ghost
   clipping's), with the noise and the division by the expected batch size done in one pass over each gradient.
   It overrides ``accumulate``/``add_noise``/``scale_grad`` and so handles ``p.summed_grad``,
   ``_check_processed_flag``, ``_mark_as_processed`` and ``_adjusted_noise_multiplier`` as Opacus' own code does.
   Departs on purpose from Opacus' named ``clip_and_accumulate -> add_noise -> scale_grad``: ``scale_grad`` is folded
   into ``add_noise`` (benchmark dp_overhead measures the gain).
4. :func:`nan_safe_clipping_coef`: ghost clipping's clip factors with a non-finite per-sample norm set to 0.

**An untested Opacus fails; it does not warn.** These names carry the privacy guarantee, not only the speed:
``_check_processed_flag`` / ``_mark_as_processed`` are what stops a gradient being noised twice or not at all, and a
change to how ``pre_step`` treats ``summed_grad`` could release a sum without its noise. A warning in a node's log
would let that run; the fix (install a tested Opacus) is one command. :func:`require_tested_opacus` raises
:class:`veil.errors.DependencyError`, one line naming the installed version and the tested set; every piece here calls
it, and :func:`veil.privacy.dpsgd.make_private` calls it before attaching anything. To add a version: read the four
pieces against its source, run tests/test_dp_exact*.py, tests/test_bookkeeping.py, tests/test_engine_bound.py and
tests/test_opacus_compat.py, then add it to :data:`TESTED_OPACUS`.

Upstream proposal (public APIs that would retire this module): docs/upstream/opacus/internals.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import opacus
import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

from veil.errors import DependencyError

TESTED_OPACUS = ("1.6.0",)  # the Opacus releases whose internals these pieces were read against and tested on

Sampler = Callable[..., dict[nn.Parameter, torch.Tensor]]  # (layer, activations, backprops) -> {param: (B, ...)}


def require_tested_opacus() -> str:
    """The installed Opacus version; :class:`DependencyError` (one line) when it is not in :data:`TESTED_OPACUS`."""
    version = str(getattr(opacus, "__version__", "?"))
    if version not in TESTED_OPACUS:
        raise DependencyError(f"opacus {version} is installed, but veil's DP engines use Opacus internals tested on "
                              f"opacus {', '.join(TESTED_OPACUS)} only; install one of those "
                              f"(pip install opacus=={TESTED_OPACUS[-1]})")
    return version


def clear_captured_activations(module: nn.Module) -> None:
    """Drop the activations Opacus' hooks captured in a forward pass that will not be followed by a backward."""
    require_tested_opacus()
    for sub in module.modules():
        captured = getattr(sub, "activations", None)
        if isinstance(captured, list):
            captured.clear()
    for p in module.parameters():
        if hasattr(p, "_forward_counter"):  # Opacus counts forwards per parameter until their backward
            p._forward_counter = 0


def grad_samplers() -> dict[type[nn.Module], Sampler]:
    """Opacus' per-sample gradient samplers by layer type (a copy of ``GradSampleModule``'s class registry)."""
    require_tested_opacus()
    return dict(GradSampleModule.GRAD_SAMPLERS)


def shadow_samplers(grad_sample_module: nn.Module, *, grad: dict[type[nn.Module], Sampler],
                    norm: dict[type[nn.Module], Sampler]) -> None:
    """Use ``grad`` (per-sample gradients) and ``norm`` (ghost clipping's per-sample norms) for this one Opacus
    grad-sample module: instance attributes over the class registries, which stay untouched."""
    require_tested_opacus()
    for attr, fns in (("GRAD_SAMPLERS", grad), ("NORM_SAMPLERS", norm)):
        registry = getattr(type(grad_sample_module), attr, None)
        if registry is not None:
            object.__setattr__(grad_sample_module, attr, {**registry, **fns})


def nan_safe_clipping_coef(module: nn.Module) -> None:
    """Ghost clipping's clip factors with a non-finite per-sample norm set to 0 on this wrapped module: Opacus computes
    ``C / (nan + 1e-6)`` = nan, which turns the whole second backward, and the update, into NaN or zeros."""
    require_tested_opacus()
    original: Callable[[], torch.Tensor] = getattr(module, "get_clipping_coef")

    def get_clipping_coef() -> torch.Tensor:
        coef = original()  # (B,)
        return torch.where(torch.isfinite(coef), coef, torch.zeros_like(coef))

    setattr(module, "get_clipping_coef", get_clipping_coef)


class FusedNoiseOptimizer(DPOptimizerFastGradientClipping):  # type: ignore[misc]
    """Opacus' optimizer for gradients already clipped and summed in ``p.grad`` (the one ghost clipping uses: noise
    of std ``sigma C``, then division by the expected batch size), with the noise and the division done in one pass
    over each gradient instead of Opacus' two copies and a division (benchmark dp_overhead):
    ``(sum + N(0, (sigma C)^2)) / B`` is drawn as ``N(0, (sigma C / B)^2) + sum / B``, the same distribution from
    the same generator (veil's OS-seeded one). Used by book-keeping (:mod:`veil.privacy.bk`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        require_tested_opacus()
        super().__init__(*args, **kwargs)

    def accumulate(self) -> None:
        for p in self.params:
            p.summed_grad = p.grad if p.summed_grad is None else p.summed_grad.add_(p.grad)

    def add_noise(self) -> None:
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
        scale = 1.0 / (self.expected_batch_size * self.accumulated_iterations) if self.loss_reduction == "mean" else 1.0
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            if std > 0:  # one pass: noise * 1 + summed * scale, written into the noise
                noise = torch.empty_like(p.summed_grad).normal_(0.0, std * scale, generator=self.generator)
                p.summed_grad = noise.add_(p.summed_grad, alpha=scale)
            elif scale != 1.0:
                p.summed_grad.mul_(scale)
            p.grad = p.summed_grad.view_as(p)
            _mark_as_processed(p.summed_grad)

    def scale_grad(self) -> None:
        """Done in :meth:`add_noise` (Opacus' ``pre_step`` calls it right after)."""
