"""One file is enough: without ``data.test_path``, a seeded split of the training file (stratified by label for a
task with labels; a plain seeded draw otherwise).

The launcher draws the split once (:func:`write_split`) and writes the exact row ids into the run directory
(``split.json``, with the file's sha256), and every process of the run (the server's evaluation, each simulated
client's shard, the partition table, a resumed run) reads those ids back (:func:`split_examples`), so they all see
the same split even if a default changes later. A changed file is refused rather than silently re-split.

Hand-written because the library splitters refuse what a real file has: scikit-learn's and ``datasets``'
stratified ``train_test_split`` fail on a label with a single example; here such an example stays in training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from veil.conf.schema import DataConfig, VeilConfig
from veil.errors import ConfigError, DataFileError
from veil.task.base import Examples

__all__ = ["SPLIT_FILE", "draw_split", "evaluation_examples", "split_examples", "stratified_test_rows",
           "training_examples", "with_split_path", "write_split"]

SPLIT_FILE = "split.json"


def stratified_test_rows(labels: list[str], *, fraction: float, seed: int) -> np.ndarray:
    """Sorted row ids of the test part: per label, ``round(fraction * n)`` rows drawn with ``seed``, at most
    ``n - 1`` (a label always keeps a training example)."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for row, label in enumerate(labels):
        by_label.setdefault(label, []).append(row)
    test: list[int] = []
    for label in sorted(by_label):  # sorted: the draw does not depend on the file's label order
        rows = np.asarray(by_label[label], dtype=np.int64)
        take = min(int(round(fraction * len(rows))), len(rows) - 1)
        test.extend(rng.permutation(rows)[:take].tolist())
    return np.sort(np.asarray(test, dtype=np.int64))


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _read_train(cfg: VeilConfig, data: DataConfig | None = None) -> Examples:
    from veil.task import get_task

    data = data or cfg.data
    return get_task(cfg.task.name).read(data.train_path, cfg, data)


def _strata(examples: Examples) -> list[str]:
    """What the split is stratified by: the label of each example, or one stratum for a task without labels."""
    labels = getattr(examples, "labels", None)
    return list(labels) if labels is not None else [""] * len(examples)


def draw_split(cfg: VeilConfig, *, seed: int) -> tuple[Examples, np.ndarray]:
    """The training file's examples and the test row ids a run with ``seed`` holds out (nothing written)."""
    data = cfg.data
    examples = _read_train(cfg)
    rows = stratified_test_rows(_strata(examples), fraction=data.test_fraction, seed=seed)
    if len(rows) == 0:
        raise DataFileError(f"data file {data.train_path} is too small to split off data.test_fraction="
                            f"{data.test_fraction}; give data.test_path=FILE or raise data.test_fraction")
    return examples, rows


def write_split(cfg: VeilConfig, *, seed: int) -> Path:
    """Write (or, when resuming, check) ``data.split_path`` for ``data.train_path``; returns its path."""
    data = cfg.data
    path = Path(data.split_path)
    digest = _sha256(data.train_path)
    if path.is_file():  # a resumed run keeps its split
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved["sha256"] != digest:
            raise ConfigError(f"{data.train_path} changed since {path} was written; resume with the same file")
        if (saved["test_fraction"], saved["seed"]) != (data.test_fraction, seed):
            raise ConfigError(f"{path} holds a split with data.test_fraction={saved['test_fraction']} and "
                              f"federation.seed={saved['seed']}; resume with those values")
        return path
    examples, rows = draw_split(cfg, seed=seed)
    record = {"file": data.train_path, "sha256": digest, "seed": seed, "test_fraction": data.test_fraction,
              "rows": len(examples), "test_rows": rows.tolist()}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    tmp.replace(path)
    return path


def split_examples(cfg: VeilConfig, data: DataConfig | None = None) -> tuple[Examples, Examples]:
    """(train, test) of ``data.train_path`` by the ids in ``data.split_path``."""
    data = data or cfg.data
    if not data.split_path or not Path(data.split_path).is_file():
        raise ConfigError("data.test_path is not set and the run has no split file; give data.test_path=FILE")
    saved = json.loads(Path(data.split_path).read_text(encoding="utf-8"))
    examples = _read_train(cfg, data)
    if len(examples) != saved["rows"]:
        raise ConfigError(f"{data.train_path} changed since {data.split_path} was written; run again with that file")
    test = np.zeros(len(examples), dtype=bool)
    test[np.asarray(saved["test_rows"], dtype=np.int64)] = True
    return examples.subset(np.flatnonzero(~test)), examples.subset(np.flatnonzero(test))


def training_examples(cfg: VeilConfig, data: DataConfig | None = None) -> Examples:
    """The run's training examples: the training file, less the split's test rows when there is no test file."""
    data = data or cfg.data
    return split_examples(cfg, data)[0] if not data.test_path else _read_train(cfg, data)


def evaluation_examples(cfg: VeilConfig) -> Examples:
    """The run's evaluation examples: the test file, or the split's test rows of the training file."""
    from veil.task import get_task

    if not cfg.data.test_path:
        return split_examples(cfg)[1]
    return get_task(cfg.task.name).read(cfg.data.test_path, cfg)


def with_split_path(data: DataConfig, run_dir: Path) -> DataConfig:
    """``data`` with ``split_path`` in ``run_dir`` when there is no test file (unchanged otherwise)."""
    return data if data.test_path else dataclasses.replace(data, split_path=str(run_dir / SPLIT_FILE))
