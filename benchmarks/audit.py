"""The one-run privacy audit (issue 13; Steinke, Nasr, Jagielski, arXiv:2305.08846): the empirical lower bound on ε
from ``veil audit`` beside the claimed ε, for target ε ∈ {1, 4, 8} and without DP, on the tiny BERT (CPU).

``--score gradient-canary`` (the default, issue 26) audits with white-box gradient canaries (veil/audit/gradient.py):
1,000 Dirac canaries at the clip norm, 100 guessed in and 100 out, in one data owner's DP-SGD steps (tiny BERT, full
fine-tuning, so that most canary coordinates are word-embedding rows no record uses; plain SGD and FedAvg, so that the
score is linear in the injected gradients; 2 rounds × 5 full-batch steps, q = 1). Each DP row runs the audit's
control arm too (same canaries, DP off); the "ideal attack" is the median bound of scores μ·[included] + N(0, 1), μ =
sqrt(T)/σ with the σ the node calibrates: what any score could show against the Gaussian noise at this m and k.

Every configuration is one real ``veil audit`` command (subprocess), one after the other, on the same synthetic
4-class file, with the audit design the CI tests use (random-word canaries with random labels, full-batch local
steps so that an included canary is in every step, k guessed in and k out), scored black-box (the final model's
loss, the default) or white-box (``--score gradient``: every round's global update against each canary's gradient
direction). The table also gives the ceiling: the bound that k + k guesses, all right, would give; no run can show
more than that.

``--level client`` audits client-level DP instead (``privacy=client_dp``, distributed noise shares under SecAgg+;
``privacy=none privacy.level=client`` for ∞): m canary clients beside 3 data owners, each sending a random direction
at the clip norm or, when not included, a zero update, scored by the published model's change along its direction.

    python -m benchmarks.audit --epsilons 4                               # gradient canaries, with the control arm
    python -m benchmarks.audit --score loss                               # 256 canary records; the loss score
    python -m benchmarks.audit --score gradient --epsilons 8,inf          # canary records, white-box
    python -m benchmarks.audit --level client                             # 200 canary clients, 2 rounds
    python -m benchmarks.audit --quick --no-record                        # 64 canaries, 1 round (for the test)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_output_args, machine_info, now, pick_device, report  # noqa: E402
from veil.audit.result import score_name  # noqa: E402
from veil.privacy.audit_bound import epsilon_lower_bound  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_SCORED = {"gradient-canary": "the published model's change at each gradient canary's coordinate (white-box)",
           "loss": "the final model's loss (black-box)",
           "gradient": "Σ over rounds of the global update against each canary's gradient direction (white-box)",
           "direction": "the published model's change w_R − w_0 against each canary client's direction (white-box)"}
_WORDS = {"card": "my card was lost", "cash": "the atm kept my cash", "fee": "why a fee on transfer",
          "pin": "i forgot my pin code"}


def write_data(folder: Path) -> list[str]:
    """A 4-class train/test pair (60 / 12 texts), as `veil simulate` overrides."""
    train = ["text,label"] + [f"{text} {i},{label}" for label, text in _WORDS.items() for i in range(15)]
    test = ["text,label"] + [f"{text} again {i},{label}" for label, text in _WORDS.items() for i in range(3)]
    (folder / "train.csv").write_text("\n".join(train) + "\n", encoding="utf-8")
    (folder / "test.csv").write_text("\n".join(test) + "\n", encoding="utf-8")
    return ["data=csv", f"data.train_path={folder / 'train.csv'}", f"data.test_path={folder / 'test.csv'}"]


def run_one(name: str, audit_args: list[str], overrides: list[str], out: Path) -> dict[str, float | None]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "veil", "audit", *audit_args, *overrides, f"hydra.run.dir={out}"],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    if not (out / "audit.json").is_file():
        raise SystemExit(f"{name} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    doc = json.loads((out / "audit.json").read_text(encoding="utf-8"))
    return {**doc, "seconds": time.perf_counter() - started}


def _plan(args: argparse.Namespace) -> tuple[int, int, int, int, str, list[str]]:
    """m, k, rounds, local steps, score and the runs' shared overrides for ``args.level``."""
    if args.level == "client":
        m = args.canaries or (24 if args.quick else 200)
        rounds, steps = args.rounds or (1 if args.quick else 2), args.steps or 2
        base = ["model=tiny_bert", "federation.batch_size=64", "federation.partitioner=iid", "federation.num_clients=3",
                f"federation.local_steps={steps}", f"federation.rounds={rounds}", "federation.seed=0"]
        return m, m // 4, rounds, steps, "direction", base
    if (args.score or "gradient-canary") == "gradient-canary":
        m = args.canaries or (200 if args.quick else 1000)
        rounds, steps = args.rounds or (1 if args.quick else 2), args.steps or 5
        base = ["model=tiny_bert", "model.tuning=full", "federation.batch_size=256", "federation.optimizer=sgd",
                "federation.lr=0.1", "federation.partitioner=iid", f"federation.local_steps={steps}",
                "federation.num_clients=1", f"federation.rounds={rounds}", "secagg=off", "federation.seed=0"]
        return m, m // 10, rounds, steps, "gradient-canary", base
    m = args.canaries or (64 if args.quick else 256)
    rounds, steps = args.rounds or (1 if args.quick else 3), args.steps or 40
    base = ["model=tiny_bert", f"federation.batch_size={4 * m}", "federation.lr=0.05", "federation.partitioner=iid",
            f"federation.local_steps={steps}", "federation.num_clients=2", "federation.clients_per_round=2",
            f"federation.rounds={rounds}", "secagg=off", "federation.seed=0"]
    return m, m // 8, rounds, steps, args.score or "loss", base


def ideal_bound(*, m: int, k: int, mu: float, draws: int = 400, seed: int = 0) -> float:
    """Median bound of the ideal attack at this audit's size: canary i scores μ·[included] + N(0, 1), which is how a
    canary client's score is distributed when only the Gaussian noise of the sum hides it (μ = sqrt(rounds)/z: S per
    round against noise z·S). The reference for what any score could show with m canaries and k + k guesses."""
    import numpy as np

    from veil.privacy.audit_bound import guess_top_bottom

    rng = np.random.default_rng(seed)
    bounds = []
    for _ in range(draws):
        included = rng.random(m) < 0.5
        scores = (mu * included if np.isfinite(mu) else 1e9 * included) + rng.standard_normal(m)
        g = guess_top_bottom(scores, included, k_in=k, k_out=k)
        bounds.append(epsilon_lower_bound(m=m, r=g.r, v=g.v, delta=1e-5, beta=0.05))
    return float(np.median(bounds))


def _ideal(level: str, eps: str, *, m: int, k: int, rounds: int, score: str = "", steps: int = 0) -> str:
    if level == "client":
        from veil.privacy.client_level import calibrate_client_level

        mu = float("inf") if eps == "inf" else rounds ** 0.5 / calibrate_client_level(
            target_epsilon=float(eps), delta=1e-5, client_rate=1.0, rounds=rounds)
    elif score == "gradient-canary":  # one owner, q = 1: C per step against noise σC per step, over T = rounds × steps
        from veil.privacy.calibration import calibrate_noise_multiplier

        mu = float("inf") if eps == "inf" else (rounds * steps) ** 0.5 / calibrate_noise_multiplier(
            target_epsilon=float(eps), delta=1e-5, sample_rate=1.0, steps=rounds * steps)
    else:
        return "–"
    return f"{ideal_bound(m=m, k=k, mu=mu):.3f}"


def _privacy(level: str, eps: str) -> list[str]:
    if level == "client":
        return ["privacy=none", "privacy.level=client"] if eps == "inf" else [
            "privacy=client_dp", f"privacy.target_epsilon={eps}"]
    return ["privacy=none"] if eps == "inf" else ["privacy=dp_sgd", f"privacy.target_epsilon={eps}"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--level", choices=("sample", "client"), default="sample",
                    help="sample: canary records, DP-SGD (default); client: canary clients, client-level DP")
    ap.add_argument("--canaries", type=int, default=None,
                    help="m (default: gradient-canary 1000, loss/gradient 256, client level 200; --quick 200 / 64 / 24)")
    ap.add_argument("--rounds", type=int, default=None, help="default: gradient-canary 2, loss/gradient 3, client level 2; --quick 1")
    ap.add_argument("--steps", type=int, default=None,
                    help="local steps per round (default: gradient-canary 5, loss/gradient 40, client level 2)")
    ap.add_argument("--epsilons", default="1,4,8,inf", help="target ε values; inf: DP off")
    ap.add_argument("--score", type=score_name, choices=("gradient-canary", "loss", "gradient"), default=None,
                    help="sample level: gradient-canary (formerly grad), white-box gradient canaries (default); loss, canary records by the "
                         "final model's loss (black-box); gradient, canary records by each round's update. Client "
                         "level always scores the canary clients' directions")
    add_output_args(ap, quick="64 canaries (24 canary clients), 1 round, ε ∈ {8, inf} (for the test)", root=ROOT)
    args = ap.parse_args(argv)
    m, k, rounds, steps, score, base = _plan(args)
    epsilons = ["8", "inf"] if args.quick else [e.strip() for e in args.epsilons.split(",")]
    info = machine_info(pick_device())
    started = now()
    rows = []
    with tempfile.TemporaryDirectory(prefix="veil-audit-") as tmp:
        data = write_data(Path(tmp))
        for eps in epsilons:
            name = "no DP" if eps == "inf" else f"DP, target ε={eps}"
            r = run_one(name, ["--canaries", str(m), "--guesses", str(k), "--score", score],
                        [*base, *_privacy(args.level, eps), *data], Path(tmp) / eps)
            claimed = "∞" if r["claimed_epsilon"] is None else f"{r['claimed_epsilon']:.3f}"
            control = r.get("control")
            power = "–" if not control else f"{control['lower_bound']:.3f} ({control['correct']}/{control['guesses']})"
            rows.append([name, claimed, f"{r['lower_bound']:.3f}", power,
                         _ideal(args.level, eps, m=m, k=k, rounds=rounds, score=score, steps=steps),
                         f"{r['correct']}/{r['guesses']}", str(r["verdict"]), f"{r['seconds']:.0f}"])
    ceiling = epsilon_lower_bound(m=m, r=2 * k, v=2 * k, delta=1e-5, beta=0.05)
    if score == "gradient-canary":
        settings = (f"tiny BERT, full fine-tuning (model.tuning=full), 1 data owner (a 60-text 4-class file), {rounds} "
                    f"rounds × {steps} full-batch local DP-SGD steps (q = 1), plain SGD lr 0.1, FedAvg, SecAgg+ off, "
                    f"δ = 1e-5; {m} gradient canaries (Dirac, norm C = 1, each included with probability 1/2), {k} "
                    f"guessed in + {k} out by {_SCORED[score]}; 95% confidence; each DP row with its control arm "
                    "(same canaries, DP off)")
    elif args.level == "client":
        settings = (f"client level: tiny BERT + LoRA r=4, 3 data owners (IID share of a 60-text 4-class file) and {m} "
                    f"canary clients, every client in each of {rounds} rounds ({steps} local steps for the owners), "
                    f"client_dp (clip S = 0.5, distributed noise shares, z calibrated to the target over {rounds} "
                    f"rounds with q = 1) under SecAgg+, no DP: privacy=none; δ = 1e-5; {k} guessed in + {k} out by "
                    f"{_SCORED[score]}; 95% confidence")
    else:
        settings = (f"tiny BERT + LoRA r=4, 2 clients (IID share of a 60-text 4-class file), {rounds} rounds × "
                    f"{steps} full-batch local steps (q = 1), lr 0.05, SecAgg+ off, δ = 1e-5; {m} canaries "
                    f"(8 random words, random label), {k} guessed in + {k} out by {_SCORED[score]}; 95% confidence")
    notes = [f"ceiling: {2 * k} right guesses out of {2 * k} would give ε ≥ {ceiling:.3f}; no run of this size can "
             "show more, whatever its true ε",
             f"{score} score, one run, CPU scale: a bound far below the claim proves nothing about privacy; a bound "
             "above the claim would be a bug (the tests plant one and see it flagged)"]
    if args.level == "client":
        notes.append("ideal attack: the median bound (400 simulated draws) of scores μ·[included] + N(0, 1), μ = "
                     "sqrt(rounds)/z, i.e. the best any score can do against the Gaussian noise of the sum at this m "
                     "and k (benchmarks/audit.py, ideal_bound)")
    report("audit", args, argv, info, settings=settings,
           headers=["configuration", "claimed ε", "lower bound (95%)", "without DP (control)", "ideal attack (median)",
                    "right guesses",
                    "verdict", "seconds"],
           rows=rows, notes=notes, elapsed=now() - started, extra_versions=("flwr",))


if __name__ == "__main__":
    main()
