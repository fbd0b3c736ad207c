"""Book-keeping for ``nn.Embedding``: per-sample norms by veil's padding-aware masked Gram norm
(:func:`veil.privacy.exact.embedding_norm_sample`), the clipped sum by ``index_add`` of ``c_i g_it`` over the live
tokens, the padding row skipped (``nn.Embedding`` never updates it).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from veil.privacy.bk.registry import Call, Clip, Shared, join, live_tokens, register, zero_rows
from veil.privacy.exact import embedding_norm_sample


def refuse(m: nn.Module, name: str) -> str | None:
    if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.scale_grad_by_freq or m.sparse):
        return (f"embedding {name} uses max_norm, scale_grad_by_freq or sparse gradients, which book-keeping "
                "does not support; use privacy.grad_sample_mode=hooks")
    return None


@register(nn.Embedding, refuse=refuse)
def embedding(layer: nn.Module, calls: list[Call], shared: Shared) -> tuple[torch.Tensor, Clip]:
    """Norms from the ids (B, T) and output gradients (B, T, H); the clipped sum from their live tokens."""
    m = cast(nn.Embedding, layer)
    batch, width = calls[0][1].shape[0], calls[0][1].shape[-1]
    g = join([grad.reshape(batch, -1, width) for _, grad in calls])  # (B, T, H)
    ids = join([inputs[0].reshape(batch, -1) for inputs, _ in calls])  # (B, T)
    sq = embedding_norm_sample(m, [ids], g)[cast(nn.Parameter, m.weight)] ** 2  # (B,)
    live, example, g = live_tokens(g)  # (N,), (N,), (N, H)
    ids = ids.reshape(-1).index_select(0, live)  # (N,)
    weight, padding_idx = cast(nn.Parameter, m.weight), m.padding_idx

    def clip(factor: torch.Tensor, bad: torch.Tensor | None) -> dict[nn.Parameter, torch.Tensor]:
        gk = g if bad is None else zero_rows(bad[example], g)
        rows = gk * factor.to(gk.dtype)[example].unsqueeze(1)  # (N, H): each token's row times its clip factor
        kept = ids
        if padding_idx is not None:  # nn.Embedding never updates the padding row
            keep = ids != padding_idx
            kept, rows = ids[keep], rows[keep]
        grad = torch.zeros_like(weight, dtype=rows.dtype)
        return {weight: grad.index_add_(0, kept, rows)}

    return sq, clip
