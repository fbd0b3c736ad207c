"""Book-keeping's engine: hooks on a model that turn ONE backward of the per-example losses into clipped summed
gradients (Bu, Mao, Xu, arXiv:2210.00038; the method is described in :mod:`veil.privacy.bk`). Per-layer work is
in the registered rules of :mod:`veil.privacy.bk.layers`.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch
from torch import nn

from veil.errors import ModelError
from veil.privacy.bk import layers as _layers  # noqa: F401  (registers the layer rules)
from veil.privacy.bk.registry import Call, Clip, Shared, rule_for

log = logging.getLogger("veil.privacy")


def _own_trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def unsupported_layer(model: nn.Module) -> str | None:
    """Why book-keeping cannot clip ``model``'s trainable parameters exactly (one line), or None when it can."""
    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        if not _own_trainable(module):
            continue
        for pname, param in module.named_parameters(recurse=False):
            if param.requires_grad and id(param) in owners:
                return (f"parameter {name}.{pname} is tied to {owners[id(param)]}, which book-keeping does not "
                        "support; use privacy.grad_sample_mode=hooks")
            owners[id(param)] = f"{name}.{pname}"
        _rule, refuse = rule_for(module)
        reason = None if refuse is None else refuse(module, name)
        if reason is not None:
            return reason
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
        self._done: list[Clip] = []  # the clipped sums still to build, one per layer done
        self._shared = Shared()
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
        sq, clip = self._finish(module, recs)
        self._sq = sq if self._sq is None else self._sq + sq
        self._done.append(clip)
        for r in recs:  # the hook's partial holds the record until the graph is freed: empty it, so the unpacked
            r.clear()   # input and output gradient are freed now, not at the end of the backward
        recs.clear()

    def backward(self, per_example: torch.Tensor) -> None:
        """One backward of ``per_example.sum()`` (B,), then ``p.grad`` = the clipped summed gradient."""
        try:
            self._sq, self._done = None, []
            self._shared.clear()
            torch.autograd.backward(per_example.sum())
            self._clipped_sum(int(per_example.shape[0]), per_example.device)
        finally:
            for recs in self.records.values():
                recs.clear()
            self._sq, self._done = None, []
            self._shared.clear()

    def take_zeroed(self) -> int:
        """How many examples had a non-finite gradient (zeroed) since the last call; for the node's own log."""
        zeroed, self.zeroed = self.zeroed, 0
        return zeroed

    def _finish(self, module: nn.Module, records: list[list[Any]]) -> tuple[torch.Tensor, Clip]:
        """A layer whose calls all have their output gradients: its (B,) float64 per-sample squared norms, and what
        builds its clipped sum (only its live tokens kept). The samplers of small layers re-run the layer's forward
        under torch.func, which must not be captured as a training call (it would add a record and a hook in the
        middle of the backward)."""
        for r in records:
            if [a._version for a in r[0] if isinstance(a, torch.Tensor)] != r[2]:
                raise ModelError(f"the model modifies the input of a {type(module).__name__} in place, so "
                                 "book-keeping cannot clip it exactly; use privacy.grad_sample_mode=ghost")
        calls: list[Call] = [(r[0], r[1]) for r in records]
        rule, _refuse = rule_for(module)
        self._sampling = True
        try:
            sq, clip = rule(module, calls, self._shared)
        finally:
            self._sampling = False
        return sq.to(torch.float64), clip

    def _clipped_sum(self, batch: int, device: torch.device) -> None:
        clips = self._done
        sq = torch.zeros(batch, dtype=torch.float64, device=device)
        if self._sq is not None:
            sq += self._sq.to(torch.float64)
        for module, recs in self.records.items():  # layers with a call whose output the loss did not use
            done = [r for r in recs if r[1] is not None]
            if done:
                layer_sq, clip = self._finish(module, done)
                clips.append(clip)
                sq += layer_sq
        self._shared.clear()  # the Gram matrices and unpacked inputs: only the packed tokens are needed now
        bad = ~torch.isfinite(sq)
        factor = (self.clip / (sq.clamp(min=0).sqrt() + 1e-6)).clamp(max=1.0)
        factor = torch.where(bad, torch.zeros_like(factor), factor)
        self.zeroed += int(bad.sum())
        any_bad = bad if bool(bad.any()) else None
        grads: dict[nn.Parameter, torch.Tensor] = {}
        while clips:  # each layer's activations and output gradients are freed once its gradient is built
            clip = clips.pop()
            grads.update(clip(factor, any_bad))
            del clip
        for p in self.params:
            g = grads.get(p)
            g = torch.zeros_like(p) if g is None else g.to(p.dtype)
            p.grad = g if p.grad is None else p.grad + g
