"""Noise calibration: the calibrated σ meets its target (ε ≤ target, ≥ 0.9 × target), checked by PLD too."""

from __future__ import annotations

import pytest

from support.references import pld_epsilon
from veil.errors import ConfigError
from veil.privacy.accounting import compute_epsilon
from veil.privacy.calibration import calibrate_noise_multiplier, planned_steps




@pytest.mark.parametrize(
    ("target", "delta", "q", "steps", "history"),
    [
        (1.0, 1e-5, 0.01, 1000, ()),
        (8.0, 1e-5, 0.05, 400, ()),
        (4.0, 1e-6, 0.02, 300, ((1.0, 0.02, 300),)),  # a ledger that has already spent part of the target
    ],
)
def test_calibrated_sigma_meets_the_target(
    target: float, delta: float, q: float, steps: int, history: tuple[tuple[float, float, int], ...]
) -> None:
    sigma = calibrate_noise_multiplier(target_epsilon=target, delta=delta, sample_rate=q, steps=steps,
                                       history=history)

    composition = [*history, (sigma, q, steps)]
    spent = compute_epsilon(composition, delta=delta).epsilon
    assert 0.9 * target <= spent <= target
    assert pld_epsilon(composition, delta) <= target  # the guarantee holds for an independent accountant too


def test_calibration_with_rdp() -> None:
    sigma = calibrate_noise_multiplier(target_epsilon=3.0, delta=1e-5, sample_rate=0.01, steps=1000,
                                       accountant="rdp")

    spent = compute_epsilon([(sigma, 0.01, 1000)], delta=1e-5, accountant="rdp").epsilon
    assert 0.9 * 3.0 <= spent <= 3.0


def test_more_steps_need_more_noise() -> None:
    few = calibrate_noise_multiplier(target_epsilon=2.0, delta=1e-5, sample_rate=0.02, steps=100)
    many = calibrate_noise_multiplier(target_epsilon=2.0, delta=1e-5, sample_rate=0.02, steps=1000)

    assert many > few


def test_target_already_spent_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unreachable") as info:
        calibrate_noise_multiplier(target_epsilon=1.0, delta=1e-5, sample_rate=0.01, steps=100,
                                   history=[(0.8, 0.01, 1000)])  # ε ≈ 3.1 already

    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"target_epsilon": float("inf")}, "target_epsilon"),
        ({"delta": 2.0}, "delta"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"steps": 0}, "steps"),
        ({"accountant": "moments"}, "accountant"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    arguments = {"target_epsilon": 1.0, "delta": 1e-5, "sample_rate": 0.01, "steps": 100, **kwargs}

    with pytest.raises(ValueError, match=match):
        calibrate_noise_multiplier(**arguments)


def test_planned_steps_is_rounds_times_epochs_over_q() -> None:
    assert planned_steps(rounds=10, local_epochs=2, sample_rate=0.01) == 2000
    assert planned_steps(rounds=3, local_epochs=1, sample_rate=0.3) == 12  # ⌈1/0.3⌉ = 4 steps per epoch
    assert planned_steps(rounds=1, local_epochs=1, sample_rate=1.0) == 1
    with pytest.raises(ValueError, match="rounds"):
        planned_steps(rounds=0, local_epochs=1, sample_rate=0.1)
    with pytest.raises(ValueError, match="sample_rate"):
        planned_steps(rounds=1, local_epochs=1, sample_rate=0.0)
    with pytest.raises(TypeError, match="local_epochs"):
        planned_steps(rounds=1, local_epochs=1.5, sample_rate=0.1)  # type: ignore[arg-type]
