"""The veil ServerApp: the coordinator's side of a run.

Flower legacy API on purpose (DESIGN.md decision 2): ``SecAggPlusWorkflow`` needs a ``LegacyContext`` and a
``flwr.server.strategy`` strategy. The same app serves simulation and deployment: the configuration comes from
``context.run_config`` (a simulation launcher passes it as defaults).

Per run: build the model template and the evaluation split, keep the global trainable tensors in the strategy,
run the rounds (SecAgg+ fit workflow when on), write one ``metrics.jsonl`` line and one console line per round,
then export the merged model with its model card. The records hold no per-client value (nodes send none); the ε
they state is the coordinator's own figure (:mod:`veil.server.guarantee`). Under ``veil server`` the app runs only
the operator's run config (:mod:`veil.server.operator`).
"""

from __future__ import annotations

import json
import logging
import random
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import Context
from flwr.server import LegacyContext, ServerConfig
from flwr.serverapp import Grid, ServerApp

from veil.atomic import atomic_write
from veil.conf.runconfig import from_run_config, to_run_config
from veil.conf.schema import VeilConfig
from veil.errors import ConfigError, VeilError
from veil.flower.patches import shorten_object_pull_backoff
from veil.flower.polling import PollingGrid
from veil.flower.sessions import bound_reply_pulls
from veil.flower.workflows import DropoutTolerantSecAggPlus, RoundLoop, RoundOutcome, plain_fit_workflow
from veil.privacy.client_level import run_noise_multiplier
from veil.server.checkpoint import (
    Checkpoint,
    check_compatible,
    latest_checkpoint,
    restore_rng,
    save_checkpoint,
    weights_sha256,
)
from veil.server.evaluate import make_evaluate_fn
from veil.server.export import export_global_model
from veil.server.guarantee import coordinator_epsilon, epsilon_basis, simulated_ledgers, simulated_node_figures
from veil.server.key_relay import KeyRelay
from veil.server.metrics import MetricsLog, console_line
from veil.server.operator import operator_config
from veil.server.progress import RoundProgress
from veil.server.tensorboard import TensorBoardHook
from veil.strategies.factory import make_strategy
from veil.strategies.fedavg import DeltaFedAvg
from veil.task import get_task
from veil.task.base import batch_size_of
from veil.task.model import get_trainable, resolve_device, trainable_names
from veil.task.shards import eval_split, run_labels

log = logging.getLogger("veil.server")


def _central_noise_std(cfg: VeilConfig) -> float:
    z = run_noise_multiplier(cfg)
    return 0.0 if z is None or cfg.privacy.noise_placement != "central" else z * cfg.privacy.max_grad_norm


class RunRecorder:
    """After each round: one metrics line, one console line, one checkpoint (in that order: a checkpoint of round k
    implies its metrics line exists; on resume, metrics lines after the checkpoint's round are dropped).

    The row holds only what the coordinator itself knows (no per-client value, DESIGN.md decision 7); ε is the
    coordinator's figure of :mod:`veil.server.guarantee`. In simulation, ``node_*`` keys add what the simulated
    owners' own ledgers say.
    """

    def __init__(self, cfg: VeilConfig, out_dir: Path, strategy: DeltaFedAvg, names: list[str], *,
                 simulation: bool = False) -> None:
        self.cfg, self.out_dir, self.strategy, self.names = cfg, out_dir, strategy, names
        self.simulation = simulation
        self.metrics = MetricsLog(out_dir / "metrics.jsonl")
        self.last: dict[str, Any] = {}
        self.rounds_completed = 0
        self.rounds_run = 0  # rounds whose fit was attempted: nodes may have trained in each
        self.planned_rounds = {cfg.federation.rounds}  # every federation.rounds this run had (a resume may raise it)
        self.epsilon_max = 0.0
        self.tensorboard = TensorBoardHook(out_dir / "tensorboard")
        self.progress: RoundProgress | None = None  # made at the first round seen (a resumed run starts later)
        self.initial: dict[str, Any] = {}  # the starting model's evaluation (task.evaluate_before)

    @property
    def basis(self) -> str:
        return epsilon_basis(self.cfg, simulation=self.simulation, planned_rounds=self.planned_rounds)

    def resume_from(self, ckpt: Checkpoint) -> None:
        self.metrics.truncate_after(ckpt.round)
        rows = self.metrics.rows()
        self.rounds_completed = sum(1 for r in rows if r.get("completed"))
        self.rounds_run = len(rows)
        saved = ckpt.meta["strategy"].get("planned_rounds", [ckpt.meta["run_config"].get("veil.federation.rounds")])
        self.planned_rounds |= {int(r) for r in saved if r is not None}
        self.last = rows[-1] if rows else {}
        self.epsilon_max = self._epsilon(self._node_figures())

    def _node_figures(self) -> dict[str, float]:
        """Simulation only: the ``node_*`` figures of the simulated owners' own ledgers."""
        if not (self.simulation and self.cfg.privacy.enabled):
            return {}
        return simulated_node_figures(simulated_ledgers(self.out_dir), delta=self.cfg.privacy.delta,
                                      accountant=self.cfg.privacy.accountant)

    def _epsilon(self, node: dict[str, float]) -> float:
        """This run's ε so far, on :attr:`basis`."""
        basis, priv = self.basis, self.cfg.privacy
        if basis == "client_level" and self.strategy.accountant is not None:
            return self.strategy.accountant.epsilon(delta=priv.delta, accountant=priv.accountant)
        if basis == "simulated_ledgers":
            return node.get("node_epsilon_max", 0.0)
        return coordinator_epsilon(self.cfg, basis=basis, rounds_run=self.rounds_run)

    def before_training(self, loss: float, metrics: dict[str, Any]) -> None:
        """The starting model's evaluation (``task.evaluate_before``): logged, and kept for summary.json."""
        self.initial = {"loss": loss, **metrics}
        ppl = f" | ppl {metrics['perplexity']:.2f}" if "perplexity" in metrics else ""
        ppl += f" | choice {metrics['choice_accuracy']:.4f}" if "choice_accuracy" in metrics else ""
        log.info("before training | acc %.4f | loss %.4f%s", metrics.get("accuracy", float("nan")), loss, ppl)

    def after_round(self, outcome: RoundOutcome) -> None:
        fit = outcome.fit_metrics
        self.rounds_run += 1
        if outcome.completed:
            self.rounds_completed += 1
        else:
            log.warning("round %d did not complete (too few clients answered); global weights unchanged", outcome.round)
        node = self._node_figures()
        self.epsilon_max = self._epsilon(node)
        row = {
            "round": outcome.round, "accuracy": outcome.accuracy, "loss": outcome.loss,
            "epsilon_max": self.epsilon_max, "clients": int(fit.get("clients", 0)),
            "refused": int(fit.get("refused", 0)), "contributed": int(fit.get("contributed", 0)),
            "upload_bytes_per_client": float(fit.get("upload_bytes_per_client", 0.0)),
            "seconds": outcome.seconds, "secagg": self.cfg.secagg.enabled, "completed": outcome.completed,
            **node, "weights_sha256": weights_sha256(self.strategy.global_arrays),
        }
        row.update(outcome.eval_metrics)  # the task's other metrics (causal_lm: perplexity, sample generations)
        self.metrics.append(row)
        self.last = row
        self.tensorboard.write(row)
        if self.progress is None:
            self.progress = RoundProgress(total=self.cfg.federation.rounds, done=outcome.round - 1)
        self.progress.update(row)
        log.info("%s", console_line(row, self.cfg.federation.rounds))
        state = {k: v for k, v in self.strategy.state_dict().items() if k != "global_arrays"}
        save_checkpoint(self.out_dir, round=outcome.round, names=self.names, arrays=self.strategy.global_arrays,
                        run_config=to_run_config(self.cfg),
                        strategy_state={**state, "planned_rounds": sorted(self.planned_rounds)})

    def close(self) -> None:
        self.tensorboard.close()
        if self.progress is not None:
            self.progress.close()


def _resume(cfg: VeilConfig, out_dir: Path, strategy: DeltaFedAvg, recorder: RunRecorder, names: list[str]) -> int:
    """Load the last checkpoint when resuming; returns the first round to run."""
    if not cfg.resume:
        return 1
    ckpt = latest_checkpoint(Path(cfg.resume))
    if ckpt is None:
        log.warning("no checkpoint in %s yet: starting from round 1", cfg.resume)
        return 1
    check_compatible(ckpt.meta["run_config"], to_run_config(cfg))
    if ckpt.names != names:
        raise ConfigError(f"cannot resume: the checkpoint in {cfg.resume} holds other tensors than this model")
    try:
        strategy.load_state_dict({"global_arrays": ckpt.arrays, **ckpt.meta["strategy"]})
    except (KeyError, ValueError) as err:
        raise ConfigError(f"cannot resume from {cfg.resume}: its checkpoint does not fit this run "
                          f"({str(err).strip(chr(39))}); start a new run") from err
    restore_rng(ckpt.meta)
    recorder.resume_from(ckpt)
    log.info("resuming after round %d from weights sha256 %s", ckpt.round, ckpt.meta["weights_sha256"])
    return ckpt.round + 1


def fit_workflow_for(cfg: VeilConfig) -> Any:
    """SecAgg+ (Bell et al., arXiv:2009.09039; Flower's workflow, surviving early drop-outs:
    :mod:`veil.flower.workflows`; veil's records relayed: :mod:`veil.server.key_relay`) when on, else Flower's plain
    fit workflow."""
    sa = cfg.secagg
    if not sa.enabled:
        return plain_fit_workflow
    return DropoutTolerantSecAggPlus(
        num_shares=sa.num_shares, reconstruction_threshold=sa.reconstruction_threshold,
        max_weight=1.0,  # every client sends weight 1 (see VeilClient.fit): full quantisation precision
        clipping_range=sa.clipping_range, quantization_range=sa.quantization_range,
        modulus_range=sa.modulus_range, timeout=sa.timeout, relay=KeyRelay,
    )


def run_server(grid: Grid, context: Context, cfg: VeilConfig, *, simulation: bool = False) -> dict[str, Any]:
    """Run all rounds and export; returns the final summary. ``simulation``: the nodes are simulated under
    ``<output_dir>/nodes`` (their ledgers give the ``node_*`` figures)."""
    out_dir = Path(cfg.output_dir or ".").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    task = get_task(cfg.task.name)
    device = resolve_device(cfg.device)
    template = task.build_model(cfg, run_labels(cfg), seed=cfg.federation.seed)
    if cfg.model.init_from and not cfg.resume:  # LP-FT's second half (veil.server.warm_start)
        from veil.server.warm_start import warm_start

        log.info("starting from %s of %s", ", ".join(warm_start(template, cfg)), cfg.model.init_from)
    data = eval_split(cfg)
    strategy = make_strategy(cfg, initial=get_trainable(template), central_noise_std=_central_noise_std(cfg),
                             evaluate_fn=make_evaluate_fn(template, data, device=device, task=task, cfg=cfg))
    names = trainable_names(template)
    recorder = RunRecorder(cfg, out_dir, strategy, names, simulation=simulation)
    random.seed(cfg.federation.seed)  # client sampling (Flower samples with Python's `random`)
    start = _resume(cfg, out_dir, strategy, recorder, names)
    if _client_level(cfg):  # whom the coordinator samples must not follow from the public seed (review H3)
        random.seed(secrets.randbits(64))
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.federation.rounds), strategy=strategy)
    try:
        if start <= cfg.federation.rounds:
            RoundLoop(fit_workflow_for(cfg), recorder, start_round=start,
                      on_initial=recorder.before_training if cfg.task.evaluate_before else None)(grid, legacy)
    finally:
        recorder.close()
    if recorder.rounds_completed == 0 and start <= cfg.federation.rounds:
        reason = strategy.last_failures[0] if strategy.last_failures else "no client answered"
        raise VeilError(f"no round completed: every client failed ({reason}); fix that and run again")
    summary = {
        **recorder.last, "epsilon_max": recorder.epsilon_max, "epsilon_basis": recorder.basis,
        "rounds_completed": recorder.rounds_completed, "rounds_run": recorder.rounds_run,
        "eval_examples": batch_size_of(data), **({"before_training": recorder.initial} if recorder.initial else {}),
    }
    save_global(out_dir / "global_trainable.npz", trainable_names(template), strategy.global_arrays)
    export_global_model(template, strategy.global_arrays, out_dir / "model", cfg=cfg, summary=summary)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float), encoding="utf-8")
    log.info("model exported to %s", out_dir / "model")
    return summary


def save_global(path: Path, names: list[str], arrays: list[np.ndarray]) -> None:
    """The global trainable tensors by name, written atomically (veil.atomic)."""
    payload = dict(zip(names, arrays, strict=True))
    atomic_write(path, lambda fh: np.savez(fh, **payload))


def load_global(path: Path, names: list[str]) -> list[np.ndarray]:
    with np.load(path) as data:
        return [data[name] for name in names]


def _client_level(cfg: VeilConfig) -> bool:
    return cfg.privacy.enabled and cfg.privacy.level == "client"


def make_server_app(defaults: Mapping[str, Any] | None = None, *, simulation: bool | None = None) -> ServerApp:
    """The veil ServerApp; ``defaults`` is the flattened run config a simulation launcher provides (its presence
    means a simulation unless ``simulation`` says otherwise). Under ``veil server`` only the operator's own run
    config runs (:func:`veil.server.operator.operator_config`)."""
    base = dict(defaults or {})
    simulated = defaults is not None if simulation is None else simulation
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = operator_config(from_run_config({**base, **dict(context.run_config)}))
        if not simulated:  # a deployment's object pulls retry after 0.02 s, not 1 s (veil.flower.patches)
            # the operator's serverapp.log gets veil's INFO lines too ("resuming after round k from weights ...")
            logging.getLogger("veil").setLevel(logging.INFO)
            shorten_object_pull_backoff()
            if cfg.secagg.enabled:  # a reply half-pushed by a dead node holds a stage no longer than its timeout
                bound_reply_pulls(cfg.secagg.timeout)
        # Flower's grid, pulling replies every 0.05 s, not 3 s
        run_server(PollingGrid(grid), context, cfg, simulation=simulated)

    return server_app


app = make_server_app()
