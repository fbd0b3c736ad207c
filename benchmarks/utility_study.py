"""Utility study (issue 15): server strategies and adapter variants on BANKING77 at the same compute, scored on a
validation split carved from the training file (stratified, seeded); the test split is never read, so defaults
chosen from this table are not fitted to it.

Run by ``python -m benchmarks.utility_banking77 --study``. To fit a 2-core machine shared with other work, the arms
run in one process without Flower's transport: each round every simulated client runs veil's own local training
(``veil.client.trainer.train_round``: Opacus DP-SGD, σ calibrated as the client does for ε over all planned
steps) on its Dirichlet shard (``veil.task.shards.simulated_partitions``), and the run's strategy
(``veil.strategies.factory.make_strategy``) aggregates the updates with weight 1 each, as SecAgg+'s unmasked sum
would (up to its 2^-22 quantisation). DP noise is drawn from OS entropy, as on a node: a rerun differs by noise.

Per-ε tuning: an arm may set the client lr and the clipping norm C (``"ε=8, fedavg, lora, lr=3e-2, C=0.1"``), and
``--lr-grid`` / ``--clip-grid`` cross the given arms with a grid. ``--test`` adds the test split as a column (for arms
already chosen on validation); ``--sealed FILE`` scores it for every arm into FILE only, to be opened once the choice
is made, so a sweep need not be re-run to report its chosen arms' test figures.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import random
import tempfile
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from benchmarks.common import machine_info, now, pick_device, report
from veil.client.trainer import LocalPlan, sample_rate_for, train_round
from veil.conf.schema import (
    DP_SGD_LR,
    PLAIN_LR,
    DataConfig,
    FederationConfig,
    ModelConfig,
    PrivacyConfig,
    SecAggConfig,
    StrategyConfig,
    VeilConfig,
)
from veil.privacy.calibration import calibrate_noise_multiplier
from veil.strategies.factory import make_strategy
from veil.task import get_task
from veil.task.data import encode_labels, read_examples, tokenize
from veil.task.model import build_model, get_trainable, load_tokenizer, set_trainable
from veil.task.shards import resolve_labels, simulated_partitions

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "veil" / "data" / "banking77"  # the packaged BANKING77 (data=banking77)
TRAIN, TEST = DATA / "train.csv", DATA / "test.csv"

# The default arms. An arm is written "<no DP | ε=E | clip only>, <strategy>, <lora | ffa>[, lr=L][, C=C][, slr=S]
# [, r=R][, opt=sgd]": lr is the client's learning rate (default federation.lr), C the per-sample clipping norm
# (default privacy.max_grad_norm), slr the server learning rate of fedadam/fedavgm (default --fedadam-lr /
# --fedavgm-lr), r the LoRA rank (default model.lora_r), opt the client optimizer (default federation.optimizer).
# "clip only" is a diagnosis, not a private arm: DP-SGD's clipping and Poisson batches with σ = 0 (no ε), which
# splits a private arm's gap to the non-private one into what clipping costs and what the noise costs.
ARMS = ("no DP, fedavg, lora", "ε=8, fedavg, lora", "ε=8, fedavg, ffa", "ε=8, fedavgm, lora", "ε=8, fedadam, lora",
        "ε=8, fedadam, ffa", "ε=3, fedavg, lora", "ε=1, fedavg, lora")
_KEYS = {"lr": "lr", "C": "clip", "slr": "server_lr", "r": "rank", "opt": "optimizer"}
CLIP_ONLY = math.inf  # Arm.epsilon of a "clip only" arm


@dataclass(frozen=True)
class Arm:
    """One study arm; ``None`` fields take the study's defaults."""

    epsilon: float | None  # None: no DP; CLIP_ONLY: clipping without noise
    strategy: str
    variant: str
    lr: float | None = None
    clip: float | None = None
    server_lr: float | None = None
    rank: float | None = None  # LoRA rank (default model.lora_r)
    optimizer: str | None = None  # client optimizer (default adamw)

    @property
    def name(self) -> str:
        privacy = ("no DP" if self.epsilon is None else "clip only" if self.epsilon == CLIP_ONLY
                   else f"ε={self.epsilon:g}")
        extra = [f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                 for key, field in _KEYS.items() if (value := getattr(self, field)) is not None]
        return ", ".join([privacy, self.strategy, self.variant, *extra])


def parse_arm(text: str) -> Arm:
    """``"ε=8, fedavg, lora, lr=3e-2, C=0.1"`` -> :class:`Arm` (see ``ARMS`` for the grammar)."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) < 3:
        raise SystemExit(f"arm {text!r}: write '<no DP | ε=E | clip only>, <strategy>, <lora | ffa>[, lr=L][, C=C]"
                         "[, slr=S][, r=R][, opt=adamw|sgd]'")
    privacy, strategy, variant, *rest = parts
    kind = privacy.lower()
    epsilon = None if kind == "no dp" else CLIP_ONLY if kind == "clip only" else float(privacy.split("=", 1)[1])
    fields: dict[str, Any] = {}
    for item in rest:
        key, _, value = (part.strip() for part in item.partition("="))
        if key not in _KEYS or not value or (key == "opt" and value not in ("adamw", "sgd")):
            raise SystemExit(f"arm {text!r}: unknown setting {item!r}; use lr=, C=, slr=, r= or opt=adamw|sgd")
        fields[_KEYS[key]] = value if key == "opt" else float(value)
    return Arm(epsilon, strategy, variant, **fields)


def expand_arms(texts: list[str], *, lrs: list[float] | None, clips: list[float] | None) -> list[Arm]:
    """The arms to run: each given arm, crossed with the ``lrs`` grid where it sets no lr and (DP arms only)
    with the ``clips`` grid where it sets no C."""
    arms = []
    for arm in map(parse_arm, texts):
        for lr in ([arm.lr] if arm.lr is not None or not lrs else lrs):
            for clip in ([arm.clip] if arm.clip is not None or arm.epsilon is None or not clips else clips):
                arms.append(replace(arm, lr=lr, clip=clip))
    return list(dict.fromkeys(arms))


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


def arm_config(base: VeilConfig, arm: Arm, *, fedadam_lr: float, fedavgm_lr: float) -> VeilConfig:
    st = StrategyConfig(name=arm.strategy)
    if arm.strategy == "fedadam":
        st = replace(st, server_lr=arm.server_lr or fedadam_lr)
    if arm.strategy == "fedavgm":
        st = replace(st, server_lr=arm.server_lr or fedavgm_lr, server_momentum=0.9)
    priv = replace(base.privacy, enabled=arm.epsilon is not None,
                   target_epsilon=base.privacy.target_epsilon if arm.epsilon in (None, CLIP_ONLY) else arm.epsilon,
                   max_grad_norm=arm.clip or base.privacy.max_grad_norm)
    model = replace(base.model, lora_variant=arm.variant, lora_r=int(arm.rank or base.model.lora_r))
    fed = replace(base.federation, lr=arm.lr or 0.0,  # 0: the default for the arm's mode and optimizer
                  optimizer=arm.optimizer or base.federation.optimizer)
    return replace(base, strategy=st, model=model, privacy=priv, federation=fed).validate()


def run_arm(cfg: VeilConfig, shards: list[dict[str, torch.Tensor]], splits: dict[str, dict[str, torch.Tensor]],
            labels: list[str], *, noiseless: bool = False) -> dict[str, float]:
    """Train the federation of ``cfg`` for its rounds; the global model's accuracy on each of ``splits``.
    ``noiseless``: DP-SGD with σ = 0 (a diagnosis, no ε)."""
    fed, priv = cfg.federation, cfg.privacy
    device = torch.device("cpu")
    template = build_model(cfg.model, labels, seed=fed.seed)
    strategy = make_strategy(cfg, initial=get_trainable(template))
    sigmas = [calibrate_noise_multiplier(target_epsilon=priv.target_epsilon, delta=priv.delta,
                                         sample_rate=sample_rate_for(batch_size=fed.batch_size,
                                                                     examples=int(s["labels"].shape[0])),
                                         steps=fed.local_steps * fed.rounds, accountant=priv.accountant)
              if priv.enabled and not noiseless else 0.0 for s in shards]
    for rnd in range(1, fed.rounds + 1):
        results = []
        for cid, (shard, sigma) in enumerate(zip(shards, sigmas, strict=True)):
            plan = LocalPlan(steps=fed.local_steps, batch_size=fed.batch_size, lr=fed.lr, private=priv.enabled,
                             noise_multiplier=sigma, max_grad_norm=priv.max_grad_norm, optimizer=fed.optimizer)
            res = train_round(template, strategy.global_arrays, shard, plan=plan, device=device,
                              seed=fed.seed * 100_003 + rnd * 1_009 + cid, task=get_task("classification"))
            results.append((None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(res.update), 1, {})))
        strategy.aggregate_fit(rnd, results, [])  # type: ignore[arg-type]
    model = copy.deepcopy(template)
    set_trainable(model, strategy.global_arrays)
    task = get_task("classification")
    scores = {name: task.evaluate(model, split, device=device)["accuracy"] for name, split in splits.items()}
    return {**scores, "sigma_mean": float(np.mean(sigmas))}


def _encoded(path: Path, base: VeilConfig, tok: object, labels: list[str]) -> dict[str, torch.Tensor]:
    held = read_examples(path, base.data)
    enc = tokenize(tok, held.texts, max_length=base.model.max_length)
    enc["labels"] = torch.as_tensor(encode_labels(held, labels, path=str(path)))
    return enc


def study(args: argparse.Namespace, argv: list[str] | None) -> None:
    """All requested arms at the same compute; one table row each."""
    info = machine_info(pick_device())
    started = now()
    arms = expand_arms(args.arms or list(ARMS), lrs=args.lr_grid, clips=args.clip_grid)
    with tempfile.TemporaryDirectory(prefix="veil-study-") as tmp:
        train, val_path = carve_validation(TRAIN, Path(tmp), per_class=args.val_per_class)
        base = VeilConfig(
            model=ModelConfig(), data=DataConfig(train_path=str(train), test_path=str(val_path)),
            privacy=PrivacyConfig(target_epsilon=8.0, delta=1e-5),
            secagg=SecAggConfig(enabled=False),  # no transport here; the strategy sees the plain sum SecAgg+ would unmask
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
        splits = {"validation": _encoded(val_path, base, tok, labels)}
        if args.test or args.sealed:  # only for arms already chosen on validation, or sealed until chosen
            splits["test"] = _encoded(TEST, base, tok, labels)
        results: dict[str, dict[str, float]] = {}
        sealed: dict[str, float] = {}
        for arm in arms:
            t0 = now()
            cfg = arm_config(base, arm, fedadam_lr=args.fedadam_lr, fedavgm_lr=args.fedavgm_lr)
            results[arm.name] = {**run_arm(cfg, shards, splits, labels, noiseless=arm.epsilon == CLIP_ONLY),
                                 "seconds": now() - t0}
            if args.sealed:  # test figures go to the sealed file only, opened after choosing on validation
                sealed[arm.name] = results[arm.name].pop("test")
                args.sealed.write_text(json.dumps(sealed, ensure_ascii=False, indent=1))
            print(f"{arm.name}: " + ", ".join(f"{k} accuracy {results[arm.name][k]:.4f}" for k in splits
                                               if k in results[arm.name])
                  + f" ({results[arm.name]['seconds']:.0f} s)", file=sys.stderr, flush=True)
    shown = [k for k in splits if not (args.sealed and k == "test")]
    rows, notes = _table(arms, results, shown)
    sizes = [int(s["labels"].shape[0]) for s in shards]
    settings = (f"{args.clients} clients (Dirichlet α=0.5, shards {min(sizes)}-{max(sizes)} texts), MiniLM-L6 + LoRA "
                f"r=8 on query/value, head from label names, {args.rounds} rounds × {args.steps} DP steps × expected "
                f"batch {args.batch_size} for every arm; client AdamW lr and clipping norm C per arm (unset: lr "
                f"{DP_SGD_LR:g} with DP, {PLAIN_LR:g} without, C={base.privacy.max_grad_norm:g}); each arm's ε (δ=1e-5, PRV) over the planned "
                f"steps; fedadam server_lr={args.fedadam_lr} (β 0.9/0.99, τ 1e-3), fedavgm server_lr={args.fedavgm_lr} "
                f"momentum 0.9; validation: {int(splits['validation']['labels'].shape[0])} training texts "
                f"({args.val_per_class} per intent, seed 0) held out of every shard; "
                + ("test: all BANKING77 test texts, read only for arms chosen on validation beforehand"
                   if "test" in shown else f"test accuracies sealed in {args.sealed.name}, not shown here"
                   if args.sealed else "the test split is not read") + "; in-process federation (no transport)")
    report("utility_banking77 --study", args, argv, info, settings=settings,
           headers=["arm", "val. accuracy", *(["test accuracy"] if "test" in shown else []), "Δ val. vs best no DP (points)",
                    "mean σ", "seconds"],
           rows=rows, notes=notes, elapsed=now() - started, extra_versions=("flwr",))


def _table(arms: list[Arm], results: dict[str, dict[str, float]], splits: list[str]) -> tuple[list[list[str]], list[str]]:
    """One row per arm; the gap is measured to the best non-private arm on validation (the fair reference)."""
    private = [a.name for a in arms if a.epsilon is None]
    ref = max(private, key=lambda n: results[n]["validation"]) if private else None
    ref_acc = results[ref]["validation"] if ref else float("nan")
    rows = [[name, *(f"{r[k]:.4f}" for k in splits), f"{100 * (r['validation'] - ref_acc):+.1f}",
             f"{r['sigma_mean']:.2f}" if r["sigma_mean"] else "–", f"{r['seconds']:.0f}"] for name, r in results.items()]
    notes = [f"reference for the gap: {ref} (the best non-private arm of this run on validation)"] if ref else []
    for eps in sorted({a.epsilon for a in arms if a.epsilon not in (None, CLIP_ONLY)}, reverse=True):
        best = max((a.name for a in arms if a.epsilon == eps), key=lambda n: results[n]["validation"])
        gaps = ", ".join(f"{k} {100 * (results[ref][k] - results[best][k]):.1f}" for k in splits) if ref else "–"
        notes.append(f"ε={eps:g}: best arm on validation {best} ({results[best]['validation']:.4f}); "
                     f"gap to the reference in points: {gaps} (target: within 3)")
    return rows, notes
