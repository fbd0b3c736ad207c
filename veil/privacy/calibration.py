"""Noise calibration: the smallest noise multiplier σ that keeps a planned DP-SGD run within a target (ε, δ).

A client that takes part in R rounds of E local epochs with Poisson rate q runs T = R·E/q subsampled-Gaussian
steps (DESIGN.md decision 5). σ is found by bisection on the accountant of :mod:`veil.privacy.accounting`
(PRV, Gopi, Lee, Wutschitz arXiv:2106.02848; RDP, Mironov arXiv:1702.07476 with the subsampled Gaussian bound
of Mironov, Talwar, Zhang arXiv:1908.10530), composed with what the data owner's ledger has already spent.
The bracket starts from the RDP calibration, which is cheap and never smaller than needed, since RDP bounds ε
from above more loosely than PRV. A result is remembered per process: the simulated clients of a round mostly plan
the same steps from the same history.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from veil.errors import ConfigError
from veil.privacy.accounting import (
    EpsilonResult,
    Event,
    _compute,
    validate_accountant,
    validate_delta,
    validate_event,
)

__all__ = ["calibrate_noise_multiplier", "planned_steps", "shared_noise_sigma"]

if TYPE_CHECKING:
    from veil.conf.schema import VeilConfig

log = logging.getLogger("veil.privacy")

_MAX_SIGMA = 1e4  # beyond this a step releases essentially nothing; needing more means the target is spent
_TOLERANCE = 0.98  # stop once ε(σ) ≥ 0.98 × target (the contract is ≥ 0.9 × target)
_MAX_ITER = 60


def planned_steps(*, rounds: int, local_epochs: int, sample_rate: float) -> int:
    """Number of DP-SGD steps a client runs: T = R · E · ⌈1/q⌉.

    Parameters
    ----------
    rounds : int
        Rounds R the client takes part in, ≥ 1.
    local_epochs : int
        Local epochs E per round, ≥ 1.
    sample_rate : float
        Poisson sampling rate q in (0, 1]; one epoch is ⌈1/q⌉ steps.
    """
    for name, value in (("rounds", rounds), ("local_epochs", local_epochs)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")
    validate_event((1.0, sample_rate, 1), where="planned_steps")
    # round() first so that 1/0.01 = 100.00000000000001 does not become 101 steps
    return rounds * local_epochs * math.ceil(round(1.0 / sample_rate, 9))


def _epsilon(history: list[Event], sigma: float, q: float, steps: int, delta: float,
             accountant: str) -> EpsilonResult:
    result, _reason = _compute([*history, (sigma, q, steps)], delta, accountant)
    return result


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    history: Iterable[Sequence[float]] = (),
) -> float:
    """Smallest σ (to within 2 % in ε) such that ``history`` + ``(σ, sample_rate, steps)`` stays within budget.

    Parameters
    ----------
    target_epsilon : float
        ε the whole composition may reach, > 0.
    delta : float
        δ in (0, 1).
    sample_rate : float
        Poisson rate q of the planned steps, in (0, 1].
    steps : int
        Planned number of steps T, ≥ 1 (see :func:`planned_steps`).
    accountant : {"prv", "rdp"}
        Accountant for the bisection (PRV falls back to RDP where unusable).
    history : iterable of (noise_multiplier, sample_rate, steps)
        Releases already on the ledger.

    Returns
    -------
    float
        σ with 0.9 × target ≤ ε(history + planned) ≤ target (≥ 0.98 × target unless the history alone is
        already close to the target).

    Raises
    ------
    veil.errors.ConfigError
        If no σ ≤ 1e4 reaches the target (the history has spent it, or the target is tiny for so many steps).
    """
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float)):
        raise TypeError(f"target_epsilon must be a number, got {target_epsilon!r}")
    if not (0 < target_epsilon < math.inf):
        raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon!r}")
    delta = validate_delta(delta)
    accountant = validate_accountant(accountant)
    _, q, steps = validate_event((1.0, sample_rate, steps), where="calibrate_noise_multiplier")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    past = [validate_event(e, where=f"history[{i}]") for i, e in enumerate(history)]
    return _calibrate(float(target_epsilon), delta, q, steps, accountant, tuple(past))


@functools.lru_cache(maxsize=256)
def _calibrate(target_epsilon: float, delta: float, q: float, steps: int, accountant: str,
               history: tuple[Event, ...]) -> float:
    """:func:`calibrate_noise_multiplier` on validated arguments (a pure function of them, so cached)."""
    past = list(history)
    spent = _compute(past, delta, accountant)[0].epsilon
    if spent >= target_epsilon:
        raise _unreachable(target_epsilon, delta, q, steps, spent)
    sigma_hi = _rdp_bracket(past, q, steps, delta, target_epsilon)
    eps_hi = _epsilon(past, sigma_hi, q, steps, delta, accountant)
    while eps_hi.epsilon > target_epsilon:  # only when RDP itself cannot reach the target below _MAX_SIGMA
        if sigma_hi >= _MAX_SIGMA:
            raise _unreachable(target_epsilon, delta, q, steps, spent)
        sigma_hi = min(2 * sigma_hi, _MAX_SIGMA)
        eps_hi = _epsilon(past, sigma_hi, q, steps, delta, accountant)
    sigma_lo = sigma_hi / 2
    while sigma_lo > 1e-3:  # the bracket from RDP is usually within a factor 2 of the answer
        eps_lo = _epsilon(past, sigma_lo, q, steps, delta, accountant)
        if eps_lo.epsilon > target_epsilon:
            break
        sigma_hi, eps_hi, sigma_lo = sigma_lo, eps_lo, sigma_lo / 2
    for _ in range(_MAX_ITER):
        if eps_hi.epsilon >= _TOLERANCE * target_epsilon or sigma_hi - sigma_lo < 1e-6 * sigma_hi:
            break
        mid = math.sqrt(sigma_lo * sigma_hi)  # geometric: ε varies over decades in σ
        eps_mid = _epsilon(past, mid, q, steps, delta, accountant)
        if eps_mid.epsilon <= target_epsilon:
            sigma_hi, eps_hi = mid, eps_mid
        else:
            sigma_lo = mid
    log.info("calibrated noise_multiplier=%.4f for %d steps at q=%g: eps=%.4f <= target %.4g at delta=%g (%s)",
             sigma_hi, steps, q, eps_hi.epsilon, target_epsilon, delta, eps_hi.accountant)
    return sigma_hi


def _unreachable(target: float, delta: float, q: float, steps: int, spent: float) -> ConfigError:
    return ConfigError(
        f"target epsilon={target:g} at delta={delta:g} is unreachable for {steps} more steps at sample rate {q:g}: "
        f"the ledger has already spent epsilon={spent:.4g}; raise the target or plan fewer rounds"
    )


def _rdp_bracket(past: list[Event], q: float, steps: int, delta: float, target: float) -> float:
    """A σ whose RDP ε (hence PRV ε) is within target: doubling then a coarse geometric bisection on RDP."""
    lo, hi = 0.0, 0.5
    while _epsilon(past, hi, q, steps, delta, "rdp").epsilon > target:
        lo, hi = hi, hi * 2
        if hi > _MAX_SIGMA:
            return _MAX_SIGMA
    for _ in range(30):
        if lo > 0 and hi / lo < 1.01:
            break
        mid = (lo + hi) / 2 if lo == 0 else math.sqrt(lo * hi)
        if _epsilon(past, mid, q, steps, delta, "rdp").epsilon > target:
            lo = mid
        else:
            hi = mid
    return hi


def shared_noise_sigma(cfg: VeilConfig) -> float:
    """The σ of a shared-noise run's sum (``privacy.share_noise``): the run's ``privacy.noise_multiplier``, or the σ
    that keeps ε at the run's δ within ``privacy.target_epsilon`` after ``federation.rounds`` single steps at the
    run's ``federation.sample_rate``. Public figures only, so every honest node and the coordinator compute the
    same one; each node adds it over sqrt(M) (:func:`veil.client.round_plan.noise_shares`)."""
    priv, fed = cfg.privacy, cfg.federation
    if priv.target_epsilon <= 0:
        return float(priv.noise_multiplier)
    return calibrate_noise_multiplier(target_epsilon=priv.target_epsilon, delta=priv.delta,
                                      sample_rate=fed.sample_rate, steps=fed.rounds, accountant=priv.accountant)
