"""Which examples a process works on: the run's label set, the server's evaluation split, a client's shard.

Loaded once per process and cached. In simulation a Ray worker reads and splits the run's training file once, whatever
the population size, and then tokenizes only each sampled client's own examples, so per-client work is proportional
to the client's data. What an example is and how it is tokenized is the task's business (:mod:`veil.task.base`);
this module only selects.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from veil.conf.runconfig import from_run_config, to_run_config
from veil.conf.schema import DataConfig, VeilConfig
from veil.errors import ConfigError, DataFileError
from veil.task import get_task
from veil.task.base import Examples, Task
from veil.task.data import TextExamples, label_names, read_examples
from veil.task.partition import Partitions, partition_indices
from veil.task.split import evaluation_examples, training_examples


class NoUsableExamples(DataFileError):
    """No example of the owner's file has a label in the run's label set: a deployed node then releases noise only
    (``veil.client.app``), so the coordinator cannot tell it from a round with data."""


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
    @property
    def planted_examples(self) -> str | None: ...  # simulation only: veil audit's planted examples (AuditPlan)
    @property
    def canary_clients(self) -> int: ...  # simulation only: veil audit's canary clients (AuditPlan)


@dataclass(frozen=True)
class AuditPlan:
    """What ``veil audit`` adds to a simulated federation, beside (never in) the run config: a Python argument of
    :func:`veil.simulation.simulate`, which hands it to the simulated nodes in their node configs
    (``veil.client.settings.NodeSettings``) and to the launcher's partition table and probe. Default: no audit.

    ``planted_examples``: a JSONL file of canary records (``{"partition", "text", "label"}``, :func:`with_planted`)
    that each simulated owner mixes into its partition (sample level). ``canary_clients``: the last
    ``canary_clients`` of the ``federation.num_clients`` simulated nodes are the audit's canary clients
    (:mod:`veil.audit.clients`), holding no data: the training file is split among the others (client level).
    """

    planted_examples: str = ""
    canary_clients: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.canary_clients, bool) or not isinstance(self.canary_clients, int) or self.canary_clients < 0:
            raise ValueError(f"canary_clients={self.canary_clients!r} is invalid: expected an integer >= 0")

    @classmethod
    def of(cls, source: ShardSource) -> AuditPlan:
        """The plan as a simulated node's settings carry it."""
        return cls(planted_examples=source.planted_examples or "", canary_clients=int(source.canary_clients))


log = logging.getLogger("veil.task")


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
    train = read_examples(cfg.train_path, cfg)
    if not cfg.test_path:  # the split keeps every label in training: the file's labels are the run's
        return label_names(train, train, train_path=cfg.train_path, test_path=cfg.train_path)
    test = read_examples(cfg.test_path, cfg)
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
    examples = evaluation_examples(cfg)
    if 0 < cfg.data.eval_max_examples < len(examples):
        rng = np.random.default_rng(cfg.federation.seed)
        examples = examples.subset(np.sort(rng.choice(len(examples), cfg.data.eval_max_examples, replace=False)))
    return task.tensors(examples, run_labels(cfg), cfg, path=cfg.data.test_path or cfg.data.train_path, evaluation=True)


def eval_split(cfg: VeilConfig) -> dict[str, torch.Tensor]:
    """The server's tokenized evaluation split (the test file, or a seeded subset of it)."""
    return _eval_cached(_key(cfg))


@functools.lru_cache(maxsize=32)
def _shard_cached(flat_json: str, data_json: str, data_path: str | None, partition: int | None,
                  audit: AuditPlan) -> dict[str, torch.Tensor]:
    cfg = _cfg(flat_json)
    data = DataConfig(**json.loads(data_json))
    task, labels = get_task(cfg.task.name), run_labels(cfg)
    if data_path is None:  # simulation: this partition of the run's training file (read and split once per worker)
        examples, parts = _training_partitions(flat_json, data_json, audit.canary_clients)
        mine = examples.subset(parts[int(partition or 0)])
        if audit.planted_examples:  # veil audit's canaries (simulation only)
            mine = with_planted(mine, audit.planted_examples, partition=int(partition or 0))
            return task.tensors(mine, labels, cfg, path=data.train_path)
        return _simulated_features(cfg, int(partition or 0),
                                   lambda: task.tensors(mine, labels, cfg, path=data.train_path))
    # a deployed owner's file: every sequence padded to model.max_length, so that no tensor shape, and no step's
    # cost, depends on the owner's longest record (review 2026-12-07, N6); simulation keeps the faster "longest"
    return task.tensors(known_labels_only(task.read(data_path, cfg, data), labels, path=data_path), labels, cfg,
                        path=data_path, fixed_length=True)


def _simulated_features(cfg: VeilConfig, partition: int, compute: Any) -> dict[str, torch.Tensor]:
    """A simulated partition's tensors; with ``model.tuning=head`` its sentence features are computed once per run
    and kept in ``<output_dir>/features/`` (atomic write), so the Ray workers that happen to get the same simulated
    bank, and the launcher's per-bank report, do not run the encoder over it again. Simulation only: a deployed
    node keeps its features in memory."""
    from veil.task.model import uses_features

    if not cfg.output_dir or not uses_features(cfg.model):
        return compute()  # type: ignore[no-any-return]
    from pathlib import Path

    path = Path(cfg.output_dir) / "features" / f"partition-{partition}.pt"
    if path.is_file():
        try:
            return dict(torch.load(path, weights_only=True))
        except (OSError, RuntimeError, EOFError):
            log.warning("features cache %s is unreadable; recomputing it", path)
    tensors = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(tensors, tmp)
    os.replace(tmp, path)  # two workers may write the same partition: the last complete file wins
    return tensors  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=2)
def _training_partitions(flat_json: str, data_json: str, canary_clients: int) -> tuple[Examples, Partitions]:
    """The run's training examples and every simulated client's indices, split once per worker process (each client's
    indices computed when that client is first sampled here: :mod:`veil.task.partition`)."""
    cfg = _cfg(flat_json)
    data = DataConfig(**json.loads(data_json))
    task = get_task(cfg.task.name)
    examples = training_examples(cfg, data)
    _ids, parts = simulated_partitions(task, examples, run_labels(cfg), dataclasses.asdict(cfg.federation),
                                       path=data.train_path, canary_clients=canary_clients)
    return examples, parts


def with_planted(examples: Examples, path: str, *, partition: int) -> TextExamples:
    """The seam for ``veil audit`` (simulation only, :attr:`AuditPlan.planted_examples`): this partition's examples
    plus the ones planted for it in ``path`` (JSONL of ``{"partition", "text", "label"}``), shuffled together in an
    order drawn from OS entropy, so the training code sees one list of examples and cannot tell a planted one by its
    place."""
    import secrets
    from pathlib import Path

    if not isinstance(examples, TextExamples):
        raise ConfigError("planted examples need task=classification (veil audit plants labelled texts)")
    try:
        rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        planted = [(str(r["text"]), str(r["label"])) for r in rows if int(r["partition"]) == partition]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"planted examples {path} are not a readable JSONL of planted examples ({err})") from err
    texts, labels = [*examples.texts, *(t for t, _ in planted)], [*examples.labels, *(lab for _, lab in planted)]
    order = np.random.default_rng(secrets.randbits(128)).permutation(len(texts))
    return TextExamples([texts[i] for i in order], [labels[i] for i in order])


def known_labels_only(examples: Examples, labels: list[str], *, path: str) -> Examples:
    """The examples whose label is in the run's label set (a task without labels: all). The others are skipped and
    counted in the node's log only: an error would tell the coordinator, who chose the label set, whether a label
    occurs in the owner's file."""
    if not labels or not isinstance(examples, TextExamples):
        return examples
    known = set(labels)
    keep = [i for i, label in enumerate(examples.labels) if label in known]
    if len(keep) < len(examples):
        log.warning("%d example(s) of %s have a label outside the run's label set and are skipped",
                    len(examples) - len(keep), path)
    if not keep:  # the node releases noise only (no refusal: that would tell whether a label occurs in the file)
        raise NoUsableExamples(f"no example of {path} has a label in the run's label set")
    return examples.subset(np.asarray(keep, dtype=np.int64))


def node_labels(cfg: VeilConfig, settings: ShardSource) -> list[str]:
    """The run's label names as a node sees them: a deployed node takes them from the run config only (it never
    opens a file the run config names); a simulated node may derive them from the run's files."""
    if not settings.simulated and not cfg.data.labels:
        raise ConfigError("the run config carries no data.labels; a deployed node does not read the run's files")
    return run_labels(cfg)


def simulated_partitions(task: Task, examples: Examples, labels: list[str], fed: Mapping[str, Any], *,
                         path: str, canary_clients: int = 0) -> tuple[np.ndarray, Partitions]:
    """Partition ids of the training file and each simulated client's example indices (the one split every process
    computes: the clients for their shard, the launcher for its partition table). The audit's canary clients
    (:attr:`AuditPlan.canary_clients`, the last nodes) hold no data: the file is split among the others."""
    ids = task.partition_ids(examples, labels, path=path)
    return ids, partition_indices(
        ids, num_partitions=int(fed["num_clients"]) - canary_clients, partitioner=str(fed["partitioner"]),
        alpha=float(fed["alpha"]),
        seed=int(fed["seed"]), min_partition_size=int(fed["min_partition_size"]),
        classes_per_client=int(fed.get("classes_per_client", 2)),
    )


def client_shard(cfg: VeilConfig, settings: ShardSource) -> dict[str, torch.Tensor]:
    """The tokenized examples this node trains on: its own file, or its simulated partition."""
    data = cfg.data
    if settings.data_path is not None:  # the owner's file, read as its start-up check read it (`veil client`)
        plain = DataConfig(train_path=settings.data_path)
        data = dataclasses.replace(data, format=plain.format, delimiter=plain.delimiter, quoting=plain.quoting,
                                   header=plain.header)
    if settings.text_column or settings.label_column:
        data = get_task(cfg.task.name).node_data(data, text_column=settings.text_column,
                                                 label_column=settings.label_column)
    if settings.simulated and settings.num_partitions not in (None, cfg.federation.num_clients):
        raise ConfigError(
            f"the simulation has {settings.num_partitions} nodes but federation.num_clients={cfg.federation.num_clients}"
        )
    return _shard_cached(_key(cfg), json.dumps(dataclasses.asdict(data), sort_keys=True), settings.data_path,
                         settings.partition_id, AuditPlan.of(settings))


def _key(cfg: VeilConfig) -> str:
    """The run config as a cache key (constant over a run)."""
    return json.dumps(to_run_config(cfg), sort_keys=True)


def absolute(path: str) -> str:
    """An absolute path for a data file: ``package:NAME`` inside veil (the shipped data), any other path resolved
    against the launch directory."""
    from veil.data import resolve_data_path

    return resolve_data_path(path)
