"""Splitting a training file's examples across simulated clients with flwr-datasets partitioners, at any population.

``partition_indices`` answers "which examples does client ``i`` hold" for IID, Dirichlet-over-labels and
pathological (k labels per client; Li et al., arXiv:2102.02079) splits. Its result, :class:`Partitions`, is a
sequence computed once per process and read lazily: a simulation worker asks only for the clients it is sampled as,
so its work per client is proportional to that client's data, not to the population (issue 14).

Why not simply ``[partitioner.load_partition(i) for i in range(P)]``, as before: every ``load_partition`` builds a
Hugging Face ``Dataset`` (Arrow table, feature deep-copies, a fingerprint): about 3-4 ms each on this project's
2-core machine, so 30-60 s for 10,000 clients, in the launcher and again in every Ray worker. Hence:

- ``iid``: flwr-datasets' ``IidPartitioner`` cuts the seeded shuffle of the dataset into contiguous shards with
  ``Dataset.shard(num_shards=P, index=i, contiguous=True)``, whose rule is that of ``np.array_split`` (the first
  ``N mod P`` shards one example longer). The shuffle is still the library's (``Dataset.shuffle(seed)``); the cut is
  taken from its index column in one ``np.array_split`` instead of P Dataset objects. tests/test_partition.py pins
  the result to ``IidPartitioner.load_partition`` for every client. This is the one piece written by hand here.
- ``dirichlet`` and ``pathological``: the library's partitioner computes its whole assignment on the first
  ``load_partition`` (that is where an impossible ``alpha``/``min_partition_size`` fails, so it is done at once);
  each further client is the library's own ``load_partition(i)``, called only when that client is first asked for.

Upstream, a ``Partitioner.partition_indices(i)`` (or a public ``partition_id_to_indices``) returning the index array
without building a ``Dataset`` would make the IID special case unnecessary (proposal in docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

import numpy as np

from veil.errors import ConfigError


class Partitions(Sequence[np.ndarray]):
    """Each client's example indices (sorted int64), computed on first use and then kept.

    Parameters
    ----------
    load
        Client index -> that client's example indices (any order, any integer dtype).
    size
        The number of clients.
    """

    def __init__(self, load: Callable[[int], np.ndarray], size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self._load, self._size = load, size
        self._done: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self._size

    @overload
    def __getitem__(self, i: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, i: slice) -> list[np.ndarray]: ...

    def __getitem__(self, i: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._size))]
        j = int(i)
        if j < 0:
            j += self._size
        if not 0 <= j < self._size:
            raise IndexError(f"client index {i} out of range for {self._size} clients")
        if j not in self._done:
            idx = np.sort(np.asarray(self._load(j), dtype=np.int64))
            idx.setflags(write=False)  # shared by every caller in the process: nobody may edit a client's share
            self._done[j] = idx
        return self._done[j]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[j] for j in range(self._size))

    @property
    def loaded(self) -> int:
        """How many clients' indices have been computed so far (for tests and benchmarks)."""
        return len(self._done)


def partition_indices(labels: np.ndarray, *, num_partitions: int, partitioner: str, alpha: float, seed: int,
                      min_partition_size: int, classes_per_client: int = 2) -> Partitions:
    """Split example indices across ``num_partitions`` clients with a flwr-datasets partitioner.

    ``iid``: a seeded shuffle cut in equal parts; ``dirichlet``: label shares drawn from Dir(alpha);
    ``pathological``: exactly ``classes_per_client`` labels per client (Li et al., arXiv:2102.02079).
    Deterministic for a seed; every index lands in exactly one partition (for ``pathological``: every index of a
    label that some client holds). Each client's indices are computed when first read (see the module docstring).
    """
    from datasets import Dataset  # heavy import, only where a split is made

    if num_partitions > len(labels):
        raise ConfigError(
            f"federation.num_clients={num_partitions} is invalid: only {len(labels)} training examples to split"
        )
    dataset = Dataset.from_dict({"idx": np.arange(len(labels)), "label": labels})
    if partitioner == "iid":  # IidPartitioner's shards of the shuffled dataset, cut in one go (module docstring)
        order = np.asarray(dataset.shuffle(seed=seed).with_format("numpy")[:]["idx"], dtype=np.int64)  # one batch
        shards = np.array_split(order, num_partitions)
        return Partitions(shards.__getitem__, num_partitions)
    part = _partitioner(partitioner, num_partitions=num_partitions, alpha=alpha, seed=seed,
                        min_size=min(min_partition_size, len(labels) // num_partitions),
                        classes_per_client=classes_per_client, num_labels=len(np.unique(labels)))
    part.dataset = dataset

    def load(i: int) -> np.ndarray:
        return np.asarray(part.load_partition(i).with_format("numpy")[:]["idx"])

    out = Partitions(load, num_partitions)
    try:
        out[0]  # the partitioner draws its whole assignment here: an impossible split fails now, not in a worker
    except ValueError as err:
        raise ConfigError(
            f"federation.alpha={alpha} cannot give {num_partitions} clients at least {min_partition_size} examples "
            f"each ({str(err).splitlines()[0]}); raise federation.alpha or lower federation.min_partition_size"
        ) from err
    return out


def _partitioner(name: str, *, num_partitions: int, alpha: float, seed: int, min_size: int, classes_per_client: int,
                 num_labels: int) -> Any:
    from flwr_datasets.partitioner import DirichletPartitioner, PathologicalPartitioner

    if name == "pathological":
        if classes_per_client > num_labels:
            raise ConfigError(
                f"federation.classes_per_client={classes_per_client} is invalid: the training file has only "
                f"{num_labels} labels; give at most {num_labels}"
            )
        # first-deterministic (the paper's mode): client i holds label i mod L, so every label is used when
        # there are at least as many clients as labels; the other labels are drawn with the seed
        return PathologicalPartitioner(num_partitions=num_partitions, partition_by="label",
                                       num_classes_per_partition=classes_per_client,
                                       class_assignment_mode="first-deterministic", shuffle=True, seed=seed)
    return DirichletPartitioner(num_partitions=num_partitions, partition_by="label", alpha=alpha,
                                min_partition_size=min_size, self_balancing=False, seed=seed)
