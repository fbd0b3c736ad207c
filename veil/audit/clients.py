"""``veil audit`` at client level: whole canary *clients*, each a simulated Flower node, scored on the published model.

One of the two places of audit-only node behaviour (the other: :mod:`veil.audit.gradient`). Under
client-level DP (:mod:`veil.privacy.client_level`) the unit of privacy is a client's whole contribution, so a canary
must be a whole client. Each canary client is an ordinary simulated node of the federation (:class:`CanaryClient`: the veil ClientApp, the node's policy and ledger, the
client-level clip and noise share, the SecAgg+ guard and masking, sampled by the coordinator like any other node)
whose local training is replaced by a fixed update: ``S·u_i``, a random unit direction ``u_i`` of the trainable
tensors scaled to the clip norm S, when canary i is included, and a zero update when it is not.

Why random-direction canaries (Andrew et al., "One-shot Empirical Privacy Estimation for Federated Learning",
ICLR 2024, arXiv:2302.03098), not clients whose data are canary records: the client-level guarantee covers *any*
update a client sends (the clip bounds it), so a client that sends the worst-case update, a full-norm vector in a
direction nothing else uses, is inside the threat model and is the strongest canary there is; its score is one inner
product, with no training of m extra clients per round. Random directions in a space of P trainable values are
nearly orthogonal to each other and to the real clients' updates, so each canary's share of the final model stands
out exactly as far as the noise lets it: the audit measures the mechanism (clip, noise, aggregation, SecAgg+), not
how well a model memorises records. Record canaries would need each canary client to train (m more local trainings
per round) and give a far weaker attack.

Why "out" canaries are zero updates and not absent nodes: veil's coordinator divides the round's sum by the number
of contributors and knows who took part (docs/privacy.md, client level), so its guarantee is about a client's
contribution, the sum's sensitivity S with the set of participants public (the accountant books sum-noise / S with no
sampling amplification). An absent canary would change the number of nodes and the divisor with the draw, which no
run claims to hide; a canary that takes part and sends zero differs from an included one by exactly its update. So
all m canary clients exist, the population is the run's clients plus m, and only the update depends on the draw.
The draw (each canary included with probability 1/2, and its direction's seed) comes from OS entropy in the
launcher and reaches the canary nodes only, as a Python argument of the simulation (never the run config; the
ordinary nodes' code never reads it).

Score: ``s_i = ⟨w_R − w_0, u_i⟩``, the published model's change against the canary's direction. For FedAvg
w_R − w_0 = Σ_r Δ_r, so this is the sum over rounds of each round's aggregate against u_i (Andrew et al. use its
cosine, the same ranking): it reads only the published model and the starting point the coordinator builds from the
run's seed, so it runs the same with SecAgg+ on. An included canary adds ``server_lr · S / n_r`` along u_i in every
round it is sampled; DP noise of std z·S on the sum hides it as much as the accountant says. Guesses and the bound
are the record audit's (:mod:`veil.privacy.audit_bound`); the claimed ε is the coordinator's client-level accountant
(``summary.json``, basis ``client_level``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from veil.client.app import VeilClient
from veil.client.settings import NodeSettings
from veil.client.trainer import LocalPlan, LocalResult
from veil.conf.schema import VeilConfig
from veil.errors import ConfigError

log = logging.getLogger("veil.audit")

@dataclass(frozen=True)
class CanaryClients:
    """m canary clients, the simulated nodes ``first_partition .. first_partition + m − 1``."""

    first_partition: int
    seeds: tuple[int, ...]  # (m,) the seed of each canary's direction
    included: tuple[bool, ...]  # (m,) whether it sends its direction (True) or a zero update

    def __len__(self) -> int:
        return len(self.seeds)

    def client_fn(self, ordinary: Callable[[Any], Any], defaults: Mapping[str, Any], *, simulation_root: Path,
                  simulated_nodes: Mapping[int, Mapping[str, Any]]) -> Callable[[Any], Any]:
        """The simulation's ``client_fn``: ``ordinary`` for the data owners, :class:`CanaryClient` for the rest."""
        from veil.client.app import node_view

        base, per_node = dict(defaults), {int(k): dict(v) for k, v in simulated_nodes.items()}
        first, seeds, included = self.first_partition, self.seeds, self.included

        def client_fn(context: Any) -> Any:
            k = int(context.node_config.get("partition-id", -1)) - first
            if k < 0:
                return ordinary(context)
            cfg, settings = node_view(context, base, per_node, simulation_root=simulation_root)
            return CanaryClient(cfg, settings, context.run_id, seed=seeds[k], included=included[k]).to_client()

        return client_fn


def draw_canary_clients(*, count: int, first_partition: int, rng: np.random.Generator | None = None) -> CanaryClients:
    """``count`` canary clients, each included with probability 1/2, from OS entropy unless ``rng`` (tests) is given."""
    if count < 2:
        raise ConfigError(f"--canaries={count} is invalid: expected at least 2 canary clients")
    rng = rng or np.random.default_rng(secrets.randbits(128))
    seeds = rng.integers(0, 2**63 - 1, size=count, dtype=np.int64)
    return CanaryClients(first_partition=first_partition, seeds=tuple(int(s) for s in seeds),
                         included=tuple(bool(b) for b in rng.random(count) < 0.5))


def canary_direction(seed: int, size: int) -> np.ndarray:
    """The canary's unit direction u, (size,) float64: a standard normal draw from ``seed``, normalised."""
    u = np.random.default_rng(seed).standard_normal(size)
    return u / np.linalg.norm(u)


def canary_update(seed: int, shapes: Sequence[tuple[int, ...]], *, clip: float, included: bool) -> list[np.ndarray]:
    """What canary client ``seed`` sends before the release: S·u split into ``shapes``, or zeros when not included."""
    sizes = [int(np.prod(s)) for s in shapes]
    flat = clip * canary_direction(seed, sum(sizes)) if included else np.zeros(sum(sizes))
    return [a.reshape(s).astype(np.float32) for a, s in zip(np.split(flat, np.cumsum(sizes)[:-1]), shapes, strict=True)]


class CanaryClient(VeilClient):
    """A canary client: the ordinary node, whose data step is empty and whose training step is the canary update.

    Everything else is :meth:`VeilClient._fit`: the policy checks, the ledger booked before the round, the
    client-level clip and this node's noise share, the reply, and (outside the client) the SecAgg+ guard and mod.
    """

    def __init__(self, cfg: VeilConfig, settings: NodeSettings, run_id: int, *, seed: int, included: bool) -> None:
        super().__init__(cfg, settings, run_id)
        self.seed, self.included = seed, included

    def _shard(self) -> dict[str, Any]:
        import torch

        # No records. One placeholder row keeps the plan's arithmetic (δ, q, steps) defined; _train never reads it.
        return {"placeholder": torch.zeros(1)}

    def _train(self, template: Any, parameters: list[np.ndarray], shard: dict[str, Any], *, plan: LocalPlan,
               device: Any, seed: int) -> LocalResult:
        priv = self.cfg.privacy
        if priv.enabled and priv.level != "client":
            raise ConfigError("canary clients audit client-level DP only (privacy.level=client)")
        update = canary_update(self.seed, [np.shape(p) for p in parameters], clip=priv.max_grad_norm,
                               included=self.included)
        return LocalResult(update=update, loss=math.nan, steps=0, sample_rate=0.0, examples=0)


def direction_scores(initial: Sequence[np.ndarray], final: Sequence[np.ndarray],
                     directions: Iterable[np.ndarray]) -> np.ndarray:
    """``s_i = ⟨w_R − w_0, u_i⟩`` for every direction u_i (P,), (m,); ``initial`` w_0 and ``final`` w_R, same tensors."""
    change = np.concatenate([np.asarray(b, np.float64).ravel() - np.asarray(a, np.float64).ravel()
                             for a, b in zip(initial, final, strict=True)])  # (P,)
    return np.array([float(change @ np.asarray(u, np.float64)) for u in directions])


def published_scores(cfg: VeilConfig, labels: list[str], out_dir: Path, seeds: Sequence[int]) -> np.ndarray:
    """The scores on the finished run in ``out_dir``: w_0 built from the run's seed as the coordinator builds it,
    w_R the published global trainable tensors."""
    from veil.server.app import load_global
    from veil.task import get_task
    from veil.task.model import get_trainable, trainable_names

    model = get_task(cfg.task.name).build_model(cfg, labels, seed=cfg.federation.seed)
    final = load_global(out_dir / "global_trainable.npz", trainable_names(model))
    initial = get_trainable(model)
    size = sum(int(a.size) for a in initial)
    return direction_scores(initial, final, (canary_direction(s, size) for s in seeds))


def canary_run_config(cfg: VeilConfig, count: int) -> VeilConfig:
    """The audited run: the data owners plus ``count`` canary clients (the last nodes; the simulation learns which
    from ``AuditPlan(canary_clients=count)``, never from this config), sampled at the owners' rate.

    ``clients_per_round`` grows in proportion (all when it was all), so a canary is sampled as often as an owner
    and the noise shares (sized by the cohort) still add up to z·S; SecAgg+'s modulus is raised when the larger
    cohort's sum could wrap.
    """
    fed, sa = cfg.federation, cfg.secagg
    population = fed.num_clients + count
    per_round = population if fed.clients_per_round == fed.num_clients else max(
        1, round(fed.clients_per_round * population / fed.num_clients))
    if sa.enabled and sa.modulus_range < 4 * sa.quantization_range * per_round:
        modulus = 1 << math.ceil(math.log2(4 * sa.quantization_range * per_round))
        log.info("audit: secagg.modulus_range raised to %d for %d clients per round", modulus, per_round)
        sa = dataclasses.replace(sa, modulus_range=modulus)
    fed = dataclasses.replace(fed, num_clients=population, clients_per_round=per_round)
    return dataclasses.replace(cfg, federation=fed, secagg=sa).validate()


def claimed_client_epsilon(cfg: VeilConfig, out_dir: Path) -> float:
    """The coordinator's client-level ε for the run (``summary.json``, basis ``client_level``); ∞ without DP."""
    if not cfg.privacy.enabled:
        return math.inf
    summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
    if summary.get("epsilon_basis") != "client_level":
        raise ConfigError(f"{out_dir}/summary.json states epsilon on basis {summary.get('epsilon_basis')!r}, "
                          "not client_level")
    return float(summary["epsilon_max"])


def run_client_audit(cfg: Any, out_dir: Path, *, canaries: int, guesses: int, confidence: float,
                     client_mods: Sequence[Any] = (), rng: np.random.Generator | None = None) -> Any:
    """The client-level audit of :func:`veil.audit.cli.run_audit` (same arguments); returns its AuditResult."""
    from veil.audit.result import SCORES, AuditResult, write_outputs
    from veil.privacy.audit_bound import epsilon_lower_bound, guess_top_bottom
    from veil.audit.nodes import audited_client_app
    from veil.simulation import simulate
    from veil.task.shards import AuditPlan

    labels: list[str] = json.loads(cfg.data.labels)
    drawn = draw_canary_clients(count=canaries, first_partition=cfg.federation.num_clients, rng=rng)
    run_cfg = canary_run_config(cfg, canaries)
    log.info("audit: %d canary clients (%d send their direction) beside %d data owners, %d clients per round",
             canaries, sum(drawn.included), cfg.federation.num_clients, run_cfg.federation.clients_per_round)
    if drawn.first_partition != run_cfg.federation.num_clients - len(drawn):
        raise ValueError(f"canary clients start at node {drawn.first_partition} and number {len(drawn)}, not "
                         f"{run_cfg.federation.num_clients - len(drawn)} and {len(drawn)}")
    simulate(run_cfg, out_dir, client_app=audited_client_app(canaries=drawn, client_mods=client_mods),
             audit=AuditPlan(canary_clients=len(drawn)))
    scores = published_scores(run_cfg, labels, out_dir, drawn.seeds)
    included = np.array(drawn.included)
    result = guess_top_bottom(scores, included, k_in=guesses, k_out=guesses)
    priv = cfg.privacy
    audit = AuditResult(
        claimed_epsilon=claimed_client_epsilon(cfg, out_dir), delta=priv.delta,
        lower_bound=epsilon_lower_bound(m=result.m, r=result.r, v=result.v, delta=priv.delta, beta=1 - confidence),
        confidence=confidence, canaries=canaries, included=int(included.sum()), guesses=result.r, correct=result.v,
        score=SCORES["direction"], privacy=f"client-level DP, {priv.noise_placement} noise" if priv.enabled else "DP off",
        unit="client",
    )
    rows = [{"seed": s, "included": inc, "score": float(v)} for s, inc, v in zip(drawn.seeds, drawn.included, scores,
                                                                               strict=True)]
    write_outputs(out_dir, audit, rows)
    return audit
