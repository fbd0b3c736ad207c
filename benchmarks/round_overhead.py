"""The fixed cost of a federated round in Flower's simulation engine (issue 7): seconds per round with no-op
clients (:mod:`benchmarks.noop_federation`) at 2, 20 and 50 clients, and where the time goes.

One simulation of 50 nodes per backend setting (``--cpus-per-client``: Ray actors = cores / this); inside it the
rounds interleave the client counts (the strategy samples 2, 20 or 50 of the 50 nodes) and the two ways the server
can wait for replies (Flower's grid, which sleeps 0.1 s between pulls, or :class:`TimedGrid` polling every
``--poll`` s through the public push/pull API). The first round starts the Ray actors and is reported apart.

Each exchange splits into dispatch (server push -> first ClientApp starts: the engine's message extractor wakes
every 0.1 s), client span (first ClientApp start -> last ClientApp end: Ray round trips, ``actors`` at a time) and
collection (last ClientApp end -> the server holds every reply: the grid's pull interval).

    python -m benchmarks.round_overhead                      # records to benchmarks/results/
    python -m benchmarks.round_overhead --quick --no-record  # 4 nodes, 1 repeat (tests)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_output_args, machine_info, now, pick_device, report  # noqa: E402
from benchmarks.noop_federation import RoundRecord, Slot, client_spans, simulate, split_exchange  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.0  # s per round at 50 no-op clients, issue 7 item 3
STOCK = "4.0-4.4"  # LIBRARY_NOTES.md


def schedule(counts: list[int], repeats: int, polls: list[float | None]) -> list[Slot]:
    warm = [Slot("warm-up", False, max(counts))]
    return warm + [Slot("round", False, n, poll) for _ in range(repeats) for poll in polls for n in counts]


def poll_name(poll: float | None) -> str:
    return "grid 0.1 s (Flower)" if poll is None else f"TimedGrid {poll:g} s"


def rows_for(cpus: float, records: list[RoundRecord], spans: list[tuple[str, float, float]], counts: list[int],
             polls: list[float | None]) -> list[list[str]]:
    actors = max(1, int((os.cpu_count() or 1) // cpus))
    out = []
    for poll in polls:
        for n in counts:
            mine = [r for r in records
                    if r.slot.label == "round" and r.slot.clients == n and r.slot.poll_interval == poll]
            parts = [split_exchange(r.exchanges[0], spans) for r in mine if r.exchanges]
            sec = statistics.median(r.seconds for r in mine)
            med = [statistics.median(p[k] for p in parts) for k in range(4)]
            server = statistics.median(r.seconds - sum(e.end - e.start for e in r.exchanges) for r in mine)
            per_msg = med[1] * min(actors, n) / n
            verdict = ("met" if sec <= TARGET else "NOT met") if n == 50 else ""
            out.append([f"{cpus:g} ({actors} actors)", poll_name(poll), str(n), str(len(mine)), f"{sec:.3f}",
                        f"{med[0]:.3f}", f"{med[1]:.3f}", f"{med[2]:.3f}", f"{med[3]:.3f}", f"{per_msg * 1000:.0f}",
                        f"{server:.3f}", verdict])
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[2, 20, 50], help="clients sampled per round")
    ap.add_argument("--cpus-per-client", type=float, nargs="+", default=[1.0, 0.25],
                    help="backend_config client_resources num_cpus, one simulation each (1.0 is veil's default)")
    ap.add_argument("--poll", type=float, nargs="*", default=[0.01], help="TimedGrid pull intervals to try (s)")
    ap.add_argument("--values", type=int, default=103_373, help="update size (default: veil's LoRA MiniLM-L6)")
    ap.add_argument("--repeats", type=int, default=4, help="rounds per configuration (median reported)")
    add_output_args(ap, quick="2 and 4 clients, 1k values, 1 repeat (for tests)", root=ROOT)
    args = ap.parse_args(argv)
    if args.quick:
        args.counts, args.cpus_per_client, args.values, args.repeats = [2, 4], [1.0], 1000, 1
    if args.repeats < 1 or min(args.counts) < 1 or min(args.cpus_per_client) <= 0:
        ap.error("--repeats, --counts and --cpus-per-client must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    info = machine_info(pick_device())
    polls: list[float | None] = [None, *args.poll]
    nodes = max(args.counts)
    rows, firsts = [], []
    start = now()
    with tempfile.TemporaryDirectory(prefix="veil-round-bench-") as tmp:
        for cpus in args.cpus_per_client:
            timings = Path(tmp) / f"timings-{cpus}.jsonl"
            backend = {"client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
                       "init_args": {"include_dashboard": False}}
            records = simulate(schedule(args.counts, args.repeats, polls), values=args.values, num_nodes=nodes,
                               timings=timings, backend_config=backend)
            rows += rows_for(cpus, records, client_spans(timings), args.counts, polls)
            firsts.append(f"num_cpus={cpus:g}: first round (starts the actors) {records[0].seconds:.2f} s")
    elapsed = now() - start
    headers = ["cpus/client", "server waits with", "clients", "rounds", "s/round", "dispatch s", "client span s",
               "collection s", "ClientApp work s", "ms/message/actor", "server s", "<= 1.0 s at 50"]
    settings = (f"{nodes} simulated no-op nodes, {args.values:,}-value update, plain fit workflow (veil's "
                f"DeltaFedAvg + RoundLoop, veil's SecAgg+ guard mod); client counts and grid polling interleaved, "
                f"{args.repeats} rounds each after one warm-up round; one simulation per cpus/client; stock figure "
                f"{STOCK} s per round (LIBRARY_NOTES.md)")
    report("round_overhead", args, argv, info, settings=settings, headers=headers, rows=rows, notes=firsts,
           elapsed=elapsed, extra_versions=("flwr", "ray", "numpy"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
