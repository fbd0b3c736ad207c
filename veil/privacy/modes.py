"""``privacy.grad_sample_mode=auto``: the fastest exact per-sample clipping mode for a model.

All three modes give per-sample clipped gradients equal to a per-example loop (tests/test_dp_exact*.py,
tests/test_families.py); they differ only in cost (docs/benchmarks.md, dp_overhead, MiniLM-L6, B=32, T=64, CPU):

* ``hooks`` (Opacus) materialises every trainable parameter's per-sample gradient, (B, *shape) each. With LoRA the
  trainable tensors are 0.5% of the model: 0.92x non-private throughput at 1.01x memory, while ``ghost``'s second
  backward runs through the whole frozen base again (0.69x).
* ``ghost`` (Opacus' fast gradient clipping, Li et al., arXiv:2110.05679) computes per-sample norms without
  per-sample gradients, then a second backward. With full fine-tuning the word-embedding per-sample gradient alone is
  B x vocabulary x hidden (1.5 GB at B=32 for MiniLM): hooks runs at 0.17-0.32x and 8.3-8.5x memory, ghost at
  0.31-0.53x and 1.12-1.17x.
* ``bk`` (book-keeping, Bu et al., arXiv:2210.00038; :mod:`veil.privacy.bk`) needs one backward, without
  weight gradients, and builds the clipped summed gradients from each layer's inputs and output gradients: for full
  fine-tuning it is the fastest of the three (benchmark dp_overhead, docs/benchmarks.md); it holds each trainable
  layer's inputs and output gradients until that layer's clip factors are known; with a tight memory limit, choose
  ``ghost``.

The rule: ``hooks`` when the trainable parameters are a small share of the model and no embedding table trains;
otherwise ``bk`` when every trainable layer is one it clips exactly
(:func:`veil.privacy.bk.unsupported_layer`), else ``ghost``, and ``hooks`` for tied weights (neither bk nor Opacus' ghost clipping supports them). It reads only
the model's structure and which parameters require gradients, so every process (and every client of a run) picks the
same mode for the same model.
"""

from __future__ import annotations

import logging

from torch import nn

from veil.conf.schema import DP_MODES

log = logging.getLogger("veil.privacy")

MODES = DP_MODES  # the exact modes (named by the schema); "auto" picks one of them
HOOKS_MAX_TRAINABLE_SHARE = 0.10  # LoRA + head is 0.5% of MiniLM-L6 (hooks fastest); full fine-tuning 100% (bk)


def pick_grad_sample_mode(module: nn.Module) -> str:
    """``hooks`` for adapter-style training (few trainable parameters, no trainable embedding), else ``bk`` (which
    :func:`resolve_grad_sample_mode` replaces by ghost or hooks where bk is not exact)."""
    total = trainable = 0
    for p in module.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    embedding_trains = any(isinstance(m, nn.Embedding) and m.weight.requires_grad for m in module.modules())
    share = trainable / total if total else 0.0
    mode = "bk" if embedding_trains or share > HOOKS_MAX_TRAINABLE_SHARE or _head_only(module) else "hooks"
    log.debug("grad_sample_mode=auto: %s (%.2f%% of parameters train, embedding trains: %s)",
              mode, 100 * share, embedding_trains)
    return mode


def _head_only(module: nn.Module) -> bool:
    """Every trainable parameter sits in one ``nn.Linear`` (``model.tuning=head``): book-keeping clips it from the
    layer's inputs and output gradients with no (B, K, H) per-sample gradient, 2-3x faster than hooks there."""
    owners = [m for m in module.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    return len(owners) == 1 and isinstance(owners[0], nn.Linear)


def resolve_grad_sample_mode(mode: str, module: nn.Module) -> str:
    """``mode`` itself when it is an exact mode, :func:`pick_grad_sample_mode` for ``auto``."""
    if mode == "auto":
        picked = pick_grad_sample_mode(module)
        if picked == "bk":
            from veil.privacy.bk import unsupported_layer

            reason = unsupported_layer(module)
            if reason is None:
                return picked
            log.debug("grad_sample_mode=auto: not bk (%s)", reason)
            picked = "ghost"
        if picked == "ghost":
            from veil.privacy.exact import inexact_layer

            if inexact_layer(module, grad_sample_mode="ghost") is not None:  # tied weights: hooks are exact
                return "hooks"
        return picked
    if mode not in MODES:
        raise ValueError(f"grad_sample_mode={mode!r} must be one of {(*MODES, 'auto')}")
    return mode


OWNER_ENGINES = ("auto", "hooks", "bk")  # `veil client --dp-engine`: what a deployed node may run


def resolve_owner_engine(engine: str, module: nn.Module) -> str:
    """The DP engine a deployed node runs: the owner's ``--dp-engine``, never the run's ``privacy.grad_sample_mode``
    (review N2). ``auto`` picks as :func:`resolve_grad_sample_mode` does, but never ghost: Opacus' ghost clipping
    takes its per-sample norms from one float32 backward and the gradient from a second one, and with crafted weights
    inside the acceptance bound the two disagree, so one example could contribute tens of C. hooks and bk clip the
    gradient they sum, and hold ``||contribution|| <= C`` (tests/test_engine_bound.py)."""
    if engine not in OWNER_ENGINES:
        raise ValueError(f"dp engine {engine!r} must be one of {OWNER_ENGINES}")
    mode = resolve_grad_sample_mode(engine, module)
    return "hooks" if mode == "ghost" else mode
