"""Non-finite values are no oracle (review 2026-12-07, N3): a NaN or an overflow, in the forward or in the backward
alone, gives a release with the declared noise, never zeros, and the same reply.

Reference: the declared noise itself. With plain SGD at lr 1 and one step, a round whose examples all overflow
releases N(0, (σC/E[B])²) per value (sample level), and a client-level round with a non-finite local update releases
the owner's share N(0, (z·S)²/M); the measured std over thousands of values must match. Today's code sent zeros.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from veil.client import app as client_app
from veil.client.app import VeilClient
from veil.client.settings import NodeSettings
from veil.client.trainer import LocalResult
from veil.conf.schema import DataConfig, ModelConfig, VeilConfig
from veil.privacy.client_level import clip_update
from veil.task.model import build_model, get_trainable, set_trainable

LABELS = ["card", "cash", "fee", "pin"]
TARGET = "zebra quokka narwhal"


def _cfg(**privacy: Any) -> VeilConfig:
    cfg = VeilConfig(model=ModelConfig(name="tiny", tiny=True, max_length=16),
                     data=DataConfig(train_path="x.csv", test_path="x.csv", label_column="label",
                                     labels=json.dumps(LABELS)))
    fed = cfg.federation
    fed.batch_size, fed.local_steps, fed.rounds, fed.optimizer, fed.lr = 8, 1, 1, "sgd", 1.0
    cfg.privacy.target_epsilon, cfg.privacy.noise_multiplier, cfg.privacy.max_grad_norm = 0.0, 1.0, 1.0
    for key, value in privacy.items():
        setattr(cfg.privacy, key, value)
    cfg.secagg.clipping_range = 1e4  # room for the noise: the release is not scaled into the range
    cfg.secagg.modulus_range = 2**40
    return cfg.validate()


def _settings(data: Path, tmp_path: Path, **policy: Any) -> NodeSettings:
    return NodeSettings(**{**dict(data_path=str(data), text_column=None, label_column=None, max_epsilon=50.0,
                                  ledger_path=tmp_path / f"{data.stem}-{len(policy)}.json", device="cpu",
                                  partition_id=None, num_partitions=None, max_sample_rate=0.05,
                                  allow_test_model=True), **policy})


def _data(tmp_path: Path, *, all_target: bool) -> Path:
    text = TARGET if all_target else "my card was lost"
    path = tmp_path / f"{'target' if all_target else 'plain'}.csv"
    path.write_text("text,label\n" + "".join(f"{text} {i},card\n" for i in range(40)), encoding="utf-8")
    return path


def _weights(cfg: VeilConfig) -> list[np.ndarray]:
    return get_trainable(build_model(cfg.model, LABELS, seed=cfg.federation.seed))


def _values(update: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([u.ravel() for u in update])


def test_a_nan_update_is_clipped_to_zero_not_passed_through() -> None:
    update = [np.array([np.nan, 0.0], np.float32), np.full(1000, 3.0, np.float32)]
    clipped, norm = clip_update(update, clip=1.0)
    assert norm == np.inf and all(np.isfinite(c).all() and not c.any() for c in clipped)


def test_a_non_finite_client_level_update_releases_the_declared_share(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(level="client", noise_placement="distributed", noise_multiplier=2.0)
    nan = LocalResult(update=[np.full(w.shape, np.nan, np.float32) for w in _weights(cfg)], loss=0.0, steps=1,
                      sample_rate=0.0, examples=40)
    monkeypatch.setattr(client_app, "train_round", lambda *a, **k: nan)
    settings = _settings(_data(tmp_path, all_target=False), tmp_path, min_cohort=4)
    update, weight, metrics = VeilClient(cfg, settings, run_id=1).fit(_weights(cfg), {"server_round": 1})
    share = 2.0 * 1.0 / np.sqrt(4)
    assert weight == 1 and metrics["noise_std"] == pytest.approx(share)
    assert np.std(_values(update)) == pytest.approx(share, rel=0.1), "the share, never zeros"


def test_a_non_finite_sample_level_update_releases_noise_of_the_declared_std(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg()
    nan = LocalResult(update=[np.full(w.shape, np.inf, np.float32) for w in _weights(cfg)], loss=0.0, steps=1,
                      sample_rate=0.05, examples=40)
    monkeypatch.setattr(client_app, "train_round", lambda *a, **k: nan)
    update, weight, metrics = VeilClient(cfg, _settings(_data(tmp_path, all_target=False), tmp_path),
                                         run_id=1).fit(_weights(cfg), {"server_round": 1})
    assert weight == 1 and metrics["refused"] == 0
    assert np.std(_values(update)) == pytest.approx(1.0 * 1.0 / 2, rel=0.1), "σC/E[B], E[B] = 0.05 × 40 = 2"


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, hit: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(hit)
        return logits.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # type: ignore[override]
        (hit,) = ctx.saved_tensors
        return torch.where(hit[:, None], torch.full_like(grad, float("inf")), grad), None


class _Overflow(nn.Module):
    """Stands in for weights crafted so that texts holding a target token overflow: in the forward (their logits
    become inf) or in the backward alone (a finite loss whose gradient overflows)."""

    def __init__(self, inner: nn.Module, token: int, where: str) -> None:
        super().__init__()
        self.inner, self.token, self.where = inner, token, where

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
        hit = (input_ids == self.token).any(dim=1)  # (B,)
        if self.where == "forward":
            out.logits = torch.where(hit[:, None], torch.full_like(out.logits, float("inf")), out.logits)
        else:
            out.logits = _InfGrad.apply(out.logits, hit)
        return out


@pytest.mark.parametrize("where", ["forward", "backward"])
@pytest.mark.parametrize("engine", ["hooks", "bk"])
def test_an_overflow_on_every_record_releases_the_declared_noise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 where: str, engine: str) -> None:
    from veil.task.model import load_tokenizer

    cfg = _cfg()
    token = load_tokenizer(cfg.model)(TARGET)["input_ids"][1]
    original = client_app.train_round
    monkeypatch.setattr(client_app, "train_round",
                        lambda template, *a, **k: original(_Overflow(template, token, where), *a, **k))
    monkeypatch.setattr("veil.client.trainer.set_trainable", lambda model, arrays: set_trainable(model.inner, arrays))
    monkeypatch.setattr("veil.client.trainer.get_trainable", lambda model: get_trainable(model.inner))
    replies = {}
    for all_target in (True, False):
        settings = _settings(_data(tmp_path, all_target=all_target), tmp_path, dp_engine=engine)
        update, weight, metrics = VeilClient(cfg, settings, run_id=3).fit(_weights(cfg), {"server_round": 1})
        values = _values(update)
        assert weight == 1 and np.isfinite(values).all() and values.any(), "a normal release, never zeros"
        replies[all_target] = metrics
        if all_target:  # every gradient dropped: what is left is the noise, σC/E[B] with E[B] = 2
            assert np.std(values) == pytest.approx(0.5, rel=0.1)
    assert replies[True] == replies[False]
