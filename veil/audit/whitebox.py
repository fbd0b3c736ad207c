"""The white-box score of ``veil audit --score gradient``: how well each round's global update aligns with a canary.

An auditor who sees every round's global trainable weights w_0, w_1, …, w_R (the coordinator does: it computes
them; with SecAgg+ it still sees each round's aggregate) scores canary i by

    s_i = Σ_r ⟨w_{r−1} − w_r, clip(g_i(w_{r−1}))⟩ / ‖clip(g_i(w_{r−1}))‖
        = Σ_r ⟨−Δ_r, g_i(w_{r−1}) / ‖g_i(w_{r−1})‖⟩

where g_i(w) is the gradient of canary i's loss with respect to the trainable tensors at w (dropout off) and
Δ_r = w_r − w_{r−1} is round r's global update. Clipping scales a gradient without turning it, so the clipping
norm drops out of the normalised direction. Training moves the weights against the gradients of the examples it
trains on, so an included canary tends to score high: it is guessed "in" for the highest scores.

This follows the white-box audit of Steinke, Nasr and Jagielski (arXiv:2305.08846), whose score sums, over the
training steps, the model update's inner product with the canary's gradient direction, adapted in two ways: the
canaries are records (input space), not crafted gradients, so the direction is the record's own gradient at the
step's starting weights; and a step is a federated round, the finest grain the coordinator observes (each client
takes many local DP-SGD steps inside one round). Far from the paper's strongest white-box setting (Dirac gradient
canaries inserted into every step), so the bound stays a loose lower bound.

The weights come from the run's own per-round checkpoints (:mod:`veil.server.checkpoint`, written by every run
anyway) and w_0 from the model built at the run's seed, as the coordinator builds it: the audit makes a normal run
write nothing more. Gradients are taken one canary at a time with plain autograd (m · R backward passes): the
direct definition, with no per-sample-gradient machinery to get wrong (``torch.func.vmap`` cannot batch them:
transformers' attention-mask code branches on the data). 128 canaries × 3 rounds of the tiny BERT: about a minute
on a loaded 2-core CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from veil.errors import ConfigError

log = logging.getLogger("veil.audit")

def alignment_scores(model: nn.Module, per_example_loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor],
                     canaries: dict[str, torch.Tensor], weights: Iterable[list[np.ndarray]], *,
                     device: torch.device | str = "cpu") -> np.ndarray:
    """``s_i = Σ_r ⟨w_{r−1} − w_r, g_i(w_{r−1}) / ‖g_i(w_{r−1})‖⟩`` for every canary i, (m,).

    ``model``: its trainable tensors (``requires_grad``) are the ones ``weights`` holds, in
    :func:`veil.task.model.trainable_names` order. ``per_example_loss(model, batch)`` gives the (B,) losses of a
    batch of ``canaries`` (the task's tensors, first dimension m). ``weights``: w_0, w_1, …, w_R, read one at a time.
    A canary whose gradient is zero scores 0 for that round.
    """
    from veil.task.model import set_trainable

    model = model.to(device).eval()  # dropout off: the gradient of the model the round started from
    params = [p for p in model.parameters() if p.requires_grad]
    m = int(next(iter(canaries.values())).shape[0])
    scores = np.zeros(m, dtype=np.float64)
    it = iter(weights)
    previous = next(it, None)
    if previous is None:
        raise ValueError("weights must hold at least w_0")
    for current in it:
        set_trainable(model, previous)
        descent = _flat(previous, device) - _flat(current, device)  # (P,) w_{r-1} - w_r
        for i in range(m):
            batch = {k: t[i:i + 1].to(device) for k, t in canaries.items()}
            loss = per_example_loss(model, batch)[0]
            grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()  # (P,)
            norm = float(grad.norm())
            if norm > 0:
                scores[i] += float(descent @ grad) / norm
        previous = current
    return scores


def _flat(arrays: list[np.ndarray], device: torch.device | str) -> torch.Tensor:
    return torch.cat([torch.as_tensor(a, dtype=torch.float64).reshape(-1) for a in arrays]).to(device)  # (P,)


def round_weights(out_dir: Path, initial: list[np.ndarray], names: list[str]) -> Iterator[list[np.ndarray]]:
    """w_0 = ``initial``, then the global trainable tensors after each round, from the run's checkpoints.

    Refuses (ConfigError) a run whose checkpoints do not hold every round from 1 on, or other tensors than ``names``.
    """
    from veil.server.checkpoint import checkpoint_files, read_checkpoint

    files = checkpoint_files(out_dir)
    if not files:
        raise ConfigError(f"{out_dir} holds no round checkpoints: the white-box score needs every round's weights")
    yield initial
    for expected, path in enumerate(files, start=1):
        ckpt = read_checkpoint(path)
        if ckpt.round != expected or ckpt.names != names:
            raise ConfigError(f"checkpoint {path} is not round {expected} of this run's model: the white-box score "
                              "needs an unbroken sequence of rounds; audit a fresh run")
        yield ckpt.arrays


def gradient_scores(cfg: Any, labels: list[str], out_dir: Path, texts: list[str], canary_labels: list[str]) -> np.ndarray:
    """The white-box score of every canary on the finished run in ``out_dir``, (m,)."""
    from veil.task import get_task
    from veil.task.data import TextExamples
    from veil.task.model import get_trainable, resolve_device, trainable_names

    task = get_task(cfg.task.name)
    model = task.build_model(cfg, labels, seed=cfg.federation.seed)  # the coordinator's starting point, w_0
    data = task.tensors(TextExamples(texts, canary_labels), labels, cfg, path="canaries")
    names = trainable_names(model)
    weights = round_weights(out_dir, get_trainable(model), names)
    scores = alignment_scores(model, task.per_example_loss, data, weights, device=resolve_device(cfg.device))
    log.info("audit: white-box scores of %d canaries over %d rounds", len(texts), cfg.federation.rounds)
    return scores
