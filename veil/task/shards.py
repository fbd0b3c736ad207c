"""Which examples a process works on: the run's label set, the server's evaluation split, a client's shard.

Loaded once per process and cached: a simulated client's Ray worker keeps its tokenized shard across rounds. What an
example is and how it is tokenized is the task's business (:mod:`veil.task.base`); this module only selects.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from veil.client.settings import NodeSettings
from veil.conf.runconfig import from_run_config, to_run_config
from veil.conf.schema import DataConfig, VeilConfig
from veil.errors import ConfigError
from veil.task import get_task
from veil.task.base import Examples, Task
from veil.task.data import label_names, partition_indices, read_examples


def resolve_labels(cfg: DataConfig) -> list[str]:
    """The run's label names for classification: ``data.labels`` if set, else derived from the two files."""
    if cfg.labels:
        try:
            names = json.loads(cfg.labels)
        except json.JSONDecodeError as err:
            raise ConfigError(f"data.labels is not a JSON list of strings ({err.msg})") from err
        if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
            raise ConfigError("data.labels must be a JSON list of at least two label names")
        return list(names)
    train, test = read_examples(cfg.train_path, cfg), read_examples(cfg.test_path, cfg)
    return label_names(train, test, train_path=cfg.train_path, test_path=cfg.test_path)


def run_labels(cfg: VeilConfig) -> list[str]:
    """The run's label set as fixed at launch (``data.labels``), or the task's own when not fixed yet."""
    if cfg.data.labels:
        names: list[str] = json.loads(cfg.data.labels)
        return names
    return get_task(cfg.task.name).labels(cfg)


def _cfg(flat_json: str) -> VeilConfig:
    return from_run_config(json.loads(flat_json))


@functools.lru_cache(maxsize=4)
def _eval_cached(flat_json: str) -> dict[str, torch.Tensor]:
    cfg = _cfg(flat_json)
    task = get_task(cfg.task.name)
    examples = task.read(cfg.data.test_path, cfg)
    if 0 < cfg.data.eval_max_examples < len(examples):
        rng = np.random.default_rng(cfg.federation.seed)
        examples = examples.subset(np.sort(rng.choice(len(examples), cfg.data.eval_max_examples, replace=False)))
    return task.tensors(examples, run_labels(cfg), cfg, path=cfg.data.test_path, evaluation=True)


def eval_split(cfg: VeilConfig) -> dict[str, torch.Tensor]:
    """The server's tokenized evaluation split (the test file, or a seeded subset of it)."""
    return _eval_cached(_key(cfg))


@functools.lru_cache(maxsize=8)
def _shard_cached(flat_json: str, data_json: str, data_path: str | None, partition: int | None) -> dict[str, torch.Tensor]:
    cfg = _cfg(flat_json)
    data = DataConfig(**json.loads(data_json))
    task, labels = get_task(cfg.task.name), run_labels(cfg)
    if data_path is None:  # simulation: this partition of the run's training file
        examples = task.read(data.train_path, cfg, data)
        _ids, parts = simulated_partitions(task, examples, labels, dataclasses.asdict(cfg.federation), path=data.train_path)
        return task.tensors(examples.subset(parts[int(partition or 0)]), labels, cfg, path=data.train_path)
    return task.tensors(task.read(data_path, cfg, data), labels, cfg, path=data_path)


def simulated_partitions(task: Task, examples: Examples, labels: list[str], fed: Mapping[str, Any], *,
                         path: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Partition ids of the training file and each simulated client's example indices (the one split every process
    computes: the clients for their shard, the launcher for its partition table)."""
    ids = task.partition_ids(examples, labels, path=path)
    return ids, partition_indices(
        ids, num_partitions=int(fed["num_clients"]), partitioner=str(fed["partitioner"]), alpha=float(fed["alpha"]),
        seed=int(fed["seed"]), min_partition_size=int(fed["min_partition_size"]),
        classes_per_client=int(fed.get("classes_per_client", 2)),
    )


def client_shard(cfg: VeilConfig, settings: NodeSettings) -> dict[str, torch.Tensor]:
    """The tokenized examples this node trains on: its own file, or its simulated partition."""
    data = cfg.data
    if settings.text_column or settings.label_column:
        data = dataclasses.replace(data, text_column=settings.text_column or data.text_column,
                                   label_column=settings.label_column or data.label_column)
    if settings.simulated and settings.num_partitions not in (None, cfg.federation.num_clients):
        raise ConfigError(
            f"the simulation has {settings.num_partitions} nodes but federation.num_clients={cfg.federation.num_clients}"
        )
    return _shard_cached(_key(cfg), json.dumps(dataclasses.asdict(data), sort_keys=True), settings.data_path,
                         settings.partition_id)


def _key(cfg: VeilConfig) -> str:
    """The run config as a cache key (constant over a run)."""
    return json.dumps(to_run_config(cfg), sort_keys=True)


def absolute(path: str) -> str:
    """An absolute path for a data file, resolved against the launch directory."""
    return str(Path(path).expanduser().resolve()) if path else path
