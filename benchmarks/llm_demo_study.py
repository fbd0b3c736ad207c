"""Settings of ``make demo-llm`` (issue 26): SmolLM2-135M + LoRA on BANKING77 as instructions under DP-SGD,
screened on a validation split carved from the training file; the test split is read only with ``--test``, for an
arm already chosen on validation.

Every arm runs through the real ``veil simulate`` (subprocess, Flower, SecAgg+), as ``make demo-llm`` does, with the
demo's fixed part (:data:`BASE`) and the arm's own overrides. The table reads each run's ``summary.json``: the
closed-set ``choice_accuracy`` (log-likelihood choice among the 77 intent names) of the starting model (round 0)
and after the last round, the perplexity of the completion tokens, ε, and the run's wall clock.

    python -m benchmarks.llm_demo_study --arms "federation.lr=1e-2" "federation.lr=3e-2" --parallel
    python -m benchmarks.llm_demo_study --arms "federation.lr=3e-2" --test   # the chosen arm, once
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
from benchmarks.utility_study import TRAIN, carve_validation

ROOT = Path(__file__).resolve().parents[1]
BASE = ["task=causal_lm", "model=smollm2", "data=banking77_instructions", "model.max_length=64",
        "data.eval_max_examples=32"]


def launch(arm: str, out: Path, data: list[str]) -> tuple[subprocess.Popen[str], float]:
    """Start one arm; its console goes to ``out/console.log`` (a pipe left unread would stall a parallel arm)."""
    cmd = [sys.executable, "-m", "veil", "simulate", *BASE, *arm.split(), *data, f"hydra.run.dir={out}"]
    out.mkdir(parents=True)
    with open(out / "console.log", "w", encoding="utf-8") as log:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True), time.time()


def result(arm: str, proc: subprocess.Popen[str], started: float, out: Path) -> dict[str, float]:
    proc.wait()
    seconds = time.time() - started
    if proc.returncode != 0:
        lines = (out / "console.log").read_text(encoding="utf-8").strip().splitlines()
        raise SystemExit(f"{arm} failed: {lines[-1] if lines else proc.returncode}")
    summary = json.loads((out / "summary.json").read_text())
    before = summary.get("before_training", {})
    return {"choice0": float(before.get("choice_accuracy", float("nan"))),
            "choice": float(summary.get("choice_accuracy", float("nan"))),
            "ppl0": float(before.get("perplexity", float("nan"))), "ppl": float(summary["perplexity"]),
            "epsilon": float(summary.get("epsilon_max", 0.0)), "seconds": seconds,
            "examples": float(summary.get("eval_examples", 0))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="+", required=True,
                    help="each arm: space-separated `veil simulate` overrides added to the demo's fixed part")
    ap.add_argument("--parallel", action="store_true", help="run the arms side by side (wall clocks then overlap)")
    ap.add_argument("--test", action="store_true", help="score on the BANKING77 test split, training on the whole "
                    "training file, exactly as make demo-llm (only for arms chosen on validation)")
    ap.add_argument("--val-per-class", type=int, default=2, help="validation texts per intent carved from train.csv (at least 2: data.choices=auto takes the "
                    "closed set from completions that repeat)")
    add_output_args(ap, quick="unused (each arm is one real run)", root=ROOT)
    args = ap.parse_args(argv)
    info = machine_info(pick_device())
    started = now()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="veil-llm-study-") as tmp:
        data: list[str] = []
        if not args.test:
            train, val = carve_validation(TRAIN, Path(tmp), per_class=args.val_per_class)
            data = [f"data.train_path={train}", f"data.test_path={val}"]
        runs = {}
        for i, arm in enumerate(args.arms):
            out = Path(tmp) / f"run{i}"
            runs[arm] = (*launch(arm, out, data), out)
            if not args.parallel:
                results[arm] = result(arm, *runs[arm])
        for arm, run in runs.items():
            results.setdefault(arm, result(arm, *run))
    split = "test" if args.test else "validation"
    rows = [[arm, split, f"{r['choice0']:.3f}", f"{r['choice']:.3f}", f"{r['choice'] - r['choice0']:+.3f}",
             f"{r['ppl0']:.1f} → {r['ppl']:.1f}", f"{r['epsilon']:.2f}", f"{r['seconds'] / 60:.1f}"]
            for arm, r in results.items()]
    examples = int(next(iter(results.values()))["examples"])
    report("llm_demo_study", args, argv, info,
           settings=f"veil simulate {' '.join(BASE)} + each arm; {split}: {examples} queries "
                    + ("of the BANKING77 test split, training on all of train.csv" if args.test else
                       f"of {args.val_per_class} per intent carved from train.csv (trained on the rest)")
                    + ("; arms run side by side" if args.parallel and len(args.arms) > 1 else ""),
           headers=["arm", "split", "choice acc. round 0", "choice acc. last round", "gain", "perplexity",
                    "ε (δ=1e-5)", "wall clock min"],
           rows=rows, notes=["choice accuracy: the log-likelihood choice among the 77 intent names (veil's "
                             "choice_accuracy); round 0 is the starting model"], elapsed=now() - started)


if __name__ == "__main__":
    main()
