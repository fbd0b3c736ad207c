"""model.init_from (LP-FT's second half): the head of a model.tuning=head run starts a LoRA run; another base model
or pooling is refused in one line; a simulation carries each owner's ledger so ε covers both runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from veil.conf.schema import DataConfig, ModelConfig, VeilConfig
from veil.errors import ConfigError
from veil.server.app import save_global
from veil.server.warm_start import carry_simulated_ledgers, warm_start
from veil.task.model import build_model, get_trainable, trainable_names

LABELS = ["a", "b", "c"]


def _earlier_run(tmp_path: Path, model: ModelConfig) -> Path:
    run = tmp_path / "head-run"
    run.mkdir()
    head = build_model(model, LABELS, seed=0)
    arrays = [a + np.random.default_rng(1).normal(size=a.shape).astype(np.float32) for a in get_trainable(head)]
    save_global(run / "global_trainable.npz", trainable_names(head), arrays)
    OmegaConf.save(OmegaConf.structured(VeilConfig(model=model)), run / "config.resolved.yaml")
    ledger = run / "nodes" / "node-0" / "privacy_ledger.json"
    ledger.parent.mkdir(parents=True)
    ledger.write_text('{"events": []}', encoding="utf-8")
    return run


def _cfg(run: Path, **model: object) -> VeilConfig:
    return VeilConfig(model=ModelConfig(tiny=True, pooling="mean", init_from=str(run), **model),  # type: ignore[arg-type]
                      data=DataConfig(train_path="x.csv", labels=json.dumps(LABELS)))


def test_a_lora_run_starts_from_the_head_run(tmp_path: Path) -> None:
    run = _earlier_run(tmp_path, ModelConfig(tiny=True, tuning="head", pooling="mean"))
    cfg = _cfg(run, tuning="lora")
    template = build_model(cfg.model, LABELS, seed=0)
    lora_before = {n: p.detach().clone() for n, p in template.named_parameters() if "lora" in n}
    assert warm_start(template, cfg) == ["head.weight", "head.bias"]
    with np.load(run / "global_trainable.npz") as saved:
        assert torch.equal(template.head.weight, torch.as_tensor(saved["head.weight"]))
    for name, p in template.named_parameters():
        if "lora" in name:
            assert torch.equal(p, lora_before[name]), name  # the adapters start as a fresh LoRA run's


def test_another_pooling_or_no_run_is_refused(tmp_path: Path) -> None:
    run = _earlier_run(tmp_path, ModelConfig(tiny=True, tuning="head", pooling="cls"))
    cfg = _cfg(run, tuning="lora")
    with pytest.raises(ConfigError, match="model.pooling='cls'"):
        warm_start(build_model(cfg.model, LABELS, seed=0), cfg)
    with pytest.raises(ConfigError, match="no global_trainable.npz"):
        warm_start(build_model(cfg.model, LABELS, seed=0), _cfg(tmp_path / "missing", tuning="lora"))


def test_simulated_ledgers_continue(tmp_path: Path) -> None:
    run = _earlier_run(tmp_path, ModelConfig(tiny=True, tuning="head", pooling="mean"))
    out = tmp_path / "lora-run"
    assert carry_simulated_ledgers(_cfg(run, tuning="lora"), out) == 1
    assert (out / "nodes" / "node-0" / "privacy_ledger.json").read_text() == '{"events": []}'
    assert carry_simulated_ledgers(_cfg(run, tuning="lora"), out) == 0  # a ledger already there is kept
