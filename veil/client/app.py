"""The veil ClientApp: one data owner's node.

Flower legacy API on purpose (DESIGN.md decision 2): SecAgg+ works only with a ``NumPyClient`` behind
``secaggplus_mod``. The same app object serves simulation and deployment; in simulation the launcher passes the
composed run config as defaults, in deployment it arrives in ``context.run_config``.

One round on the node: read the owner's settings (node config), load the shard and the model (cached per process),
check the owner's ε budget for this round *before* training, train under DP-SGD, record the release in the on-disk
ledger, and return the update (trained - received) of the trainable tensors, weighted 1 (see ``fit``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Context, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.clientapp.typing import ClientAppCallable

from veil.client.floor import check_round, check_run
from veil.client.settings import NodeSettings, node_settings
from veil.client.trainer import LocalPlan, sample_rate_for, steps_for, train_round
from veil.conf.runconfig import from_run_config, to_run_config
from veil.conf.schema import VeilConfig
from veil.errors import NodeRefusal, SecAggRangeError, VeilError
from veil.task import get_task
from veil.task.base import batch_size_of
from veil.task.model import resolve_device
from veil.task.shards import client_shard, run_labels

if TYPE_CHECKING:
    from veil.privacy.ledger import LedgerEvent, PrivacyLedger

log = logging.getLogger("veil.client")


@functools.lru_cache(maxsize=2)
def _template(flat_json: str) -> Any:
    cfg = from_run_config(json.loads(flat_json))
    return get_task(cfg.task.name).build_model(cfg, run_labels(cfg), seed=cfg.federation.seed)


@functools.lru_cache(maxsize=16)
def _calibrated_sigma(*, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """σ for this run: ε after all the run's planned steps on this node ≤ target (one value for the whole run)."""
    from veil.privacy.calibration import calibrate_noise_multiplier

    sigma = calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate,
                                       steps=steps, accountant=accountant)
    log.info("calibrated noise multiplier %.4f for epsilon <= %.3g over %d steps at q=%.4f",
             sigma, target_epsilon, steps, sample_rate)
    return sigma


class VeilClient(NumPyClient):
    """Trains on one node's data; never returns raw data, gradients or paths, only the update and aggregates."""

    def __init__(self, cfg: VeilConfig, settings: NodeSettings, run_id: int) -> None:
        self.cfg, self.settings, self.run_id = cfg, settings, run_id

    def fit(self, parameters: list[np.ndarray], config: Mapping[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        cfg, settings = self.cfg, self.settings
        server_round = int(config.get("server_round", 0))
        task = get_task(cfg.task.name)
        shard = client_shard(cfg, settings)
        examples = batch_size_of(shard)
        template = _template(json.dumps(to_run_config(cfg), sort_keys=True))
        try:
            plan, event, ledger = self._plan(examples, server_round)
        except NodeRefusal as refusal:
            return self._refuse(parameters, refusal, server_round)
        seed = cfg.federation.seed * 100_003 + server_round * 1_009 + (settings.partition_id or 0)
        device = resolve_device(settings.device or cfg.device)
        result = train_round(template, parameters, shard, plan=plan, device=device, seed=seed, task=task)
        if cfg.privacy.enabled and cfg.privacy.level == "client":
            result = dataclasses.replace(result, update=_client_level_release(result.update, cfg, plan.noise_multiplier))
        _check_update(result.update, cfg)
        epsilon, can_train_next = 0.0, True
        if ledger is not None and event is not None:
            ledger.record(event)  # recorded before the update leaves the node
            epsilon = ledger.epsilon(delta=cfg.privacy.delta, accountant=cfg.privacy.accountant).epsilon
            following = dataclasses.replace(event, round=event.round + 1)
            can_train_next = ledger.epsilon_if(following, delta=cfg.privacy.delta,
                                               accountant=cfg.privacy.accountant).epsilon <= settings.max_epsilon
        upload = _upload_bytes(result.update, cfg)
        metrics = {
            "train_loss": result.loss, "num_examples": examples, "epsilon": epsilon, "steps": result.steps,
            "sample_rate": result.sample_rate, "noise_multiplier": plan.noise_multiplier,
            "upload_bytes": upload, "can_train_next": can_train_next, "refused": 0,
        }
        log.info("round %d: trained on %d examples, %d steps, loss %.4f, epsilon %.3f",
                 server_round, examples, result.steps, result.loss, epsilon)
        # Weight 1 for every client: SecAgg+ scales each vector by weight/max_weight (max_weight=1 keeps full
        # quantisation precision) and a size weight would tell the server each owner's data size.
        return result.update, 1, metrics

    def _refuse(self, parameters: list[np.ndarray], refusal: NodeRefusal,
                server_round: int) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Decline the round without leaving it: a zero update with weight 0 keeps SecAgg+'s thresholds intact
        and adds nothing to the mean; ``can_train_next=False`` tells the server not to sample this node again."""
        log.warning("round %d: refusing to train: %s", server_round, refusal)
        epsilon = 0.0
        if self.cfg.privacy.enabled and self.settings.ledger_path.exists():
            from veil.privacy.ledger import PrivacyLedger

            ledger = PrivacyLedger.open(self.settings.ledger_path)
            epsilon = ledger.epsilon(delta=self.cfg.privacy.delta, accountant=self.cfg.privacy.accountant).epsilon
        zeros = [np.zeros_like(p) for p in parameters]
        metrics = {"refused": 1, "can_train_next": False, "epsilon": epsilon, "num_examples": 0, "steps": 0,
                   "upload_bytes": _upload_bytes(zeros, self.cfg)}
        return zeros, 0, metrics

    def _plan(self, examples: int, server_round: int) -> tuple[LocalPlan, LedgerEvent | None, PrivacyLedger | None]:
        cfg, fed, priv = self.cfg, self.cfg.federation, self.cfg.privacy
        q = sample_rate_for(batch_size=fed.batch_size, examples=examples)
        steps = steps_for(local_epochs=fed.local_epochs, local_steps=fed.local_steps, sample_rate=q)
        if not priv.enabled:  # no DP: ε is unbounded, so an owner with any budget or floor refuses
            check_run(self.settings, cfg)
            plan = LocalPlan(steps=steps, batch_size=fed.batch_size, lr=fed.lr, private=False,
                             noise_multiplier=0.0, max_grad_norm=priv.max_grad_norm)
            return plan, None, None
        from veil.privacy.ledger import LedgerEvent, PrivacyLedger

        if priv.level == "client":
            return self._plan_client_level(steps, server_round)
        sigma = priv.noise_multiplier
        if priv.target_epsilon > 0:
            sigma = _calibrated_sigma(target_epsilon=priv.target_epsilon, delta=priv.delta, sample_rate=q,
                                      steps=steps * fed.rounds, accountant=priv.accountant)
        check_round(self.settings, noise_multiplier=sigma, sample_rate=q)  # the owner's floor (floor.py)
        ledger = PrivacyLedger.open(self.settings.ledger_path)
        event = LedgerEvent(run_id=str(self.run_id), round=server_round, noise_multiplier=sigma, sample_rate=q,
                            steps=steps, delta=priv.delta)
        ledger.check_budget(event, max_epsilon=self.settings.max_epsilon, delta=priv.delta, accountant=priv.accountant)
        plan = LocalPlan(steps=steps, batch_size=fed.batch_size, lr=fed.lr, private=True,
                         noise_multiplier=sigma, max_grad_norm=priv.max_grad_norm,
                         grad_sample_mode=priv.grad_sample_mode)
        return plan, event, ledger

    def _plan_client_level(self, steps: int, server_round: int) -> tuple[LocalPlan, LedgerEvent, PrivacyLedger]:
        """Client-level DP: plain local training; the release is the clipped (and, distributed, noised) update.
        The node's ledger counts one Gaussian release of multiplier z per round without client-sampling
        amplification (q = 1): the node cannot verify how the server samples."""
        from veil.privacy.client_level import run_noise_multiplier
        from veil.privacy.ledger import LedgerEvent, PrivacyLedger

        fed, priv = self.cfg.federation, self.cfg.privacy
        z = run_noise_multiplier(self.cfg)
        if z is None:
            raise ValueError("_plan_client_level is only for runs with privacy.level=client")
        check_round(self.settings, noise_multiplier=z, sample_rate=0.0)  # q caps are about examples: n/a here
        ledger = PrivacyLedger.open(self.settings.ledger_path)
        event = LedgerEvent(run_id=str(self.run_id), round=server_round, noise_multiplier=z, sample_rate=1.0,
                            steps=1, delta=priv.delta)
        ledger.check_budget(event, max_epsilon=self.settings.max_epsilon, delta=priv.delta, accountant=priv.accountant)
        plan = LocalPlan(steps=steps, batch_size=fed.batch_size, lr=fed.lr, private=False, noise_multiplier=z,
                         max_grad_norm=priv.max_grad_norm)
        return plan, event, ledger


def _upload_bytes(update: list[np.ndarray], cfg: VeilConfig) -> int:
    """Bytes of the update on the wire: SecAgg+ sends int64 masked values, plain aggregation float32."""
    return sum(int(a.size) for a in update) * (8 if cfg.secagg.enabled else 4)


def _client_level_release(update: list[np.ndarray], cfg: VeilConfig, z: float) -> list[np.ndarray]:
    """Clip the whole update to S; with distributed noise, add this client's share N(0, (z·S)²/m)."""
    from veil.privacy.client_level import add_gaussian_noise, clip_update, distributed_share_std

    clipped, _norm = clip_update(update, clip=cfg.privacy.max_grad_norm)
    if cfg.privacy.noise_placement != "distributed":
        return clipped
    share = distributed_share_std(noise_multiplier=z, clip=cfg.privacy.max_grad_norm,
                                  clients_per_round=cfg.federation.clients_per_round)
    return add_gaussian_noise(clipped, std=share)


def _check_update(update: list[np.ndarray], cfg: VeilConfig) -> None:
    """Never send a non-finite update, and never let SecAgg+ clip one silently."""
    if not all(np.isfinite(a).all() for a in update):
        raise VeilError("local training produced a non-finite update (NaN/Inf); lower federation.lr or check the data")
    if cfg.secagg.enabled:
        peak = max((float(np.abs(a).max()) for a in update if a.size), default=0.0)
        if peak > cfg.secagg.clipping_range:
            raise SecAggRangeError(
                f"an update value of {peak:.3g} lies outside secagg.clipping_range={cfg.secagg.clipping_range}; "
                "raise secagg.clipping_range or lower federation.lr"
            )


def quiet_worker() -> None:
    """Keep a node's console to veil's lines: Flower's per-stage SecAgg+ debug lines and library deprecation
    notices say nothing a data owner can act on."""
    logging.getLogger("flwr").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")


def secagg_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run Flower's ``secaggplus_mod`` for messages of a SecAgg+ round, pass the others straight through.

    ``secaggplus_mod`` fails (KeyError 'secaggplus_configs') on a plain fit message, and the app cannot know
    at construction whether the run it will serve uses SecAgg+ (that is in the run config). Also quiets the worker.
    """
    quiet_worker()
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def make_client_fn(defaults: Mapping[str, Any] | None = None, *, simulation_root: Path | None = None,
                   simulated_nodes: Mapping[int, Mapping[str, Any]] | None = None) -> Callable[[Context], Client]:
    """The ClientApp's ``client_fn``.

    ``defaults`` is the flattened run config a simulation launcher provides; ``simulated_nodes`` adds node-config
    entries per partition id, standing in for each simulated owner's own node config.
    """
    base = dict(defaults or {})
    per_node = {int(k): dict(v) for k, v in (simulated_nodes or {}).items()}

    def client_fn(context: Context) -> Client:
        cfg = from_run_config({**base, **dict(context.run_config)})
        node_config = dict(context.node_config)
        node_config.update(per_node.get(int(node_config.get("partition-id", -1)), {}))
        settings = node_settings(node_config, simulation_root=simulation_root)
        return VeilClient(cfg, settings, context.run_id).to_client()

    return client_fn


def make_client_app(defaults: Mapping[str, Any] | None = None, *, simulation_root: Path | None = None,
                    simulated_nodes: Mapping[int, Mapping[str, Any]] | None = None) -> ClientApp:
    """The veil ClientApp (see :func:`make_client_fn`), with SecAgg+ for the rounds that use it."""
    client_fn = make_client_fn(defaults, simulation_root=simulation_root, simulated_nodes=simulated_nodes)
    return ClientApp(client_fn=client_fn, mods=[secagg_when_asked])


app = make_client_app()

