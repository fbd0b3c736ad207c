"""Utility benchmark on BANKING77 (issue 6 item 7): final test accuracy of a 10-bank federation (Dirichlet α=0.5
over intents, MiniLM-L6 + LoRA r=8) under sample-level DP at ε = 8, δ = 1e-5, against the same federation without
DP and against centralised non-private training of the same model with the same number of samples seen.

Every configuration runs through the real ``veil simulate`` command (subprocess), one after the other, and the
table reads each run's ``summary.json``. On a GPU machine run it without ``--reduced``; on 2 CPU cores the default
is the reduced version (fewer rounds and steps), and the recorded section says exactly what was reduced.

``--study`` (issue 15) compares server strategies and adapter variants at the same compute on a validation split
carved from the training data (never the test split): see ``benchmarks/utility_study.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import add_output_args, machine_info, now, pick_device, report

ROOT = Path(__file__).resolve().parents[1]


def configurations(*, rounds: int, steps: int, batch: int, clients: int, quick: bool) -> dict[str, list[str]]:
    """The three runs, as `veil simulate` overrides; the central run sees as many samples as each federation."""
    shared = [f"federation.rounds={rounds}", f"federation.batch_size={batch}", "federation.seed=0"]
    if quick:
        shared += ["model=tiny_bert", "federation.partitioner=iid"]
    fed = [*shared, f"federation.num_clients={clients}", f"federation.clients_per_round={clients}",
           f"federation.local_steps={steps}", "federation.alpha=0.5"]
    if not quick:
        fed.append("federation.partitioner=dirichlet")
    return {
        "federated, DP ε=8": [*fed, "privacy=dp_sgd", "privacy.target_epsilon=8", "privacy.delta=1e-5"],
        "federated, no DP": [*fed, "privacy=none"],
        "centralised, no DP": [*shared, "federation.num_clients=1", "federation.clients_per_round=1",
                               f"federation.local_steps={steps * clients}", "privacy=none", "secagg=off"],
    }


def run_one(name: str, overrides: list[str], out: Path, data: list[str]) -> dict[str, float]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "veil", "simulate", *overrides, *data, f"hydra.run.dir={out}"],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    summary = json.loads((out / "summary.json").read_text())
    return {"accuracy": float(summary["accuracy"]), "epsilon": float(summary.get("epsilon_max", 0.0)),
            "baseline": float(summary.get("majority_baseline", 0.0)), "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reduced", action=argparse.BooleanOptionalAction, default=None,
                    help="fewer rounds/steps (default: on without a GPU)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="DP steps per client per round")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--clients", type=int, default=10)
    add_output_args(ap, quick="tiny BERT on a 4-class file, 1 round (for the test)", root=ROOT)
    ap.add_argument("--data", nargs=2, type=Path, metavar=("TRAIN", "TEST"), help="--quick: the train/test CSV pair")
    ap.add_argument("--study", action="store_true", help="strategy/adapter arms scored on a validation split")
    ap.add_argument("--arms", nargs="+", help="--study: the arms to run, e.g. 'ε=8, fedavg, lora, lr=3e-2, C=0.1' "
                    "(default: utility_study.ARMS)")
    ap.add_argument("--lr-grid", nargs="+", type=float, help="--study: client lrs to cross every arm without lr= with")
    ap.add_argument("--clip-grid", nargs="+", type=float,
                    help="--study: clipping norms C to cross every DP arm without C= with")
    ap.add_argument("--test", action="store_true",
                    help="--study: also score on the BANKING77 test split (only arms chosen on validation)")
    ap.add_argument("--sealed", type=Path, metavar="JSON",
                    help="--study: write each arm's test accuracy to JSON only (table and log show validation), "
                         "to open for the arms chosen on validation once the choice is made")
    ap.add_argument("--val-per-class", type=int, default=10, help="--study: validation texts per intent")
    ap.add_argument("--fedadam-lr", type=float, default=0.01, help="--study: FedAdam's server learning rate")
    ap.add_argument("--fedavgm-lr", type=float, default=1.0, help="--study: FedAvgM's server learning rate")
    args = ap.parse_args(argv)
    if args.study:
        from benchmarks.utility_study import study

        args.rounds, args.steps = args.rounds or 3, args.steps or 2
        study(args, argv)
        return
    device = pick_device()
    reduced = args.reduced if args.reduced is not None else device.type != "cuda"
    rounds = args.rounds or (1 if args.quick else 2 if reduced else 10)
    steps = args.steps or (2 if args.quick else 3 if reduced else 10)
    data = ["data=csv", f"data.train_path={args.data[0]}", f"data.test_path={args.data[1]}"] if args.data else []
    info = machine_info(device)
    started = now()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="veil-utility-") as tmp:
        for i, (name, overrides) in enumerate(configurations(rounds=rounds, steps=steps, batch=args.batch_size,
                                                             clients=args.clients, quick=args.quick).items()):
            results[name] = run_one(name, overrides, Path(tmp) / f"run{i}", data)
    reference = results["federated, no DP"]["accuracy"]
    rows = [[name, f"{r['accuracy']:.4f}", f"{100 * (r['accuracy'] - reference):+.1f}",
             f"{r['epsilon']:.2f}" if r["epsilon"] else "–", f"{r['seconds']:.0f}"] for name, r in results.items()]
    gap = 100 * (reference - results["federated, DP ε=8"]["accuracy"])
    settings = (f"{args.clients} clients, Dirichlet α=0.5, MiniLM-L6 + LoRA r=8, head from label names, "
                f"{rounds} rounds × {steps} steps × batch {args.batch_size}; centralised: {steps * args.clients} "
                f"steps per round; evaluation on all 3,080 BANKING77 test texts"
                + ("; REDUCED for CPU (the full version: 10 rounds × 10 steps)" if reduced else ""))
    notes = [f"majority-class baseline {next(iter(results.values()))['baseline']:.4f}",
             f"DP federation is {gap:.1f} points below the non-private federation (goal: within 3 points): "
             + ("met" if gap <= 3 else "not met")]
    report("utility_banking77", args, argv, info, settings=settings,
           headers=["configuration", "accuracy", "Δ vs fed. no DP (points)", "ε (δ=1e-5)", "seconds"],
           rows=rows, notes=notes, elapsed=now() - started, extra_versions=("flwr",))


if __name__ == "__main__":
    main()
