"""Seconds per round and memory of ``veil simulate`` at population scale (issue 14 item 2): a large population
of simulated clients (1,000 by default), a few sampled per round, tiny BERT, DP-SGD and SecAgg+.

Each configuration is one ``python -m veil simulate`` subprocess; round seconds are the ServerApp's own figure
(``seconds`` in ``metrics.jsonl``). Memory is sampled once a second over the process tree (psutil RSS): the
coordinator (the ``veil simulate`` process: ServerApp, LinkState, simulation engine), each Ray worker (the
ClientApp actors, max over workers) and Ray's own daemons (summed). ``--before REF`` runs the same configuration
on the code of git revision ``REF`` too (extracted with ``git archive``), interleaved with the working tree's
runs, so before/after figures share the machine's load; on a shared machine compare them only side by side.

    python -m benchmarks.sim_scale --before be7cb10                 # 1,000 clients x 10 per round, 3 rounds
    python -m benchmarks.sim_scale --populations 100,1000,10000     # memory vs population
    python -m benchmarks.sim_scale --quick --no-record              # 20 clients, 2 rounds (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_output_args, machine_info, now, pick_device, report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "banking77"
TARGET = 3.0  # s per round after the first, issue 14 item 2


@dataclass
class Sample:
    """Peak resident memory (bytes) of each part of the process tree."""

    coordinator: int = 0
    worker_max: int = 0
    workers: int = 0
    ray_daemons: int = 0


@dataclass
class Outcome:
    code: str
    population: int
    seconds: list[float]
    memory: Sample
    wall: float
    error: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def overrides(population: int, per_round: int, rounds: int, run_dir: Path, extra: list[str]) -> list[str]:
    return ["model=tiny_bert", f"data.train_path={DATA / 'train.csv'}", f"data.test_path={DATA / 'test.csv'}",
            "data.eval_max_examples=200", "federation.partitioner=iid", f"federation.num_clients={population}",
            f"federation.clients_per_round={per_round}", f"federation.rounds={rounds}", "federation.batch_size=8",
            "federation.local_steps=2", "privacy.target_epsilon=0", "privacy.noise_multiplier=1.0",
            f"hydra.run.dir={run_dir}", *extra]


def _watch(pid: int, stop: threading.Event, peak: Sample) -> None:
    import psutil

    root = psutil.Process(pid)
    while not stop.wait(1.0):
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        workers, daemons = [], 0
        for p in procs:
            try:
                rss, cmd = p.memory_info().rss, " ".join(p.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if p.pid == pid:
                peak.coordinator = max(peak.coordinator, rss)
            elif "default_worker.py" in cmd or cmd.startswith("ray::"):
                workers.append(rss)
            else:
                daemons += rss
        peak.worker_max = max([peak.worker_max, *workers])
        peak.workers = max(peak.workers, len(workers))
        peak.ray_daemons = max(peak.ray_daemons, daemons)


def run_one(code: Path, label: str, population: int, per_round: int, rounds: int, extra: list[str],
            timeout: float) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="veil-simscale-") as tmp:
        run_dir = Path(tmp) / "run"
        env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0",
               "PYTHONWARNINGS": "ignore", "RAY_DEDUP_LOGS": "0"}
        cmd = [sys.executable, "-m", "veil", "simulate", *overrides(population, per_round, rounds, run_dir, extra)]
        log = Path(tmp) / "log.txt"
        peak, stop = Sample(), threading.Event()
        start = now()
        with open(log, "w", encoding="utf-8") as fh:
            # own process group: a timeout stops the run and the Ray daemons it started, nothing else
            proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
            watcher = threading.Thread(target=_watch, args=(proc.pid, stop, peak), daemon=True)
            watcher.start()
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = -9
            stop.set()
            watcher.join()
        wall = now() - start
        rows = []
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists():
            rows = [json.loads(ln) for ln in metrics.read_text(encoding="utf-8").splitlines() if ln.strip()]
        error = "" if rc == 0 else f"exit {rc}: " + log.read_text(encoding="utf-8")[-400:].replace("\n", " ")
        return Outcome(label, population, [float(r["seconds"]) for r in rows], peak, wall, error)


def checkout(ref: str, dest: Path) -> Path:
    """The tree of git revision ``ref`` (``git archive``), without touching the working tree."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def rows_for(outcomes: list[Outcome]) -> list[list[str]]:
    out = []
    for o in outcomes:
        later = o.seconds[1:]
        steady = statistics.median(later) if later else float("nan")
        verdict = ("met" if steady <= TARGET else "NOT met") if later else ""
        out.append([o.code, f"{o.population:,}", " / ".join(f"{s:.1f}" for s in o.seconds) or "-",
                    f"{steady:.2f}" if later else "-", verdict, _mib(o.memory.coordinator),
                    f"{_mib(o.memory.worker_max)} ({o.memory.workers})", _mib(o.memory.ray_daemons),
                    f"{o.wall:.0f}", o.error[:200]])
    return out


HEADERS = ["code", "clients", "round s (1 / 2 / ...)", "s/round after the first", f"<= {TARGET:g} s",
           "coordinator MiB", "Ray worker MiB, max (workers)", "Ray daemons MiB", "wall s", "error"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--populations", default="1000", help="comma-separated population sizes")
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--before", default="", help="git revision to compare with (run interleaved)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per simulation")
    ap.add_argument("--set", action="append", default=[], help="extra veil override (repeatable)")
    add_output_args(ap, quick="20 clients, 2 rounds", root=ROOT)
    args = ap.parse_args(argv)
    pops = [20] if args.quick else [int(p) for p in args.populations.split(",")]
    rounds = 2 if args.quick else args.rounds
    per_round = min(args.per_round, min(pops))
    info = machine_info(pick_device())
    start = now()
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="veil-before-") as tmp:
        codes = [("this tree", ROOT)]
        if args.before:
            codes.insert(0, (f"before ({args.before})", checkout(args.before, Path(tmp) / "tree")))
        for pop in pops:
            for label, code in codes:
                outcomes.append(run_one(code, label, pop, per_round, rounds, args.set, args.timeout))
                print(rows_for(outcomes[-1:])[0], flush=True)
    settings = (f"veil simulate, model=tiny_bert, BANKING77 train file split IID across the population, "
                f"{per_round} clients per round, {rounds} rounds, DP-SGD (sigma=1, 2 steps of B=8) + SecAgg+, "
                f"central evaluation on 200 test texts; Ray backend with veil's client_resources; "
                f"memory = peak RSS sampled every second")
    notes = [f"extra overrides: {' '.join(args.set)}" if args.set else "no extra overrides"]
    report("sim_scale", args, argv, info, settings=settings, headers=HEADERS, rows=rows_for(outcomes), notes=notes,
           elapsed=now() - start, extra_versions=("flwr", "ray"))


if __name__ == "__main__":
    main()
