"""Client-level DP: the noise on the aggregate has the configured standard deviation (distributed shares summed
over the round's clients, or central), updates are clipped to S, and the accountant matches PLD."""

from __future__ import annotations

import numpy as np
import pytest

from support.references import pld_epsilon
from veil.privacy.client_level import (
    add_gaussian_noise,
    calibrate_client_level,
    client_level_epsilon,
    clip_update,
    distributed_share_std,
)


def test_clip_update_bounds_the_norm_and_keeps_direction() -> None:
    rng = np.random.default_rng(0)
    update = [rng.normal(size=(30, 4)).astype(np.float32), rng.normal(size=7).astype(np.float32)]
    clipped, norm = clip_update(update, clip=0.5)
    new_norm = np.sqrt(sum(float((a.astype(np.float64) ** 2).sum()) for a in clipped))
    assert norm > 0.5 and new_norm == pytest.approx(0.5, rel=1e-5)
    np.testing.assert_allclose(clipped[0] / clipped[0].ravel()[0], update[0] / update[0].ravel()[0], rtol=1e-4)
    small = [a * 1e-3 for a in update]
    assert all(np.array_equal(x, y) for x, y in zip(clip_update(small, clip=0.5)[0], small, strict=True))


@pytest.mark.parametrize("placement", ["distributed", "central"])
def test_aggregate_noise_has_the_configured_std(placement: str) -> None:
    z, clip, m, values = 1.3, 0.7, 8, 40_000
    rng = np.random.default_rng(1234)
    zero = [np.zeros(values, dtype=np.float32)]
    if placement == "distributed":
        share = distributed_share_std(noise_multiplier=z, clip=clip, clients_per_round=m)
        total = sum(add_gaussian_noise(zero, std=share, rng=rng)[0].astype(np.float64) for _ in range(m))
    else:
        total = add_gaussian_noise(zero, std=z * clip, rng=rng)[0].astype(np.float64)
    expected = z * clip
    # the sample std of 40,000 normal values is within 1.5% of the truth with overwhelming probability (> 5 sigma)
    assert np.std(total) == pytest.approx(expected, rel=0.015)
    assert abs(np.mean(total)) < 5 * expected / np.sqrt(values)


def test_client_level_accounting_against_pld_and_calibration() -> None:
    eps = client_level_epsilon(noise_multiplier=1.0, client_rate=0.1, rounds=50, delta=1e-5)
    reference = pld_epsilon([(1.0, 0.1, 50)], 1e-5)
    assert reference <= eps <= 1.03 * reference
    z = calibrate_client_level(target_epsilon=3.0, delta=1e-5, client_rate=0.2, rounds=30)
    reached = client_level_epsilon(noise_multiplier=z, client_rate=0.2, rounds=30, delta=1e-5)
    assert 0.9 * 3.0 <= reached <= 3.0


def test_central_noise_on_the_mean_has_std_zs_over_n() -> None:
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from test_strategy import _Proxy

    from veil.strategies.fedavg import DeltaFedAvg

    values, n, zs = 40_000, 4, 0.9
    strategy = DeltaFedAvg(initial=[np.zeros(values, np.float32)], clients_per_round=n, num_clients=n,
                           central_noise_std=zs)
    update = [np.full(values, 0.01, np.float32)]
    results = [(_Proxy(i), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), 1, {})) for i in range(n)]
    params, _ = strategy.aggregate_fit(1, results, [])
    noise = parameters_to_ndarrays(params)[0].astype(np.float64) - 0.01
    assert np.std(noise) == pytest.approx(zs / n, rel=0.015)
