"""The one-run audit bound: from guesses about canaries to an empirical lower bound on ε (pure functions only).

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023 (arXiv:2305.08846).
Setting: m canaries, each included in the training data independently with probability 1/2 (S_i ∈ {−1, +1});
after one training run the auditor guesses "in" (+1), "out" (−1) or abstains (0) for each; r guesses, v of them
right. If training is (ε, δ)-DP, the paper's analysis for approximate DP bounds the chance of v or more right
guesses by its p-value (Corollary 5.4 of arXiv:2305.08846v1; ``p_value_DP_audit`` in its Appendix D):

    P[W ≥ v] ≤ f(v) + 2·m·δ · max_{i=1..v} (f(v − i) − f(v)) / i,      f(w) = P[Binomial(r, e^ε / (1 + e^ε)) ≥ w]

(f(v − i) − f(v) = P[v − i ≤ Binomial < v]). This right-hand side is the p-value of the hypothesis "training is
(ε, δ)-DP" given the observed (r, v); it grows with ε, and the empirical lower bound at confidence 1 − β is the
largest ε whose p-value is still below β (Appendix D's ``get_eps_audit`` searches it the same way). Every (ε, δ)-DP
algorithm yields a bound above its ε with probability at most β.

Written here, not taken from a library: the formula is a few lines over ``scipy.stats.binom`` and the one library
that ships it (jax-privacy) would pull in JAX. The guesses follow the paper's rule: the k₊ highest scores are
guessed "in", the k₋ lowest "out", the rest abstain; k₊ and k₋ are fixed before the scores are seen (choosing
them after looking at the scores would need a correction for the multiple tries).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

__all__ = ["Guesses", "epsilon_lower_bound", "guess_top_bottom", "p_value"]


@dataclass(frozen=True)
class Guesses:
    """Outcome of the guessing game: ``r`` guesses (abstentions excluded), ``v`` of them right, ``m`` canaries."""

    m: int
    r: int
    v: int


def _check_counts(m: int, r: int, v: int) -> None:
    for name, value in (("m", m), ("r", r), ("v", v)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name}={value!r} must be an integer")
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")


def p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of "(ε, δ)-DP" after ``v`` right guesses out of ``r`` on ``m`` canaries (see the module docstring)."""
    _check_counts(m, r, v)
    if not epsilon >= 0:
        raise ValueError(f"epsilon={epsilon} must be >= 0")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta={delta} must be in [0, 1]")
    if math.isinf(epsilon):
        return 1.0  # ε = ∞ claims nothing: no outcome can refute it
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of ε-DP randomized response: e^ε / (1 + e^ε)
    tail = float(binom.sf(v - 1, r, q))  # f(v) = P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    i = np.arange(1, v + 1)
    between = np.cumsum(binom.pmf(v - i, r, q))  # f(v - i) - f(v) = P[v - i <= Binomial < v], i = 1..v
    return min(tail + 2.0 * m * delta * float(np.max(between / i)), 1.0)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, beta: float = 0.05, tol: float = 1e-6) -> float:
    """The largest ε whose p-value is below ``beta``: "training is not (ε, δ)-DP" at confidence 1 − β.

    0 when the guesses refute no ε (e.g. no better than chance). Bisection on ε, as the p-value grows with ε.
    """
    if not 0 < beta < 1:
        raise ValueError(f"beta={beta} must be in (0, 1)")
    if p_value(m=m, r=r, v=v, epsilon=0.0, delta=delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m=m, r=r, v=v, epsilon=hi, delta=delta) < beta:  # ends: at v = r, f(v) = q^r -> 1 as ε grows
        lo, hi = hi, 2.0 * hi
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if p_value(m=m, r=r, v=v, epsilon=mid, delta=delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def guess_top_bottom(scores: np.ndarray, included: np.ndarray, *, k_in: int, k_out: int) -> Guesses:
    """Guess "in" for the ``k_in`` highest scores and "out" for the ``k_out`` lowest; count the right guesses.

    ``scores`` (m,): higher means "more likely trained on"; ``included`` (m,) bool: the truth. Ties are broken
    by position, which carries no information (canaries are in random order).
    """
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    m = int(scores.shape[0])
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and included {included.shape} must be equal 1-d shapes")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    if k_in < 0 or k_out < 0 or k_in + k_out > m:
        raise ValueError(f"need k_in, k_out >= 0 and k_in + k_out <= m={m}, got {k_in}, {k_out}")
    order = np.argsort(-scores, kind="stable")  # (m,) highest first
    right = int(included[order[:k_in]].sum()) + int((~included[order[m - k_out:]]).sum() if k_out else 0)
    return Guesses(m=m, r=k_in + k_out, v=right)
