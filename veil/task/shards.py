"""Which examples a process works on: the run's label set, the server's evaluation split, a client's shard.

Loaded once per process and cached. In simulation a Ray worker reads, splits and tokenizes the run's training file
once (:class:`veil.task.token_cache.TrainingSplit`, whatever the population size) and then assembles each sampled
client's shard from its own examples only, so per-client work is proportional to the client's data.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import torch

from veil.conf.schema import DataConfig, ModelConfig, VeilConfig
from veil.errors import ConfigError, DataFileError
from veil.task.data import TextExamples, encode_labels, label_names, partition_indices, read_examples, tokenize
from veil.task.model import load_tokenizer
from veil.task.split import evaluation_examples, training_examples
from veil.task.token_cache import TrainingSplit


class ShardSource(Protocol):
    """Where a node's examples come from (what :func:`client_shard` reads of ``veil.client.settings.NodeSettings``;
    a protocol, so the task package imports no node code)."""

    @property
    def data_path(self) -> str | None: ...  # None in simulation: the run's training file, split by partition id
    @property
    def text_column(self) -> str | None: ...
    @property
    def label_column(self) -> str | None: ...
    @property
    def partition_id(self) -> int | None: ...
    @property
    def num_partitions(self) -> int | None: ...
    @property
    def simulated(self) -> bool: ...


log = logging.getLogger("veil.task")


def resolve_labels(cfg: DataConfig) -> list[str]:
    """The run's label names: ``data.labels`` if set, else derived from the training and test files."""
    if cfg.labels:
        try:
            names = json.loads(cfg.labels)
        except json.JSONDecodeError as err:
            raise ConfigError(f"data.labels is not a JSON list of strings ({err.msg})") from err
        if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
            raise ConfigError("data.labels must be a JSON list of at least two label names")
        return list(names)
    train = read_examples(cfg.train_path, cfg)
    if not cfg.test_path:  # the split keeps every label in training: the file's labels are the run's
        return label_names(train, train, train_path=cfg.train_path, test_path=cfg.train_path)
    test = read_examples(cfg.test_path, cfg)
    return label_names(train, test, train_path=cfg.train_path, test_path=cfg.test_path)


@functools.lru_cache(maxsize=2)
def _tokenizer(model_json: str) -> object:
    return load_tokenizer(ModelConfig(**json.loads(model_json)))


def _tensors(examples: TextExamples, labels: list[str], model: ModelConfig, *, path: str) -> dict[str, torch.Tensor]:
    tok = _tokenizer(_key(model))
    enc = tokenize(tok, examples.texts, max_length=model.max_length)
    enc["labels"] = torch.as_tensor(encode_labels(examples, labels, path=path))  # (N,)
    return enc


@functools.lru_cache(maxsize=4)
def _eval_cached(data_json: str, model_json: str, labels: tuple[str, ...], seed: int) -> dict[str, torch.Tensor]:
    data, model = DataConfig(**json.loads(data_json)), ModelConfig(**json.loads(model_json))
    examples = evaluation_examples(data)
    if 0 < data.eval_max_examples < len(examples):
        keep = np.sort(np.random.default_rng(seed).choice(len(examples), data.eval_max_examples, replace=False))
        examples = TextExamples([examples.texts[i] for i in keep], [examples.labels[i] for i in keep])
    return _tensors(examples, list(labels), model, path=data.test_path or data.train_path)


def eval_split(cfg: VeilConfig, labels: list[str]) -> dict[str, torch.Tensor]:
    """The server's tokenized evaluation split (the test file, or a seeded subset of it)."""
    return _eval_cached(_key(cfg.data), _key(cfg.model), tuple(labels), cfg.federation.seed)


@functools.lru_cache(maxsize=8)
def _shard_cached(data_json: str, model_json: str, labels: tuple[str, ...], fed_json: str, data_path: str | None,
                  partition: int | None) -> dict[str, torch.Tensor]:
    data, model = DataConfig(**json.loads(data_json)), ModelConfig(**json.loads(model_json))
    if data_path is None:  # simulation: this partition of the run's training file (split and tokenized once)
        return _training_split(data_json, model_json, labels, fed_json).shard(int(partition or 0))
    return _tensors(known_labels_only(read_examples(data_path, data), labels, path=data_path), list(labels), model,
                    path=data_path)


def known_labels_only(examples: TextExamples, labels: tuple[str, ...] | list[str], *, path: str) -> TextExamples:
    """The examples whose label is in the run's label set. The others are skipped and counted in the node's log
    only: an error would tell the coordinator, who chose the label set, whether a label occurs in the file."""
    known = set(labels)
    keep = [i for i, label in enumerate(examples.labels) if label in known]
    if len(keep) < len(examples):
        log.warning("%d example(s) of %s have a label outside the run's label set and are skipped",
                    len(examples) - len(keep), path)
    if not keep:  # a refusal, like any other (docs/privacy.md lists this residual bit)
        raise DataFileError(f"no example of {path} has a label in the run's label set")
    return TextExamples([examples.texts[i] for i in keep], [examples.labels[i] for i in keep])


def node_labels(cfg: VeilConfig, settings: ShardSource) -> list[str]:
    """The run's label names as a node sees them: a deployed node takes them from the run config only (it never
    opens a file the run config names); a simulated node may derive them from the run's files."""
    if not settings.simulated and not cfg.data.labels:
        raise ConfigError("the run config carries no data.labels; a deployed node does not read the run's files")
    return resolve_labels(cfg.data)


@functools.lru_cache(maxsize=2)
def _training_split(data_json: str, model_json: str, labels: tuple[str, ...], fed_json: str) -> TrainingSplit:
    data, model = DataConfig(**json.loads(data_json)), ModelConfig(**json.loads(model_json))
    examples = training_examples(data)
    ids, parts = simulated_partitions(examples, list(labels), json.loads(fed_json), path=data.train_path)
    return TrainingSplit.build(_tokenizer(model_json), examples.texts, ids, parts, max_length=model.max_length)


_PARTITION_KEYS = ("num_clients", "partitioner", "alpha", "seed", "min_partition_size", "classes_per_client")


def simulated_partitions(examples: TextExamples, labels: list[str], fed: Mapping[str, Any], *,
                         path: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Label ids of the training file and each simulated client's example indices (the one split every process
    computes: the clients for their shard, the launcher for its partition table)."""
    ids = encode_labels(examples, labels, path=path)
    return ids, partition_indices(
        ids, num_partitions=int(fed["num_clients"]), partitioner=str(fed["partitioner"]), alpha=float(fed["alpha"]),
        seed=int(fed["seed"]), min_partition_size=int(fed["min_partition_size"]),
        classes_per_client=int(fed.get("classes_per_client", 2)),
    )


def client_shard(cfg: VeilConfig, settings: ShardSource, labels: list[str]) -> dict[str, torch.Tensor]:
    """The tokenized examples this node trains on: its own file, or its simulated partition."""
    data = cfg.data
    if settings.text_column or settings.label_column:
        data = DataConfig(**{**_asdict(data), "text_column": settings.text_column or data.text_column,
                             "label_column": settings.label_column or data.label_column})
    fed = {k: getattr(cfg.federation, k) for k in _PARTITION_KEYS}
    if settings.simulated and settings.num_partitions not in (None, cfg.federation.num_clients):
        raise ConfigError(
            f"the simulation has {settings.num_partitions} nodes but federation.num_clients={cfg.federation.num_clients}"
        )
    return _shard_cached(_key(data), _key(cfg.model), tuple(labels), json.dumps(fed, sort_keys=True),
                         settings.data_path, settings.partition_id)


def _asdict(obj: object) -> dict[str, object]:
    import dataclasses

    return dataclasses.asdict(obj)  # type: ignore[call-overload, no-any-return]


def _key(obj: object) -> str:
    return json.dumps(_asdict(obj), sort_keys=True)


def absolute(path: str) -> str:
    """An absolute path for a data file: ``package:NAME`` inside veil (the shipped data), any other path resolved
    against the launch directory."""
    from veil.data import resolve_data_path

    return resolve_data_path(path)
