"""Local training of one client for one round: a fixed number of DP-SGD steps (E epochs = E/q Poisson batches,
or an explicit step count), or plain minibatch steps when privacy is off, with AdamW or plain SGD
(``federation.optimizer``) on the client's tokenized shard, starting from the global trainable weights; returns the
update (trained - received).

The loop calls one engine object and never asks which mode it is: a DP engine from
:func:`veil.privacy.dpsgd.make_private` (hooks, ghost or book-keeping, each a
:class:`~veil.privacy.dpsgd.PrivateTraining`) or :class:`PlainTraining` when privacy is off.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from veil.privacy.dpsgd import PrivateTraining, make_private
from veil.task.base import Task, batch_size_of
from veil.task.model import get_trainable, set_trainable

log = logging.getLogger("veil.client")


@dataclass(frozen=True)
class LocalPlan:
    """What one round of local training does; privacy fields are keyword-only at every call site."""

    steps: int  # optimizer steps this round; with DP, each is one subsampled-Gaussian release
    batch_size: int
    lr: float
    private: bool
    noise_multiplier: float
    max_grad_norm: float
    grad_sample_mode: str = "hooks"
    optimizer: str = "adamw"  # federation.optimizer: adamw | sgd (plain SGD)
    sample_rate: float | None = None  # a deployed node's own Poisson rate q (None: 1 / batches of the shard)
    expected_batch_size: int | None = None  # the fixed divisor of each noisy sum (None: Opacus' N·q)


class GradientInjector(Protocol):
    """``veil audit``'s gradient canaries (:class:`veil.audit.gradient.CanaryInjector`), called once per step
    with the trainable parameters. ``mode`` says where a per-sample gradient goes in the step's engine: ``rows``
    (Opacus' hooks: a row appended to every ``p.grad_sample``, which Opacus clips and sums with the batch's), ``sum``
    (ghost and book-keeping: added to ``p.grad``, the clipped sum before the noise) or ``mean`` (no DP: one more
    example of the mean over the step's ``batch`` examples). ``sample_rate``: the Poisson rate q, or without DP the
    chance batch / N that a record of a plain shuffled loader is in a step's batch."""

    def __call__(self, params: list[nn.Parameter], *, mode: str, sample_rate: float, batch: int) -> None: ...


@dataclass(frozen=True)
class LocalResult:
    update: list[np.ndarray]  # trained - received, trainable tensors only
    loss: float  # mean training loss over the round's batches
    steps: int  # optimizer steps = DP releases when private
    sample_rate: float  # Poisson rate q (0 when not private)
    examples: int


def sample_rate_for(*, batch_size: int, examples: int) -> float:
    """The Poisson rate Opacus will use for this shard: 1 / number of batches of a plain loader."""
    return 1.0 / math.ceil(examples / batch_size)


def train_round(template: nn.Module, received: list[np.ndarray], data: dict[str, torch.Tensor], *,
                plan: LocalPlan, device: torch.device, seed: int, task: Task,
                inject: GradientInjector | None = None) -> LocalResult:
    """Train a fresh copy of ``template`` from ``received`` and return the update.

    ``data`` holds the task's (N, ...) tensors; ``task.per_example_loss`` gives the (B,) losses DP-SGD clips.
    ``inject``: ``veil audit``'s gradient canaries (:mod:`veil.audit.gradient`), called once per step
    between the backward pass and the optimizer step. Only the audit's simulated canary node passes it; the node's
    own client (:class:`veil.client.app.VeilClient`) never does, and no config reaches it.
    """
    torch.manual_seed(seed)  # dropout (and plain shuffling); DP sampling and noise have OS-seeded generators
    model = fresh_copy(template).to(device)
    set_trainable(model, received)
    model.train()
    keys = sorted(data)
    dataset = TensorDataset(*(data[k] for k in keys))
    loader = DataLoader(dataset, batch_size=plan.batch_size, shuffle=not plan.private)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = (torch.optim.SGD(params, lr=plan.lr) if plan.optimizer == "sgd"
                                        else torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.0))
    engine: PrivateTraining | PlainTraining = make_private(
        module=model, optimizer=optimizer, loader=loader, noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm, grad_sample_mode=plan.grad_sample_mode, device=device,
        sample_rate=plan.sample_rate, expected_batch_size=plan.expected_batch_size,
    ) if plan.private else PlainTraining(model, optimizer, loader)
    losses: list[float] = []
    steps = zeroed = 0
    canaries = None  # the audit's canary gradients: where they go in this engine, and how often a record is drawn
    if inject is not None:
        rate = engine.sample_rate or min(1.0, plan.batch_size / max(1, len(dataset)))  # no DP: a plain batch / N
        canaries = functools.partial(inject, params, mode=engine.canary_mode, sample_rate=rate)
    for tensors in _batches(engine.loader, plan.steps):
        batch = {k: t.to(device) for k, t in zip(keys, tensors, strict=True)}
        engine.optimizer.zero_grad(set_to_none=True)
        loss = _loss(engine, task, batch)
        if loss is None:  # an empty Poisson batch (or nothing finite in it) still releases noise
            engine.noise_only_step(None if canaries is None else functools.partial(canaries, batch=0))
            steps += 1
            continue
        loss.backward()
        zeroed += engine.after_backward()
        if canaries is not None:
            canaries(batch=batch_size_of(batch))
        engine.optimizer.step()
        losses.append(float(loss.detach()))
        steps += 1
    if zeroed:
        log.warning("%d per-sample gradient(s) were not finite and were zeroed before clipping", zeroed)
    trained = get_trainable(model)
    update = [t - r for t, r in zip(trained, received, strict=True)]
    return LocalResult(
        update=update, loss=float(np.mean(losses)) if losses else float("nan"), steps=steps,
        sample_rate=engine.sample_rate, examples=len(dataset),
    )


@dataclass
class PlainTraining:
    """Training without DP (``privacy.enabled=false``) behind the same calls as a DP engine
    (:class:`veil.privacy.dpsgd.PrivateTraining`): the mean loss, a shuffled loader, nothing to zero or noise."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader[Any]
    sample_rate: float = 0.0  # no Poisson sampling (and no DP release)
    canary_mode: str = "mean"  # a canary is one more example of the mean over the step's batch

    def mean_loss(self, per_example: torch.Tensor) -> Any:
        return per_example.mean()

    def drop_nonfinite(self, per_example: torch.Tensor) -> torch.Tensor | None:
        return None

    def after_backward(self) -> int:
        return 0

    def noise_only_step(self, before_step: Callable[[], None] | None = None) -> None:
        if before_step is not None:
            before_step()
        self.optimizer.step()


def fresh_copy(template: nn.Module) -> nn.Module:
    """A copy of ``template`` to train, sharing its frozen parameters (never written: no optimizer holds them, and
    Opacus only touches parameters that require gradients). Copying MiniLM's 22.7M frozen weights each round cost
    more than a round of DP-SGD on its head."""
    memo: dict[int, Any] = {id(p): p for p in template.parameters() if not p.requires_grad}
    return copy.deepcopy(template, memo)


def _batches(loader: DataLoader[Any], steps: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Exactly ``steps`` batches, passing over the loader as often as needed (a fresh Poisson draw each pass)."""
    done = 0
    while done < steps:
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return


def steps_for(*, local_epochs: int, local_steps: int, sample_rate: float) -> int:
    """Steps per round: ``local_steps`` when set, else ``local_epochs`` passes of 1/q batches each."""
    return local_steps if local_steps > 0 else local_epochs * round(1 / sample_rate)


def _loss(engine: PrivateTraining | PlainTraining, task: Task, batch: dict[str, torch.Tensor]) -> Any:
    """The batch's loss, or None for an empty batch (or one with nothing finite in it, where the engine drops what is
    not finite before the backward: :meth:`veil.privacy.dpsgd.PrivateTraining.drop_nonfinite`)."""
    if batch_size_of(batch) == 0:
        return None
    per_example = task.per_example_loss(engine.module, batch)  # (B,)
    keep = engine.drop_nonfinite(per_example)  # (B,) or None
    if keep is None:
        return engine.mean_loss(per_example)  # (B,) -> scalar, or the engine's own loss object
    log.warning("%d example(s) of a batch have a non-finite loss and are dropped from it", int((~keep).sum()))
    if not bool(keep.any()):
        return None
    return engine.mean_loss(task.per_example_loss(engine.module, {k: t[keep] for k, t in batch.items()}))
