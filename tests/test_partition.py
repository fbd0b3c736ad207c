"""The Dirichlet, IID and pathological splits are deterministic for a seed and assign every example to exactly one client."""

from __future__ import annotations

import numpy as np
import pytest

from veil.conf.schema import DataConfig
from veil.errors import ConfigError
from veil.task.data import encode_labels, label_names, read_examples
from veil.task.partition import partition_indices


@pytest.mark.parametrize("partitioner", ["dirichlet", "iid"])
def test_partition_is_deterministic_and_exact(banking77, partitioner: str) -> None:
    cfg = DataConfig()
    train = read_examples(banking77 / "train.csv", cfg)
    test = read_examples(banking77 / "test.csv", cfg)
    names = label_names(train, test, train_path="train", test_path="test")
    ids = encode_labels(train, names, path="train")
    kwargs = dict(num_partitions=5, partitioner=partitioner, alpha=0.5, min_partition_size=10)
    a = partition_indices(ids, seed=7, **kwargs)
    b = partition_indices(ids, seed=7, **kwargs)
    c = partition_indices(ids, seed=8, **kwargs)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True)), "another seed gives another split"
    every = np.concatenate(a)
    assert len(every) == len(ids) == len(np.unique(every)), "each example in exactly one partition"
    assert all(len(p) >= 10 for p in a)
    if partitioner == "dirichlet":  # skewed label mixes: some client lacks some intent
        assert any(len(np.unique(ids[p])) < len(names) for p in a)


def test_too_many_clients_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="federation.num_clients"):
        partition_indices(np.array([0, 1, 0]), num_partitions=5, partitioner="iid", alpha=1.0, seed=0,
                          min_partition_size=1)


def test_pathological_gives_each_client_exactly_k_labels(banking77) -> None:
    cfg = DataConfig()
    train = read_examples(banking77 / "train.csv", cfg)
    test = read_examples(banking77 / "test.csv", cfg)
    ids = encode_labels(train, label_names(train, test, train_path="train", test_path="test"), path="train")
    kwargs = dict(num_partitions=10, partitioner="pathological", alpha=0.5, min_partition_size=10, classes_per_client=3)

    a = partition_indices(ids, seed=7, **kwargs)
    b = partition_indices(ids, seed=7, **kwargs)

    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert [len(np.unique(ids[p])) for p in a] == [3] * 10
    every = np.concatenate(a)
    assert len(every) == len(np.unique(every)), "no example in two partitions"
    held = np.unique(ids[every])
    assert len(every) == int(np.isin(ids, held).sum()), "every example of a held label is assigned"
    assert all(i in ids[p] for i, p in enumerate(a)), "first-deterministic: client i holds label i mod L"


def test_pathological_with_more_classes_than_labels_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="federation.classes_per_client=5"):
        partition_indices(np.array([0, 1, 0, 1, 2, 2]), num_partitions=2, partitioner="pathological", alpha=1.0,
                          seed=0, min_partition_size=1, classes_per_client=5)


def test_schema_accepts_pathological_and_checks_classes_per_client() -> None:
    from veil.conf.schema import VeilConfig

    cfg = VeilConfig()
    cfg.data.train_path, cfg.data.test_path = "train.csv", "test.csv"
    cfg.federation.partitioner = "pathological"
    assert cfg.validate() is cfg
    cfg.federation.classes_per_client = 0
    with pytest.raises(ConfigError, match="federation.classes_per_client=0"):
        cfg.validate()


def _library_partitions(labels: np.ndarray, partitioner: str, n: int, *, seed: int, alpha: float = 0.5,
                        min_size: int = 1, classes: int = 2) -> list[np.ndarray]:
    """The reference: flwr-datasets' partitioner, one ``load_partition`` per client (the former eager path)."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    dataset = Dataset.from_dict({"idx": np.arange(len(labels)), "label": labels})
    if partitioner == "iid":
        part, dataset = IidPartitioner(num_partitions=n), dataset.shuffle(seed=seed)
    elif partitioner == "dirichlet":
        part = DirichletPartitioner(num_partitions=n, partition_by="label", alpha=alpha, min_partition_size=min_size,
                                    self_balancing=False, seed=seed)
    else:
        part = PathologicalPartitioner(num_partitions=n, partition_by="label", num_classes_per_partition=classes,
                                       class_assignment_mode="first-deterministic", shuffle=True, seed=seed)
    part.dataset = dataset
    return [np.sort(np.asarray(part.load_partition(i)["idx"], dtype=np.int64)) for i in range(n)]


@pytest.mark.parametrize(("partitioner", "n"), [("iid", 7), ("iid", 50), ("iid", 503), ("dirichlet", 9),
                                                ("pathological", 12)])
def test_every_client_gets_the_libraries_partition(partitioner: str, n: int) -> None:
    """The IID cut taken in one np.array_split, and the lazily loaded Dirichlet/pathological partitions, equal what
    flwr-datasets' partitioner gives each client (N=1003 examples: not divisible by any n here)."""
    labels = np.random.default_rng(0).integers(0, 11, 1003)
    want = _library_partitions(labels, partitioner, n, seed=5, min_size=min(10, len(labels) // n))
    got = partition_indices(labels, num_partitions=n, partitioner=partitioner, alpha=0.5, seed=5,
                            min_partition_size=10, classes_per_client=2)
    order = np.random.default_rng(1).permutation(n)  # the order a worker meets its clients must not matter
    for i in order:
        assert got[int(i)].dtype == np.int64
        assert np.array_equal(got[int(i)], want[int(i)]), f"{partitioner}: client {i} differs from the library"
    assert len(got) == n and [len(p) for p in got] == [len(p) for p in want]


def test_partitions_are_computed_once_and_only_when_asked() -> None:
    labels = np.random.default_rng(0).integers(0, 5, 400)
    parts = partition_indices(labels, num_partitions=40, partitioner="dirichlet", alpha=1.0, seed=0,
                              min_partition_size=1)
    assert parts.loaded == 1, "only client 0 is loaded up front (the partitioner's one-off draw and its check)"
    first = parts[17]
    assert parts.loaded == 2 and parts[17] is first, "a client's indices are kept, not recomputed"
    assert parts[-1] is parts[39] and [len(p) for p in parts[3:5]] == [len(parts[3]), len(parts[4])]
    with pytest.raises(ValueError):
        first[0] = 1  # read-only: every caller in the process shares them
    with pytest.raises(IndexError):
        parts[40]
