"""``veil audit --score gradient-canary`` (the default at sample level): white-box *gradient canaries* injected into DP-SGD.

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023 (arXiv:2305.08846), §6,
white-box: a canary is not a record but a per-sample gradient chosen by the auditor. Here canary i is the Dirac
gradient ``C·e_{j_i}`` (C the clip norm, e_j a one-hot vector of the trainable values, the m coordinates j_i distinct
and drawn from OS entropy): its norm is C, so clipping keeps it whole, and it is orthogonal to every other canary.
Each canary is included with probability 1/2 (the "in" set), in one simulated node's data; an included canary is a
record of that node: every DP-SGD step draws it with the node's Poisson rate q, like its other records, and when drawn
its gradient joins the step's per-sample gradients (:class:`CanaryInjector`, through the seam
:class:`veil.client.trainer.GradientInjector`): as one more row of Opacus' ``grad_sample`` that Opacus clips, sums
and noises with the batch (hooks), or added to the clipped sum before Opacus' noise (ghost, book-keeping, whose sum
holds no per-sample rows). The node's ledger books the round as always: a canary is one more record under the same
(q, σ, T), so the claimed ε is the real one.

Score: ``s_i = Σ_r ⟨w_{r−1} − w_r, e_{j_i}⟩ = (w_0 − w_R)[j_i]``, the sum over rounds of the aggregate updates
against the canary's direction (the sum telescopes to the published model's change). SGD moves the weights against
the gradients it sums, so an included canary scores high: guessed "in" for the k highest scores, "out" for the k
lowest. With plain SGD and FedAvg an included canary adds ``lr·server_lr·C·(times drawn) / (B·n)`` to its coordinate,
the noise ``lr·server_lr·σC·sqrt(T·n) / (B·n)`` (n clients per round): the attack is as strong as DP allows when one
node holds the data (n = 1) and q is large; with n owners each canary is also hidden by the others' noise, which no
owner's ledger counts. What else moves a canary's coordinate (the records' own gradients) only adds noise to the
score: a coordinate of a word-embedding row that no record uses (most of them, with ``model.tuning=full``) moves by
the canary and the DP noise alone.

Written here, not taken from a library: Opacus computes and clips per-sample gradients of records; injecting a chosen
gradient in their place is the audit's own step (about 20 lines), and the score is one index into the model's change.
Only :class:`CanaryNode`, a simulated node built by ``veil audit`` from a Python argument of the simulation, passes
an injector to the trainer; it refuses to exist on a deployed node, and no config key reaches it.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from veil.client.app import VeilClient
from veil.client.settings import NodeSettings
from veil.client.trainer import LocalPlan, LocalResult, train_round
from veil.conf.schema import VeilConfig
from veil.errors import ConfigError
from veil.task import get_task

__all__ = ["CanaryInjector", "CanaryNode", "GradientCanaries", "coordinate_scores", "draw_gradient_canaries",
           "run_gradient_audit"]

log = logging.getLogger("veil.audit")


@dataclass(frozen=True)
class GradientCanaries:
    """m gradient canaries: canary i is ``clip·e_{coordinates[i]}`` in node ``partition[i]``'s data when included."""

    coordinates: tuple[int, ...]  # (m,) distinct flat indices into the trainable values (trainable_names order)
    included: tuple[bool, ...]  # (m,)
    partition: tuple[int, ...]  # (m,) the simulated node whose data holds the canary when included

    def __len__(self) -> int:
        return len(self.coordinates)

    def of_node(self, partition: int) -> tuple[int, ...]:
        """The coordinates of the canaries included in ``partition``'s data (the node sees nothing else)."""
        return tuple(j for j, inc, p in zip(self.coordinates, self.included, self.partition, strict=True)
                     if inc and p == partition)

    def client_fn(self, ordinary: Callable[[Any], Any], defaults: Mapping[str, Any], *, simulation_root: Path,
                  simulated_nodes: Mapping[int, Mapping[str, Any]]) -> Callable[[Any], Any]:
        """The simulation's ``client_fn``: every simulated node is a :class:`CanaryNode` with its own canaries."""
        from veil.client.app import node_view

        base, per_node = dict(defaults), {int(k): dict(v) for k, v in simulated_nodes.items()}

        def client_fn(context: Any) -> Any:
            cfg, settings = node_view(context, base, per_node, simulation_root=simulation_root)
            mine = self.of_node(int(context.node_config.get("partition-id", -1)))
            return CanaryNode(cfg, settings, context.run_id,
                              inject=CanaryInjector(mine, clip=cfg.privacy.max_grad_norm)).to_client()

        return client_fn


def draw_gradient_canaries(*, count: int, size: int, num_clients: int,
                           rng: np.random.Generator | None = None) -> GradientCanaries:
    """``count`` distinct coordinates of ``size`` trainable values, each canary included with probability 1/2 in a
    random node, from OS entropy unless ``rng`` (tests, and the two arms of one audit) is given."""
    if count < 2:
        raise ConfigError(f"--canaries={count} is invalid: expected at least 2 (the paper uses about 1,000)")
    if count > size:
        raise ConfigError(f"--canaries={count} is more than the model's {size} trainable values: give at most {size} "
                          "gradient canaries, or train more of the model (model.tuning=full)")
    rng = rng or np.random.default_rng(secrets.randbits(128))
    coordinates = rng.choice(size, size=count, replace=False)
    return GradientCanaries(coordinates=tuple(int(j) for j in coordinates),
                            included=tuple(bool(b) for b in rng.random(count) < 0.5),
                            partition=tuple(int(p) for p in rng.integers(0, num_clients, size=count)))


class CanaryInjector:
    """One node's included canaries, drawn at each step with the step's rate (OS-seeded generator) and added as
    per-sample gradients ``clip·e_j`` (see :class:`veil.client.trainer.GradientInjector` for ``mode``)."""

    def __init__(self, coordinates: Sequence[int], *, clip: float, generator: torch.Generator | None = None) -> None:
        if not clip > 0:
            raise ValueError(f"clip={clip} must be > 0")
        self.coordinates = torch.as_tensor(list(coordinates), dtype=torch.long)  # (k,)
        self.clip = float(clip)
        self.generator = generator
        self.drawn = 0  # canary gradients injected so far (for tests and the node's log)

    def __call__(self, params: list[nn.Parameter], *, mode: str, sample_rate: float, batch: int) -> None:
        if self.generator is None:
            from veil.privacy.dpsgd import os_generator

            self.generator = os_generator("cpu")
        k = int(self.coordinates.numel())
        drawn = self.coordinates[torch.rand(k, generator=self.generator) < sample_rate] if k else self.coordinates
        self.drawn += int(drawn.numel())
        if mode == "rows":
            _append_rows(params, drawn, self.clip)
        elif mode in ("sum", "mean"):
            _add_to_grad(params, drawn, self.clip / (max(1, batch) if mode == "mean" else 1))
        else:
            raise ValueError(f"mode={mode!r} must be rows, sum or mean")


def _locate(params: list[nn.Parameter], coordinates: torch.Tensor) -> list[tuple[int, int]]:
    """(parameter index, flat offset in it) of each flat coordinate of the concatenated trainable values."""
    ends = np.cumsum([p.numel() for p in params])  # (n_params,)
    where = np.searchsorted(ends, coordinates.numpy(), side="right")
    if coordinates.numel() and int(coordinates.max()) >= int(ends[-1]):
        raise ValueError(f"canary coordinate {int(coordinates.max())} is beyond the {int(ends[-1])} trainable values")
    return [(int(i), int(j - (ends[i - 1] if i else 0))) for i, j in zip(where, coordinates.tolist(), strict=True)]


def _append_rows(params: list[nn.Parameter], drawn: torch.Tensor, clip: float) -> None:
    """One ``grad_sample`` row per drawn canary, (B + k, *shape): zero but ``clip`` at its coordinate."""
    k = int(drawn.numel())
    if k == 0:
        return
    rows = [torch.zeros((k, p.numel()), dtype=p.dtype, device=p.device) for p in params]  # (k, numel) each
    for row, (i, offset) in enumerate(_locate(params, drawn)):
        rows[i][row, offset] = clip
    for p, extra in zip(params, rows, strict=True):
        p.grad_sample = torch.cat([p.grad_sample, extra.view(k, *p.shape)])  # type: ignore[attr-defined]


def _add_to_grad(params: list[nn.Parameter], drawn: torch.Tensor, value: float) -> None:
    with torch.no_grad():
        for i, offset in _locate(params, drawn):
            p = params[i]
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.view(-1)[offset] += value


class CanaryNode(VeilClient):
    """A simulated data owner whose DP-SGD steps also draw its gradient canaries; everything else is
    :class:`VeilClient`'s (policy, ledger booked before the round, release, SecAgg+ guard and mask)."""

    def __init__(self, cfg: VeilConfig, settings: NodeSettings, run_id: int, *, inject: CanaryInjector) -> None:
        if not settings.simulated:
            raise ConfigError("gradient canaries exist only in veil audit's simulated nodes; a deployed node never "
                              "injects them")
        super().__init__(cfg, settings, run_id)
        self.inject = inject

    def _train(self, template: Any, parameters: list[np.ndarray], shard: dict[str, Any], *, plan: LocalPlan,
               device: Any, seed: int) -> LocalResult:
        return train_round(template, parameters, shard, plan=plan, device=device, seed=seed,
                           task=get_task(self.cfg.task.name), inject=self.inject)


def coordinate_scores(initial: Sequence[np.ndarray], final: Sequence[np.ndarray],
                      coordinates: Sequence[int]) -> np.ndarray:
    """``s_i = (w_0 − w_R)[j_i]``, (m,): the sum over rounds of the aggregate updates against ``e_{j_i}``."""
    descent = np.concatenate([np.asarray(a, np.float64).ravel() - np.asarray(b, np.float64).ravel()
                              for a, b in zip(initial, final, strict=True)])  # (P,)
    return descent[np.asarray(coordinates, dtype=np.int64)]


def run_gradient_audit(cfg: Any, out_dir: Path, *, canaries: int, guesses: int, confidence: float,
                       client_mods: Sequence[Any] = (), rng: np.random.Generator | None = None) -> Any:
    """The gradient-canary audit of :func:`veil.audit.cli.run_audit` (same arguments); returns its AuditResult."""
    from veil.audit.result import SCORES, AuditResult, claimed_epsilon, write_outputs
    from veil.privacy.audit_bound import epsilon_lower_bound, guess_top_bottom
    from veil.server.app import load_global
    from veil.audit.nodes import audited_client_app
    from veil.simulation import simulate
    from veil.task.model import get_trainable, trainable_names

    labels: list[str] = json.loads(cfg.data.labels)
    model = get_task(cfg.task.name).build_model(cfg, labels, seed=cfg.federation.seed)  # w_0, as the coordinator
    initial = get_trainable(model)
    drawn = draw_gradient_canaries(count=canaries, size=sum(int(a.size) for a in initial),
                                   num_clients=cfg.federation.num_clients, rng=rng)
    log.info("audit: %d gradient canaries (%d included) in %d clients' DP-SGD steps", canaries, sum(drawn.included),
             cfg.federation.num_clients)
    simulate(cfg, out_dir, client_app=audited_client_app(canaries=drawn, client_mods=client_mods))
    final = load_global(out_dir / "global_trainable.npz", trainable_names(model))
    scores = coordinate_scores(initial, final, drawn.coordinates)
    included = np.array(drawn.included)
    result = guess_top_bottom(scores, included, k_in=guesses, k_out=guesses)
    audit = AuditResult(
        claimed_epsilon=claimed_epsilon(cfg, out_dir), delta=cfg.privacy.delta,
        lower_bound=epsilon_lower_bound(m=result.m, r=result.r, v=result.v, delta=cfg.privacy.delta,
                                        beta=1 - confidence),
        confidence=confidence, canaries=canaries, included=int(included.sum()), guesses=result.r, correct=result.v,
        score=SCORES["gradient-canary"], privacy="sample-level DP-SGD" if cfg.privacy.enabled else "DP off", unit="gradient",
    )
    write_outputs(out_dir, audit, [{"coordinate": j, "partition": p, "included": inc, "score": float(s)}
                                   for j, p, inc, s in zip(drawn.coordinates, drawn.partition, drawn.included, scores,
                                                           strict=True)])
    return audit
