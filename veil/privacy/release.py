"""What a node releases when its training gives nothing usable: noise of the declared std, never zeros.

DP-SGD (Abadi et al., arXiv:1607.00133) releases, at every step, the clipped sum of the sampled examples' gradients
plus N(0, (σC)²), divided by a *fixed* expected batch size (never the batch actually drawn: arXiv 2605.15648 shows
that the realised size leaks). A step on an empty Poisson batch releases the noise alone. This module builds that
noise-only release for a whole round, for the cases where the node has no usable example (no row with a label of
the run's set) or where training ended in a non-finite update (weights crafted to overflow on one record): the
update sent is then exactly what ``steps`` empty batches would have produced, so the coordinator cannot tell it
from an ordinary noisy round, and the reply (weight 1, the same fields) is unchanged.

A non-finite release would otherwise be an oracle: zeros (what ``nan_to_num`` makes of it) are recognisable, and
"the update is zero" says "a record overflowed". Replacing it with fresh noise is post-processing with fresh
randomness, so it costs no privacy beyond the round the ledger already booked.

:func:`nan_safe_norm` is the one L2 norm for clipping whole updates: non-finite in, ``inf`` out, so the clip factor
``min(1, C / norm)`` is 0 (the contribution is dropped), never ``min(1, C / nan) = 1`` (clipping switched off).
What this module does *not* protect against: a release whose values are finite but whose magnitude is set by the
data beyond the clip bound; that is the DP engines' job (:mod:`veil.privacy.dpsgd`, tested against the bound).
"""

from __future__ import annotations

import math
import secrets

import numpy as np
import torch

__all__ = ["all_finite", "nan_safe_norm", "noise_only_update", "noise_arrays"]


def nan_safe_norm(arrays: list[np.ndarray]) -> float:
    """L2 norm of all values of ``arrays`` in float64; ``inf`` when any value is not finite."""
    total = 0.0
    for a in arrays:
        a64 = np.asarray(a, dtype=np.float64)
        if not np.isfinite(a64).all():
            return math.inf
        total += float(np.sum(np.square(a64)))
    return math.sqrt(total) if math.isfinite(total) else math.inf


def all_finite(arrays: list[np.ndarray]) -> bool:
    """True when every value of every array is finite."""
    return all(bool(np.isfinite(np.asarray(a)).all()) for a in arrays)


def noise_arrays(shapes: list[tuple[int, ...]], *, std: float) -> list[np.ndarray]:
    """Fresh i.i.d. N(0, std²) arrays of ``shapes`` (float32), from a generator seeded by the OS's entropy."""
    if not std >= 0:
        raise ValueError(f"std={std} must be >= 0")
    rng = np.random.default_rng(secrets.randbits(128))
    return [rng.normal(0.0, std, size=shape).astype(np.float32) for shape in shapes]


def noise_only_update(received: list[np.ndarray], *, steps: int, noise_multiplier: float, max_grad_norm: float,
                      expected_batch_size: int, optimizer: str, lr: float) -> list[np.ndarray]:
    """The update ``steps`` DP-SGD steps on empty batches give: each step's gradient is N(0, (σC)²) / E[B]
    (Opacus' noise on a zero clipped sum, divided by the fixed expected batch size), applied by the round's
    optimizer (``"sgd"`` or ``"adamw"``, weight decay 0, as :mod:`veil.client.trainer` builds it)
    to a copy of ``received``; returns trained − received (float32)."""
    if steps < 0 or expected_batch_size < 1:
        raise ValueError(f"steps={steps} must be >= 0 and expected_batch_size={expected_batch_size} >= 1")
    if not (noise_multiplier >= 0 and max_grad_norm > 0):
        raise ValueError(f"noise_multiplier={noise_multiplier} must be >= 0 and max_grad_norm={max_grad_norm} > 0")
    params = [torch.tensor(np.asarray(a, dtype=np.float32), requires_grad=True) for a in received]
    opt: torch.optim.Optimizer = (torch.optim.SGD(params, lr=lr) if optimizer == "sgd"
                                  else torch.optim.AdamW(params, lr=lr, weight_decay=0.0))
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    std = noise_multiplier * max_grad_norm / expected_batch_size
    for _ in range(steps):
        for p in params:
            p.grad = torch.empty_like(p).normal_(0.0, std, generator=generator) if std > 0 else torch.zeros_like(p)
        opt.step()
    return [(p.detach().numpy() - np.asarray(r, dtype=np.float32)).astype(np.float32)
            for p, r in zip(params, received, strict=True)]
