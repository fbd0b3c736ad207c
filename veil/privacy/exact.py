"""Exact per-sample gradients for full fine-tuning of a BERT-style model under Opacus 1.6 (DP-SGD, Abadi et al.,
arXiv:1607.00133; ghost clipping, Li et al., arXiv:2110.05679). Issue 7, item 1.

With LoRA only adapters and the head train, and Opacus' per-sample clipped gradients already equal a per-example
loop. With every parameter trainable (``model.lora=false``) three upstream problems make them differ or fail; this
module works around each of them without patching Opacus' global registries:

1. **Broadcast position ids** (Opacus issue 841). Hugging Face's ``BertEmbeddings`` looks up learned position
   embeddings with a buffer slice of shape (1, T) that is broadcast over the batch, so the position embedding layer
   sees a batch of one: Opacus' per-sample gradient has batch dimension 1 and the clip step fails ("stack expects
   each tensor to be equal size"). Fix: :class:`ExplicitIds` passes ``position_ids`` of shape (B, T).
2. **Ghost clipping: "view size is not compatible with input tensor's size and stride".** The same
   ``BertEmbeddings`` builds ``token_type_ids`` by ``.expand(batch_size, seq_length)`` of a (1, T) buffer: a (B, T)
   tensor whose batch stride is 0. Opacus' embedding norm sampler
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

:func:`make_exact` (before Opacus wraps the model), :func:`install_samplers` (on the wrapped module, as
instance-level overrides of the class registries ``GRAD_SAMPLERS``/``NORM_SAMPLERS``) and :func:`keep_padding_rows`
(on the optimizer) are called by
:func:`veil.privacy.dpsgd.make_private`. ``tests/test_dp_exact_full.py`` checks the result against a per-example loop.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from opacus.grad_sample.embedding import compute_embedding_grad_sample
from torch import nn

log = logging.getLogger("veil.privacy")

# Model types whose embeddings default to position ids = arange(T) and token type ids = 0 (BERT family). RoBERTa-like
# models derive position ids from input ids per sample, which already has shape (B, T); they are not rewritten here.
_ARANGE_POSITION_TYPES = frozenset({"bert"})


class ExplicitIds(nn.Module):
    """Calls ``model`` with explicit, contiguous (B, T) ``position_ids`` and ``token_type_ids``.

    The values are those the model would use by default (its own buffers), so outputs are unchanged; only their
    shape and memory layout differ, which is what Opacus' per-sample hooks need (issue 841, and the stride-0
    ``token_type_ids`` behind the ghost clipping "view size" error).

    Parameters
    ----------
    model
        A Hugging Face BERT-style classifier (``model.config.model_type`` in ``{"bert"}``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._embeddings = (_find_embeddings(model),)  # a tuple: not registered twice as a submodule

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        batch, length = input_ids.shape  # (B, T)
        emb = self._embeddings[0]
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = emb.position_ids[:, :length].expand(batch, length).contiguous()  # (B, T)
        if kwargs.get("token_type_ids") is None:
            buffered = getattr(emb, "token_type_ids", None)
            kwargs["token_type_ids"] = (
                buffered[:, :length].expand(batch, length).contiguous() if buffered is not None
                else torch.zeros_like(input_ids)
            )  # (B, T)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def _find_embeddings(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if hasattr(module, "position_embeddings") and isinstance(getattr(module, "position_ids", None), torch.Tensor):
            return module
    raise ValueError(f"model of type {type(model).__name__} has no BERT-style embeddings module with position_ids")


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


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
        ``model`` itself (LoRA, frozen embeddings, or a model type this module does not know) or the wrapper, which
        shares ``model``'s parameters.
    """
    if not trains_embeddings(model):
        return model
    model_type = _model_type(model)
    if model_type not in _ARANGE_POSITION_TYPES:
        log.warning("full fine-tuning of model_type %s: explicit position ids not derived; per-sample gradients "
                    "of its embeddings are not checked against a per-example loop", model_type)
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


def install_samplers(grad_sample_module: nn.Module) -> None:
    """Use veil's embedding samplers in this Opacus grad-sample module only (not globally).

    Opacus looks samplers up as ``self.GRAD_SAMPLERS[type(module)]`` / ``self.NORM_SAMPLERS[...]`` at backward
    time, so instance attributes shadow the class registries for this one wrapped model.
    """
    for attr, fn in (("GRAD_SAMPLERS", embedding_grad_sample), ("NORM_SAMPLERS", embedding_norm_sample)):
        registry = getattr(type(grad_sample_module), attr, None)
        if registry is not None:
            object.__setattr__(grad_sample_module, attr, {**registry, nn.Embedding: fn})


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
