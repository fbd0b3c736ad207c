"""Book-keeping's per-layer registry, in Opacus' style (``@register_grad_sampler(nn.Linear)``): one function per layer
type, in one file under :mod:`veil.privacy.bk.layers`.

A layer rule is called once a layer's calls of one batch all have their output gradients, with ``calls`` =
``[(inputs, output_grad), ...]`` (several calls are joined along tokens). It returns

* the (B,) per-sample squared norms of the layer's trainable parameters' gradients, and
* a :data:`Clip`: given the (B,) clip factors and the (B,) mask of examples whose gradient is not finite (None when
  every one is), the clipped *summed* gradient ``sum_i c_i g_i`` of each trainable parameter.

Between the two, the rule keeps only what the clipped sum needs (the live tokens), so the backward frees the rest as
it goes. ``refuse(module, name)`` says in one line why the rule cannot clip ``module`` exactly (None when it can);
:func:`veil.privacy.bk.engine.unsupported_layer` asks it before training. The most specific registered class in a
layer's MRO wins; ``nn.Module`` itself is the fallback (:mod:`veil.privacy.bk.layers.other`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Call = tuple[list[Any], torch.Tensor]  # one forward call of a layer: its inputs, and its output gradient
Clip = Callable[[torch.Tensor, "torch.Tensor | None"], dict[nn.Parameter, torch.Tensor]]


@dataclass
class Shared:
    """What layers that read one input (query, key, value: their output gradients arrive one after the other) share
    within a batch: the last input whose Gram matrix was taken, the last input packed to its live tokens, and the
    last packed input scaled by the clip factors, each with the tensor it was made from."""

    gram: tuple[torch.Tensor, torch.Tensor] | None = None  # (input (B, T, d), its Gram matrix (B, T, T))
    packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (input, live rows (N,), packed (N, d))
    scaled: tuple[torch.Tensor, torch.Tensor] | None = None  # (packed input, packed input * clip factors)

    def clear(self) -> None:
        """Let go of all three (the layers' clipped-sum functions hold this object, not its tensors)."""
        self.gram = self.packed = self.scaled = None


Rule = Callable[[nn.Module, list[Call], Shared], tuple[torch.Tensor, Clip]]
Refuse = Callable[[nn.Module, str], "str | None"]

_RULES: dict[type[nn.Module], tuple[Rule, Refuse | None]] = {}


def register(*layer_types: type[nn.Module] | None, refuse: Refuse | None = None) -> Callable[[Rule], Rule]:
    """Register the decorated function as book-keeping's rule for ``layer_types`` (a None, an optional library's
    missing class, is skipped), with ``refuse`` naming what it cannot clip exactly."""

    def decorate(rule: Rule) -> Rule:
        for layer_type in layer_types:
            if layer_type is not None:
                _RULES[layer_type] = (rule, refuse)
        return rule

    return decorate


def rule_for(module: nn.Module) -> tuple[Rule, Refuse | None]:
    """The rule of the most specific registered class of ``module`` (its MRO order)."""
    for cls in type(module).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    raise LookupError(f"no book-keeping rule for {type(module).__name__}")  # nn.Module is registered: unreachable


def join(parts: list[torch.Tensor]) -> torch.Tensor:
    """The calls of one layer joined along the token dimension (no copy for the usual single call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def live_tokens(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The live rows of ``g`` (B, T, p), those whose output gradient is not zero (the others add nothing to any
    gradient: pads behind an attention mask): their flat indices (N,), the example of each (N,), and ``g`` packed to
    them (N, p)."""
    b, t = g.shape[0], g.shape[1]
    # a row is live when its largest or smallest entry is not 0 (nan propagates: counts as live); two reductions
    # without a temporary, 4-5x faster than (g != 0).any(-1) on CPU
    live = ((g.amax(dim=-1) != 0) | (g.amin(dim=-1) != 0)).reshape(-1).nonzero().squeeze(1)  # (N,)
    example = torch.div(live, t, rounding_mode="floor")  # (N,)
    return live, example, g.reshape(b * t, -1).index_select(0, live)


def same(kept: torch.Tensor | None, t: torch.Tensor) -> bool:
    """Whether ``t`` is a view of the same memory as ``kept`` (held alive, so the same values) in the same layout."""
    return (kept is not None and kept.data_ptr() == t.data_ptr() and kept.shape == t.shape
            and kept.stride() == t.stride() and kept.dtype == t.dtype)


def zero_rows(bad: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` with the rows (first dimension) flagged in ``bad`` set to zero (a zero clip factor would still give
    0 * nan)."""
    return torch.where(bad.view(-1, *([1] * (t.dim() - 1))), torch.zeros_like(t), t)


def clip_per_sample(per_sample: dict[nn.Parameter, torch.Tensor], factor: torch.Tensor,
                    bad: torch.Tensor | None) -> dict[nn.Parameter, torch.Tensor]:
    """``sum_i factor_i * grad_i`` from instantiated (B, ...) per-sample gradients."""
    if bad is not None:
        per_sample = {p: zero_rows(bad, gs) for p, gs in per_sample.items()}
    return {p: torch.einsum("b,b...->...", factor.to(gs.dtype), gs) for p, gs in per_sample.items()}
