"""The veil ServerApp: the coordinator's side of a run.

Flower legacy API on purpose (DESIGN.md decision 2): ``SecAggPlusWorkflow`` needs a ``LegacyContext`` and a
``flwr.server.strategy`` strategy. The same app serves simulation and deployment: the configuration comes from
``context.run_config`` (a simulation launcher passes it as defaults).

Per run: build the model template and the evaluation split, keep the global trainable tensors in the strategy,
run the rounds (SecAgg+ fit workflow when on), write one ``metrics.jsonl`` line and one console line per round,
then export the merged model with its model card.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import Context
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import Grid, ServerApp

from veil.conf.runconfig import from_run_config, to_run_config
from veil.conf.schema import VeilConfig
from veil.errors import ConfigError, VeilError
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
from veil.server.metrics import MetricsLog, console_line
from veil.server.progress import RoundProgress
from veil.server.tensorboard import TensorBoardHook
from veil.server.workflow import RoundLoop, RoundOutcome
from veil.strategies.fedavg import DeltaFedAvg
from veil.task import get_task
from veil.task.base import batch_size_of
from veil.task.model import get_trainable, resolve_device, trainable_names
from veil.task.shards import eval_split, run_labels

log = logging.getLogger("veil.server")


def _central_noise_std(cfg: VeilConfig) -> float:
    z = run_noise_multiplier(cfg)
    return 0.0 if z is None or cfg.privacy.noise_placement != "central" else z * cfg.privacy.max_grad_norm


def _client_level_epsilon(cfg: VeilConfig, z: float, rounds: int) -> float:
    from veil.privacy.client_level import client_level_epsilon

    fed = cfg.federation
    return client_level_epsilon(noise_multiplier=z, client_rate=fed.clients_per_round / fed.num_clients,
                                rounds=rounds, delta=cfg.privacy.delta, accountant=cfg.privacy.accountant)


class RunRecorder:
    """After each round: one metrics line, one console line, one checkpoint (in that order: a checkpoint of round k
    implies its metrics line exists; on resume, metrics lines after the checkpoint's round are dropped)."""

    def __init__(self, cfg: VeilConfig, out_dir: Path, strategy: DeltaFedAvg, names: list[str]) -> None:
        self.cfg, self.out_dir, self.strategy, self.names = cfg, out_dir, strategy, names
        self.metrics = MetricsLog(out_dir / "metrics.jsonl")
        self.last: dict[str, Any] = {}
        self.rounds_completed = 0
        self.epsilon_max = 0.0
        self.client_level_z = run_noise_multiplier(cfg)
        self.tensorboard = TensorBoardHook(out_dir / "tensorboard")
        self.progress: RoundProgress | None = None  # made at the first round seen (a resumed run starts later)

    def resume_from(self, ckpt: Checkpoint) -> None:
        self.metrics.truncate_after(ckpt.round)
        rows = self.metrics.rows()
        self.rounds_completed = sum(1 for r in rows if r.get("completed"))
        self.epsilon_max = max((float(r.get("epsilon_max", 0.0)) for r in rows), default=0.0)
        self.last = rows[-1] if rows else {}

    def after_round(self, outcome: RoundOutcome) -> None:
        fit = outcome.fit_metrics
        if outcome.completed:
            self.rounds_completed += 1
            self.epsilon_max = max(self.epsilon_max, float(fit.get("epsilon_max", 0.0)))
            if self.client_level_z is not None:  # client level: ε over rounds with client sampling, server-side
                self.epsilon_max = _client_level_epsilon(self.cfg, self.client_level_z, self.rounds_completed)
        else:
            log.warning("round %d did not complete (too few clients answered); global weights unchanged", outcome.round)
        row = {
            "round": outcome.round, "accuracy": outcome.accuracy, "loss": outcome.loss,
            "epsilon_max": self.epsilon_max, "epsilon_mean": float(fit.get("epsilon_mean", 0.0)),
            "upload_bytes_per_client": float(fit.get("upload_bytes_per_client", 0.0)),
            "seconds": outcome.seconds, "secagg": self.cfg.secagg.enabled, "completed": outcome.completed,
            "clients": int(fit.get("clients", 0)), "refused": int(fit.get("refused", 0)), "train_loss": float(fit.get("train_loss", float("nan"))),
            "examples": int(fit.get("examples", 0)),
            "noise_multiplier_max": float(fit.get("noise_multiplier_max", 0.0)),
            "sample_rate_max": float(fit.get("sample_rate_max", 0.0)),
        }
        row.update(outcome.eval_metrics)  # the task's other metrics (causal_lm: perplexity, sample generations)
        row["weights_sha256"] = weights_sha256(self.strategy.global_arrays)
        self.metrics.append(row)
        self.last = row
        self.tensorboard.write(row)
        if self.progress is None:
            self.progress = RoundProgress(total=self.cfg.federation.rounds, done=outcome.round - 1)
        self.progress.update(row)
        log.info("%s", console_line(row, self.cfg.federation.rounds))
        save_checkpoint(self.out_dir, round=outcome.round, names=self.names, arrays=self.strategy.global_arrays,
                        run_config=to_run_config(self.cfg),
                        strategy_state={k: v for k, v in self.strategy.state_dict().items() if k != "global_arrays"})

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
    strategy.load_state_dict({"global_arrays": ckpt.arrays, **ckpt.meta["strategy"]})
    restore_rng(ckpt.meta)
    recorder.resume_from(ckpt)
    log.info("resuming after round %d from weights sha256 %s", ckpt.round, ckpt.meta["weights_sha256"])
    return ckpt.round + 1


def fit_workflow_for(cfg: VeilConfig) -> Any:
    """SecAgg+ (Bell et al., arXiv:2009.09039) when on, else Flower's plain fit workflow."""
    sa = cfg.secagg
    if not sa.enabled:
        return default_fit_workflow
    return SecAggPlusWorkflow(
        num_shares=sa.num_shares, reconstruction_threshold=sa.reconstruction_threshold,
        max_weight=1.0,  # every client sends weight 1 (see VeilClient.fit): full quantisation precision
        clipping_range=sa.clipping_range, quantization_range=sa.quantization_range,
        modulus_range=sa.modulus_range, timeout=sa.timeout,
    )


def run_server(grid: Grid, context: Context, cfg: VeilConfig) -> dict[str, Any]:
    """Run all rounds and export; returns the final summary."""
    out_dir = Path(cfg.output_dir or ".").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    task = get_task(cfg.task.name)
    device = resolve_device(cfg.device)
    template = task.build_model(cfg, run_labels(cfg), seed=cfg.federation.seed)
    data = eval_split(cfg)
    strategy = DeltaFedAvg(
        initial=get_trainable(template), server_lr=cfg.strategy.server_lr,
        clients_per_round=cfg.federation.clients_per_round, num_clients=cfg.federation.num_clients,
        min_clients=cfg.secagg.num_shares if cfg.secagg.enabled else 1,
        central_noise_std=_central_noise_std(cfg), evaluate_fn=make_evaluate_fn(template, data, device=device, task=task),
    )
    names = trainable_names(template)
    recorder = RunRecorder(cfg, out_dir, strategy, names)
    random.seed(cfg.federation.seed)  # client sampling (Flower samples with Python's `random`)
    start = _resume(cfg, out_dir, strategy, recorder, names)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.federation.rounds), strategy=strategy)
    try:
        if start <= cfg.federation.rounds:
            RoundLoop(fit_workflow_for(cfg), recorder, start_round=start)(grid, legacy)
    finally:
        recorder.close()
    if recorder.rounds_completed == 0 and start <= cfg.federation.rounds:
        reason = strategy.last_failures[0] if strategy.last_failures else "no client answered"
        raise VeilError(f"no round completed: every client failed ({reason}); fix that and run again")
    summary = {
        **recorder.last, "epsilon_max": recorder.epsilon_max, "rounds_completed": recorder.rounds_completed,
        "eval_examples": batch_size_of(data),
    }
    save_global(out_dir / "global_trainable.npz", trainable_names(template), strategy.global_arrays)
    export_global_model(template, strategy.global_arrays, out_dir / "model", cfg=cfg, summary=summary)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float), encoding="utf-8")
    log.info("model exported to %s", out_dir / "model")
    return summary


def save_global(path: Path, names: list[str], arrays: list[np.ndarray]) -> None:
    """The global trainable tensors by name, written atomically (temp file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **dict(zip(names, arrays, strict=True)))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_global(path: Path, names: list[str]) -> list[np.ndarray]:
    with np.load(path) as data:
        return [data[name] for name in names]


def make_server_app(defaults: Mapping[str, Any] | None = None) -> ServerApp:
    """The veil ServerApp; ``defaults`` is the flattened run config a simulation launcher provides."""
    base = dict(defaults or {})
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = from_run_config({**base, **dict(context.run_config)})
        run_server(grid, context, cfg)

    return server_app


app = make_server_app()
