"""Sequence classification: a text column and a label column; cross-entropy per example; accuracy.

The reading, splitting and model code lives in :mod:`veil.task.data` and :mod:`veil.task.model`; this module is
that code behind the :class:`veil.task.base.Task` interface.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from veil.conf.schema import DataConfig, VeilConfig
from veil.task.data import TextExamples, encode_labels, read_examples, tokenize
from veil.task.features import sentence_features
from veil.task.model import build_model, export_model, load_tokenizer, uses_features


class ClassificationTask:
    """See :class:`veil.task.base.Task`."""

    name = "classification"
    pipeline_tag = "text-classification"

    def labels(self, cfg: VeilConfig) -> list[str]:
        from veil.task.shards import resolve_labels

        return resolve_labels(cfg.data)

    def read(self, path: str, cfg: VeilConfig, data: DataConfig | None = None) -> TextExamples:
        return read_examples(path, data or cfg.data)

    def node_data(self, data: DataConfig, *, text_column: str | None, label_column: str | None) -> DataConfig:
        return dataclasses.replace(data, text_column=text_column or data.text_column,
                                   label_column=label_column or data.label_column)

    def partition_ids(self, examples: TextExamples, labels: list[str], *, path: str) -> np.ndarray:  # type: ignore[override]
        return encode_labels(examples, labels, path=path)

    def partition_names(self, examples: TextExamples, labels: list[str]) -> list[str]:  # type: ignore[override]
        return labels

    def tensors(self, examples: TextExamples, labels: list[str], cfg: VeilConfig, *,  # type: ignore[override]
                path: str, evaluation: bool = False, fixed_length: bool = False) -> dict[str, torch.Tensor]:
        enc = tokenize(load_tokenizer(cfg.model), examples.texts, max_length=cfg.model.max_length,
                       fixed_length=fixed_length)
        targets = torch.as_tensor(encode_labels(examples, labels, path=path))  # (N,)
        if uses_features(cfg.model):  # model.tuning=head: the frozen encoder runs once, here; the head trains on these
            return {"features": sentence_features(cfg.model, enc, seed=cfg.federation.seed), "labels": targets}
        enc["labels"] = targets
        return enc

    def build_model(self, cfg: VeilConfig, labels: list[str], *, seed: int, dropout: float | None = None) -> nn.Module:
        return build_model(cfg.model, labels, seed=seed, dropout=dropout)

    def per_example_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(**model_inputs(batch)).logits  # (B, K)
        return nn.functional.cross_entropy(logits, batch["labels"], reduction="none")  # (B,)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: dict[str, torch.Tensor], *, device: torch.device,
                 cfg: VeilConfig | None = None, batch_size: int = 256) -> dict[str, float]:
        model.eval()
        n = int(data["labels"].shape[0])
        loss_sum, correct = 0.0, 0
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            logits = model(**{k: t[sl].to(device) for k, t in model_inputs(data).items()}).logits  # (B, K)
            labels = data["labels"][sl].to(device)
            loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(dim=-1) == labels).sum())
        return {"loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1)}

    def export(self, model: nn.Module, cfg: VeilConfig, out_dir: Path) -> Path:
        return export_model(model, load_tokenizer(cfg.model), out_dir, max_length=cfg.model.max_length)

    def baseline(self, cfg: VeilConfig) -> float:
        """Accuracy of always predicting the most frequent training label on the evaluation split."""
        from veil.task.split import evaluation_examples, training_examples

        labels = json.loads(cfg.data.labels)
        train = encode_labels(training_examples(cfg), labels, path=cfg.data.train_path)  # type: ignore[arg-type]
        test = encode_labels(evaluation_examples(cfg), labels,  # type: ignore[arg-type]
                             path=cfg.data.test_path or cfg.data.train_path)
        majority = int(np.bincount(train).argmax())
        return float((test == majority).mean())

    def check_files(self, cfg: VeilConfig) -> None:
        labels = json.loads(cfg.data.labels)
        for path in (cfg.data.train_path, cfg.data.test_path):
            if path:  # no test file: the split's test rows come from the training file
                encode_labels(read_examples(path, cfg.data), labels, path=path)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the classifier is called with: the cached sentence features (``model.tuning=head``) or the tokens."""
    if "features" in batch:
        return {"features": batch["features"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


TASK = ClassificationTask()
