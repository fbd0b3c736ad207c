"""LP-FT against the head alone at the same ε (issue 22, scope 2): does fine-tuning the encoder with LoRA after the
DP linear probe (Kumar et al., ICLR 2022, arXiv:2202.10054) beat the probe alone when both spend the same budget?

Each arm runs the real ``veil simulate`` (subprocess; SecAgg+ off, which changes no number and saves minutes) on
BANKING77's training file minus a carved validation split (never the test split), scored on that validation split:

* head alone: ``model=minilm`` as shipped (20 rounds × 20 steps), target ε = ``--epsilon``;
* LP-FT: the same head run at target ε = ``--probe-epsilon``, then ``model.tuning=lora model.init_from=<that run>``
  with each simulated owner's budget ``federation.node_max_epsilon=--epsilon``: the LoRA run's σ is raised so that
  both runs together stay within ``--epsilon`` in every owner's ledger (the ledgers carry over).

    python -m benchmarks.lpft_study --epsilon 4 --probe-epsilon 3 --lora-rounds 2 --lora-steps 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import add_output_args, machine_info, now, report
from benchmarks.utility_study import TRAIN, carve_validation

ROOT = Path(__file__).resolve().parents[1]


def simulate(overrides: list[str], out: Path) -> dict[str, float]:
    """One ``veil simulate`` run; its validation accuracy, largest ε and seconds (one clear line on failure)."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "veil", "simulate", *overrides, f"hydra.run.dir={out}"], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip() or str(proc.returncode)).splitlines()
        raise SystemExit(f"lpft_study: veil simulate {' '.join(overrides)} failed: {lines[-1]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"accuracy": float(summary["accuracy"]), "epsilon": float(summary.get("epsilon_max", 0.0)),
            "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epsilon", type=float, default=4.0, help="the budget both arms spend")
    ap.add_argument("--probe-epsilon", type=float, default=3.0, help="LP-FT: the probe run's target ε")
    ap.add_argument("--lora-rounds", type=int, default=2)
    ap.add_argument("--lora-steps", type=int, default=5)
    ap.add_argument("--lora-lr", type=float, default=3e-2, help="AdamW lr of the LoRA phase (docs/demo.md)")
    ap.add_argument("--val-per-class", type=int, default=10)
    add_output_args(ap, quick="(no effect)", root=ROOT)
    args = ap.parse_args(argv)
    info, started = machine_info(torch.device("cpu")), now()
    with tempfile.TemporaryDirectory(prefix="veil-lpft-") as tmp:
        train, val = carve_validation(TRAIN, Path(tmp), per_class=args.val_per_class)
        data = [f"data.train_path={train}", f"data.test_path={val}", "secagg=off", "task.evaluate_before=false"]
        head = simulate([*data, f"privacy.target_epsilon={args.epsilon}"], Path(tmp) / "head")
        probe = simulate([*data, f"privacy.target_epsilon={args.probe_epsilon}"], Path(tmp) / "probe")
        lpft = simulate([*data, "model.tuning=lora", f"model.init_from={Path(tmp) / 'probe'}",
                         f"privacy.target_epsilon={args.epsilon}", f"federation.node_max_epsilon={args.epsilon}",
                         f"federation.rounds={args.lora_rounds}", f"federation.local_steps={args.lora_steps}",
                         "federation.optimizer=adamw", f"federation.lr={args.lora_lr}", "federation.lr_noise_ref=0"],
                        Path(tmp) / "lpft")
    rows = [["head alone (model=minilm as shipped)", f"{100 * head['accuracy']:.1f}", f"{head['epsilon']:.3f}",
             f"{head['seconds']:.0f}"],
            [f"LP-FT, probe half (head at ε {args.probe_epsilon:g})", f"{100 * probe['accuracy']:.1f}",
             f"{probe['epsilon']:.3f}", f"{probe['seconds']:.0f}"],
            [f"LP-FT: then LoRA {args.lora_rounds}x{args.lora_steps}, AdamW lr {args.lora_lr:g}, within ε "
             f"{args.epsilon:g} in total", f"{100 * lpft['accuracy']:.1f}", f"{lpft['epsilon']:.3f}",
             f"{lpft['seconds']:.0f}"]]
    verdict = "beats" if lpft["accuracy"] > head["accuracy"] else "does NOT beat"
    report("lpft_study", args, argv, info,
           settings=(f"BANKING77, 5 banks, Dirichlet 0.5, MiniLM-L6; validation: {args.val_per_class} texts per label "
                     "carved from train.csv; veil simulate, SecAgg+ off"),
           headers=["arm", "validation acc %", "ε (largest owner, both runs)", "seconds"], rows=rows,
           notes=[f"LP-FT {verdict} the head alone at ε {args.epsilon:g} "
                  f"({100 * (lpft['accuracy'] - head['accuracy']):+.1f} points)"],
           elapsed=now() - started)


if __name__ == "__main__":
    main()
