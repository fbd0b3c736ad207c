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

The norms of Linear, Conv1D and Embedding layers are taken in the backward, as each layer's output gradient arrives;
then only the tokens whose output gradient is not zero are kept (pads behind an attention mask add nothing to any
gradient, so dropping them is exact), which cuts both the memory held until the clip factors are known and the final
matmuls. The cost: those kept inputs and output gradients of every trainable layer live until the end of the backward
(docs/benchmarks.md measures the peak memory). Per-layer work is in :mod:`veil.privacy.bookkeeping_layers`.

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
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

from veil.errors import ModelError
from veil.privacy.bookkeeping_layers import SAMPLERS, LayerRecord, linear_kind

log = logging.getLogger("veil.privacy")


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
        if linear_kind(module) is not None:
            continue
        if any(p.requires_grad for c in module.children() for p in c.parameters()):
            return (f"layer {name} ({type(module).__name__}) holds trainable parameters and trainable sub-layers, "
                    "which book-keeping does not support; use privacy.grad_sample_mode=ghost or hooks")
        if type(module) not in SAMPLERS and any(True for _ in module.buffers()):
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
        self._done: list[LayerRecord] = []
        self._gram: list[Any] = [None, None]  # the last activation whose Gram matrix was taken, and that matrix
        self._packed: list[Any] = [None, None, None]  # the last activation packed, its live tokens, the copy
        self._sampling = False  # True while a per-sample sampler re-runs a layer's forward (torch.func)
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
        if self._sampling or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
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
        if any(r[1] is None for r in recs):
            return
        layer, sq = self._finish(module, recs)
        self._sq = sq if self._sq is None else self._sq + sq
        self._done.append(layer)
        for r in recs:  # the hook's partial holds the record until the graph is freed: empty it, so the unpacked
            r.clear()   # input and output gradient are freed now, not at the end of the backward
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

    def _layer(self, module: nn.Module, records: list[list[Any]]) -> LayerRecord:
        for r in records:
            if [a._version for a in r[0] if isinstance(a, torch.Tensor)] != r[2]:
                raise ModelError(f"the model modifies the input of a {type(module).__name__} in place, so "
                                 "book-keeping cannot clip it exactly; use privacy.grad_sample_mode=ghost")
        return LayerRecord(module, self.layers[module], records)

    def _finish(self, module: nn.Module, records: list[list[Any]]) -> tuple[LayerRecord, torch.Tensor]:
        """A layer whose calls all have their output gradients: its (B,) float64 per-sample squared norms, then only
        its live tokens kept. The samplers of small layers re-run the layer's forward under torch.func, which must
        not be captured as a training call (it would add a record and a hook in the middle of the backward)."""
        layer = self._layer(module, records)
        self._sampling = True
        try:
            sq = layer.norm_sq(self._gram).to(torch.float64)
        finally:
            self._sampling = False
        layer.pack(self._packed)
        return layer, sq

    def _clipped_sum(self, batch: int, device: torch.device) -> None:
        layers = self._done
        sq = torch.zeros(batch, dtype=torch.float64, device=device)
        if self._sq is not None:
            sq += self._sq.to(torch.float64)
        for module, recs in self.records.items():  # layers with a call whose output the loss did not use
            done = [r for r in recs if r[1] is not None]
            if done:
                layer, layer_sq = self._finish(module, done)
                layers.append(layer)
                sq += layer_sq
        self._gram, self._packed = [None, None], [None, None, None]
        bad = ~torch.isfinite(sq)
        factor = (self.clip / (sq.clamp(min=0).sqrt() + 1e-6)).clamp(max=1.0)
        factor = torch.where(bad, torch.zeros_like(factor), factor)
        self.zeroed += int(bad.sum())
        grads: dict[nn.Parameter, torch.Tensor] = {}
        scaled: list[Any] = [None, None]
        while layers:  # each layer's activations and output gradients are freed once its gradient is built
            layer = layers.pop()
            if bool(bad.any()):
                layer.zero_rows(bad)
            grads.update(layer.clipped(factor, scaled))
            del layer
        for p in self.params:
            g = grads.get(p)
            g = torch.zeros_like(p) if g is None else g.to(p.dtype)
            p.grad = g if p.grad is None else p.grad + g


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
    of std ``sigma C``, then division by the expected batch size), with the noise and the division done in one pass
    over each gradient instead of Opacus' two copies and a division (MiniLM, 22.7M parameters, 1 CPU thread: 0.43 s
    -> 0.24 s a step): ``(sum + N(0, (sigma C)^2)) / B`` is drawn as ``N(0, (sigma C / B)^2) + sum / B``, the same
    distribution from the same generator (veil's OS-seeded one)."""

    def accumulate(self) -> None:
        for p in self.params:
            p.summed_grad = p.grad if p.summed_grad is None else p.summed_grad.add_(p.grad)

    def add_noise(self) -> None:
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
        scale = 1.0 / (self.expected_batch_size * self.accumulated_iterations) if self.loss_reduction == "mean" else 1.0
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            if std > 0:  # one pass: noise * 1 + summed * scale, written into the noise
                noise = torch.empty_like(p.summed_grad).normal_(0.0, std * scale, generator=self.generator)
                p.summed_grad = noise.add_(p.summed_grad, alpha=scale)
            elif scale != 1.0:
                p.summed_grad.mul_(scale)
            p.grad = p.summed_grad.view_as(p)
            _mark_as_processed(p.summed_grad)

    def scale_grad(self) -> None:
        """Done in :meth:`add_noise` (Opacus' ``pre_step`` calls it right after)."""
