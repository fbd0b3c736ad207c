"""privacy.grad_sample_mode=auto picks hooks for LoRA and bk (book-keeping) for full fine-tuning (the fastest exact
mode in docs/benchmarks.md's dp_overhead), ghost where bk cannot be exact, hooks for tied weights; exactness of every
mode, auto included, is in tests/test_dp_exact*.py and tests/test_families.py."""

from __future__ import annotations

import pytest
from torch import nn

from veil.conf.schema import ModelConfig
from veil.privacy.modes import pick_grad_sample_mode, resolve_grad_sample_mode
from veil.task.model import build_model


def test_auto_picks_hooks_for_lora_and_bk_for_full_fine_tuning() -> None:
    lora = build_model(ModelConfig(tiny=True, lora=True), ["a", "b"], seed=0)
    full = build_model(ModelConfig(tiny=True, lora=False), ["a", "b"], seed=0)
    assert resolve_grad_sample_mode("auto", lora) == "hooks"
    assert resolve_grad_sample_mode("auto", full) == "bk"
    assert resolve_grad_sample_mode("hooks", full) == "hooks", "an explicit mode is kept"


def test_a_trainable_embedding_alone_means_bk() -> None:
    model = nn.Sequential(nn.Embedding(1000, 16), nn.Linear(16, 2))
    for p in model[1].parameters():
        p.requires_grad_(False)
    assert pick_grad_sample_mode(model) == "bk"  # 16k trainable of 16k: a (B, V, H) per-sample gradient
    model[0].weight.requires_grad_(False)
    model[1].weight.requires_grad_(True)
    assert pick_grad_sample_mode(model) == "bk"  # a head alone (model.tuning=head): no (B, K, H) gradient needed
    two = nn.Sequential(nn.Embedding(1000, 16), nn.Linear(16, 16), nn.Linear(16, 2))
    two[0].weight.requires_grad_(False)
    assert pick_grad_sample_mode(two) == "hooks"  # 306 of 16,306 parameters in two layers, no embedding


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="grad_sample_mode='ew'"):
        resolve_grad_sample_mode("ew", nn.Linear(2, 2))


def test_auto_falls_back_to_ghost_where_bk_is_not_exact_and_to_hooks_for_tied_weights() -> None:
    from transformers import AutoModelForCausalLM

    from support.families import tiny_config

    clipped = nn.Sequential(nn.Embedding(1000, 16, max_norm=1.0), nn.Linear(16, 2))  # bk refuses max_norm
    assert resolve_grad_sample_mode("auto", clipped) == "ghost"
    tied = AutoModelForCausalLM.from_config(tiny_config("gpt2"))  # neither bk nor ghost supports tied weights
    assert resolve_grad_sample_mode("auto", tied) == "hooks"
