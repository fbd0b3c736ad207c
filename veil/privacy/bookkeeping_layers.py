"""One trainable layer's part in book-keeping (:mod:`veil.privacy.bookkeeping`, Bu et al., arXiv:2210.00038): its
inputs and output gradients of one batch, their per-sample squared norms, and its clipped summed gradient.

Hand-written for the reason given in :mod:`veil.privacy.bookkeeping` (Opacus 1.6 has no single-pass mode); the
per-sample samplers of small layers are Opacus' (veil's LayerNorm one, torch.func otherwise), the Embedding norm is
veil's padding-aware :func:`veil.privacy.exact.embedding_norm_sample`.
"""

from __future__ import annotations

from typing import Any

import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from torch import nn

from veil.privacy.exact import embedding_norm_sample, layer_norm_grad_sample

try:  # GPT-2's linear layer with a transposed (in, out) weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None  # type: ignore[assignment,misc]

SAMPLERS = {**GradSampleModule.GRAD_SAMPLERS, nn.LayerNorm: layer_norm_grad_sample}


def linear_kind(module: nn.Module) -> str | None:
    """"linear" (``nn.Linear``), "conv1d" (GPT-2's ``Conv1D``, weight (in, out)) or None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if Conv1D is not None and isinstance(module, Conv1D):
        return "conv1d"
    return None


def kind_of(module: nn.Module) -> str:
    """How book-keeping treats ``module``: "embedding", "linear", "conv1d" or "other" (per-sample gradients)."""
    return "embedding" if isinstance(module, nn.Embedding) else linear_kind(module) or "other"


class LayerRecord:
    """One trainable layer's activations and output gradients of a batch (several calls joined along tokens)."""

    def __init__(self, module: nn.Module, params: list[nn.Parameter], records: list[list[Any]]) -> None:
        self.module, self.params = module, params
        self.kind = kind_of(module)
        self.per_sample: dict[nn.Parameter, torch.Tensor] | None = None
        if self.kind == "other":
            self.calls = [(r[0], r[1]) for r in records]
            return
        batch = records[0][1].shape[0]
        width = records[0][1].shape[-1]
        self.g = _join([r[1].reshape(batch, -1, width) for r in records])  # (B, T, p)
        if self.kind == "embedding":
            self.a = _join([r[0][0].reshape(batch, -1) for r in records])  # (B, T) ids
        else:
            d = records[0][0][0].shape[-1]
            self.a = _join([r[0][0].reshape(batch, -1, d) for r in records]).to(self.g.dtype)  # (B, T, d)

    def norm_sq(self, grams: list[Any]) -> torch.Tensor:
        """(B,) squared norms of each example's gradient of this layer's trainable parameters. ``grams`` holds the
        last input whose Gram matrix was taken and that matrix: layers that read one input (query, key, value),
        whose gradients arrive one after the other, share it."""
        m = self.module
        if self.kind == "embedding":
            return embedding_norm_sample(m, [self.a], self.g)[m.weight] ** 2  # type: ignore[arg-type]
        if self.kind == "other":
            self.per_sample = {}
            for inputs, g in self.calls:
                sampler = SAMPLERS.get(type(m), ft_compute_per_sample_gradient)
                for p, gs in sampler(m, inputs, g).items():
                    if p.requires_grad:
                        self.per_sample[p] = gs if p not in self.per_sample else self.per_sample[p] + gs
            g0 = self.calls[0][1]
            sq = torch.zeros(g0.shape[0], dtype=g0.dtype, device=g0.device)
            for gs in self.per_sample.values():
                sq = sq + gs.reshape(gs.shape[0], -1).pow(2).sum(dim=1)
            return sq
        a, g = self.a, self.g  # (B, T, d), (B, T, p)
        sq = torch.zeros(a.shape[0], dtype=g.dtype, device=g.device)
        if m.weight.requires_grad:
            t, d, p = a.shape[1], a.shape[2], g.shape[2]
            if 2 * t * t <= d * p:  # ghost norm: Gram matrices (B, T, T)
                if not _same(grams[0], a):
                    grams[0], grams[1] = a, torch.bmm(a, a.transpose(1, 2))  # (B, T, T), kept with its input
                sq = sq + (grams[1] * torch.bmm(g, g.transpose(1, 2))).sum(dim=(1, 2))
            else:  # instantiate (B, p, d) per-sample gradients: cheaper than the Gram matrices
                self.per_sample = {m.weight: torch.einsum("btp,btd->bpd", g, a)}
                sq = sq + self.per_sample[m.weight].pow(2).sum(dim=(1, 2))
        if getattr(m, "bias", None) is not None and m.bias.requires_grad:
            sq = sq + g.sum(dim=1).pow(2).sum(dim=1)
        return sq

    def pack(self, shared: list[Any]) -> None:
        """Keep only the tokens whose output gradient is not zero (the others add nothing to any gradient: pads
        behind an attention mask), flattened with the example each belongs to; drop what the norms alone needed.
        ``shared`` holds the last packed input: layers that read one input (query, key, value) share its copy."""
        if self.kind == "other":
            self.calls = []
            return
        b, t = self.g.shape[0], self.g.shape[1]
        # a row is live when its largest or smallest entry is not 0 (nan propagates: counts as live); two reductions
        # without a temporary, 4-5x faster than (g != 0).any(-1) on CPU
        live = ((self.g.amax(dim=-1) != 0) | (self.g.amin(dim=-1) != 0)).reshape(-1).nonzero().squeeze(1)  # (N,)
        self.idx = torch.div(live, t, rounding_mode="floor")  # (N,) example of each token
        self.g = self.g.reshape(b * t, -1).index_select(0, live)  # (N, p)
        if self.kind == "embedding":
            self.a = self.a.reshape(-1).index_select(0, live)  # (N,) ids
        elif self.per_sample:
            self.a = None  # the weight's per-sample gradient is instantiated
        elif _same(shared[0], self.a) and torch.equal(shared[1], live):
            self.a = shared[2]
        else:
            packed = self.a.reshape(b * t, -1).index_select(0, live)  # (N, d)
            shared[:] = [self.a, live, packed]
            self.a = packed

    def zero_rows(self, bad: torch.Tensor) -> None:
        """Drop the examples whose gradient is not finite (a zero clip factor would still give 0 * nan)."""
        if self.per_sample:
            self.per_sample = {p: torch.where(_rows(bad, gs), torch.zeros_like(gs), gs)
                               for p, gs in self.per_sample.items()}
        if self.kind == "other":
            return
        tokens = bad[self.idx]  # (N,)
        self.g = torch.where(_rows(tokens, self.g), torch.zeros_like(self.g), self.g)
        if self.kind != "embedding" and self.a is not None:
            self.a = torch.where(_rows(tokens, self.a), torch.zeros_like(self.a), self.a)

    def clipped(self, factor: torch.Tensor, scaled: list[Any]) -> dict[nn.Parameter, torch.Tensor]:
        """``sum_i factor_i * grad_i`` of each trainable parameter, from the kept activations and gradients.
        ``scaled`` holds the last packed input scaled by the clip factors and that product."""
        m = self.module
        out = {p: torch.einsum("b,b...->...", factor.to(gs.dtype), gs) for p, gs in (self.per_sample or {}).items()}
        if self.kind == "other":
            return out
        c = factor.to(self.g.dtype)[self.idx].unsqueeze(1)  # (N, 1): each token's clip factor
        if self.kind == "embedding":
            ids, rows = self.a, self.g * c
            if m.padding_idx is not None:  # nn.Embedding never updates the padding row
                keep = ids != m.padding_idx
                ids, rows = ids[keep], rows[keep]
            grad = torch.zeros_like(m.weight, dtype=rows.dtype)
            return {m.weight: grad.index_add_(0, ids, rows)}
        if m.weight.requires_grad and m.weight not in out:
            d, p = self.a.shape[-1], self.g.shape[-1]
            if d <= p:  # scale the narrower operand; layers that read one input (query, key, value) share its copy
                if scaled[0] is not self.a:
                    scaled[:] = [self.a, self.a * c]
                w = scaled[1].T @ self.g  # (d, p)
            else:
                w = ((self.g * c).T @ self.a).T  # the narrower operand transposed on the left
            out[m.weight] = (w.T if self.kind == "linear" else w).contiguous()
        elif self.kind == "conv1d" and m.weight in out:
            out[m.weight] = out[m.weight].T.contiguous()  # (p, d) per-sample layout -> Conv1D's (d, p)
        if getattr(m, "bias", None) is not None and m.bias.requires_grad:
            out[m.bias] = self.g.T @ c.squeeze(1)  # sum_i c_i sum_t g_it, without a scaled copy of g
        return out


def _same(kept: torch.Tensor | None, t: torch.Tensor) -> bool:
    """Whether ``t`` is a view of the same memory as ``kept`` (held alive, so the same values) in the same layout."""
    return (kept is not None and kept.data_ptr() == t.data_ptr() and kept.shape == t.shape
            and kept.stride() == t.stride() and kept.dtype == t.dtype)


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    """The calls of one layer joined along the token dimension (no copy for the usual single call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _rows(bad: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return bad.view(-1, *([1] * (t.dim() - 1)))
