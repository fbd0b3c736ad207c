"""Which examples a process works on: the run's label set, the server's evaluation split, a client's shard.

Loaded once per process and cached: a simulated client's Ray worker keeps its tokenized shard across rounds.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from veil.client.settings import NodeSettings
from veil.conf.schema import DataConfig, ModelConfig, VeilConfig
from veil.errors import ConfigError
from veil.task.data import TextExamples, encode_labels, label_names, partition_indices, read_examples, tokenize
from veil.task.model import load_tokenizer


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
    train, test = read_examples(cfg.train_path, cfg), read_examples(cfg.test_path, cfg)
    return label_names(train, test, train_path=cfg.train_path, test_path=cfg.test_path)


def _tensors(examples: TextExamples, labels: list[str], model: ModelConfig, *, path: str) -> dict[str, torch.Tensor]:
    tok = load_tokenizer(model)
    enc = tokenize(tok, examples.texts, max_length=model.max_length)
    enc["labels"] = torch.as_tensor(encode_labels(examples, labels, path=path))  # (N,)
    return enc


@functools.lru_cache(maxsize=4)
def _eval_cached(data_json: str, model_json: str, labels: tuple[str, ...], seed: int) -> dict[str, torch.Tensor]:
    data, model = DataConfig(**json.loads(data_json)), ModelConfig(**json.loads(model_json))
    examples = read_examples(data.test_path, data)
    if 0 < data.eval_max_examples < len(examples):
        keep = np.sort(np.random.default_rng(seed).choice(len(examples), data.eval_max_examples, replace=False))
        examples = TextExamples([examples.texts[i] for i in keep], [examples.labels[i] for i in keep])
    return _tensors(examples, list(labels), model, path=data.test_path)


def eval_split(cfg: VeilConfig, labels: list[str]) -> dict[str, torch.Tensor]:
    """The server's tokenized evaluation split (the test file, or a seeded subset of it)."""
    return _eval_cached(_key(cfg.data), _key(cfg.model), tuple(labels), cfg.federation.seed)


@functools.lru_cache(maxsize=8)
def _shard_cached(data_json: str, model_json: str, labels: tuple[str, ...], fed_json: str, data_path: str | None,
                  partition: int | None) -> dict[str, torch.Tensor]:
    data, model = DataConfig(**json.loads(data_json)), ModelConfig(**json.loads(model_json))
    fed = json.loads(fed_json)
    if data_path is None:  # simulation: this partition of the run's training file
        examples = read_examples(data.train_path, data)
        _ids, parts = simulated_partitions(examples, list(labels), fed, path=data.train_path)
        idx = parts[int(partition or 0)]
        examples = TextExamples([examples.texts[i] for i in idx], [examples.labels[i] for i in idx])
        if fed.get("planted_examples"):
            examples = with_planted(examples, str(fed["planted_examples"]), partition=int(partition or 0))
        return _tensors(examples, list(labels), model, path=data.train_path)
    return _tensors(read_examples(data_path, data), list(labels), model, path=data_path)


_PARTITION_KEYS = ("num_clients", "partitioner", "alpha", "seed", "min_partition_size", "classes_per_client",
                   "planted_examples")


def with_planted(examples: TextExamples, path: str, *, partition: int) -> TextExamples:
    """The seam for ``veil audit`` (simulation only): this partition's examples plus the ones planted for it in
    ``path`` (JSONL of ``{"partition", "text", "label"}``), shuffled together in an order drawn from OS entropy,
    so the training code sees one list of examples and cannot tell a planted one by its place."""
    import secrets

    try:
        rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        planted = [(str(r["text"]), str(r["label"])) for r in rows if int(r["partition"]) == partition]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"federation.planted_examples={path} is not a readable JSONL of planted examples ({err})") from err
    texts, labels = [*examples.texts, *(t for t, _ in planted)], [*examples.labels, *(lab for _, lab in planted)]
    order = np.random.default_rng(secrets.randbits(128)).permutation(len(texts))
    return TextExamples([texts[i] for i in order], [labels[i] for i in order])


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


def client_shard(cfg: VeilConfig, settings: NodeSettings, labels: list[str]) -> dict[str, torch.Tensor]:
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
    """An absolute path for a data file, resolved against the launch directory."""
    return str(Path(path).expanduser().resolve()) if path else path
