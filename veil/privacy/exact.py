"""Exact per-sample gradients for full fine-tuning of Hugging Face Transformers under Opacus 1.6 (DP-SGD, Abadi et al.,
arXiv:1607.00133; ghost clipping, Li et al., arXiv:2110.05679). Issue 7, item 1.

With LoRA only adapters and the head train, and Opacus' per-sample clipped gradients already equal a per-example
loop. With every parameter trainable (``model.lora=false``) three upstream problems make them differ or fail; this
module works around each of them without patching Opacus' global registries:

1. **Broadcast position ids** (Opacus issue 841). Hugging Face's ``BertEmbeddings`` looks up learned position
   embeddings with a buffer slice of shape (1, T) that is broadcast over the batch, so the position embedding layer
   sees a batch of one: Opacus' per-sample gradient has batch dimension 1 and the clip step fails ("stack expects
   each tensor to be equal size"). DistilBERT, ELECTRA and GPT-2's ``wpe`` do the same. Fix: :class:`ExplicitIds`
   expands every trainable embedding's batch-1 input to (B, T) with a forward pre-hook.
2. **Ghost clipping: "view size is not compatible with input tensor's size and stride".** The same
   ``BertEmbeddings`` builds ``token_type_ids`` by ``.expand(batch_size, seq_length)`` of a (1, T) buffer: a (B, T)
   tensor whose batch stride is 0 (the same pre-hook makes it contiguous). Opacus' embedding norm sampler
   (``opacus/grad_sample/embedding_norm_sample.py``, added with ghost clipping for embeddings in Opacus PR 694)
   calls ``input_ids.view(-1, 1)`` on it, and ``view`` cannot flatten a stride-0 dimension. It is an input
   (activation) tensor, not the backprops. Fix: :class:`ExplicitIds` passes contiguous ``token_type_ids`` (B, T),
   and :func:`embedding_norm_sample` uses ``reshape`` so no caller can trigger it again.
3. **The padding row.** ``nn.Embedding(padding_idx=p)`` gives row ``p`` a zero gradient, but Opacus' embedding grad
   sampler and norm sampler scatter the backprops of pad tokens into it. The extra per-sample gradient enters every
   example's norm, so the clip factor of *every* parameter shifts, and in hooks mode the clipped sum also puts
   gradient (and, after noise, updates) on a row the true gradient never touches. The same bug was fixed in
   private-transformers' ghost clipping (lxuechen/private-transformers PR 3); no Opacus issue was found for it.
   With an attention mask and a [CLS] head the pad positions' backprops are exactly zero and the bug is latent; it
   bites when pads are attended or pooled. Fix: :func:`embedding_grad_sample` zeroes the row,
   :func:`embedding_norm_sample` masks pad positions, and :func:`keep_padding_rows` drops the Gaussian noise Opacus
   adds to that row, so it stays fixed as ``nn.Embedding`` promises. Dropping it is post-processing of the release
   with public knowledge (the row's true gradient is identically zero), so the privacy guarantee is unchanged.

4. **LayerNorm without bias** (ModernBERT): Opacus' LayerNorm sampler reads ``layer.bias.requires_grad`` of None;
   :func:`layer_norm_grad_sample` handles it.
5. **No fix possible** (refused before training by :func:`inexact_layer`, one line naming the layer and what works):
   DeBERTa-v2's relative position table (read as a weight, never called, so no per-sample input exists), and tied
   parameters (GPT-2's and Llama's tied LM head) in ghost mode, which Opacus' ghost clipping does not support.
   Tied parameters in hooks mode are exact: Opacus sums the per-sample gradients of both uses.

``tests/test_families.py`` checks BERT, RoBERTa, DistilBERT, DeBERTa-v2 (LoRA), ELECTRA, ModernBERT, GPT-2, Llama and
Qwen2 against a per-example loop, with pad tokens.

:func:`make_exact` (before Opacus wraps the model), :func:`install_samplers` (on the wrapped module, as
instance-level overrides of the class registries ``GRAD_SAMPLERS``/``NORM_SAMPLERS``:
:func:`veil.privacy.opacus_compat.shadow_samplers`) and :func:`keep_padding_rows` (on the optimizer) are called by
the DP engines (:mod:`veil.privacy.hooks`, :mod:`veil.privacy.ghost`, :mod:`veil.privacy.bk`).
``tests/test_dp_exact_full.py`` checks the result against a per-example loop.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from opacus.grad_sample.embedding import compute_embedding_grad_sample
from opacus.utils.tensor_utils import sum_over_all_but_batch_and_last_n
from torch import nn

from veil.privacy.opacus_compat import shadow_samplers

log = logging.getLogger("veil.privacy")

# Layers that read a trainable weight directly instead of calling the module, so Opacus' hooks never see a per-sample
# input for them and no exact per-sample gradient exists: (model_type, module name suffix) -> what the layer is.
_WEIGHT_READ_LAYERS = {
    ("deberta-v2", "rel_embeddings"): "DeBERTa's relative position table, read as a weight by every attention layer",
}


class ExplicitIds(nn.Module):
    """Calls ``model`` so that every trainable ``nn.Embedding`` sees a contiguous (B, ...) input.

    Hugging Face models look up learned absolute position embeddings (BERT, DistilBERT, ELECTRA, GPT-2's ``wpe``)
    with ids of shape (1, T) broadcast over the batch, and BERT's token type ids are a stride-0 ``expand`` of a
    (1, T) buffer. A forward pre-hook on each trainable embedding expands a batch-1 input to the batch size of the
    current call and makes it contiguous: the embedding values are the same (only broadcast earlier), which is what
    Opacus' per-sample hooks need (issue 841, and the stride-0 ids behind the ghost clipping "view size" error).
    Models that already pass (B, T) ids (RoBERTa, Llama, Qwen2: rotary positions) are unaffected.

    Parameters
    ----------
    model
        A Hugging Face model called with ``input_ids`` (B, T).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._batch = 0
        for module in model.modules():
            if isinstance(module, nn.Embedding) and module.weight.requires_grad:
                module.register_forward_pre_hook(self._batched)

    def _batched(self, _module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        ids = args[0]  # (1, ...) broadcast, or (B, ...) possibly with stride 0
        if ids.dim() >= 1 and ids.shape[0] == 1 and self._batch > 1:
            ids = ids.expand(self._batch, *ids.shape[1:])
        return (ids.contiguous(), *args[1:])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        self._batch = int(input_ids.shape[0])  # (B, T)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def _model_type(model: nn.Module) -> str | None:
    for module in model.modules():  # the first HF config found (a peft wrapper holds the model inside)
        config = getattr(module, "config", None)
        if getattr(config, "model_type", None):
            return str(config.model_type)
    return None


def refusal_for_model_type(model_type: str, *, lora: bool) -> str | None:
    """The launcher's early form of :func:`inexact_layer`, from ``config.json``'s ``model_type`` alone."""
    if lora:
        return None
    for (kind, suffix), what in _WEIGHT_READ_LAYERS.items():
        if kind == model_type:
            return (f"full fine-tuning of {model_type} under DP-SGD: layer {suffix} ({what}) has no exact per-sample "
                    "gradient; use model.lora=true (LoRA)")
    return None


def inexact_layer(model: nn.Module, *, grad_sample_mode: str) -> str | None:
    """Why DP-SGD on ``model``'s trainable parameters would not be exact, naming the layer and what works instead
    (one line), or None when it is exact.

    Two cases: a trainable layer whose weight the model reads directly (no per-sample input for Opacus' hooks), and,
    in ghost mode, a trainable parameter shared by two layers (tied input/output embeddings), which Opacus' ghost
    clipping does not support.
    """
    model_type = _model_type(model)
    for name, module in model.named_modules():
        for (kind, suffix), what in _WEIGHT_READ_LAYERS.items():
            if kind == model_type and name.endswith(suffix) and any(p.requires_grad for p in module.parameters()):
                return (f"layer {name} ({what}) has no exact per-sample gradient under DP-SGD; "
                        "use model.lora=true (LoRA)")
    if grad_sample_mode == "ghost":
        owners: dict[int, str] = {}
        for name, module in model.named_modules():
            for pname, param in module.named_parameters(recurse=False):
                if not param.requires_grad:
                    continue
                if id(param) in owners:
                    return (f"parameter {name}.{pname} is tied to {owners[id(param)]}, which ghost clipping does not "
                            "support; use privacy.grad_sample_mode=hooks or model.lora=true")
                owners[id(param)] = f"{name}.{pname}"
    return None


def trains_embeddings(model: nn.Module) -> bool:
    """Whether any ``nn.Embedding`` in ``model`` has a trainable weight (full fine-tuning, not LoRA)."""
    return any(isinstance(m, nn.Embedding) and m.weight.requires_grad for m in model.modules())


def make_exact(model: nn.Module) -> nn.Module:
    """Wrap ``model`` in :class:`ExplicitIds` when its embeddings train; otherwise return it unchanged.

    Parameters
    ----------
    model
        The model about to be handed to Opacus.

    Returns
    -------
    nn.Module
        ``model`` itself (LoRA: frozen embeddings) or the wrapper, which shares ``model``'s parameters.
    """
    if not trains_embeddings(model):
        return model
    return ExplicitIds(model)


def embedding_grad_sample(layer: nn.Embedding, activations: list[torch.Tensor],
                          backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus' embedding grad sampler with the ``padding_idx`` row zeroed, as ``nn.Embedding``'s own backward does.

    Returns
    -------
    dict
        ``{layer.weight: grad_sample}`` with ``grad_sample`` of shape (B, V, H).
    """
    ret = compute_embedding_grad_sample(layer, activations, backprops)
    if layer.padding_idx is not None and layer.weight in ret:
        ret[layer.weight][:, layer.padding_idx] = 0  # (B, H) row of the pad token
    return ret


def embedding_norm_sample(layer: nn.Embedding, activations: list[torch.Tensor],
                          backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms of an embedding weight without materialising (B, V, H).

    Example ``b``'s gradient row for token ``v`` is the sum of the backprops at the positions holding ``v``, so
    ``||g_b||^2 = sum_{s,t} [id_s == id_t] <g_s, g_t>`` over positions ``s, t`` of ``b`` that are not padding: a
    masked Gram matrix, as ghost clipping does for linear layers. Works on any memory layout of the ids.

    Returns
    -------
    dict
        ``{layer.weight: norms}`` with ``norms`` of shape (B,).
    """
    if not layer.weight.requires_grad:
        return {}
    ids = activations[0]
    batch = ids.shape[0]
    ids = ids.reshape(batch, -1)  # (B, T); reshape, not view: ids may be expanded (stride 0)
    grads = backprops.reshape(batch, -1, layer.embedding_dim)  # (B, T, H)
    same = ids.unsqueeze(2) == ids.unsqueeze(1)  # (B, T, T)
    if layer.padding_idx is not None:
        keep = ids != layer.padding_idx  # (B, T)
        same = same & keep.unsqueeze(2) & keep.unsqueeze(1)
    gram = torch.bmm(grads, grads.transpose(1, 2))  # (B, T, T)
    sq = (gram * same.to(gram.dtype)).sum(dim=(1, 2)).clamp(min=0)  # (B,)
    return {layer.weight: sq.sqrt()}


def layer_norm_grad_sample(layer: nn.LayerNorm, activations: list[torch.Tensor],
                           backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus' LayerNorm grad sampler, also for a LayerNorm without bias (``bias=False``: ModernBERT), where
    Opacus' own reads ``layer.bias.requires_grad`` of None.

    Returns
    -------
    dict
        Per-sample gradients (B, *normalized_shape) of the trainable weight and bias.
    """
    x = activations[0]
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight is not None and layer.weight.requires_grad:
        normed = nn.functional.layer_norm(x, layer.normalized_shape, eps=layer.eps)
        ret[layer.weight] = sum_over_all_but_batch_and_last_n(normed * backprops, layer.weight.dim())
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = sum_over_all_but_batch_and_last_n(backprops, layer.bias.dim())
    return ret


def install_samplers(grad_sample_module: nn.Module) -> None:
    """Use veil's embedding and LayerNorm samplers in this Opacus grad-sample module only (not globally), through
    :func:`veil.privacy.opacus_compat.shadow_samplers`."""
    shadow_samplers(grad_sample_module, grad={nn.Embedding: embedding_grad_sample, nn.LayerNorm: layer_norm_grad_sample},
                    norm={nn.Embedding: embedding_norm_sample})


def keep_padding_rows(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Zero the ``padding_idx`` rows of the (clipped, noised) gradients right before each optimizer step.

    Parameters
    ----------
    model
        The model whose trainable ``nn.Embedding`` layers with a ``padding_idx`` are kept fixed.
    optimizer
        An Opacus ``DPOptimizer`` (the hook goes on its ``original_optimizer``, which steps after noise is added)
        or a plain optimizer.

    Returns
    -------
    int
        The number of rows kept fixed.
    """
    rows = [(m.weight, m.padding_idx) for m in model.modules()
            if isinstance(m, nn.Embedding) and m.padding_idx is not None and m.weight.requires_grad]
    if not rows:
        return 0
    target = getattr(optimizer, "original_optimizer", optimizer)

    def _zero_rows(_opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        for weight, index in rows:
            if weight.grad is not None:
                weight.grad[index] = 0  # (H,) public: the true gradient of this row is always zero

    target.register_step_pre_hook(_zero_rows)
    return len(rows)
