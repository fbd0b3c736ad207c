"""The veil ClientApp: one data owner's node, which protects its owner against the coordinator.

Flower legacy API on purpose (DESIGN.md decision 2): SecAgg+ works only with a ``NumPyClient`` behind
``secaggplus_mod``. The same app object serves simulation and deployment; in simulation the launcher passes the
composed run config as defaults, in deployment it arrives in ``context.run_config``.

The coordinator writes the run config and the weights, so both are checked, never trusted (DESIGN.md decisions 7
and 12). Whether a node refuses or trains, and every reply field but the DP release, is decided from the run config
and the owner's flags only (review 2026-12-07, N1). One round on the node, in this order:

1. the run config against the owner's policy (:mod:`veil.client.floor`), the received weights (finite, the
   model's shapes, in range) — nothing read from the data;
2. the plan (:mod:`veil.client.round_plan`): q, steps, δ and the fixed expected batch from the run config, the
   owner's flags and the file's size at start; σ calibrated, fitted to the ledger and clamped to the owner's floor;
   the owner's DP engine (``--dp-engine``, never the run's); the round **booked in the ledger before training**;
3. the owner's shard (examples whose label is not in the run's label set are skipped, counted in the log only);
4. DP-SGD (OS-seeded Poisson sampling and noise, non-finite per-sample gradients dropped), or the client-level
   release (NaN-safe clip plus this node's noise share). No usable example, a non-finite update or a failure while
   training: noise alone of the declared std (:mod:`veil.privacy.release`), never zeros, the reply unchanged;
5. the reply: the update (scaled into the SecAgg+ range if needed, logged) with weight 1, and :data:`REPLY_KEYS`,
   held until the owner's ``--reply-after`` (:mod:`veil.client.reply_time`), refusals too.
   A reply with ``can_train_next=False`` is kept in the owner's ledger: the node refuses the rest of that run on its
   own, across restarts (review N10).

Every refusal (policy, budget, bad weights) is the same reply: zero update, weight 0, the same keys. Training loss,
example count, sampling rate and ε stay in the node's log and ledger.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.client import Client, NumPyClient
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common import Context

from veil.client.floor import check_delta, check_run
from veil.client.secagg_guard import SecAggPolicy, make_secagg_guard, secagg_policy
from veil.security.roster import load_roster, load_signing_key
from veil.client.secagg_guard import quiet_worker as quiet_worker  # moved; executor.py imports it from here
from veil.client.reply_time import ReplyTimer
from veil.client.settings import NodeSettings, node_settings
from veil.client.round_plan import (
    Sampling, calibrated_sigma, check_not_stopped, mark_stopped, owner_sampling, plain_plan, plan_client_level,
    plan_sample_level, shard_sampling, start_rows,
)
from veil.client.trainer import LocalPlan, LocalResult, train_round
from veil.conf.runconfig import from_run_config, to_run_config
from veil.conf.schema import ModelConfig, VeilConfig
from veil.errors import LedgerError, LedgerWriteError, NodeRefusal, VeilError
from veil.task import get_task
from veil.task.base import batch_size_of
from veil.task.model import get_trainable, resolve_device
from veil.privacy.modes import resolve_owner_engine
from veil.privacy.release import all_finite, noise_only_update
from veil.task.shards import NoUsableExamples, client_shard, node_labels, run_labels
from veil.wire import REPLY_KEYS as REPLY_KEYS  # the reply contract, shared with the coordinator
from veil.wire import flatten, is_flat, unflatten

if TYPE_CHECKING:
    from veil.privacy.ledger import LedgerEvent, PrivacyLedger

log = logging.getLogger("veil.client")

# Received weights beyond this magnitude are refused before any data is touched (LoRA adapters and heads are O(1)).
# Kept at 1e4, not lowered (review 2026-12-07, N2): the engines a node runs, hooks and bk, hold ||contribution|| <= C
# for adversarial weights at this very bound (tests/test_engine_bound.py); only ghost clipping broke it (from ~1e3
# up), and a node never runs ghost. A tighter bound would add no privacy and could refuse honest runs whose weights
# grow (a head at a large model.head_init_scale, many FedAdam rounds).
MAX_RECEIVED_ABS = 1e4


@functools.lru_cache(maxsize=2)
def _template(flat_json: str) -> Any:
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

    def fit(self, parameters: list[np.ndarray], config: Mapping[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Answer one training instruction; the reply leaves at the owner's ``--reply-after`` (review N6), whatever
        the round did: trained, noise only or refused."""
        started = self.timer.start()
        server_round = int(config.get("server_round", 0))
        reply = self._answer(parameters, server_round)
        self.timer.hold(started, hold=self.settings.reply_after, server_round=server_round)
        return reply

    def _answer(self, parameters: list[np.ndarray],
                server_round: int) -> tuple[list[np.ndarray], int, dict[str, Any]]:
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

    def _fit(self, parameters: list[np.ndarray], server_round: int) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        cfg, settings, run_id = self.cfg, self.settings, str(self.run_id)
        check_run(settings, cfg)  # (1) the run against the owner's policy: no data read yet
        node_labels(cfg, settings)  # a deployed node takes the label set from the run config only
        if cfg.privacy.enabled:
            check_delta(settings, run_delta=cfg.privacy.delta, owner_delta=settings.delta_limit)
        check_not_stopped(settings, run_id)
        own = dataclasses.replace(cfg, model=owner_model(cfg, settings))
        if not settings.simulated:  # the owner's --model against the run's task, before the model is built
            _check_owner_model(json.dumps(to_run_config(own), sort_keys=True))
        template = _template(json.dumps(to_run_config(own), sort_keys=True))
        expected = get_trainable(template)
        flat = is_flat(parameters, expected)  # the coordinator's one-vector layout (veil.wire); reply in kind
        if flat:
            try:
                parameters = unflatten(parameters[0], expected)
            except ValueError:
                raise NodeRefusal("the received weights do not match this node's model (size differs)") from None
        check_received(parameters, expected)
        shard: dict[str, Any] | None = None
        if settings.simulated:  # the researcher's own partition: the run's rules (round_plan.py)
            shard = self._shard()
            sampling = shard_sampling(cfg, settings, examples=batch_size_of(shard))
        else:  # (2) the plan from the run config, the owner's flags and the file's size at start only
            sampling = owner_sampling(cfg, settings, rows=start_rows(settings))
        plan, event, ledger = self._plan(sampling, server_round, template)  # (3)
        if ledger is not None and event is not None:
            ledger.record(event)  # booked BEFORE training: whatever happens next, this release is counted
        update, noise_std, examples = self._release(template, parameters, shard, plan, server_round)  # (4)
        update = postprocess_update(update, cfg)  # (5)
        if flat:
            update = [flatten(update)]
        can_train_next, epsilon, delta = True, 0.0, sampling.delta
        if ledger is not None and event is not None:
            epsilon = ledger.epsilon(delta=delta, accountant=cfg.privacy.accountant).epsilon
            following = dataclasses.replace(event, round=event.round + 1)
            can_train_next = ledger.epsilon_if(following, delta=delta,
                                               accountant=cfg.privacy.accountant).epsilon <= settings.max_epsilon
        if not can_train_next:
            _keep_stopped(settings, run_id, server_round)
        log.info("round %d: trained on %d examples, %d steps, sigma %.4f, q %.5f, ledger epsilon %.3f (delta %g)",
                 server_round, examples, plan.steps, plan.noise_multiplier, sampling.sample_rate, epsilon, delta)
        # Weight 1 for every client: SecAgg+ scales each vector by weight/max_weight (max_weight=1 keeps full
        # quantisation precision) and a size weight would tell the server each owner's data size.
        return update, 1, self._reply(update, can_train_next=can_train_next, refused=False, noise_std=noise_std)

    def _release(self, template: Any, parameters: list[np.ndarray], shard: dict[str, Any] | None, plan: LocalPlan,
                 server_round: int) -> tuple[list[np.ndarray], float, int]:
        """Step (4): the DP release — trained on the shard, or noise alone where the round has nothing usable (no
        example with a label of the run's set; a non-finite update; a failure while training on a deployed node).
        Returns the release, the noise share's std (client level) and the example count (for the owner's log)."""
        cfg, settings = self.cfg, self.settings
        client_level = cfg.privacy.enabled and cfg.privacy.level == "client"
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
            if settings.simulated or not (plan.private or client_level):
                raise
            log.exception("round %d: training failed on this node; this round releases noise only", server_round)
        if client_level:
            return (*_client_level_release(update, parameters, cfg, settings, plan.noise_multiplier), examples)
        if update is not None and not all_finite(update):
            log.warning("round %d: the update is not finite; this round releases noise only", server_round)
            update = None
        if update is None:
            if not plan.private:
                raise VeilError("this node has no usable example for the run")
            update = noise_only_update(parameters, steps=plan.steps, noise_multiplier=plan.noise_multiplier,
                                       max_grad_norm=plan.max_grad_norm, optimizer=plan.optimizer, lr=plan.lr,
                                       expected_batch_size=plan.expected_batch_size or max(1, plan.batch_size))
        return update, 0.0, examples

    def _shard(self) -> dict[str, Any]:
        """This node's tokenized examples, or with ``model.tuning=head`` their sentence features, computed with the
        owner's own model (step 2)."""
        own = dataclasses.replace(self.cfg, model=owner_model(self.cfg, self.settings))
        return client_shard(own, self.settings)

    def _train(self, template: Any, parameters: list[np.ndarray], shard: dict[str, Any], *, plan: LocalPlan,
               device: Any, seed: int) -> LocalResult:
        """The round's local training (step 4); the release and the reply follow in :meth:`_fit`. The audit's
        canary clients (:mod:`veil.audit.clients`, simulation only) replace this step and :meth:`_shard`."""
        return train_round(template, parameters, shard, plan=plan, device=device, seed=seed,
                           task=get_task(self.cfg.task.name))

    def _reply(self, update: list[np.ndarray], *, can_train_next: bool, refused: bool,
               noise_std: float) -> dict[str, Any]:
        return {"can_train_next": bool(can_train_next), "refused": int(refused),
                "upload_bytes": _upload_bytes(update, self.cfg), "noise_std": float(noise_std)}

    def _refuse(self, parameters: list[np.ndarray], refusal: VeilError, server_round: int, *,
                can_train_next: bool = False) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Decline the round without leaving it: a zero update with weight 0 keeps SecAgg+'s thresholds intact
        and adds nothing to the mean; ``can_train_next=False`` tells the server not to sample this node again.
        The reply is the same whatever the reason but for ``can_train_next``, which stays true only when the ledger
        could not be written (the budget allows the round; the disk did not: a fact of the machine, not of the data
        or the policy); the reason goes to the owner's log only."""
        log.warning("round %d: refusing to train: %s", server_round, refusal)
        if not can_train_next:
            _keep_stopped(self.settings, str(self.run_id), server_round)
        zeros = [np.zeros(np.shape(p), dtype=np.float32) for p in parameters]
        return zeros, 0, self._reply(zeros, can_train_next=can_train_next, refused=True, noise_std=0.0)

    def _plan(self, sampling: Sampling, server_round: int,
              template: Any) -> tuple[LocalPlan, LedgerEvent | None, PrivacyLedger | None]:
        cfg, settings, run_id = self.cfg, self.settings, str(self.run_id)
        if not cfg.privacy.enabled:  # allowed only on a node without any limit (check_run)
            return plain_plan(cfg, sampling.steps), None, None
        from veil.privacy.ledger import PrivacyLedger

        ledger = PrivacyLedger.open(settings.ledger_path)
        if cfg.privacy.level == "client":
            plan, event = plan_client_level(cfg, settings, steps=sampling.steps, delta=sampling.delta, ledger=ledger,
                                            run_id=run_id, server_round=server_round)
            return plan, event, ledger
        engine = (cfg.privacy.grad_sample_mode if settings.simulated
                  else resolve_owner_engine(settings.dp_engine, template))  # the owner's engine, never the run's
        plan, event = plan_sample_level(cfg, settings, sampling, ledger=ledger, run_id=run_id,
                                        server_round=server_round, engine=engine)
        return plan, event, ledger


def _keep_stopped(settings: NodeSettings, run_id: str, server_round: int) -> None:
    """Persist in the owner's ledger that this node said ``can_train_next=False`` in run ``run_id``: it refuses the
    rest of that run on its own, also after a restart (review N10). A ledger that cannot be written is logged; the
    reply is unchanged (it already says the node will not train again)."""
    try:
        mark_stopped(settings, run_id)
    except LedgerError as err:
        log.error("round %d: could not keep run %s's stop in the ledger (%s); a restarted node would forget it",
                  server_round, run_id, err)


def check_received(parameters: list[np.ndarray], expected: list[np.ndarray]) -> None:
    """Refuse weights that are not the model's trainable tensors, or not finite, or absurdly large — before any
    data is read, so that the check says nothing about the data.

    Raises
    ------
    NodeRefusal
        A count or shape mismatch, a non-finite value, or a value beyond :data:`MAX_RECEIVED_ABS`.
    """
    if len(parameters) != len(expected) or any(np.shape(a) != np.shape(b) for a, b in zip(parameters, expected)):
        raise NodeRefusal("the received weights do not match this node's model (count or shapes differ)")
    for a in parameters:
        arr = np.asarray(a)
        if arr.size and not (np.isfinite(arr).all() and float(np.abs(arr).max()) <= MAX_RECEIVED_ABS):
            raise NodeRefusal(f"the received weights hold a non-finite value or one beyond +-{MAX_RECEIVED_ABS:g}")


def _upload_bytes(update: list[np.ndarray], cfg: VeilConfig) -> int:
    """Bytes of the update on the wire: SecAgg+ sends int64 masked values, plain aggregation float32."""
    return sum(int(a.size) for a in update) * (8 if cfg.secagg.enabled else 4)


def _client_level_release(update: list[np.ndarray] | None, received: list[np.ndarray], cfg: VeilConfig,
                          settings: NodeSettings, z: float) -> tuple[list[np.ndarray], float]:
    """Clip the whole update to S (NaN-safe: a non-finite update, or none, counts as zeros); with distributed noise,
    add this node's share N(0, (z·S)²/min-cohort). Returns the release and the share's std (0 with central noise,
    which only an opted-in owner accepts). The share is always added: never an exact-zero release (review N3a)."""
    from veil.privacy.client_level import add_gaussian_noise, clip_update, distributed_share_std

    if update is None:
        update = [np.zeros(np.shape(p), dtype=np.float32) for p in received]
    clipped, norm = clip_update(update, clip=cfg.privacy.max_grad_norm)
    if not math.isfinite(norm):
        log.warning("the local update is not finite; this round releases the noise share alone")
    if cfg.privacy.noise_placement != "distributed":
        return clipped, 0.0
    share = distributed_share_std(noise_multiplier=z, clip=cfg.privacy.max_grad_norm,
                                  clients_per_round=settings.min_cohort)
    return add_gaussian_noise(clipped, std=share), share


def postprocess_update(update: list[np.ndarray], cfg: VeilConfig) -> list[np.ndarray]:
    """Make the DP release sendable — post-processing, so no privacy cost and nothing the server can tell apart:
    non-finite values become 0, and an update beyond SecAgg+'s clipping range is scaled into it (never clipped
    value by value). Both are logged on the node."""
    out = [np.asarray(a, dtype=np.float32) for a in update]
    bad = sum(int((~np.isfinite(a)).sum()) for a in out)
    if bad:
        log.warning("the update had %d non-finite value(s); they are sent as 0", bad)
        out = [np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0) for a in out]
    if cfg.secagg.enabled:
        peak = max((float(np.abs(a).max()) for a in out if a.size), default=0.0)
        limit = cfg.secagg.clipping_range
        if peak > limit:
            factor = np.float32(limit / peak * (1 - 1e-6))
            log.warning("an update value of %.3g lies outside secagg.clipping_range=%g; the update is scaled by %.3g "
                        "to fit (raise secagg.clipping_range or lower federation.lr)", peak, limit, factor)
            out = [a * factor for a in out]
    return out


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
                             else None)

    return make_secagg_guard(policy_for)


def make_client_app(defaults: Mapping[str, Any] | None = None, *, simulation_root: Path | None = None,
                    simulated_nodes: Mapping[int, Mapping[str, Any]] | None = None) -> ClientApp:
    """The veil ClientApp (see :func:`make_client_fn`), with SecAgg+ for the rounds that use it."""
    client_fn = make_client_fn(defaults, simulation_root=simulation_root, simulated_nodes=simulated_nodes)
    guard = make_secagg_mod(defaults, simulation_root=simulation_root, simulated_nodes=simulated_nodes)
    return ClientApp(client_fn=client_fn, mods=[guard])


app = make_client_app()

