"""Shared DP-SGD noise (``privacy.share_noise``, issue 22): each of M owners adds σ/sqrt(M) to its one SGD step of a
round, divided by the run's public batch size, so that SecAgg+'s sum of their updates carries the run's σ.

References: the plain sum of M real node updates (each from ``VeilClient.fit``, the node's whole path) against the
hand figure lr·C·σ/B per value; a node that does not share (``--min-cohort 1``) sends the full σ; the ledger's
booking against σ/sqrt(M); the coordinator's stated ε against an independent PLD accountant.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.references import pld_epsilon

from veil.client.app import VeilClient
from veil.client.round_plan import noise_shares
from veil.client.settings import NodeSettings
from veil.conf.schema import DataConfig, ModelConfig, VeilConfig
from veil.errors import ConfigError
from veil.privacy.calibration import shared_noise_sigma
from veil.privacy.ledger import PrivacyLedger
from veil.server.guarantee import coordinator_epsilon, epsilon_basis
from veil.task.model import build_model, get_trainable

LABELS = ["card", "cash", "fee", "pin"]
SIGMA, LR, BATCH, RATE = 2.0, 1.0, 50, 0.001  # q so small that a round almost never samples a row: noise alone


def _cfg(**privacy: Any) -> VeilConfig:
    cfg = VeilConfig(model=ModelConfig(name="tiny", tiny=True, max_length=16),
                     data=DataConfig(train_path="unused.csv", test_path="unused.csv", label_column="label",
                                     labels=json.dumps(LABELS)))
    fed = cfg.federation
    fed.batch_size, fed.local_steps, fed.rounds, fed.optimizer, fed.lr, fed.sample_rate = BATCH, 1, 3, "sgd", LR, RATE
    cfg.privacy.target_epsilon, cfg.privacy.noise_multiplier, cfg.privacy.share_noise = 0.0, SIGMA, True
    for key, value in privacy.items():
        setattr(cfg.privacy, key, value)
    return cfg.validate()


def _node(tmp_path: Path, name: str, **policy: Any) -> NodeSettings:
    data = tmp_path / f"{name}.csv"
    data.write_text("text,label\n" + "".join(f"my card was lost {i},card\n" for i in range(8)), encoding="utf-8")
    return NodeSettings(**{**dict(data_path=str(data), text_column=None, label_column=None,
                                  ledger_path=tmp_path / f"{name}.json", device="cpu", partition_id=None,
                                  num_partitions=None, allow_test_model=True, max_epsilon=math.inf), **policy})


def _updates(cfg: VeilConfig, settings: NodeSettings, rounds: int) -> list[np.ndarray]:
    weights = get_trainable(build_model(cfg.model, LABELS, seed=cfg.federation.seed))
    client, flat = VeilClient(cfg, settings, run_id=7), []
    for rnd in range(1, rounds + 1):
        update, weight, _metrics = client.fit(weights, {"server_round": rnd})
        assert weight == 1
        flat.append(np.concatenate([np.ravel(u) for u in update]).astype(np.float64))
    return flat


def test_the_sum_of_m_shared_updates_carries_the_run_sigma(tmp_path: Path) -> None:
    m, rounds = 4, 3
    cfg = _cfg()
    nodes = [_updates(cfg, _node(tmp_path, f"n{i}", min_cohort=m), rounds) for i in range(m)]
    sums = np.stack([sum(node[r] for node in nodes) for r in range(rounds)])
    per_value = LR * cfg.privacy.max_grad_norm * SIGMA / BATCH  # one DP-SGD step of σ, divided by the run's B
    assert sums.std() == pytest.approx(per_value, rel=0.15), "the sum of M shares must carry the run's σ"
    assert np.stack(nodes[0]).std() == pytest.approx(per_value / math.sqrt(m), rel=0.15), "one share is σ/sqrt(M)"
    alone = np.stack(_updates(cfg, _node(tmp_path, "alone", min_cohort=1), rounds))
    assert alone.std() == pytest.approx(per_value, rel=0.15), "an owner who counts on nobody adds the full σ"
    (event, *_rest) = PrivacyLedger.open(tmp_path / "n0.json", create=False).events
    assert event.noise_multiplier == pytest.approx(SIGMA / math.sqrt(m)) and event.sample_rate == RATE
    assert event.steps == 1, "the ledger books the node's own share, one step a round"


def test_owners_with_other_deltas_rate_caps_and_floors_send_the_same_kind_of_step(tmp_path: Path) -> None:
    """The step size and the share come from public figures: an owner's --delta or --max-sample-rate changes its own
    ledger, never the σ/sqrt(M) it adds nor its lr (else one owner's record would face less noise); a σ floor above
    the share raises the owner's noise, not its lr."""
    cfg = _cfg(target_epsilon=4.0, delta=1e-6)
    cfg.federation.lr_noise_ref = ref = 0.05
    run_sigma = shared_noise_sigma(cfg)
    lr = LR * min(1.0, ref / run_sigma)
    floor = 3 * run_sigma
    owners = {"plain": (_node(tmp_path, "plain", min_cohort=2), run_sigma / math.sqrt(2)),
              "strict": (_node(tmp_path, "strict", min_cohort=2, delta=1e-6, max_sample_rate=RATE / 2),
                         run_sigma / math.sqrt(2)),
              "floor": (_node(tmp_path, "floor", min_cohort=2, min_noise_multiplier=floor), floor)}
    for name, (settings, own_sigma) in owners.items():
        (update,) = _updates(cfg, settings, 1)
        (event,) = PrivacyLedger.open(settings.ledger_path, create=False).events
        assert event.noise_multiplier == pytest.approx(own_sigma), name
        assert update.std() == pytest.approx(lr * own_sigma / BATCH, rel=0.15), name
    rates = [PrivacyLedger.open(s.ledger_path, create=False).events[0].sample_rate for s, _ in owners.values()]
    assert rates == [RATE, RATE / 2, RATE], "each owner samples (and books) at its own q"


def test_noise_is_shared_only_when_the_sum_is_one_step(tmp_path: Path) -> None:
    owner = _node(tmp_path, "o", min_cohort=5)
    assert noise_shares(_cfg(), owner) == 5
    for field, value in (("local_steps", 2), ("optimizer", "adamw"), ("sample_rate", 0.0)):
        cfg = _cfg()
        setattr(cfg.federation, field, value)  # a run config that skipped validation: an ordinary round
        assert noise_shares(cfg, owner) is None, field
    cfg = _cfg()
    cfg.secagg.enabled = False
    assert noise_shares(cfg, owner) is None
    assert noise_shares(_cfg(share_noise=False), owner) is None
    assert noise_shares(_cfg(), _node(tmp_path, "p")) == 1, "--min-cohort 1: a shared run, the node's own σ whole"


@pytest.mark.parametrize("field,value,named", [
    ("local_steps", 2, "federation.local_steps"), ("optimizer", "adamw", "federation.optimizer"),
    ("sample_rate", 0.0, "federation.sample_rate")])
def test_a_shared_noise_run_that_is_not_one_step_is_refused(field: str, value: Any, named: str) -> None:
    cfg = VeilConfig(model=ModelConfig(name="tiny", tiny=True), data=DataConfig(train_path="unused.csv"))
    cfg.privacy.share_noise, cfg.federation.optimizer, cfg.federation.local_steps = True, "sgd", 1
    cfg.federation.sample_rate = 0.01
    setattr(cfg.federation, field, value)
    with pytest.raises(ConfigError, match=named):
        cfg.validate()


def test_the_stated_epsilon_is_the_sum_s_noise_at_the_run_s_rate() -> None:
    cfg = _cfg(noise_multiplier=1.0)
    cfg.federation.sample_rate = 0.05
    assert epsilon_basis(cfg, simulation=True) == epsilon_basis(cfg, simulation=False) == "shared_noise"
    stated = coordinator_epsilon(cfg, basis="shared_noise", rounds_run=30)
    reference = pld_epsilon([(1.0, 0.05, 30)], cfg.privacy.delta)
    assert reference <= stated <= 1.03 * reference
    target = _cfg(target_epsilon=4.0)
    assert coordinator_epsilon(target, basis="shared_noise", rounds_run=target.federation.rounds) <= 4.0
