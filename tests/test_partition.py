"""The Dirichlet, IID and pathological splits are deterministic for a seed and assign every example to exactly one client."""

from __future__ import annotations

import numpy as np
import pytest

from veil.conf.schema import DataConfig
from veil.errors import ConfigError
from veil.task.data import encode_labels, label_names, partition_indices, read_examples


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
