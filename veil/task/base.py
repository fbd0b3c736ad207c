"""The task interface: everything that differs between, say, sequence classification and causal language modelling.

The ServerApp, the ClientApp, the trainer, evaluation, export and the simulation launcher call a :class:`Task`
(looked up by ``task.name`` in :func:`veil.task.get_task`) and never branch on the task's name themselves.

A task's tensors are a dict of equally long (N, ...) tensors; the trainer batches them all together, and
:meth:`Task.per_example_loss` turns one batch into one loss per example, which is what DP-SGD clips.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from veil.conf.schema import DataConfig, VeilConfig


class Examples(Protocol):
    """A task's examples in file order."""

    def __len__(self) -> int: ...

    def subset(self, idx: np.ndarray) -> Examples:
        """The examples at ``idx``, in that order."""
        ...


class Task(Protocol):
    """One kind of learning problem (see the module docstring)."""

    name: str
    pipeline_tag: str  # the Hugging Face pipeline tag of the exported model

    def labels(self, cfg: VeilConfig) -> list[str]:
        """The run's label set (empty when the task has none); fixed once at launch into ``data.labels``."""
        ...

    def read(self, path: str, cfg: VeilConfig, data: DataConfig | None = None) -> Examples:
        """Read one data file (``data`` overrides ``cfg.data``, e.g. a node's own column names)."""
        ...

    def node_data(self, data: DataConfig, *, text_column: str | None, label_column: str | None) -> DataConfig:
        """How a deployed node reads its own file: the owner's column names (``veil client --text-column
        --label-column``) in place of the run's."""
        ...

    def partition_ids(self, examples: Examples, labels: list[str], *, path: str) -> np.ndarray:
        """One integer per example that the label-skew partitioners split on (int64, (N,))."""
        ...

    def partition_names(self, examples: Examples, labels: list[str]) -> list[str]:
        """The name of each partition id (for the partition table)."""
        ...

    def tensors(self, examples: Examples, labels: list[str], cfg: VeilConfig, *, path: str,
                evaluation: bool = False, fixed_length: bool = False) -> dict[str, torch.Tensor]:
        """The tokenized examples: a dict of (N, ...) tensors (``evaluation``: with what evaluation needs too;
        ``fixed_length``: every sequence padded to ``model.max_length``, as a deployed node trains on them)."""
        ...

    def build_model(self, cfg: VeilConfig, labels: list[str], *, seed: int, dropout: float | None = None) -> nn.Module:
        """The model every process starts from (same seed: same weights); only trainable tensors travel."""
        ...

    def per_example_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One loss per example of ``batch``, shape (B,); the training loss is their mean."""
        ...

    def evaluate(self, model: nn.Module, data: dict[str, torch.Tensor], *, device: torch.device,
                 cfg: VeilConfig | None = None) -> dict[str, Any]:
        """Central evaluation: at least ``loss`` and ``accuracy`` (floats); other keys go into the metrics row
        as they are (JSON values, e.g. causal_lm's ``perplexity`` and sample generations when ``cfg`` is given)."""
        ...

    def export(self, model: nn.Module, cfg: VeilConfig, out_dir: Path) -> Path:
        """Write ``model`` (adapters merged) and its tokenizer as a Hugging Face directory ``out_dir``."""
        ...

    def baseline(self, cfg: VeilConfig) -> float:
        """A trivial reference for the final accuracy (NaN when there is none)."""
        ...

    def check_files(self, cfg: VeilConfig) -> None:
        """Read the data files once before any output exists, raising one-line errors."""
        ...


def batch_size_of(batch: dict[str, Any]) -> int:
    """The number of examples in a batch of a task's tensors."""
    return int(next(iter(batch.values())).shape[0])
