"""Opacus per-sample clipped gradients through veil's integration equal a per-example loop (clip each example's
gradient, average) on a batch with pad tokens: LoRA model, hooks and ghost modes, and auto (which picks one of them)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from support.references import clipped_mean_gradient
from veil.conf.schema import ModelConfig
from veil.privacy.dpsgd import make_private
from veil.task.data import tokenize
from veil.task.model import build_model, load_tokenizer

TEXTS = ["hi", "my card has not arrived yet, what should i do about it", "fee?", "where is my money transfer now"]
LABELS = [0, 1, 2, 1]
C = 0.05  # small enough that every example is clipped, so the clip factors matter


def _batch() -> dict[str, torch.Tensor]:
    cfg = ModelConfig(tiny=True)
    enc = tokenize(load_tokenizer(cfg), TEXTS, max_length=24)
    enc["labels"] = torch.tensor(LABELS)
    return enc


def _reference(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return clipped_mean_gradient(model, batch, clip=C)


@pytest.mark.parametrize(("mode", "variant"), [("hooks", "lora"), ("ghost", "lora"), ("auto", "lora"),
                                             ("hooks", "ffa")])
def test_lora_per_sample_clipping_matches_loop(mode: str, variant: str) -> None:
    batch = _batch()
    assert (batch["attention_mask"] == 0).any(), "the batch must contain pad tokens"
    torch.manual_seed(0)
    model = build_model(ModelConfig(tiny=True, lora_variant=variant), ["a", "b", "c"], seed=0, dropout=0.0)
    # move LoRA B away from zero so the adapters' A matrices get gradient too
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    reference = _reference(copy.deepcopy(model), batch)

    n = batch["labels"].shape[0]
    loader = DataLoader(TensorDataset(batch["input_ids"], batch["attention_mask"], batch["labels"]), batch_size=n)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    dp = make_private(module=model, optimizer=opt, loader=loader, noise_multiplier=0.0, max_grad_norm=C,
                      grad_sample_mode=mode)
    assert dp.sample_rate == 1.0
    logits = dp.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    dp.criterion(logits, batch["labels"]).backward()
    dp.optimizer.pre_step()  # clip, accumulate, add (zero) noise, scale by the expected batch size
    got = [p.grad for p in params]
    assert len(got) == len(reference)
    for g, r in zip(got, reference, strict=True):
        torch.testing.assert_close(g.double(), r.double(), atol=1e-6, rtol=1e-5)
    assert any(float(r.abs().max()) > 1e-4 for r in reference), "reference gradients must not be trivially zero"
