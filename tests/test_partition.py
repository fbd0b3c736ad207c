"""The Dirichlet and IID splits are deterministic for a seed and assign every example to exactly one client."""

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
