"""The DP linear probe on frozen sentence features (issue 22): the simplest strong baselines beside the federated
recipe, and the recipe's levers, scored on a validation split carved from the training file (the test split is read
only with ``--test``, for settings already chosen on validation).

Rows, all on the same Dirichlet split of the same banks:

* ``zero-shot``: the head initialised from the label names through the model's pooling, no training (round 0);
* ``bank i alone``: bank i's own non-private logistic regression (scikit-learn, L2) on its own share's features;
* ``pooled, no DP``: one logistic regression on every bank's data (what no federation can beat);
* ``federated ...``: veil's own local training (``veil.client.trainer.train_round``: Opacus DP-SGD, Poisson
  sampling, σ calibrated per bank as a node does) on the cached features, aggregated by veil's strategy with weight
  1 each, as SecAgg+'s unmasked sum is (up to its 2^-22 quantisation). No Flower transport: a 2-core machine runs a
  whole grid in minutes. ``veil simulate`` runs the chosen arm through Flower and SecAgg+ (``make demo``).

    python -m benchmarks.head_study --banks 5 --epsilons 4 --lrs 0.03,0.1 --rounds 20 --steps 20 --batch 256
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from benchmarks.common import machine_info, now, pick_device, report
from benchmarks.utility_study import TEST, TRAIN, carve_validation
from veil.client.budget import book, plan_round
from veil.client.round_plan import shard_sampling
from veil.client.settings import NodeSettings
from veil.client.trainer import train_round
from veil.conf.schema import DataConfig, FederationConfig, ModelConfig, PrivacyConfig, SecAggConfig, VeilConfig
from veil.strategies.factory import make_strategy
from veil.task import get_task
from veil.task.data import read_examples
from veil.task.model import build_model, get_trainable, set_trainable
from veil.task.probe import probe_accuracy
from veil.task.shards import resolve_labels, simulated_partitions

TASK = get_task("classification")


def _config(args: argparse.Namespace, train: Path, *, lr: float, clip: float, epsilon: float | None, rounds: int,
            steps: int, batch: int, sample_rate: float = 0.0) -> VeilConfig:
    """The run config of one arm; ``--share-noise`` with DP on sets ``privacy.share_noise`` (and SecAgg+, which it
    needs: described, not run here)."""
    shared = args.share_noise and epsilon is not None
    model = ModelConfig(tuning="head", path=args.model_path, source=args.source, pooling=args.pooling,
                        max_length=args.max_length, feature_center=args.feature_center,
                        feature_scale=args.feature_scale)
    fed = FederationConfig(num_clients=args.banks, rounds=rounds, local_steps=steps, batch_size=batch, lr=lr,
                           optimizer=args.optimizer, alpha=args.alpha, lr_noise_ref=args.lr_noise_ref,
                           sample_rate=sample_rate or args.sample_rate)
    priv = PrivacyConfig(enabled=epsilon is not None, target_epsilon=epsilon or 4.0, max_grad_norm=clip,
                         share_noise=shared, max_grad_norm_final=clip * args.clip_final if epsilon is not None else 0.0)
    return VeilConfig(model=model, federation=fed, privacy=priv, secagg=SecAggConfig(enabled=shared),
                      data=DataConfig(train_path=str(train), test_path=str(TEST))).validate()


def federate(cfg: VeilConfig, shards: list[dict[str, torch.Tensor]], template: torch.nn.Module,
             splits: dict[str, dict[str, torch.Tensor]], *, seed: int = 0) -> dict[str, float]:
    """veil's rounds in one process (see the module docstring); the global head's accuracy on each split.

    Each bank plans and books its round as a simulated node does (:func:`veil.client.budget.plan_round` on its own
    ledger, with :func:`veil.client.round_plan.shard_sampling`): σ, q, the divisor of each noisy sum, the lr, and
    with ``privacy.share_noise`` one SGD step a round adding σ/sqrt(banks) of the run's σ (``--min-cohort`` = the
    number of banks). Without DP, veil's plain plan (a batch of ``federation.batch_size`` a step). SecAgg+ is
    described by ``cfg`` (shared noise needs it) but not run: the strategy sums the updates in clear."""
    strategy = make_strategy(cfg, initial=get_trainable(template))
    sigmas: list[float] = []
    with tempfile.TemporaryDirectory(prefix="veil-head-ledgers-") as tmp:
        nodes = [NodeSettings(data_path=None, text_column=None, label_column=None, max_epsilon=math.inf,
                              ledger_path=Path(tmp) / f"bank-{i}.json", device=None, partition_id=i,
                              num_partitions=len(shards), min_cohort=len(shards)) for i in range(len(shards))]
        for rnd in range(1, cfg.federation.rounds + 1):
            results = []
            for cid, (shard, node) in enumerate(zip(shards, nodes, strict=True)):
                sampling = shard_sampling(cfg, node, examples=int(shard["labels"].shape[0]))
                budget = plan_round(cfg, node, sampling, run_id="head_study", server_round=rnd, template=template)
                book(budget)
                if rnd == 1:
                    sigmas.append(budget.plan.noise_multiplier)
                res = train_round(template, strategy.global_arrays, shard, plan=budget.plan,
                                  device=torch.device("cpu"), seed=seed * 1_000_003 + rnd * 1_009 + cid, task=TASK)
                results.append((None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(res.update), 1, {})))
            strategy.aggregate_fit(rnd, results, [])  # type: ignore[arg-type]
    model = copy.deepcopy(template)
    set_trainable(model, strategy.global_arrays)
    scores = {name: TASK.evaluate(model, split, device=torch.device("cpu"))["accuracy"] for name, split in splits.items()}
    shared = cfg.privacy.share_noise  # the sum's σ: each bank's share times sqrt(banks)
    return {**scores, "sigma": float(np.mean(sigmas) * (len(shards) ** 0.5 if shared else 1.0))}


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def study(args: argparse.Namespace, argv: list[str] | None) -> None:
    info, started = machine_info(pick_device()), now()
    with tempfile.TemporaryDirectory(prefix="veil-head-") as tmp:
        train, val_path = carve_validation(TRAIN, Path(tmp), per_class=args.val_per_class)
        base = _config(args, train, lr=0.1, clip=1.0, epsilon=None, rounds=1, steps=1, batch=256)  # data, model
        labels = resolve_labels(base.data)
        t0 = time.perf_counter()
        examples = read_examples(str(train), base.data)
        key = f"{args.model_path or args.source}-{args.pooling}-{args.max_length}-{args.val_per_class}"
        cached = Path(args.feature_cache) / f"head_study-{key.replace('/', '_')}.pt" if args.feature_cache else None
        if cached is not None and cached.is_file():  # the frozen encoder's features of the same texts
            everything, splits = torch.load(cached, weights_only=True)
        else:
            everything = TASK.tensors(examples, labels, base, path=str(train))
            splits = {"validation": TASK.tensors(read_examples(str(val_path), base.data), labels, base,
                                                 path=str(val_path)),
                      "test": TASK.tensors(read_examples(str(TEST), base.data), labels, base, path=str(TEST))}
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.save((everything, splits), cached)
        if not args.test:
            splits.pop("test")
        featurize_s = time.perf_counter() - t0
        _ids, parts = simulated_partitions(TASK, examples, labels, {**vars(base.federation)}, path=str(train))
        shards = [{k: t[torch.as_tensor(parts[i])] for k, t in everything.items()} for i in range(args.banks)]
        template = build_model(base.model, labels, seed=0)
        rows: list[list[str]] = []

        def row(name: str, scores: dict[str, float], extra: str = "") -> None:
            rows.append([name, *(f"{100 * scores[s]:.1f}" for s in splits), extra])
            print(" | ".join(rows[-1]), flush=True)

        row("zero-shot (label-name head, round 0)",
            {s: TASK.evaluate(template, d, device=torch.device("cpu"))["accuracy"] for s, d in splits.items()})
        for i, shard in enumerate(shards):
            row(f"bank {i} alone, no DP ({int(shard['labels'].shape[0])} texts)",
                {s: probe_accuracy(shard, d) for s, d in splits.items()})
        row("pooled data, no DP", {s: probe_accuracy(everything, d) for s, d in splits.items()})
        grid = itertools.product(_floats(args.epsilons), _floats(args.lrs), _floats(args.clips),
                                 [int(v) for v in _floats(args.rounds)], [int(v) for v in _floats(args.steps)],
                                 [int(v) for v in _floats(args.batch)])
        for eps, lr, clip, rounds, steps, batch in grid:
            # --share-noise: the run's public q, the expected batch over the mean bank's size
            rate = min(0.99, batch * args.banks / len(examples)) if args.share_noise else 0.0
            cfg = _config(args, train, lr=lr, clip=clip, epsilon=None if eps == 0 else eps, rounds=rounds,
                          steps=steps, batch=batch, sample_rate=rate)
            t1 = time.perf_counter()
            runs = [federate(cfg, shards, template, splits, seed=seed) for seed in range(args.seeds)]
            scores = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
            per_seed = "" if args.seeds == 1 else "; per seed " + ", ".join(
                " / ".join(f"{100 * r[s]:.1f}" for s in splits) for r in runs)
            what = ("no DP" if eps == 0 else f"ε={eps:g}") + (
                f", shared noise (1 step a round, q={cfg.federation.sample_rate:.3f})" if cfg.privacy.share_noise
                else ", same shape (1 step a round, a batch of B a bank)" if args.share_noise else "")
            row(f"federated {what}, {args.optimizer} lr={lr:g}"
                + (f" × min(1, {args.lr_noise_ref:g}/σ)" if args.lr_noise_ref and eps else "") + f", C={clip:g}" + (f" -> {clip * args.clip_final:g}" if args.clip_final and eps else "")
                + f", {rounds}x{steps} steps, B={batch}", scores,
                f"σ {scores['sigma']:.2f}, {time.perf_counter() - t1:.0f} s{per_seed}")
    settings = (f"{args.banks} banks, Dirichlet α={args.alpha}, {args.model_path or args.source} frozen, pooling {args.pooling} "
                f"(resolved: {template.pooling if hasattr(template, 'pooling') else 'pooler'}), feature map "
                f"{args.feature_center} x {args.feature_scale:g}, head from label "
                f"names; validation: {args.val_per_class} texts per label carved from train.csv; features for "
                f"{len(examples)} training texts computed in {featurize_s:.0f} s"
                + ("; test: the BANKING77 test split" if args.test else ""))
    notes = ["bank i alone: logistic regression (C = veil.task.probe.PROBE_C) on its own share, no DP: what a bank "
             "gets without joining", "federated arms: ε per bank over all its rounds (PRV, δ 1e-5), σ the mean over banks (shared noise: the sum's σ)"]
    report("head_study", args, argv, info, settings=settings, headers=["arm", *(f"{s} acc %" for s in splits), "note"],
           rows=rows, notes=notes, elapsed=now() - started)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--banks", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--epsilons", default="4", help="comma list; 0 = no DP")
    ap.add_argument("--lrs", default="0.1")
    ap.add_argument("--clips", default="1")
    ap.add_argument("--clip-final", type=float, default=0.0,
                    help="privacy.max_grad_norm_final as a fraction of C (0: C every round)")
    ap.add_argument("--lr-noise-ref", type=float, default=0.0, help="federation.lr_noise_ref (0: the lr as given)")
    ap.add_argument("--rounds", default="20")
    ap.add_argument("--steps", default="20")
    ap.add_argument("--batch", default="256")
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--pooling", default="auto")
    ap.add_argument("--feature-center", default="none", help="model.feature_center: none | label_names")
    ap.add_argument("--feature-scale", type=float, default=1.0, help="model.feature_scale")
    ap.add_argument("--model-path", default="")
    ap.add_argument("--source", default="minilm", help="a packaged model when --model-path is empty: minilm | smollm2")
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--val-per-class", type=int, default=10)
    ap.add_argument("--share-noise", action="store_true",
                    help="privacy.share_noise: each bank adds σ/sqrt(banks); use --steps 1 --optimizer sgd")
    ap.add_argument("--sample-rate", type=float, default=0.0, help="federation.sample_rate (0: unset)")
    ap.add_argument("--seeds", type=int, default=1, help="federated arms: the mean over this many seeds of sampling and noise")
    ap.add_argument("--test", action="store_true", help="also score the test split (chosen settings only)")
    ap.add_argument("--feature-cache", default="", help="a directory keeping the frozen features between runs")
    from benchmarks.common import add_output_args

    add_output_args(ap, quick="--epsilons 4 --rounds 2 --steps 2", root=Path(__file__).resolve().parents[1])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    study(args, argv)


if __name__ == "__main__":
    main()
