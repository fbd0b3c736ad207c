"""Utility study (issue 15): server strategies and adapter variants on BANKING77 at the same compute, scored on a
validation split carved from the training file (stratified, seeded); the test split is never read, so defaults
chosen from this table are not fitted to it.

Run by ``python -m benchmarks.utility_banking77 --study``. To fit a 2-core machine shared with other work, the arms
run in one process without Flower's transport: each round every simulated client runs veil's own local training
(``veil.client.trainer.train_round``: Opacus DP-SGD, σ calibrated as the client does for ε over all planned
steps) on its Dirichlet shard (``veil.task.shards.simulated_partitions``), and the run's strategy
(``veil.strategies.factory.make_strategy``) aggregates the updates with weight 1 each, as SecAgg+'s unmasked sum
would (up to its 2^-22 quantisation). DP noise is drawn from OS entropy, as on a node: a rerun differs by noise.
"""

from __future__ import annotations

import argparse
import copy
import csv
import random
import tempfile
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from benchmarks.common import machine_info, now, pick_device, report
from veil.client.trainer import LocalPlan, sample_rate_for, train_round
from veil.conf.schema import DataConfig, FederationConfig, ModelConfig, PrivacyConfig, StrategyConfig, VeilConfig
from veil.privacy.calibration import calibrate_noise_multiplier
from veil.strategies.factory import make_strategy
from veil.task import get_task
from veil.task.data import encode_labels, read_examples, tokenize
from veil.task.model import build_model, get_trainable, load_tokenizer, set_trainable
from veil.task.shards import resolve_labels, simulated_partitions

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT.parent / "shared" / "data" / "banking77" / "train.csv"

# arm name -> (private, strategy name, lora variant)
ARMS = {  # arm -> (target ε or None for no DP, strategy, LoRA variant)
    "no DP, fedavg, lora": (None, "fedavg", "lora"),
    "ε=8, fedavg, lora": (8.0, "fedavg", "lora"),
    "ε=8, fedavg, ffa": (8.0, "fedavg", "ffa"),
    "ε=8, fedavgm, lora": (8.0, "fedavgm", "lora"),
    "ε=8, fedadam, lora": (8.0, "fedadam", "lora"),
    "ε=8, fedadam, ffa": (8.0, "fedadam", "ffa"),
    "ε=3, fedavg, lora": (3.0, "fedavg", "lora"),
    "ε=1, fedavg, lora": (1.0, "fedavg", "lora"),
}


def carve_validation(train: Path, out_dir: Path, *, per_class: int, seed: int = 0) -> tuple[Path, Path]:
    """Split ``train`` (CSV with ``text``/``category``) into a training file and a validation file holding
    ``per_class`` seeded random rows of every label; returns (train, validation) paths."""
    with open(train, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    by_label: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_label.setdefault(row["category"], []).append(i)
    rng = random.Random(seed)
    held = {i for idx in by_label.values() for i in rng.sample(idx, min(per_class, len(idx) // 2))}
    paths = (out_dir / "train_part.csv", out_dir / "validation.csv")
    for path, keep in zip(paths, (False, True), strict=True):
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["text", "category"])
            writer.writeheader()
            writer.writerows({"text": r["text"], "category": r["category"]} for i, r in enumerate(rows)
                             if (i in held) == keep)
    return paths


def arm_config(base: VeilConfig, arm: str, *, fedadam_lr: float, fedavgm_lr: float) -> VeilConfig:
    epsilon, strategy, variant = ARMS[arm]
    st = StrategyConfig(name=strategy)
    if strategy == "fedadam":
        st = replace(st, server_lr=fedadam_lr)
    if strategy == "fedavgm":
        st = replace(st, server_lr=fedavgm_lr, server_momentum=0.9)
    return replace(base, strategy=st, model=replace(base.model, lora_variant=variant),
                   privacy=replace(base.privacy, enabled=epsilon is not None,
                                   target_epsilon=epsilon or base.privacy.target_epsilon)).validate()


def run_arm(cfg: VeilConfig, shards: list[dict[str, torch.Tensor]], val: dict[str, torch.Tensor],
            labels: list[str]) -> dict[str, float]:
    """Train the federation of ``cfg`` for its rounds; the global model's validation accuracy."""
    fed, priv = cfg.federation, cfg.privacy
    device = torch.device("cpu")
    template = build_model(cfg.model, labels, seed=fed.seed)
    strategy = make_strategy(cfg, initial=get_trainable(template))
    sigmas = [calibrate_noise_multiplier(target_epsilon=priv.target_epsilon, delta=priv.delta,
                                         sample_rate=sample_rate_for(batch_size=fed.batch_size,
                                                                     examples=int(s["labels"].shape[0])),
                                         steps=fed.local_steps * fed.rounds, accountant=priv.accountant)
              if priv.enabled else 0.0 for s in shards]
    for rnd in range(1, fed.rounds + 1):
        results = []
        for cid, (shard, sigma) in enumerate(zip(shards, sigmas, strict=True)):
            plan = LocalPlan(steps=fed.local_steps, batch_size=fed.batch_size, lr=fed.lr, private=priv.enabled,
                             noise_multiplier=sigma, max_grad_norm=priv.max_grad_norm)
            res = train_round(template, strategy.global_arrays, shard, plan=plan, device=device,
                              seed=fed.seed * 100_003 + rnd * 1_009 + cid, task=get_task("classification"))
            results.append((None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(res.update), 1, {})))
        strategy.aggregate_fit(rnd, results, [])  # type: ignore[arg-type]
    model = copy.deepcopy(template)
    set_trainable(model, strategy.global_arrays)
    scores = get_task("classification").evaluate(model, val, device=device)
    return {"accuracy": scores["accuracy"], "loss": scores["loss"], "sigma_mean": float(np.mean(sigmas))}


def study(args: argparse.Namespace, argv: list[str] | None) -> None:
    """All requested arms at the same compute; one table row each."""
    info = machine_info(pick_device())
    started = now()
    with tempfile.TemporaryDirectory(prefix="veil-study-") as tmp:
        train, val_path = carve_validation(TRAIN, Path(tmp), per_class=args.val_per_class)
        base = VeilConfig(
            model=ModelConfig(), data=DataConfig(train_path=str(train), test_path=str(val_path)),
            privacy=PrivacyConfig(target_epsilon=8.0, delta=1e-5),
            federation=FederationConfig(num_clients=args.clients, clients_per_round=args.clients,
                                        rounds=args.rounds, local_steps=args.steps, batch_size=args.batch_size,
                                        partitioner="dirichlet", alpha=0.5, seed=0),
        ).validate()
        labels = resolve_labels(base.data)
        tok = load_tokenizer(base.model)
        examples = read_examples(train, base.data)
        _ids, parts = simulated_partitions(get_task("classification"), examples, labels, {**base.federation.__dict__},
                                           path=str(train))
        shards = []
        for idx in parts:
            enc = tokenize(tok, [examples.texts[i] for i in idx], max_length=base.model.max_length)
            enc["labels"] = torch.as_tensor(_ids[idx])
            shards.append(enc)
        held = read_examples(val_path, base.data)
        val = tokenize(tok, held.texts, max_length=base.model.max_length)
        val["labels"] = torch.as_tensor(encode_labels(held, labels, path=str(val_path)))
        results: dict[str, dict[str, float]] = {}
        for arm in args.arms or list(ARMS):
            t0 = now()
            cfg = arm_config(base, arm, fedadam_lr=args.fedadam_lr, fedavgm_lr=args.fedavgm_lr)
            results[arm] = {**run_arm(cfg, shards, val, labels), "seconds": now() - t0}
            print(f"{arm}: validation accuracy {results[arm]['accuracy']:.4f} ({results[arm]['seconds']:.0f} s)",
                  file=sys.stderr, flush=True)
    base_acc = results.get("ε=8, fedavg, lora", {}).get("accuracy", float("nan"))
    ref = results.get("no DP, fedavg, lora", {}).get("accuracy", float("nan"))
    rows = [[arm, f"{r['accuracy']:.4f}", f"{100 * (r['accuracy'] - base_acc):+.1f}",
             f"{100 * (r['accuracy'] - ref):+.1f}", f"{r['sigma_mean']:.2f}" if r["sigma_mean"] else "–",
             f"{r['seconds']:.0f}"] for arm, r in results.items()]
    sizes = [int(s["labels"].shape[0]) for s in shards]
    settings = (f"{args.clients} clients (Dirichlet α=0.5, shards {min(sizes)}-{max(sizes)} texts), MiniLM-L6 + LoRA "
                f"r=8 on query/value, head from label names, {args.rounds} rounds × {args.steps} DP steps × expected "
                f"batch {args.batch_size} for every arm, client lr 1e-2, C=1; each arm's ε (δ=1e-5, PRV) over the planned steps; "
                f"fedadam server_lr={args.fedadam_lr} (β 0.9/0.99, τ 1e-3), fedavgm server_lr={args.fedavgm_lr} "
                f"momentum 0.9; validation: {len(held.texts)} training texts ({args.val_per_class} per intent, seed 0) "
                f"held out of every shard; the test split is not read; in-process federation (no transport)")
    report("utility_banking77 --study", args, argv, info, settings=settings,
           headers=["arm", "val. accuracy", "Δ vs ε=8 fedavg lora (points)", "Δ vs no DP (points)", "mean σ",
                    "seconds"],
           rows=rows, notes=[], elapsed=now() - started, extra_versions=("flwr",))
