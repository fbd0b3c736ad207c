"""Accountant tests: veil's ε against Google's dp-accounting PLD accountant, an independent implementation."""

from __future__ import annotations

import logging
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from support.references import pld_epsilon
from veil.privacy.accounting import EpsilonResult, compute_epsilon, epsilon_after

DELTA = 1e-5




@pytest.mark.parametrize(
    "history",
    [
        [(1.0, 0.01, 1000)],  # LIBRARY_NOTES.md: PLD 1.828
        [(0.8, 0.02, 300)],
        [(2.0, 0.1, 100)],
        [(4.0, 0.01, 500)],  # small ε
        [(0.5, 0.05, 200)],  # large ε (~30)
        [(1.0, 0.01, 300), (1.2, 0.02, 200)],  # heterogeneous composition
        [(1.0, 1.0, 3)],  # no subsampling
    ],
)
def test_prv_is_an_upper_bound_within_3_percent_of_pld(history: list[tuple[float, float, int]]) -> None:
    reference = pld_epsilon(history, DELTA)

    result = compute_epsilon(history, delta=DELTA)

    assert result.accountant == "prv"
    assert result.epsilon >= reference
    assert result.epsilon <= 1.03 * reference


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    sigma=st.floats(min_value=0.8, max_value=3.0),
    q=st.floats(min_value=0.005, max_value=0.1),
    steps=st.integers(min_value=10, max_value=400),
)
def test_property_never_below_pld_and_within_3_percent(sigma: float, q: float, steps: int) -> None:
    history = [(sigma, q, steps)]
    reference = pld_epsilon(history, DELTA)

    result = compute_epsilon(history, delta=DELTA)

    assert reference <= result.epsilon <= 1.03 * reference + 1e-3  # + 1e-3: ε ≈ 0 is not a relative matter


def test_rdp_is_selectable_and_looser_than_prv() -> None:
    history = [(1.0, 0.01, 1000)]

    rdp = compute_epsilon(history, delta=DELTA, accountant="rdp")
    prv = compute_epsilon(history, delta=DELTA, accountant="prv")

    assert rdp.accountant == "rdp"
    assert rdp.epsilon == pytest.approx(2.1014, abs=1e-3)  # LIBRARY_NOTES.md
    assert rdp.epsilon > prv.epsilon >= pld_epsilon(history, DELTA)


def test_empty_history_is_zero_and_no_noise_is_infinite() -> None:
    assert compute_epsilon([], delta=DELTA) == EpsilonResult(0.0, DELTA, "prv")
    assert compute_epsilon([(1.0, 0.1, 0)], delta=DELTA).epsilon == 0.0
    assert math.isinf(compute_epsilon([(0.0, 0.1, 5)], delta=DELTA).epsilon)
    assert math.isinf(compute_epsilon([(1.0, 0.01, 100), (0.0, 0.1, 1)], delta=DELTA, accountant="rdp").epsilon)
    assert compute_epsilon([(0.0, 0.1, 0)], delta=DELTA).epsilon == 0.0  # zero steps release nothing


def test_split_history_equals_merged_history() -> None:
    split = compute_epsilon([(1.0, 0.01, 400), (1.0, 0.01, 600)], delta=DELTA)
    merged = compute_epsilon([(1.0, 0.01, 1000)], delta=DELTA)

    assert split == merged


def test_epsilon_after_composes_one_more_event() -> None:
    history = [(1.0, 0.01, 500)]

    after = epsilon_after(history, (1.0, 0.01, 500), delta=DELTA)

    assert after == compute_epsilon([(1.0, 0.01, 1000)], delta=DELTA)
    assert after.epsilon > compute_epsilon(history, delta=DELTA).epsilon


@pytest.mark.parametrize("history", [[(0.05, 0.1, 10)], [(0.1, 1.0, 100)], [(1e-6, 0.1, 10)]])
def test_large_epsilon_falls_back_to_rdp_with_a_warning(
    history: list[tuple[float, float, int]], caplog: pytest.LogCaptureFixture
) -> None:
    # Opacus' PRV returns inf silently here (exp overflow) or needs a 10^7..10^10-point grid.
    with caplog.at_level(logging.WARNING, logger="veil.privacy"):
        result = compute_epsilon(history, delta=DELTA)

    assert result.accountant == "rdp"
    assert result.epsilon == compute_epsilon(history, delta=DELTA, accountant="rdp").epsilon
    assert math.isfinite(result.epsilon) and result.epsilon > 1000
    assert any("falling back to RDP" in r.getMessage() for r in caplog.records)


def test_tiny_delta_falls_back_to_rdp() -> None:
    # PRV raises "Floating point errors will dominate" when δ nears float precision × grid size.
    result = compute_epsilon([(1.0, 0.01, 1000)], delta=1e-15)

    assert result.accountant == "rdp"
    assert result.epsilon == compute_epsilon([(1.0, 0.01, 1000)], delta=1e-15, accountant="rdp").epsilon


@pytest.mark.parametrize(
    ("history", "kwargs", "match"),
    [
        ([(-1.0, 0.1, 10)], {"delta": DELTA}, "noise_multiplier"),
        ([(math.nan, 0.1, 10)], {"delta": DELTA}, "noise_multiplier"),
        ([(1.0, 0.0, 10)], {"delta": DELTA}, "sample_rate"),
        ([(1.0, 1.5, 10)], {"delta": DELTA}, "sample_rate"),
        ([(1.0, 0.1, -1)], {"delta": DELTA}, "steps"),
        ([(1.0, 0.1, 10)], {"delta": 0.0}, "delta"),
        ([(1.0, 0.1, 10)], {"delta": 1.0}, "delta"),
        ([(1.0, 0.1, 10)], {"delta": DELTA, "accountant": "gdp"}, "accountant"),
    ],
)
def test_invalid_inputs_name_the_parameter(history: list, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_epsilon(history, **kwargs)


def test_wrong_types_raise_type_error() -> None:
    with pytest.raises(TypeError, match="steps"):
        compute_epsilon([(1.0, 0.1, 10.5)], delta=DELTA)
    with pytest.raises(TypeError):
        compute_epsilon([(1.0, 0.1)], delta=DELTA)
    with pytest.raises(TypeError):
        compute_epsilon([(1.0, 0.1, 10)], 1e-5)  # type: ignore[misc]  # δ is keyword-only
