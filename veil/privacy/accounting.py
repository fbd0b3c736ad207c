"""Privacy accounting for DP-SGD: ε of a composition of Poisson-subsampled Gaussian steps.

Pure functions over a *history* ``[(noise_multiplier, sample_rate, steps), ...]``: one entry per release of
``steps`` DP-SGD steps at noise multiplier σ and Poisson rate q. The whole history is accounted as one
composition (DESIGN.md decision 5).

Accountants
-----------
``"prv"`` (default)
    Numerical composition of privacy loss random variables, Gopi, Lee, Wutschitz, "Numerical Composition of
    Differential Privacy", arXiv:2106.02848, with Opacus' PRV building blocks, exactly as
    :meth:`opacus.accountants.PRVAccountant.get_epsilon` composes them (cached RDP terms, FFT-friendly grid).
    We report the *upper* bound ``eps_upper`` (estimate at δ − δ_err, plus ε_err), as Opacus does, never the
    estimate, so the figure is never below what an independent tight accountant (Google's PLD) gives.
    ``eps_error`` is chosen per call: 0.5 % of a first RDP guess (so ε lands within ~1 % above PLD; Opacus'
    fixed 0.01 is 10 % of ε = 0.1), raised when the discretisation grid would be too large.
``"rdp"``
    Rényi DP, Mironov, "Rényi Differential Privacy", arXiv:1702.07476, with the subsampled Gaussian bound of
    Mironov, Talwar, Zhang, arXiv:1908.10530 (:class:`opacus.accountants.RDPAccountant`). Looser (5–60 % above
    PLD) but robust for every ε.

PRV fails for large ε (Opacus issues 602/604/637): the safe domain from RDP becomes huge, so the grid needs
10⁸–10¹⁰ points (minutes, or ``MemoryError``); ``exp(t)`` overflows past t ≈ 709 and ``get_epsilon`` returns
``inf`` *silently*; an infinite RDP bound gives ``OverflowError``; a tiny δ gives ``ValueError``; a grid/mean
mismatch gives ``RuntimeError``. We predict the grid from the cheap RDP bound, skip PRV when it is unusable,
catch its exceptions, reject non-finite results, and fall back to RDP with a warning on ``veil.privacy``.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.fft import next_fast_len
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv import (
    Domain,
    PoissonSubsampledGaussianPRV,
    TruncatedPrivacyRandomVariable,
    compose_heterogeneous,
    discretize,
)

from veil.conf.schema import ACCOUNTANTS as SCHEMA_ACCOUNTANTS

__all__ = [
    "ACCOUNTANTS",
    "EpsilonResult",
    "Event",
    "compute_epsilon",
    "epsilon_after",
    "validate_accountant",
    "validate_delta",
    "validate_event",
]

log = logging.getLogger("veil.privacy")

Event = tuple[float, float, int]
"""One release: ``(noise_multiplier, sample_rate, steps)``."""

ACCOUNTANTS: tuple[str, ...] = SCHEMA_ACCOUNTANTS  # named by the schema (privacy.accountant)

# PRV grid budget: points × distinct (σ, q) pairs. 4e6 float64 points is ~32 MB per array and ~2.5 s on 2 cores.
_MAX_GRID_WORK = 4e6
# Beyond this domain half-width exp(t) nears float64 overflow (t ≈ 709): PRV then returns inf silently.
_MAX_DOMAIN = 600.0
# eps_error as a fraction of the RDP guess, and its bounds.
_REL_EPS_ERROR = 0.005
_MIN_EPS_ERROR = 5e-4
_MAX_EPS_ERROR = 0.5


@dataclass(frozen=True)
class EpsilonResult:
    """ε of a composition at a given δ.

    Attributes
    ----------
    epsilon : float
        Upper bound on ε (``inf`` when any step had no noise, ``0.0`` for an empty history).
    delta : float
        The δ at which ε was computed.
    accountant : str
        The accountant that actually produced ``epsilon`` (``"prv"`` or ``"rdp"``), after any fallback.
    """

    epsilon: float
    delta: float
    accountant: str


def validate_event(event: Sequence[float], *, where: str = "history") -> Event:
    """Check one ``(noise_multiplier, sample_rate, steps)`` triple and return it normalised.

    Raises
    ------
    TypeError
        If the entry is not a triple of numbers.
    ValueError
        If σ < 0 or not finite, q outside (0, 1], or steps not an integer ≥ 0.
    """
    if isinstance(event, (str, bytes)) or len(event) != 3:
        raise TypeError(f"{where}: expected (noise_multiplier, sample_rate, steps), got {event!r}")
    sigma, q, steps = event
    for name, value in (("noise_multiplier", sigma), ("sample_rate", q)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise TypeError(f"{where}: {name} must be a number, got {value!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"{where}: steps must be an integer, got {steps!r}")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"{where}: noise_multiplier must be finite and >= 0, got {sigma!r}")
    if not (0 < q <= 1):
        raise ValueError(f"{where}: sample_rate must be in (0, 1], got {q!r}")
    if steps < 0:
        raise ValueError(f"{where}: steps must be >= 0, got {steps!r}")
    return float(sigma), float(q), int(steps)


def validate_delta(delta: float) -> float:
    """Return δ as a float; ValueError unless 0 < δ < 1."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float, np.floating)):
        raise TypeError(f"delta must be a number, got {delta!r}")
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def validate_accountant(accountant: str) -> str:
    """Return the accountant name; ValueError unless it is one of :data:`ACCOUNTANTS`."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    return accountant


def _coalesce(history: Iterable[Sequence[float]]) -> list[Event]:
    """Validate, drop zero-step entries and merge equal (σ, q) pairs (composition is commutative)."""
    merged: dict[tuple[float, float], int] = {}
    for i, raw in enumerate(history):
        sigma, q, steps = validate_event(raw, where=f"history[{i}]")
        if steps:
            merged[(sigma, q)] = merged.get((sigma, q), 0) + steps
    return [(sigma, q, steps) for (sigma, q), steps in merged.items()]


_ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(sigma: float, q: float) -> tuple[float, ...]:
    """RDP of one subsampled Gaussian step at every order (cached: it is the slow part, ~0.03 s per pair)."""
    return tuple(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(_ORDERS)))


def _rdp_epsilon(history: Sequence[Event], delta: float) -> float:
    """RDP ε of the composition (RDP adds over steps), as :class:`opacus.accountants.RDPAccountant` gives."""
    rdp = sum(steps * np.asarray(_rdp_per_step(sigma, q)) for sigma, q, steps in history)
    with np.errstate(over="ignore", invalid="ignore"), warnings.catch_warnings():
        # "optimal order is the largest/smallest alpha": the bound is valid, only looser; PRV is the tight one
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(_ORDERS), rdp=rdp, delta=delta)
    eps = float(eps)
    return math.inf if math.isnan(eps) else max(eps, 0.0)


def _fast_domain(width: float, dt: float) -> Domain:
    """Grid on [-width, width] (or slightly wider) with mesh ``dt`` and an FFT-friendly even size.

    Same shape as :meth:`Domain.create_aligned`, but the size is rounded up to a product of small primes:
    pocketfft on a size with a large prime factor is many times slower. A wider domain is still safe.
    """
    half = math.ceil(width / dt)
    size = 2 * half + 2
    while (size := next_fast_len(size, real=True)) % 2:
        size += 1
    half = size // 2 - 1
    return Domain(t_min=-half * dt, t_max=(half + 1) * dt, size=size)


def _prv_epsilon(history: list[Event], delta: float, rdp_guess: float) -> tuple[float | None, str]:
    """PRV upper bound, or ``(None, reason)`` when PRV is unusable for this history.

    Mirrors :meth:`opacus.accountants.PRVAccountant.get_epsilon` (safe domain of Gopi et al. remark 5.6 from
    RDP, mesh from ε_err, FFT composition) with the RDP terms cached and the grid size checked beforehand.
    """
    if not math.isfinite(rdp_guess):
        return None, "the RDP bound is infinite"
    total_steps = sum(steps for _, _, steps in history)
    delta_error = delta / 1000  # Opacus' default
    eps_error = min(max(_REL_EPS_ERROR * rdp_guess, _MIN_EPS_ERROR), _MAX_EPS_ERROR)
    half_width = max(
        _rdp_epsilon(history, delta_error / 4),
        *(_rdp_epsilon([(sigma, q, 1)], delta_error / (8 * total_steps)) for sigma, q, _ in history),
    )
    if not half_width + 3 < _MAX_DOMAIN:
        return None, f"domain half-width {half_width + 3:.0f} overflows exp()"
    spread = math.sqrt(total_steps * math.log(12 / delta_error) / 2)
    work = 2 * (max(half_width, eps_error) + 3) * spread / eps_error * len(history)
    if work > _MAX_GRID_WORK:  # coarsen the grid instead of running for minutes
        eps_error *= work / _MAX_GRID_WORK
        if eps_error > _MAX_EPS_ERROR:
            return None, f"grid of {work:.2g} points is too large"
    width = max(half_width, eps_error) + 3
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            domain = _fast_domain(width, eps_error / spread)
            dprvs = [
                discretize(TruncatedPrivacyRandomVariable(PoissonSubsampledGaussianPRV(q, sigma), domain.t_min,
                                                          domain.t_max), domain)
                for sigma, q, _ in history
            ]
            composed = compose_heterogeneous(dprvs=dprvs, num_self_compositions=[s for _, _, s in history])
            _, _, eps = composed.compute_epsilon(delta, delta_error, eps_error)  # upper bound, not estimate
    except (ArithmeticError, ValueError, RuntimeError, MemoryError) as err:
        return None, f"{type(err).__name__}: {err}"
    eps = float(eps)
    if not math.isfinite(eps):
        return None, f"it returned {eps}"
    return max(eps, 0.0), ""


@functools.lru_cache(maxsize=256)
def _prv_epsilon_cached(history: tuple[Event, ...], delta: float, rdp_guess: float) -> tuple[float | None, str]:
    """:func:`_prv_epsilon`, once per process for each history (a pure function of its arguments): the simulated
    clients of a population mostly hold equal histories (same σ, q, steps), and each client's ledger asks for two
    ε per round (~0.1-0.2 s each on 2 busy cores)."""
    return _prv_epsilon(list(history), delta, rdp_guess)


def _compute(history: Iterable[Sequence[float]], delta: float, accountant: str) -> tuple[EpsilonResult, str]:
    """ε and, when PRV was asked for but not used, the reason (empty otherwise)."""
    delta = validate_delta(delta)
    accountant = validate_accountant(accountant)
    events = _coalesce(history)
    if not events:
        return EpsilonResult(0.0, delta, accountant), ""
    if any(sigma == 0 for sigma, _, _ in events):
        return EpsilonResult(math.inf, delta, accountant), ""
    rdp = _rdp_epsilon(events, delta)
    if accountant == "rdp":
        return EpsilonResult(rdp, delta, "rdp"), ""
    prv, reason = _prv_epsilon_cached(tuple(events), delta, rdp)
    if prv is None:
        return EpsilonResult(rdp, delta, "rdp"), reason
    if prv > rdp:  # both are valid upper bounds; never report the looser one
        return EpsilonResult(rdp, delta, "rdp"), ""
    return EpsilonResult(prv, delta, "prv"), ""


def compute_epsilon(
    history: Iterable[Sequence[float]], *, delta: float, accountant: str = "prv"
) -> EpsilonResult:
    """ε spent by a composition of Poisson-subsampled Gaussian releases.

    Parameters
    ----------
    history : iterable of (noise_multiplier, sample_rate, steps)
        Every release so far; entries with equal (σ, q) are merged, zero-step entries ignored.
    delta : float
        Target δ, in (0, 1).
    accountant : {"prv", "rdp"}
        Preferred accountant. PRV falls back to RDP (with a warning) when it fails or would be unusable.

    Returns
    -------
    EpsilonResult
        ``epsilon`` is an upper bound: 0 for an empty history, ``inf`` if any step had σ = 0.

    Raises
    ------
    TypeError, ValueError
        On a malformed history entry, δ or accountant name (the message names the parameter and value).
    """
    result, reason = _compute(history, delta, accountant)
    if reason:
        log.warning("PRV accountant unusable (%s); falling back to RDP, eps=%.4g at delta=%g", reason,
                    result.epsilon, result.delta)
    return result


def epsilon_after(
    history: Iterable[Sequence[float]], event: Sequence[float], *, delta: float, accountant: str = "prv"
) -> EpsilonResult:
    """ε of ``history`` composed with one more release ``event = (noise_multiplier, sample_rate, steps)``."""
    planned = validate_event(event, where="event")
    return compute_epsilon([*history, planned], delta=delta, accountant=accountant)
