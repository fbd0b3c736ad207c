"""The client sends only trainable tensors, their shapes are those of the adapters and the head, and an update
is exactly trained - received."""

from __future__ import annotations

import numpy as np
import torch

from veil.client.trainer import LocalPlan, train_round
from veil.conf.schema import ModelConfig
from veil.task import get_task
from veil.task.data import tokenize
from veil.task.model import build_model, get_trainable, load_tokenizer, trainable_names


def test_only_adapters_and_head_travel() -> None:
    cfg = ModelConfig(tiny=True, lora_r=4)
    model = build_model(cfg, ["a", "b", "c"], seed=0)
    names = trainable_names(model)
    shapes = dict(zip(names, (a.shape for a in get_trainable(model)), strict=True))
    assert names and all(("lora_" in n) or ("classifier" in n) for n in names)
    hidden = 32
    for name, shape in shapes.items():
        if "lora_A" in name:
            assert shape == (4, hidden)
        elif "lora_B" in name:
            assert shape == (hidden, 4)
        elif name.endswith("classifier.modules_to_save.default.weight"):
            assert shape == (3, hidden)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert sum(int(np.prod(s)) for s in shapes.values()) < frozen / 100


def test_update_is_trained_minus_received_and_moves_lora() -> None:
    cfg = ModelConfig(tiny=True, lora_r=4)
    template = build_model(cfg, ["a", "b"], seed=0, dropout=0.0)
    enc = tokenize(load_tokenizer(cfg), ["card lost", "atm ate cash", "pin forgot", "fee high"] * 8, max_length=16)
    enc["labels"] = torch.tensor([0, 1] * 16)
    received = get_trainable(template)
    plan = LocalPlan(steps=8, batch_size=8, lr=0.05, private=True, noise_multiplier=0.5, max_grad_norm=1.0)
    result = train_round(template, received, enc, plan=plan, device=torch.device("cpu"), seed=1,
                         task=get_task("classification"))
    assert [u.shape for u in result.update] == [r.shape for r in received]
    names = trainable_names(template)
    moved = {n for n, u in zip(names, result.update, strict=True) if np.abs(u).max() > 0}
    assert any("lora_B" in n for n in moved), "LoRA weights must move under DP-SGD (Opacus issue 820)"
    assert any("classifier" in n for n in moved)
    assert result.steps == 2 * 4 and abs(result.sample_rate - 0.25) < 1e-12
    # the template itself is untouched: every round trains a fresh copy
    assert all(np.array_equal(a, b) for a, b in zip(get_trainable(template), received, strict=True))


def test_sgd_plan_takes_one_plain_gradient_step() -> None:
    """optimizer="sgd": one full-batch step moves every trainable tensor by exactly -lr × the mean loss's gradient
    (reference: autograd on a copy); AdamW's first step would move each coordinate by about ±lr instead."""
    import copy

    cfg = ModelConfig(tiny=True, lora_r=4)
    template = build_model(cfg, ["a", "b"], seed=0, dropout=0.0)
    enc = tokenize(load_tokenizer(cfg), ["card lost", "atm ate cash", "pin forgot", "fee high"], max_length=16)
    enc["labels"] = torch.tensor([0, 1, 1, 0])
    received = get_trainable(template)
    task = get_task("classification")
    plan = LocalPlan(steps=1, batch_size=4, lr=0.5, private=False, noise_multiplier=0.0, max_grad_norm=1.0,
                     optimizer="sgd")
    result = train_round(template, received, enc, plan=plan, device=torch.device("cpu"), seed=1, task=task)
    reference = copy.deepcopy(template).train()
    task.per_example_loss(reference, dict(enc)).mean().backward()
    expected = [-0.5 * p.grad.numpy() for p in reference.parameters() if p.requires_grad]
    assert len(expected) == len(result.update)
    for got, want in zip(result.update, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    assert max(float(np.abs(u).max()) for u in result.update) > 0
