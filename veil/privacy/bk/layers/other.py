"""Book-keeping for any other layer with its own trainable parameters (LayerNorm, RMSNorm: a few parameters each):
instantiated per-sample gradients from Opacus' grad samplers (veil's LayerNorm one, torch.func otherwise), their
norms, and their clipped sum. Registered for ``nn.Module``: the fallback of :func:`veil.privacy.bk.registry.rule_for`.
"""

from __future__ import annotations

import functools

import torch
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from torch import nn

from veil.privacy.bk.registry import Call, Clip, Shared, clip_per_sample, register
from veil.privacy.exact import layer_norm_grad_sample
from veil.privacy.opacus_compat import Sampler, grad_samplers


@functools.cache
def _samplers() -> dict[type[nn.Module], Sampler]:
    """Opacus' samplers and veil's LayerNorm one (read at first use: an untested Opacus fails there, in one line)."""
    return {**grad_samplers(), nn.LayerNorm: layer_norm_grad_sample}


def refuse(m: nn.Module, name: str) -> str | None:
    if any(p.requires_grad for c in m.children() for p in c.parameters()):
        return (f"layer {name} ({type(m).__name__}) holds trainable parameters and trainable sub-layers, "
                "which book-keeping does not support; use privacy.grad_sample_mode=ghost or hooks")
    if type(m) not in _samplers() and any(True for _ in m.buffers()):
        return (f"layer {name} ({type(m).__name__}) has buffers and no Opacus grad sampler, which "
                "book-keeping does not support; use privacy.grad_sample_mode=ghost or hooks")
    return None


@register(nn.Module, refuse=refuse)
def other(m: nn.Module, calls: list[Call], shared: Shared) -> tuple[torch.Tensor, Clip]:
    """Per-sample gradients of each call, summed over calls; their (B,) squared norms."""
    per_sample: dict[nn.Parameter, torch.Tensor] = {}
    sampler = _samplers().get(type(m), ft_compute_per_sample_gradient)
    for inputs, g in calls:
        for p, gs in sampler(m, inputs, g).items():
            if p.requires_grad:
                per_sample[p] = gs if p not in per_sample else per_sample[p] + gs
    g0 = calls[0][1]
    sq = torch.zeros(g0.shape[0], dtype=g0.dtype, device=g0.device)
    for gs in per_sample.values():
        sq = sq + gs.reshape(gs.shape[0], -1).pow(2).sum(dim=1)

    def clip(factor: torch.Tensor, bad: torch.Tensor | None) -> dict[nn.Parameter, torch.Tensor]:
        return clip_per_sample(per_sample, factor, bad)

    return sq, clip
