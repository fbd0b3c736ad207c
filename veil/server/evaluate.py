"""Central evaluation of the global model on the server's evaluation split (accuracy, mean cross-entropy)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from flwr.common import NDArrays, Scalar
from torch import nn

from veil.task.model import set_trainable


@torch.no_grad()
def evaluate_model(model: nn.Module, data: dict[str, torch.Tensor], *, device: torch.device,
                   batch_size: int = 256) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` on ``data``."""
    model.eval()
    n = int(data["labels"].shape[0])
    loss_sum, correct = 0.0, 0
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        logits = model(input_ids=data["input_ids"][sl].to(device),
                       attention_mask=data["attention_mask"][sl].to(device)).logits  # (B, K)
        labels = data["labels"][sl].to(device)
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == labels).sum())
    return loss_sum / max(n, 1), correct / max(n, 1)


def make_evaluate_fn(template: nn.Module, data: dict[str, torch.Tensor], *,
                     device: torch.device) -> Callable[[int, NDArrays, dict[str, Scalar]], tuple[float, dict[str, Scalar]]]:
    """A Flower ``evaluate_fn`` that loads the global trainable tensors into a copy of ``template``."""
    model = copy.deepcopy(template).to(device)

    def evaluate(server_round: int, arrays: NDArrays, config: dict[str, Scalar]) -> tuple[float, dict[str, Scalar]]:
        set_trainable(model, [np.asarray(a) for a in arrays])
        loss, acc = evaluate_model(model, data, device=device)
        return loss, {"accuracy": acc}

    return evaluate


def majority_baseline(train_labels: np.ndarray, test_labels: np.ndarray) -> float:
    """Accuracy of always predicting the most frequent training label."""
    majority = int(np.bincount(train_labels).argmax())
    return float((test_labels == majority).mean())
