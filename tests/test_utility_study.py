"""The utility study's sweep arithmetic (issue 15): arm grammar, the lr × C grid, the fair reference for the gap, and
the per-arm configuration. The training itself is veil's ``train_round`` (tested elsewhere)."""

from __future__ import annotations

import math

import pytest

from benchmarks.utility_study import CLIP_ONLY, Arm, _table, arm_config, expand_arms, parse_arm
from veil.conf.schema import DP_SGD_LR, PLAIN_LR, DataConfig, VeilConfig


def test_parse_arm_reads_every_field_and_names_it_back() -> None:
    arm = parse_arm("ε=3, fedadam, ffa, lr=3e-2, C=0.1, slr=0.05")
    assert arm == Arm(3.0, "fedadam", "ffa", lr=0.03, clip=0.1, server_lr=0.05)
    assert arm.name == "ε=3, fedadam, ffa, lr=0.03, C=0.1, slr=0.05"
    assert parse_arm("no DP, fedavg, lora") == Arm(None, "fedavg", "lora")
    with pytest.raises(SystemExit, match="unknown setting"):
        parse_arm("ε=8, fedavg, lora, momentum=0.9")
    with pytest.raises(SystemExit, match="unknown setting"):
        parse_arm("ε=8, fedavg, lora, opt=lamb")
    diag = parse_arm("clip only, fedavg, lora, lr=2, r=32, opt=sgd")
    assert diag == Arm(CLIP_ONLY, "fedavg", "lora", lr=2.0, rank=32.0, optimizer="sgd")
    assert diag.name == "clip only, fedavg, lora, lr=2, r=32, opt=sgd"


def test_grid_crosses_lr_everywhere_and_clipping_on_dp_arms_only() -> None:
    arms = expand_arms(["no DP, fedavg, lora", "ε=8, fedavg, lora", "ε=1, fedavg, lora, C=0.5"],
                       lrs=[0.01, 0.1], clips=[0.1, 1.0])
    assert [a.name for a in arms] == [
        "no DP, fedavg, lora, lr=0.01", "no DP, fedavg, lora, lr=0.1",
        "ε=8, fedavg, lora, lr=0.01, C=0.1", "ε=8, fedavg, lora, lr=0.01, C=1",
        "ε=8, fedavg, lora, lr=0.1, C=0.1", "ε=8, fedavg, lora, lr=0.1, C=1",
        "ε=1, fedavg, lora, lr=0.01, C=0.5", "ε=1, fedavg, lora, lr=0.1, C=0.5",
    ]
    assert expand_arms(["ε=8, fedavg, lora"] * 2, lrs=None, clips=None) == [Arm(8.0, "fedavg", "lora")]


def test_arm_config_applies_lr_clip_and_privacy() -> None:
    base = VeilConfig(data=DataConfig(train_path="train.csv", test_path="test.csv")).validate()
    cfg = arm_config(base, parse_arm("ε=3, fedavgm, lora, lr=0.1, C=0.1"), fedadam_lr=0.01, fedavgm_lr=1.0)
    assert (cfg.federation.lr, cfg.privacy.max_grad_norm, cfg.privacy.target_epsilon) == (0.1, 0.1, 3.0)
    assert (cfg.strategy.name, cfg.strategy.server_lr, cfg.strategy.server_momentum) == ("fedavgm", 1.0, 0.9)
    plain = arm_config(base, parse_arm("no DP, fedavg, lora"), fedadam_lr=0.01, fedavgm_lr=1.0)
    assert not plain.privacy.enabled
    assert (plain.federation.lr, plain.privacy.max_grad_norm) == (PLAIN_LR, base.privacy.max_grad_norm)
    untuned = arm_config(base, parse_arm("ε=8, fedavg, lora"), fedadam_lr=0.01, fedavgm_lr=1.0)
    assert untuned.federation.lr == DP_SGD_LR, "an arm without lr= runs at the shipped default of its mode"
    clip_only = arm_config(base, parse_arm("clip only, fedavg, lora, r=2"), fedadam_lr=0.01, fedavgm_lr=1.0)
    assert clip_only.privacy.enabled and clip_only.model.lora_r == 2  # DP-SGD's path; run_arm gives it σ = 0


def test_gap_is_measured_to_the_best_non_private_arm() -> None:
    arms = [parse_arm(t) for t in ("no DP, fedavg, lora, lr=0.01", "no DP, fedavg, lora, lr=0.1",
                                   "ε=8, fedavg, lora, C=1", "ε=8, fedavg, lora, C=0.1")]
    results = {arms[0].name: {"validation": 0.50, "test": 0.49, "sigma_mean": 0.0, "seconds": 1.0},
               arms[1].name: {"validation": 0.60, "test": 0.58, "sigma_mean": 0.0, "seconds": 1.0},
               arms[2].name: {"validation": 0.40, "test": 0.41, "sigma_mean": 0.5, "seconds": 1.0},
               arms[3].name: {"validation": 0.55, "test": 0.52, "sigma_mean": 0.5, "seconds": 1.0}}
    rows, notes = _table(arms, results, ["validation", "test"])
    assert [r[3] for r in rows] == ["-10.0", "+0.0", "-20.0", "-5.0"]  # 100 × (val − 0.60)
    assert notes[0].startswith("reference for the gap: no DP, fedavg, lora, lr=0.1")
    # best ε=8 arm on validation is C=0.1; gaps 60−55 = 5.0 (val) and 58−52 = 6.0 (test)
    assert "best arm on validation ε=8, fedavg, lora, C=0.1" in notes[1]
    assert "validation 5.0, test 6.0" in notes[1]
    assert not math.isnan(float(rows[3][1]))
