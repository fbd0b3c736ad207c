"""The frozen encoder's sentence features, computed once where the data is (``model.tuning=head``).

A node runs the base encoder forward over its texts once and keeps the pooled embeddings in memory; DP-SGD then
trains the head on them with steps that cost a matrix product. The encoder here is built exactly as
:func:`veil.task.model.build_model` builds it for the same seed, so the features equal what the model computes
before its head (``tests/test_head_tuning.py``).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from veil.conf.schema import ModelConfig
from veil.task.model import base_encoder, load_tokenizer, model_pooling, pad_token_for, resolve_device
from veil.task.pooling import PooledClassifier


@functools.lru_cache(maxsize=2)
def _feature_encoder(cfg_json: str, seed: int) -> nn.Module:
    import json

    cfg = ModelConfig(**json.loads(cfg_json))
    torch.manual_seed(seed)
    encoder = base_encoder(cfg)
    model = PooledClassifier(encoder, model_pooling(cfg), 2)  # the head is not used: embed() only
    pad_token_for(load_tokenizer(cfg), model)
    return model.eval()


@torch.no_grad()
def sentence_features(cfg: ModelConfig, enc: dict[str, torch.Tensor], *, seed: int, device: torch.device | None = None,
                      batch_size: int = 256) -> torch.Tensor:
    """The frozen encoder's pooled embeddings of tokenized texts, (N, H) float32 on the CPU.

    Forward only, in evaluation mode, on the process's own copy of the base encoder (built as :func:`build_model`
    builds it for the same ``seed``), so they equal what the model computes before its head. Nothing here leaves
    the process: on a node they are the owner's data, kept in memory like the tokens they come from.
    """
    import dataclasses
    import json

    model = _feature_encoder(json.dumps(dataclasses.asdict(cfg), sort_keys=True), seed)
    device = device or resolve_device("auto")
    model.to(device)
    n = int(enc["input_ids"].shape[0])
    chunks = []
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        chunks.append(model.embed(enc["input_ids"][sl].to(device), enc["attention_mask"][sl].to(device)).float().cpu())
    hidden = int(model.head.in_features)
    return torch.cat(chunks) if chunks else torch.zeros((0, hidden), dtype=torch.float32)
