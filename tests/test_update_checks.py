"""What a node sends is always sendable, and making it so reveals nothing: non-finite values become 0 and an update
beyond SecAgg+'s range is scaled into it as a whole (post-processing of the DP release, never a refusal that a
crafted model could trigger for one record: issue 10, point 4)."""

from __future__ import annotations

import numpy as np
import pytest

from veil.client.release import postprocess_update
from veil.conf.schema import DataConfig, VeilConfig


def _cfg(secagg: bool) -> VeilConfig:
    cfg = VeilConfig(data=DataConfig(train_path="a.csv", test_path="b.csv"))
    cfg.secagg.enabled = secagg
    return cfg.validate()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_sent_as_zero(bad: float) -> None:
    update = [np.zeros(4, np.float32), np.array([0.1, bad], np.float32)]
    out = postprocess_update(update, _cfg(secagg=False))
    assert np.array_equal(out[1], np.array([0.1, 0.0], np.float32)) and np.array_equal(out[0], update[0])
    assert all(np.isfinite(a).all() for a in out)


def test_value_outside_the_secagg_range_scales_the_whole_update() -> None:
    cfg = _cfg(secagg=True)
    limit = cfg.secagg.clipping_range
    inside = [np.array([limit * 0.99, -limit * 0.5], np.float32)]
    assert np.array_equal(postprocess_update(inside, cfg)[0], inside[0])
    outside = [np.array([1.0, -2 * limit], np.float32), np.array([limit], np.float32)]
    out = postprocess_update(outside, cfg)
    peak = max(float(np.abs(a).max()) for a in out)
    assert peak <= limit
    factor = out[0][1] / outside[0][1]
    for sent, raw in zip(out, outside):  # one factor for every value: the direction of the update is kept
        np.testing.assert_allclose(sent, raw * factor, rtol=1e-6)
    plain = postprocess_update(outside, _cfg(secagg=False))  # nothing is clipped without SecAgg+: nothing to scale
    assert np.array_equal(plain[0], outside[0])
