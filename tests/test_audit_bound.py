"""The one-run audit bound (arXiv:2305.08846) against the paper's printed figures and independent computations:
exact rational binomial tails,
the closed form for all-correct guesses, the definition of the bound, and its coverage on an exactly ε-DP
mechanism (randomized response)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from veil.privacy.audit_bound import epsilon_lower_bound, guess_top_bottom, p_value


@pytest.mark.parametrize("m,r,v,delta,published", [
    (1000, 100, 75, 1e-4, 0.673),  # arXiv:2305.08846v1, Appendix D, p. 46
    (100_000, 1510, 1439, 1e-5, 2.675),  # arXiv:2305.08846v1, Section 7, p. 28
])
def test_bound_reproduces_the_papers_figures(m: int, r: int, v: int, delta: float, published: float) -> None:
    assert epsilon_lower_bound(m=m, r=r, v=v, delta=delta, beta=0.05) == pytest.approx(published, abs=1e-3)


def _p_value_exact(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The p-value's formula term by term with exact binomial sums (math.comb), no scipy."""
    q = Fraction(1) / (1 + Fraction(math.exp(-epsilon)))

    def tail(w: int) -> Fraction:  # P[Binomial(r, q) >= w]
        return sum((Fraction(math.comb(r, j)) * q**j * (1 - q) ** (r - j) for j in range(max(w, 0), r + 1)), Fraction(0))

    f_v = tail(v)
    worst = max(((tail(v - i) - f_v) / i for i in range(1, v + 1)), default=Fraction(0))
    return min(float(f_v + 2 * m * Fraction(delta) * worst), 1.0)


@pytest.mark.parametrize("m,r,v,eps,delta", [
    (100, 20, 15, 0.5, 0.0), (100, 20, 15, 0.5, 1e-3), (50, 10, 10, 2.0, 1e-5), (1000, 40, 31, 1.0, 1e-5),
    (30, 30, 0, 1.0, 1e-2), (200, 60, 44, 0.0, 1e-4),
])
def test_p_value_matches_an_exact_rational_computation(m: int, r: int, v: int, eps: float, delta: float) -> None:
    assert p_value(m=m, r=r, v=v, epsilon=eps, delta=delta) == pytest.approx(_p_value_exact(m, r, v, eps, delta),
                                                                              rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("r", [10, 20, 50, 100, 1000])
def test_all_right_guesses_give_the_closed_form_bound(r: int) -> None:
    """δ = 0, v = r: the p-value is q^r, so the bound is log(q / (1 − q)) with q = β^(1/r)
    (e.g. r = 100 at 95%: ε ≥ 3.49)."""
    q = 0.05 ** (1 / r)
    assert epsilon_lower_bound(m=r, r=r, v=r, delta=0.0, beta=0.05) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)


def test_bound_is_the_largest_refuted_epsilon() -> None:
    m, r, v, delta = 1000, 100, 90, 1e-5
    bound = epsilon_lower_bound(m=m, r=r, v=v, delta=delta)
    assert 0 < bound < 3.49  # below the all-right bound of r = 100
    assert p_value(m=m, r=r, v=v, epsilon=bound - 1e-3, delta=delta) < 0.05
    assert p_value(m=m, r=r, v=v, epsilon=bound + 1e-3, delta=delta) >= 0.05
    assert epsilon_lower_bound(m=m, r=r, v=v, delta=0.0) > bound, "δ > 0 weakens the bound"
    assert epsilon_lower_bound(m=m, r=r, v=v, delta=delta, beta=0.01) < bound, "more confidence, smaller bound"


def test_chance_level_guesses_refute_nothing() -> None:
    assert epsilon_lower_bound(m=1000, r=100, v=50, delta=1e-5) == 0.0
    assert epsilon_lower_bound(m=1000, r=100, v=30, delta=1e-5) == 0.0
    assert p_value(m=10, r=10, v=10, epsilon=math.inf, delta=0.0) == 1.0


def test_bound_covers_an_exactly_dp_mechanism() -> None:
    """Randomized response with ε₀ per canary is exactly ε₀-DP: its bound may exceed ε₀ in at most β of runs."""
    rng = np.random.default_rng(7)
    eps0, m, k, runs = 1.0, 400, 100, 300
    above = 0
    for _ in range(runs):
        included = rng.random(m) < 0.5
        truthful = rng.random(m) < math.exp(eps0) / (1 + math.exp(eps0))
        reported = np.where(truthful, included, ~included)
        scores = reported + rng.random(m) * 1e-3  # tie-break at random
        g = guess_top_bottom(scores, included, k_in=k, k_out=k)
        above += epsilon_lower_bound(m=g.m, r=g.r, v=g.v, delta=0.0) > eps0
    assert above <= 0.05 * runs + 3 * math.sqrt(0.05 * 0.95 * runs)


def test_top_bottom_guesses_count_hand_checked() -> None:
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.5, 0.7])
    included = np.array([True, False, False, True, True, True])
    g = guess_top_bottom(scores, included, k_in=2, k_out=2)  # in: 0.9 (T), 0.8 (F); out: 0.1 (right), 0.2 (wrong)
    assert (g.m, g.r, g.v) == (6, 4, 2)


@pytest.mark.parametrize("kwargs", [dict(m=5, r=6, v=1), dict(m=5, r=3, v=4), dict(m=5, r=3, v=-1)])
def test_bad_counts_are_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        p_value(**kwargs, epsilon=1.0, delta=0.0)
