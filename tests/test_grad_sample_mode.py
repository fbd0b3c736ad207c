"""privacy.grad_sample_mode=auto picks hooks for LoRA and ghost for full fine-tuning (the faster exact mode in
docs/benchmarks.md's dp_overhead); exactness of every mode, auto included, is in tests/test_dp_exact*.py."""

from __future__ import annotations

import pytest
from torch import nn

from veil.conf.schema import ModelConfig
from veil.privacy.modes import pick_grad_sample_mode, resolve_grad_sample_mode
from veil.task.model import build_model


def test_auto_picks_hooks_for_lora_and_ghost_for_full_fine_tuning() -> None:
    lora = build_model(ModelConfig(tiny=True, lora=True), ["a", "b"], seed=0)
    full = build_model(ModelConfig(tiny=True, lora=False), ["a", "b"], seed=0)
    assert resolve_grad_sample_mode("auto", lora) == "hooks"
    assert resolve_grad_sample_mode("auto", full) == "ghost"
    assert resolve_grad_sample_mode("hooks", full) == "hooks", "an explicit mode is kept"


def test_a_trainable_embedding_alone_means_ghost() -> None:
    model = nn.Sequential(nn.Embedding(1000, 16), nn.Linear(16, 2))
    for p in model[1].parameters():
        p.requires_grad_(False)
    assert pick_grad_sample_mode(model) == "ghost"  # 16k trainable of 16k: a (B, V, H) per-sample gradient
    model[0].weight.requires_grad_(False)
    model[1].weight.requires_grad_(True)
    assert pick_grad_sample_mode(model) == "hooks"  # 32 of 16,034 parameters, no embedding


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="grad_sample_mode='ew'"):
        resolve_grad_sample_mode("ew", nn.Linear(2, 2))
