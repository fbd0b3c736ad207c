"""The veil ClientApp: one data owner's node, which protects its owner against the coordinator.

Flower legacy API on purpose (DESIGN.md decision 2): SecAgg+ works only with a ``NumPyClient`` behind
``secaggplus_mod``. The same app object serves simulation and deployment; in simulation the launcher passes the
composed run config as defaults, in deployment it arrives in ``context.run_config``.

This module wires; the work lives in named parts. The coordinator writes the run config and the weights, so both are
checked, never trusted (DESIGN.md decisions 7 and 12). Whether a node refuses or trains, and every reply field but
the DP release, is decided from the run config and the owner's flags only (review 2026-12-07, N1). One round
(:meth:`VeilClient._fit`), in this order:

1. the run against the owner's policy (:mod:`veil.client.floor`) and the run's stop mark — nothing read from the data;
2. the owner's model (``--model``, never a run-config path) and the received weights, checked
   (:mod:`veil.client.release`: finite, the model's shapes, in range);
3. the round's sampling (:mod:`veil.client.round_plan`): q, steps, δ and the fixed expected batch from the run
   config, the owner's flags and the file's size at start;
4. the plan (:mod:`veil.client.budget`): σ calibrated, fitted to the ledger and clamped to the owner's floor; the
   owner's DP engine (``--dp-engine``, never the run's);
5. the round **booked in the ledger before training**;
6. the owner's shard (examples whose label is not in the run's label set are skipped, counted in the log only) and
   DP-SGD (OS-seeded Poisson sampling and noise, non-finite per-sample gradients dropped), or the client-level
   release (NaN-safe clip plus this node's noise share). No usable example, a non-finite update or a failure while
   training: noise alone of the declared std (:mod:`veil.privacy.release`), never zeros, the reply unchanged;
7. the update made sendable (scaled into the SecAgg+ range if needed, logged; in the layout it arrived in);
8. whether one more round fits the owner's budget: a reply with ``can_train_next=False`` is kept in the owner's
   ledger, and the node refuses the rest of that run on its own, across restarts (review N10);
9. the reply: the update with weight 1 and :data:`veil.wire.REPLY_KEYS`, held until the owner's ``--reply-after``
   (:mod:`veil.client.reply_time`), refusals too.

Every refusal (policy, budget, bad weights) is the same reply: zero update, weight 0, the same keys. Training loss,
example count, sampling rate and ε stay in the node's log and ledger.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.client import Client, NumPyClient
from flwr.clientapp import ClientApp
from flwr.common import Context

from veil.client.budget import RoundBudget, book, check_not_stopped, close_round, keep_stopped, plan_round
from veil.client.floor import check_delta, check_run
from veil.client.release import finish_release, is_client_level, received_weights, sendable, upload_bytes, zeros_like
from veil.client.reply_time import ReplyTimer
from veil.client.round_plan import (Sampling, calibrated_sigma, cohort_counted_on, owner_sampling, shard_sampling,
                                    start_rows)
from veil.client.secagg_guard import SecAggPolicy, make_secagg_guard, secagg_policy
from veil.client.settings import NodeSettings, node_settings
from veil.client.trainer import LocalPlan, LocalResult, train_round
from veil.conf.runconfig import from_run_config, to_run_config
from veil.conf.schema import ModelConfig, VeilConfig
from veil.errors import LedgerWriteError, NodeRefusal, VeilError
from veil.flower.names import Mod
from veil.security.roster import load_roster, load_signing_key
from veil.task import get_task
from veil.task.base import batch_size_of
from veil.task.model import get_trainable, resolve_device
from veil.task.shards import NoUsableExamples, client_shard, node_labels, run_labels
from veil.wire import REPLY_KEYS as REPLY_KEYS  # the reply contract, shared with the coordinator
from veil.wire import reply_metrics

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger("veil.client")

Reply = tuple[list[np.ndarray], int, dict[str, Any]]  # Flower's fit reply: the update, its weight, the metrics


@functools.lru_cache(maxsize=2)
def _template(flat_json: str) -> nn.Module:
    cfg = from_run_config(json.loads(flat_json))
    return get_task(cfg.task.name).build_model(cfg, run_labels(cfg), seed=cfg.federation.seed)


@functools.lru_cache(maxsize=2)
def _check_owner_model(flat_json: str) -> None:
    """The model pre-flight (:func:`veil.task.model_check.check_model_files`) on a deployed node's own ``--model``
    for the run's task, once per run config: a model the node cannot train is a ModelError, one line naming the
    problem and the fix, and the round a plain refusal (decided from the model directory and the run config: no data
    is read). A simulation's coordinator runs the same check on its model before any round."""
    from veil.task.model_check import check_model_files

    check_model_files(from_run_config(json.loads(flat_json)))


_calibrated_sigma = calibrated_sigma  # the name tests and older callers use


def owner_model(cfg: VeilConfig, settings: NodeSettings) -> ModelConfig:
    """The model this node loads: a deployed node's own ``--model`` directory (never a run-config path); the run's
    ``model.tiny`` only on a node whose owner passed ``--allow-test-model`` (:func:`veil.client.floor.check_run`
    refuses it otherwise, review N8)."""
    if settings.simulated or (cfg.model.tiny and settings.allow_test_model):
        return cfg.model
    return dataclasses.replace(cfg.model, path=settings.model_path or "")


class VeilClient(NumPyClient):
    """Trains on one node's data; returns only the DP release and data-independent fields (:data:`REPLY_KEYS`)."""

    def __init__(self, cfg: VeilConfig, settings: NodeSettings, run_id: int, *,
                 timer: ReplyTimer | None = None) -> None:
        self.cfg, self.settings, self.run_id = cfg, settings, run_id
        self.timer = timer or ReplyTimer()

    def fit(self, parameters: list[np.ndarray], config: Mapping[str, Any]) -> Reply:
        """Answer one training instruction; the reply leaves at the owner's ``--reply-after`` (review N6), whatever
        the round did: trained, noise only or refused."""
        started = self.timer.start()
        server_round = int(config.get("server_round", 0))
        reply = self._answer(parameters, server_round)
        self.timer.hold(started, hold=self.settings.reply_after, server_round=server_round)  # (9)
        return reply

    def _answer(self, parameters: list[np.ndarray], server_round: int) -> Reply:
        try:
            return self._fit(parameters, server_round)
        except NodeRefusal as refusal:
            return self._refuse(parameters, refusal, server_round)
        except LedgerWriteError as err:  # a full disk or read-only path: nothing booked, nothing trained; retry later
            return self._refuse(parameters, err, server_round, can_train_next=True)
        except VeilError as err:  # the owner's data file or settings: the owner's log says which, the reply not
            log.error("round %d: this node cannot train: %s", server_round, err)
            return self._refuse(parameters, err, server_round)
        except Exception as err:  # noqa: BLE001 - any other failure may depend on the data: no oracle
            if self.settings.simulated:
                raise  # a researcher's own federation: the cause belongs on the console
            log.exception("round %d: training failed on this node (the reply is a plain refusal)", server_round)
            return self._refuse(parameters, VeilError(f"{type(err).__name__}: {err}"), server_round)

    def _fit(self, parameters: list[np.ndarray], server_round: int) -> Reply:
        cfg, settings, run_id = self.cfg, self.settings, str(self.run_id)
        self._admit(run_id)  # (1) the run against the owner's policy: no data read yet
        template = self._owner_template()  # (2)
        parameters, flat = received_weights(parameters, get_trainable(template))
        shard, sampling = self._sampling()  # (3)
        budget = plan_round(cfg, settings, sampling, run_id=run_id, server_round=server_round,  # (4)
                            template=template)
        book(budget)  # (5) booked BEFORE training: whatever happens next, this release is counted
        update, noise_std, examples = self._release(template, parameters, shard, budget.plan, server_round)  # (6)
        update = sendable(update, cfg, flat=flat)  # (7)
        can_train_next, epsilon = close_round(budget, cfg, settings)  # (8)
        if not can_train_next:
            keep_stopped(settings, run_id, server_round)
        _log_round(server_round, examples, budget, epsilon)
        # Weight 1 for every client: SecAgg+ scales each vector by weight/max_weight (max_weight=1 keeps full
        # quantisation precision) and a size weight would tell the server each owner's data size.
        return update, 1, self._reply(update, can_train_next=can_train_next, refused=False, noise_std=noise_std)

    def _admit(self, run_id: str) -> None:
        """Step (1): refuse what the owner's policy refuses, from the run config and the owner's flags only."""
        cfg, settings = self.cfg, self.settings
        check_run(settings, cfg)
        node_labels(cfg, settings)  # a deployed node takes the label set from the run config only
        if cfg.privacy.enabled:
            check_delta(settings, run_delta=cfg.privacy.delta, owner_delta=settings.delta_limit)
        check_not_stopped(settings, run_id)

    def _owner_template(self) -> nn.Module:
        """Step (2): the model this node trains, built once per run config from the owner's own model."""
        own = dataclasses.replace(self.cfg, model=owner_model(self.cfg, self.settings))
        key = json.dumps(to_run_config(own), sort_keys=True)
        if not self.settings.simulated:  # the owner's --model against the run's task, before the model is built
            _check_owner_model(key)
        return _template(key)

    def _sampling(self) -> tuple[dict[str, Any] | None, Sampling]:
        """Step (3): a deployed node's sampling from the run config, the owner's flags and the file's size at start;
        a simulated node's from its partition (read here, and returned for training)."""
        if not self.settings.simulated:
            return None, owner_sampling(self.cfg, self.settings, rows=start_rows(self.settings))
        shard = self._shard()  # the researcher's own partition: the run's rules (round_plan.py)
        return shard, shard_sampling(self.cfg, self.settings, examples=batch_size_of(shard))

    def _release(self, template: nn.Module, parameters: list[np.ndarray], shard: dict[str, Any] | None,
                 plan: LocalPlan, server_round: int) -> tuple[list[np.ndarray], float, int]:
        """Step (6): the DP release — trained on the shard, or noise alone where the round has nothing usable (no
        example with a label of the run's set; a non-finite update; a failure while training on a deployed node).
        Returns the release, the noise share's std (client level) and the example count (for the owner's log)."""
        cfg, settings = self.cfg, self.settings
        update: list[np.ndarray] | None = None
        examples = 0
        try:
            shard = self._shard() if shard is None else shard
            examples = batch_size_of(shard)
            seed = cfg.federation.seed * 100_003 + server_round * 1_009 + (settings.partition_id or 0)  # dropout
            device = resolve_device(settings.device or cfg.device)
            update = self._train(template, parameters, shard, plan=plan, device=device, seed=seed).update
        except NoUsableExamples as err:
            log.warning("round %d: %s; this round releases noise only", server_round, err)
        except Exception:  # noqa: BLE001 - a failure may depend on the data: the reply must not
            if settings.simulated or not (plan.private or is_client_level(cfg)):
                raise
            log.exception("round %d: training failed on this node; this round releases noise only", server_round)
        released, noise_std = finish_release(update, parameters, plan=plan, cfg=cfg, settings=settings,
                                             server_round=server_round)
        return released, noise_std, examples

    def _shard(self) -> dict[str, Any]:
        """This node's tokenized examples, or with ``model.tuning=head`` their sentence features, computed with the
        owner's own model."""
        own = dataclasses.replace(self.cfg, model=owner_model(self.cfg, self.settings))
        return client_shard(own, self.settings)

    def _train(self, template: nn.Module, parameters: list[np.ndarray], shard: dict[str, Any], *, plan: LocalPlan,
               device: Any, seed: int) -> LocalResult:
        """The round's local training (step 6); the release and the reply follow in :meth:`_fit`. The audit's
        canary clients (:mod:`veil.audit.clients`, simulation only) replace this step and :meth:`_shard`."""
        return train_round(template, parameters, shard, plan=plan, device=device, seed=seed,
                           task=get_task(self.cfg.task.name))

    def _reply(self, update: list[np.ndarray], *, can_train_next: bool, refused: bool,
               noise_std: float) -> dict[str, Any]:
        return reply_metrics(can_train_next=can_train_next, refused=refused, noise_std=noise_std,
                             upload_bytes=upload_bytes(update, self.cfg))

    def _refuse(self, parameters: list[np.ndarray], refusal: VeilError, server_round: int, *,
                can_train_next: bool = False) -> Reply:
        """Decline the round without leaving it: a zero update with weight 0 keeps SecAgg+'s thresholds intact
        and adds nothing to the mean; ``can_train_next=False`` tells the server not to sample this node again.
        The reply is the same whatever the reason but for ``can_train_next``, which stays true only when the ledger
        could not be written (the budget allows the round; the disk did not: a fact of the machine, not of the data
        or the policy); the reason goes to the owner's log only."""
        log.warning("round %d: refusing to train: %s", server_round, refusal)
        if not can_train_next:
            keep_stopped(self.settings, str(self.run_id), server_round)
        zeros = zeros_like(parameters)
        return zeros, 0, self._reply(zeros, can_train_next=can_train_next, refused=True, noise_std=0.0)


def _log_round(server_round: int, examples: int, budget: RoundBudget, epsilon: float) -> None:
    plan, sampling = budget.plan, budget.sampling
    log.info("round %d: trained on %d examples, %d steps, sigma %.4f, q %.5f, ledger epsilon %.3f (delta %g)",
             server_round, examples, plan.steps, plan.noise_multiplier, sampling.sample_rate, epsilon, sampling.delta)


def make_client_fn(defaults: Mapping[str, Any] | None = None, *, simulation_root: Path | None = None,
                   simulated_nodes: Mapping[int, Mapping[str, Any]] | None = None) -> Callable[[Context], Client]:
    """The ClientApp's ``client_fn``.

    ``defaults`` is the flattened run config a simulation launcher provides; ``simulated_nodes`` adds node-config
    entries per partition id (int keys), standing in for each simulated owner's own node config; it is read per
    message, never copied per node (a population of 10,000 shares one ``veil.simulation.SimulatedNodes``).
    """
    base = dict(defaults or {})
    per_node = simulated_nodes if simulated_nodes is not None else {}  # kept as given: it may be a compact mapping

    def client_fn(context: Context) -> Client:
        cfg, settings = node_view(context, base, per_node, simulation_root=simulation_root)
        return VeilClient(cfg, settings, context.run_id).to_client()

    return client_fn


def node_view(context: Context, base: Mapping[str, Any], per_node: Mapping[int, Mapping[str, Any]], *,
              simulation_root: Path | None) -> tuple[VeilConfig, NodeSettings]:
    """The run config as this node reads it, and this node's owner settings (node config, plus a simulated
    owner's entries by partition id)."""
    cfg = from_run_config({**base, **dict(context.run_config)})
    node_config = dict(context.node_config)
    node_config.update(per_node.get(int(node_config.get("partition-id", -1)), {}))
    return cfg, node_settings(node_config, simulation_root=simulation_root)


def make_secagg_mod(defaults: Mapping[str, Any] | None = None, *, simulation_root: Path | None = None,
                    simulated_nodes: Mapping[int, Mapping[str, Any]] | None = None) -> Mod:
    """The node's SecAgg+ guard (:mod:`veil.client.secagg_guard`) with the policy of this node's owner and the
    run's ``secagg.*`` settings, read from each message's context."""
    base = dict(defaults or {})
    per_node = simulated_nodes if simulated_nodes is not None else {}  # kept as given: it may be a compact mapping

    def policy_for(context: Context) -> SecAggPolicy:
        cfg, settings = node_view(context, base, per_node, simulation_root=simulation_root)
        return secagg_policy(cfg, require_secagg=settings.require_secagg, max_dropouts=settings.max_dropouts,
                             roster=load_roster(settings.roster_path) if settings.roster_path else None,
                             signing_key=load_signing_key(settings.signing_key_path) if settings.signing_key_path
                             else None, min_cohort=cohort_counted_on(cfg, settings))

    return make_secagg_guard(policy_for)


def make_client_app(defaults: Mapping[str, Any] | None = None, *, simulation_root: Path | None = None,
                    simulated_nodes: Mapping[int, Mapping[str, Any]] | None = None) -> ClientApp:
    """The veil ClientApp (see :func:`make_client_fn`), with SecAgg+ for the rounds that use it."""
    client_fn = make_client_fn(defaults, simulation_root=simulation_root, simulated_nodes=simulated_nodes)
    guard = make_secagg_mod(defaults, simulation_root=simulation_root, simulated_nodes=simulated_nodes)
    return ClientApp(client_fn=client_fn, mods=[guard])


app = make_client_app()

