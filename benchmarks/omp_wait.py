"""What torch's OpenMP wait policy costs when several torch processes share the cores, as in ``make test`` (two
pytest sessions, Ray workers, each deployed node's processes) and in a simulation (Ray runs several clients at once).

By default libgomp's worker threads spin-wait at the end of every parallel region; on an oversubscribed machine a
spinning thread burns the core its descheduled sibling needs. ``OMP_WAIT_POLICY=PASSIVE`` makes them sleep instead.
Each arm starts ``--processes`` copies of the same fixed workload (matrix products of MiniLM-L6's widths: a batch of
256 × 384 through a 384 → 1536 → 384 feed-forward block, ``--iterations`` times) at once, with the policy set in
their environment before Python starts, and reports the slowest copy's wall clock and the mean CPU time. The arms
run one after the other on the same machine; compare the ratio, not the seconds (the load is recorded).

    python -m benchmarks.omp_wait                     # 1 and 3 processes, ACTIVE and PASSIVE; records
    python -m benchmarks.omp_wait --quick --no-record
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.common import add_output_args, machine_info, now, report

ROOT = Path(__file__).resolve().parents[1]
WORK = """
import json, time, torch
x, w = torch.randn(256, 384), torch.randn(384, 1536)
wall, cpu = time.time(), time.process_time()
for _ in range({iterations}):
    y = (x @ w).relu() @ w.T
print(json.dumps({{"wall": time.time() - wall, "cpu": time.process_time() - cpu}}))
"""


def arm(processes: int, policy: str, iterations: int) -> tuple[float, float]:
    """(slowest wall clock, mean CPU seconds) of ``processes`` copies started together under ``policy``."""
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    procs = [subprocess.Popen([sys.executable, "-c", WORK.format(iterations=iterations)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    runs = [json.loads(p.communicate()[0]) for p in procs]
    return max(r["wall"] for r in runs), sum(r["cpu"] for r in runs) / len(runs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", default="1,3", help="comma list of how many copies run at once")
    ap.add_argument("--iterations", type=int, default=1500)
    add_output_args(ap, quick="200 iterations, 1 and 2 processes", root=ROOT)
    args = ap.parse_args(argv)
    counts = [1, 2] if args.quick else [int(v) for v in args.processes.split(",")]
    iterations = 200 if args.quick else args.iterations
    info, started = machine_info(torch.device("cpu")), now()
    rows = []
    for count in counts:
        walls = {}
        for policy in ("ACTIVE", "PASSIVE"):
            wall, cpu = arm(count, policy, iterations)
            walls[policy] = wall
            rows.append([str(count), policy, f"{wall:.1f}", f"{cpu:.1f}",
                         f"{walls['ACTIVE'] / wall:.2f}" if policy == "PASSIVE" else "1.00"])
            print(" | ".join(rows[-1]), flush=True)
    report("omp_wait", args, argv, info,
           settings=f"{iterations} iterations of a 256x384 @ 384x1536 @ 1536x384 block per process, torch threads "
                    f"{torch.get_num_threads()} each; the arms run one after the other",
           headers=["processes", "OMP_WAIT_POLICY", "slowest wall s", "mean CPU s", "speed-up vs ACTIVE"],
           rows=rows, notes=["veil sets PASSIVE for itself and its children unless the environment says otherwise "
                             "(veil/cli.py), and the Makefile exports it"],
           elapsed=now() - started)


if __name__ == "__main__":
    main()
