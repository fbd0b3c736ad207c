"""``privacy.grad_sample_mode=bk``: book-keeping per-sample clipping in ONE backward pass (Bu, Mao, Xu, "Differentially
Private Optimization on Large Model at Small Cost", ICML 2023, arXiv:2210.00038).

Why hand-written: Opacus 1.6 offers per-sample gradients ("hooks") and fast gradient / ghost clipping ("ghost"),
which runs a first backward to get per-sample norms and a *second* full backward on the re-weighted loss. It has no
single-pass mode. Book-keeping keeps, for every trainable layer, its input activations ``a`` (B, T, d) and output
gradients ``g`` (B, T, p) from one backward in which no weight gradient is computed (the parameters do not require
gradients during the forward; backpropagation still flows because each trainable layer's output is made to require
a gradient when nothing upstream does). Then:

* per-sample squared norms per layer: Linear (and GPT-2's Conv1D) by the ghost norm
  ``sum_{t,s} (a_t . a_s)(g_t . g_s)`` or, when ``2 T^2 > d p``, from the instantiated per-sample gradient ("mixed");
  Embedding by veil's padding-aware masked Gram norm (:func:`veil.privacy.exact.embedding_norm_sample`); any other
  layer (LayerNorm, RMSNorm: a few parameters) by Opacus' grad samplers (veil's LayerNorm one, torch.func otherwise);
* clip factors ``c_i = min(1, C / (||g_i|| + 1e-6))`` over all layers, as Opacus computes them; an example whose
  norm is not finite gets ``c_i = 0`` and its rows are zeroed (:func:`veil.privacy.dpsgd.zero_nonfinite_samples`'s
  rule);
* each parameter's clipped *summed* gradient directly: Linear ``sum_i c_i a_i^T g_i`` (one matmul, the cost of the
  usual weight gradient), bias ``sum_i c_i sum_t g_it``, Embedding rows by ``index_add`` of ``c_i g_it`` (padding
  positions skipped), small layers from their per-sample gradients.

The result lands in ``p.grad``; Opacus' ``DPOptimizerFastGradientClipping`` then adds the Gaussian noise (std
``sigma C``, veil's OS-seeded generator) and divides by the expected batch size, and Opacus' ``DPDataLoader`` does the
Poisson sampling, exactly as in ghost mode. :func:`unsupported_layer` refuses what is not exact here (tied parameters,
embeddings with ``max_norm``/``scale_grad_by_freq``/``sparse``, layers with buffers and no Opacus sampler);
``auto`` then falls back to ghost or hooks. ``tests/test_dp_exact_full.py`` and ``tests/test_families.py`` check the
clipped gradients against a per-example loop.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

from veil.errors import ModelError
from veil.privacy.exact import embedding_norm_sample, layer_norm_grad_sample

log = logging.getLogger("veil.privacy")

try:  # GPT-2's linear layer with a transposed (in, out) weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None  # type: ignore[assignment,misc]

_SAMPLERS = {**GradSampleModule.GRAD_SAMPLERS, nn.LayerNorm: layer_norm_grad_sample}


def _linear_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if Conv1D is not None and isinstance(module, Conv1D):
        return "conv1d"
    return None


def _kind(module: nn.Module) -> str:
    return "embedding" if isinstance(module, nn.Embedding) else _linear_kind(module) or "other"


def _own_trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def unsupported_layer(model: nn.Module) -> str | None:
    """Why book-keeping cannot clip ``model``'s trainable parameters exactly (one line), or None when it can."""
    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        own = _own_trainable(module)
        if not own:
            continue
        for pname, param in module.named_parameters(recurse=False):
            if param.requires_grad and id(param) in owners:
                return (f"parameter {name}.{pname} is tied to {owners[id(param)]}, which book-keeping does not "
                        "support; use privacy.grad_sample_mode=hooks")
            owners[id(param)] = f"{name}.{pname}"
        if isinstance(module, nn.Embedding):
            if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
                return (f"embedding {name} uses max_norm, scale_grad_by_freq or sparse gradients, which book-keeping "
                        "does not support; use privacy.grad_sample_mode=hooks")
            continue
        if _linear_kind(module) is not None:
            continue
        if any(p.requires_grad for c in module.children() for p in c.parameters()):
            return (f"layer {name} ({type(module).__name__}) holds trainable parameters and trainable sub-layers, "
                    "which book-keeping does not support; use privacy.grad_sample_mode=ghost or hooks")
        if type(module) not in _SAMPLERS and any(True for _ in module.buffers()):
            return (f"layer {name} ({type(module).__name__}) has buffers and no Opacus grad sampler, which "
                    "book-keeping does not support; use privacy.grad_sample_mode=ghost or hooks")
    return None


class BookKeeping:
    """Hooks on ``model`` that turn one backward of the per-example losses into clipped summed gradients.

    Parameters
    ----------
    model
        The model called by the training loop (veil's :class:`~veil.privacy.exact.ExplicitIds` wrapper for full
        fine-tuning); checked with :func:`unsupported_layer` first.
    max_grad_norm
        The clipping norm C.

    Each forward is expected to be followed by one backward (the training loop's step); a new forward drops what
    the previous one captured.
    """

    def __init__(self, model: nn.Module, *, max_grad_norm: float) -> None:
        self.clip = float(max_grad_norm)
        self.layers = {m: _own_trainable(m) for m in model.modules() if _own_trainable(m)}
        self.params = [p for ps in self.layers.values() for p in ps]
        self.records: dict[nn.Module, list[list[Any]]] = {m: [] for m in self.layers}
        self.zeroed = 0  # examples whose gradient was not finite, since the last take_zeroed()
        self._sq: torch.Tensor | None = None  # (B,) float64 squared norms of the layers done in this backward
        self._done: list[_Layer] = []
        self._gram: list[Any] = [None, None]  # the last activation whose Gram matrix was taken, and that matrix
        self._packed: list[Any] = [None, None, None]  # the last activation packed, its live tokens, the copy
        model.register_forward_pre_hook(self._begin)
        model.register_forward_hook(self._end, always_call=True)
        for module in self.layers:
            module.register_forward_hook(self._capture)

    def _begin(self, _module: nn.Module, _args: Any) -> None:
        for recs in self.records.values():
            recs.clear()  # a forward not followed by a backward leaves nothing behind
        if torch.is_grad_enabled():
            for p in self.params:  # no weight gradient in autograd: book-keeping computes the clipped one
                p.requires_grad_(False)

    def _end(self, _module: nn.Module, _args: Any, _output: Any) -> None:
        for p in self.params:
            p.requires_grad_(True)

    def _capture(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return None
        replaced = not output.requires_grad
        if replaced:  # nothing upstream trains: backpropagation starts here
            output = output.detach().requires_grad_(True)
        inputs = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        record = [inputs, None, [a._version for a in args if isinstance(a, torch.Tensor)]]
        self.records[module].append(record)
        output.register_hook(partial(self._on_backprop, module, record))
        return output if replaced else None

    def _on_backprop(self, module: nn.Module, record: list[Any], grad: torch.Tensor) -> None:
        """Store ``grad``; once every call of ``module`` has its gradient, take its norms now and keep only the tokens
        with a non-zero output gradient (pads behind an attention mask), so the backward frees the rest as it goes."""
        record[1] = grad.detach()
        recs = self.records[module]
        if any(r[1] is None for r in recs) or _kind(module) == "other":  # small layers: after the backward
            return
        layer = self._layer(module, recs)
        sq = layer.norm_sq(self._gram).to(torch.float64)
        self._sq = sq if self._sq is None else self._sq + sq
        layer.pack(self._packed)
        self._done.append(layer)
        recs.clear()

    def backward(self, per_example: torch.Tensor) -> None:
        """One backward of ``per_example.sum()`` (B,), then ``p.grad`` = the clipped summed gradient."""
        try:
            self._sq, self._done, self._gram, self._packed = None, [], [None, None], [None, None, None]
            per_example.sum().backward()
            self._clipped_sum(int(per_example.shape[0]), per_example.device)
        finally:
            for recs in self.records.values():
                recs.clear()
            self._sq, self._done, self._gram, self._packed = None, [], [None, None], [None, None, None]

    def take_zeroed(self) -> int:
        """How many examples had a non-finite gradient (zeroed) since the last call; for the node's own log."""
        zeroed, self.zeroed = self.zeroed, 0
        return zeroed

    def _layer(self, module: nn.Module, records: list[list[Any]]) -> _Layer:
        for r in records:
            if [a._version for a in r[0] if isinstance(a, torch.Tensor)] != r[2]:
                raise ModelError(f"the model modifies the input of a {type(module).__name__} in place, so "
                                 "book-keeping cannot clip it exactly; use privacy.grad_sample_mode=ghost")
        return _Layer(module, self.layers[module], records)

    def _clipped_sum(self, batch: int, device: torch.device) -> None:
        layers = self._done
        sq = torch.zeros(batch, dtype=torch.float64, device=device)
        if self._sq is not None:
            sq += self._sq.to(torch.float64)
        for module, recs in self.records.items():  # layers with a call whose output the loss did not use
            done = [r for r in recs if r[1] is not None]
            if done:
                layers.append(self._layer(module, done))
                sq += layers[-1].norm_sq(self._gram).to(torch.float64)
                layers[-1].pack(self._packed)
        self._gram, self._packed = [None, None], [None, None, None]
        bad = ~torch.isfinite(sq)
        factor = (self.clip / (sq.clamp(min=0).sqrt() + 1e-6)).clamp(max=1.0)
        factor = torch.where(bad, torch.zeros_like(factor), factor)
        self.zeroed += int(bad.sum())
        grads: dict[nn.Parameter, torch.Tensor] = {}
        while layers:  # each layer's activations and output gradients are freed once its gradient is built
            layer = layers.pop()
            if bool(bad.any()):
                layer.zero_rows(bad)
            grads.update(layer.clipped(factor))
            del layer
        for p in self.params:
            g = grads.get(p)
            g = torch.zeros_like(p) if g is None else g.to(p.dtype)
            p.grad = g if p.grad is None else p.grad + g


class _Layer:
    """One trainable layer's activations and output gradients of a batch (several calls joined along tokens)."""

    def __init__(self, module: nn.Module, params: list[nn.Parameter], records: list[list[Any]]) -> None:
        self.module, self.params = module, params
        self.kind = _kind(module)
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
                sampler = _SAMPLERS.get(type(m), ft_compute_per_sample_gradient)
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
        live = (self.g != 0).any(dim=-1).reshape(-1)  # (B*T,) nan counts as live
        self.idx = torch.arange(b, device=self.g.device).repeat_interleave(t)[live]  # (N,) example of each token
        self.g = self.g.reshape(b * t, -1)[live]  # (N, p)
        if self.kind == "embedding":
            self.a = self.a.reshape(-1)[live]  # (N,) ids
        elif self.per_sample:
            self.a = None  # the weight's per-sample gradient is instantiated
        elif _same(shared[0], self.a) and torch.equal(shared[1], live):
            self.a = shared[2]
        else:
            packed = self.a.reshape(b * t, -1)[live]  # (N, d)
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

    def clipped(self, factor: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        """``sum_i factor_i * grad_i`` of each trainable parameter, from the kept activations and gradients."""
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
            a, g = (self.a * c, self.g) if d <= p else (self.a, self.g * c)  # scale the narrower operand
            w = a.T @ g if d <= p else (g.T @ a).T  # (d, p); the narrower operand transposed on the left
            out[m.weight] = (w.T if self.kind == "linear" else w).contiguous()
        elif self.kind == "conv1d" and m.weight in out:
            out[m.weight] = out[m.weight].T.contiguous()  # (p, d) per-sample layout -> Conv1D's (d, p)
        if getattr(m, "bias", None) is not None and m.bias.requires_grad:
            out[m.bias] = (self.g * c).sum(dim=0)  # sum_i c_i sum_t g_it
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


class BookKeepingLoss:
    """The batch loss the training loop calls ``backward()`` on: the mean of the per-example losses for logging,
    book-keeping's one backward of their sum (clipping is per example's own loss) for ``backward()``."""

    def __init__(self, bookkeeping: BookKeeping, per_example: torch.Tensor) -> None:
        self.bookkeeping, self.per_example = bookkeeping, per_example  # (B,)

    def detach(self) -> torch.Tensor:
        return self.per_example.detach().mean()

    def item(self) -> float:
        return float(self.detach())

    def backward(self) -> None:
        self.bookkeeping.backward(self.per_example)


class BookKeepingCriterion(nn.Module):
    """Cross-entropy of logits and labels as a :class:`BookKeepingLoss` (Opacus' ghost criterion's counterpart)."""

    def __init__(self, bookkeeping: BookKeeping) -> None:
        super().__init__()
        self.bookkeeping = bookkeeping

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> BookKeepingLoss:  # type: ignore[override]
        per_example = nn.functional.cross_entropy(logits, labels, reduction="none")  # (B,)
        return BookKeepingLoss(self.bookkeeping, per_example)


class BookKeepingOptimizer(DPOptimizerFastGradientClipping):
    """Opacus' optimizer for gradients already clipped and summed in ``p.grad`` (the one ghost clipping uses: noise
    of std ``sigma C``, then division by the expected batch size), noising ``p.grad`` in place instead of copying it
    twice per step (MiniLM, 22.7M parameters, 1 CPU thread: 0.43 s -> 0.26 s a step). Same distribution, same
    generator (veil's OS-seeded one)."""

    def accumulate(self) -> None:
        for p in self.params:
            p.summed_grad = p.grad if p.summed_grad is None else p.summed_grad.add_(p.grad)

    def add_noise(self) -> None:
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            if std > 0:
                p.summed_grad.add_(torch.empty_like(p.summed_grad).normal_(0.0, std, generator=self.generator))
            p.grad = p.summed_grad.view_as(p)
            _mark_as_processed(p.summed_grad)
