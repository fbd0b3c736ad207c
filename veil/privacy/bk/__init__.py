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
  norm is not finite gets ``c_i = 0`` and its rows are zeroed (:func:`veil.privacy.hooks.zero_nonfinite_samples`'s
  rule);
* each parameter's clipped *summed* gradient directly: Linear ``sum_i c_i a_i^T g_i`` (one matmul, the cost of the
  usual weight gradient), bias ``sum_i c_i sum_t g_it``, Embedding rows by ``index_add`` of ``c_i g_it`` (padding
  positions skipped), small layers from their per-sample gradients.

The norms of Linear, Conv1D and Embedding layers are taken in the backward, as each layer's output gradient arrives;
then only the tokens whose output gradient is not zero are kept (pads behind an attention mask add nothing to any
gradient, so dropping them is exact), which cuts both the memory held until the clip factors are known and the final
matmuls. The cost: those kept inputs and output gradients of every trainable layer live until the end of the backward
(docs/benchmarks.md measures the peak memory).

Layout: :mod:`~veil.privacy.bk.engine` (the hooks, the clip factors), :mod:`~veil.privacy.bk.registry` (one rule per
layer type, Opacus-style ``@register``), :mod:`~veil.privacy.bk.layers` (``linear.py``, ``embedding.py``,
``other.py``), :mod:`~veil.privacy.bk.training` (the DP engine the training loop calls).

The result lands in ``p.grad``; Opacus' ``DPOptimizerFastGradientClipping`` (veil's fused-noise subclass,
:class:`veil.privacy.opacus_compat.FusedNoiseOptimizer`) then adds the Gaussian noise (std
``sigma C``, veil's OS-seeded generator) and divides by the expected batch size, and Opacus' ``DPDataLoader`` does the
Poisson sampling, exactly as in ghost mode. :func:`unsupported_layer` refuses what is not exact here (tied parameters,
embeddings with ``max_norm``/``scale_grad_by_freq``/``sparse``, layers with buffers and no Opacus sampler);
``auto`` then falls back to ghost or hooks. ``tests/test_dp_exact_full.py`` and ``tests/test_families.py`` check the
clipped gradients against a per-example loop.
"""

from veil.privacy.bk.engine import BookKeeping, unsupported_layer

__all__ = ["BookKeeping", "unsupported_layer"]
