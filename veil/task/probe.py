"""A non-private linear probe: multinomial logistic regression (scikit-learn, L2) on sentence features.

The reference a data owner would compute alone: what its own data gives it on the base model's frozen features,
with no federation and no privacy needed for its own data. ``veil simulate`` reports it per simulated bank beside
the federation's accuracy (a bank gains by joining only if the federation beats this), and
``benchmarks/head_study.py`` reports it with the pooled-data probe. Never used on a deployed node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from veil.conf.schema import VeilConfig
from veil.task.shards import AuditPlan, client_shard, eval_split

PROBE_C = 10.0  # inverse L2 strength; chosen on the validation split (docs/benchmarks.md, head_study)


def fit_probe(features: torch.Tensor, labels: torch.Tensor, *, c: float = PROBE_C) -> object:
    """Fit logistic regression on (N, H) features and (N,) label ids."""
    from sklearn.linear_model import LogisticRegression

    x, y = features.double().numpy(), labels.numpy()
    probe = LogisticRegression(C=c, max_iter=2000)
    probe.fit(x, y)
    return probe


def probe_accuracy(train: dict[str, torch.Tensor], evaluation: dict[str, torch.Tensor], *,
                   c: float = PROBE_C) -> float:
    """Accuracy on ``evaluation`` of the probe fitted on ``train`` (both: ``features`` and ``labels`` tensors).
    A share holding one label only predicts that label."""
    y = train["labels"]
    if int(torch.unique(y).numel()) < 2:
        return float((evaluation["labels"] == y[0]).float().mean()) if y.numel() else 0.0
    probe = fit_probe(train["features"], y, c=c)
    predicted = probe.predict(evaluation["features"].double().numpy())  # type: ignore[attr-defined]
    return float(np.mean(predicted == evaluation["labels"].numpy()))


@dataclass(frozen=True)
class _SimulatedBank:
    """A simulated owner's shard source (:class:`veil.task.shards.ShardSource`): partition ``partition_id``."""

    partition_id: int
    num_partitions: int
    data_path: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    simulated: bool = True
    planted_examples: str | None = None
    canary_clients: int = 0


def banks_alone(cfg: VeilConfig, audit: AuditPlan | None = None) -> list[dict[str, float]]:
    """Simulation only: each simulated bank's own non-private probe on its own share's features, scored on the
    run's evaluation split: ``[{"bank": i, "examples": n, "accuracy": a}, ...]``. Empty unless the run trains a
    head on cached features (``model.tuning=head``), where the features are at hand. ``audit``: the simulation's
    :class:`veil.task.shards.AuditPlan` (its canary clients are no banks; a bank's share holds what was planted in
    it, as the node's does)."""
    from veil.task.model import uses_features

    if cfg.task.name != "classification" or not uses_features(cfg.model):
        return []
    evaluation, audit = eval_split(cfg), audit or AuditPlan()
    owners = cfg.federation.num_clients - audit.canary_clients
    rows = []
    for bank in range(owners):
        shard = client_shard(cfg, _SimulatedBank(bank, cfg.federation.num_clients,
                                                 planted_examples=audit.planted_examples or None,
                                                 canary_clients=audit.canary_clients))
        rows.append({"bank": bank, "examples": int(shard["labels"].shape[0]),
                     "accuracy": probe_accuracy(shard, evaluation)})
    return rows
