"""Central evaluation of the global model on the server's evaluation split (the task's metrics: loss, accuracy, ...)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from flwr.common import NDArrays, Scalar
from torch import nn

from veil.conf.schema import VeilConfig
from veil.task.base import Task
from veil.task.model import set_trainable


def make_evaluate_fn(template: nn.Module, data: dict[str, torch.Tensor], *, device: torch.device, task: Task,
                     cfg: VeilConfig | None = None) -> Callable[[int, NDArrays, dict[str, Scalar]], tuple[float, dict[str, Scalar]]]:
    """A Flower ``evaluate_fn`` that loads the global trainable tensors into a copy of ``template``."""
    model = copy.deepcopy(template).to(device)

    def evaluate(server_round: int, arrays: NDArrays, config: dict[str, Scalar]) -> tuple[float, dict[str, Scalar]]:
        set_trainable(model, [np.asarray(a) for a in arrays])
        metrics = task.evaluate(model, data, device=device, cfg=cfg)
        return metrics.pop("loss"), metrics

    return evaluate


def majority_baseline(train_labels: np.ndarray, test_labels: np.ndarray) -> float:
    """Accuracy of always predicting the most frequent training label."""
    majority = int(np.bincount(train_labels).argmax())
    return float((test_labels == majority).mean())
