"""A client never sends a non-finite update, and never lets SecAgg+ clip a value silently."""

from __future__ import annotations

import numpy as np
import pytest

from veil.client.app import _check_update
from veil.conf.schema import DataConfig, VeilConfig
from veil.errors import SecAggRangeError, VeilError


def _cfg(secagg: bool) -> VeilConfig:
    cfg = VeilConfig(data=DataConfig(train_path="a.csv", test_path="b.csv"))
    cfg.secagg.enabled = secagg
    return cfg.validate()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_update_is_an_error(bad: float) -> None:
    update = [np.zeros(4, np.float32), np.array([0.1, bad], np.float32)]
    with pytest.raises(VeilError, match="non-finite"):
        _check_update(update, _cfg(secagg=False))


def test_value_outside_the_secagg_range_is_an_error_not_a_clip() -> None:
    inside = [np.array([7.99, -7.99], np.float32)]
    _check_update(inside, _cfg(secagg=True))
    outside = [np.array([0.0, -8.5], np.float32)]
    with pytest.raises(SecAggRangeError, match="secagg.clipping_range"):
        _check_update(outside, _cfg(secagg=True))
    _check_update(outside, _cfg(secagg=False))  # without SecAgg+ nothing is clipped, so nothing to refuse
