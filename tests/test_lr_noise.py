"""``federation.lr_noise_ref``: a DP-SGD node steps at lr × min(1, ref / σ) with σ its own noise multiplier for the
round (issue 22: one recipe for every ε). Checked against σ computed here, independently of the node's plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from veil.client.round_plan import Sampling, noise_scaled_lr, plan_sample_level
from veil.client.settings import NodeSettings
from veil.conf.schema import DataConfig, ModelConfig, VeilConfig
from veil.errors import ConfigError
from veil.privacy.calibration import calibrate_noise_multiplier
from veil.privacy.ledger import PrivacyLedger


def _cfg(**federation: float) -> VeilConfig:
    cfg = VeilConfig(model=ModelConfig(name="tiny", tiny=True, max_length=16),
                     data=DataConfig(train_path="unused.csv", test_path="unused.csv"))
    cfg.federation.lr, cfg.federation.rounds = 5.0, 4
    for key, value in federation.items():
        setattr(cfg.federation, key, value)
    return cfg


def _plan_lr(cfg: VeilConfig, tmp_path: Path, *, q: float = 0.1, steps: int = 3) -> float:
    settings = NodeSettings(data_path=None, text_column=None, label_column=None, max_epsilon=float("inf"),
                            ledger_path=tmp_path / "ledger.json", device="cpu", partition_id=0, num_partitions=1)
    sampling = Sampling(sample_rate=q, steps=steps, expected_batch_size=None, delta=1e-5)
    plan, _event = plan_sample_level(cfg.validate(), settings, sampling, ledger=PrivacyLedger(tmp_path / "l.json"),
                                     run_id="r", server_round=1, engine="hooks")
    assert plan.private
    return plan.lr


def test_the_scaled_lr_is_lr_times_ref_over_sigma_above_ref_and_lr_below() -> None:
    assert noise_scaled_lr(5.0, sigma=10.0, ref=3.0) == pytest.approx(1.5)
    assert noise_scaled_lr(5.0, sigma=2.0, ref=3.0) == 5.0
    assert noise_scaled_lr(5.0, sigma=10.0, ref=0.0) == 5.0


def test_a_node_scales_its_lr_by_its_own_fixed_noise_multiplier(tmp_path: Path) -> None:
    cfg = _cfg(lr_noise_ref=3.0)
    cfg.privacy.target_epsilon, cfg.privacy.noise_multiplier = 0.0, 12.0
    assert _plan_lr(cfg, tmp_path) == pytest.approx(5.0 * 3.0 / 12.0)
    cfg.privacy.noise_multiplier = 2.0  # below the reference: the run's lr
    assert _plan_lr(cfg, tmp_path) == 5.0


@pytest.mark.parametrize("epsilon", [0.5, 8.0])
def test_a_node_scales_its_lr_by_the_sigma_calibrated_for_the_target(tmp_path: Path, epsilon: float) -> None:
    cfg = _cfg(lr_noise_ref=3.0)
    cfg.privacy.target_epsilon = epsilon
    sigma = calibrate_noise_multiplier(target_epsilon=epsilon, delta=1e-5, sample_rate=0.1, steps=3 * 4,
                                       accountant=cfg.privacy.accountant)
    assert _plan_lr(cfg, tmp_path) == pytest.approx(5.0 * min(1.0, 3.0 / sigma), rel=1e-6)


def test_without_a_reference_the_lr_is_the_runs(tmp_path: Path) -> None:
    cfg = _cfg()
    cfg.privacy.target_epsilon = 0.5
    assert _plan_lr(cfg, tmp_path) == 5.0


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_a_bad_reference_is_refused_naming_the_field(bad: float) -> None:
    with pytest.raises(ConfigError, match="federation.lr_noise_ref"):
        _cfg(lr_noise_ref=bad).validate()
