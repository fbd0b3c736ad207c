"""Book-keeping for ``nn.Linear`` and GPT-2's ``Conv1D`` (a linear layer with a transposed (in, out) weight).

Per-sample squared norms by the ghost norm ``sum_{t,s} (a_t . a_s)(g_t . g_s)`` (Li et al., arXiv:2110.05679) or,
when ``2 T^2 > d p``, from the instantiated (B, p, d) per-sample gradient ("mixed", Bu et al., arXiv:2210.00038);
the clipped sum is one matmul of the live tokens, ``sum_i c_i a_i^T g_i``, the cost of the usual weight gradient.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from veil.privacy.bk.registry import Call, Clip, Shared, clip_per_sample, join, live_tokens, register, same, zero_rows

try:  # GPT-2's linear layer with a transposed (in, out) weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None  # type: ignore[assignment,misc]


@register(nn.Linear, Conv1D)
def linear(m: nn.Module, calls: list[Call], shared: Shared) -> tuple[torch.Tensor, Clip]:
    """Norms from the inputs ``a`` (B, T, d) and output gradients ``g`` (B, T, p); the clipped sum from their live
    tokens. ``shared``: layers that read one input (query, key, value) share its Gram matrix, its packed copy and
    its copy scaled by the clip factors."""
    transposed = not isinstance(m, nn.Linear)  # Conv1D: weight (d, p)
    batch, width = calls[0][1].shape[0], calls[0][1].shape[-1]
    g = join([grad.reshape(batch, -1, width) for _, grad in calls])  # (B, T, p)
    d = calls[0][0][0].shape[-1]
    a = join([inputs[0].reshape(batch, -1, d) for inputs, _ in calls]).to(g.dtype)  # (B, T, d)
    weight = cast(nn.Parameter, m.weight)
    bias = cast("nn.Parameter | None", getattr(m, "bias", None))
    per_sample: dict[nn.Parameter, torch.Tensor] = {}
    sq = torch.zeros(a.shape[0], dtype=g.dtype, device=g.device)
    if weight.requires_grad:
        t, p = a.shape[1], g.shape[2]
        if 2 * t * t <= d * p:  # ghost norm: Gram matrices (B, T, T)
            if shared.gram is None or not same(shared.gram[0], a):
                shared.gram = (a, torch.bmm(a, a.transpose(1, 2)))  # (B, T, T), kept with its input
            sq = sq + (shared.gram[1] * torch.bmm(g, g.transpose(1, 2))).sum(dim=(1, 2))
        else:  # instantiate (B, p, d) per-sample gradients: cheaper than the Gram matrices
            per_sample = {weight: torch.einsum("btp,btd->bpd", g, a)}
            sq = sq + per_sample[weight].pow(2).sum(dim=(1, 2))
    if bias is not None and bias.requires_grad:
        sq = sq + g.sum(dim=1).pow(2).sum(dim=1)
    live, example, g = live_tokens(g)  # (N,), (N,), (N, p)
    packed: torch.Tensor | None = None  # the weight's per-sample gradient is instantiated: no input needed
    if not per_sample:
        if shared.packed is not None and same(shared.packed[0], a) and torch.equal(shared.packed[1], live):
            packed = shared.packed[2]
        else:
            packed = a.reshape(-1, d).index_select(0, live)  # (N, d)
            shared.packed = (a, live, packed)
    del a

    def clip(factor: torch.Tensor, bad: torch.Tensor | None) -> dict[nn.Parameter, torch.Tensor]:
        gk, ak = g, packed
        if bad is not None:
            tokens = bad[example]  # (N,)
            gk = zero_rows(tokens, gk)
            ak = None if ak is None else zero_rows(tokens, ak)
        out = clip_per_sample(per_sample, factor, bad)
        c = factor.to(gk.dtype)[example].unsqueeze(1)  # (N, 1): each token's clip factor
        if weight.requires_grad and ak is not None:
            if ak.shape[-1] <= gk.shape[-1]:  # scale the narrower operand; layers reading one input share its copy
                if shared.scaled is None or shared.scaled[0] is not ak:
                    shared.scaled = (ak, ak * c)
                w = shared.scaled[1].T @ gk  # (d, p)
            else:
                w = ((gk * c).T @ ak).T  # the narrower operand transposed on the left
            out[weight] = (w if transposed else w.T).contiguous()
        elif transposed and weight in out:
            out[weight] = out[weight].T.contiguous()  # (p, d) per-sample layout -> Conv1D's (d, p)
        if bias is not None and bias.requires_grad:
            out[bias] = gk.T @ c.squeeze(1)  # sum_i c_i sum_t g_it, without a scaled copy of g
        return out

    return sq, clip
