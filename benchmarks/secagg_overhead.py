"""The cost of SecAgg+ (Bell et al., arXiv:2009.09039) in a veil round (issue 7): round time with Flower's
``SecAggPlusWorkflow`` (veil's settings, :func:`veil.server.app.fit_workflow_for`) vs the plain fit workflow,
simulated no-op clients (:mod:`benchmarks.noop_federation`), per update size.

One simulation per update size; inside it, plain and SecAgg+ rounds alternate (after one warm-up round of each,
which starts the Ray actors and is not counted), so load changes hit both alike. A round is what veil's
``RoundLoop`` times: the fit workflow and the (here empty) central evaluation. The clients do no training, so the
ratio is SecAgg+'s cost against the fixed cost of a round; the table also gives the added seconds, which is what a
round with real local training pays on top (see the ratio projected onto a measured training round).

    python -m benchmarks.secagg_overhead                      # 20 clients, 75k and 1M values; appends to docs
    python -m benchmarks.secagg_overhead --quick --no-record  # 4 clients, 1k values, 1 repeat (tests)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_output_args, machine_info, now, pick_device, report  # noqa: E402
from benchmarks.noop_federation import RoundRecord, Slot, client_spans, simulate, split_exchange  # noqa: E402
from veil.conf.schema import SecAggConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {75_000: 1.10, 1_000_000: 1.25}  # SecAgg+ / plain round time, issue 7 item 3
STOCK = {75_000: 1.20, 1_000_000: 1.49}  # LIBRARY_NOTES.md, measured before this benchmark existed
STAGES = ("setup", "share keys", "collect masked vectors", "unmask")


def schedule(clients: int, repeats: int, polls: list[float | None]) -> list[Slot]:
    warm = [Slot("warm-up", False, clients), Slot("warm-up", True, clients)]
    return warm + [Slot(name, name == "SecAgg+", clients, poll) for _ in range(repeats) for poll in polls
                   for name in ("plain", "SecAgg+")]


def poll_name(poll: float | None) -> str:
    return "Flower's grid polling (0.1 s)" if poll is None else f"TimedGrid polling every {poll:g} s"


def summarise(values: int, records: list[RoundRecord], spans: list[tuple[str, float, float]],
              project: float, poll: float | None) -> tuple[list[str], list[str]]:
    """One table row for this size and grid polling, and the per-stage line of its SecAgg+ rounds."""
    mine = [r for r in records if r.slot.poll_interval == poll]
    plain = [r.seconds for r in mine if r.slot.label == "plain"]
    secure = [r for r in mine if r.slot.label == "SecAgg+"]
    p, s = statistics.median(plain), statistics.median(r.seconds for r in secure)
    ratio = s / p
    target = TARGETS.get(values)
    verdict = "" if target is None else ("met" if ratio <= target else "NOT met")
    projected = (project + s - p) / project
    row = [f"{values:,}", poll_name(poll), str(len(plain)), f"{p:.3f}", f"{s:.3f}", f"{ratio:.2f}", f"{s - p:.3f}",
           f"{projected:.3f}", f"{STOCK.get(values, float('nan')):.2f}", f"<= {target}" if target else "-", verdict]
    parts = []
    for k, name in enumerate(STAGES):
        cells = [split_exchange(r.exchanges[k], spans) for r in secure if len(r.exchanges) == len(STAGES)]
        wall = statistics.median(r.exchanges[k].end - r.exchanges[k].start for r in secure
                                 if len(r.exchanges) == len(STAGES))
        work = statistics.median(c[3] for c in cells)
        parts.append(f"{name} {wall:.3f} s (ClientApp work summed over clients {work:.3f} s)")
    between = statistics.median(r.seconds - sum(e.end - e.start for e in r.exchanges) for r in secure)
    stage_line = f"{values:,} values, {poll_name(poll)}, SecAgg+ round by exchange (median): " + "; ".join(parts) + (
        f"; server outside the exchanges (unmasking, aggregation) {between:.3f} s")
    return row, [stage_line]


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--sizes", type=int, nargs="+", default=[75_000, 1_000_000], help="update sizes (values)")
    ap.add_argument("--repeats", type=int, default=5, help="plain/SecAgg+ round pairs per size (median reported)")
    ap.add_argument("--poll", type=float, nargs="*", default=[0.01],
                    help="also run every round with TimedGrid's own polling at these intervals (s)")
    ap.add_argument("--cpus-per-client", type=float, default=1.0,
                    help="backend_config client_resources num_cpus (Ray actors = cores / this; veil's default 1)")
    ap.add_argument("--project", type=float, default=30.0,
                    help="seconds of a round with real local training, to project the added time onto")
    add_output_args(ap, quick="4 clients, 1k values, 1 repeat (for tests)", root=ROOT)
    args = ap.parse_args(argv)
    if args.quick:
        args.clients, args.sizes, args.repeats = 4, [1000], 1
    if args.clients < 3:
        ap.error(f"--clients={args.clients} must be >= 3 (SecAgg+ needs num_shares=3 neighbours)")
    if args.repeats < 1 or min(args.sizes) < 1:
        ap.error("--repeats and --sizes must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    info = machine_info(pick_device())
    sa = SecAggConfig()
    rows, stage_lines = [], []
    start = now()
    with tempfile.TemporaryDirectory(prefix="veil-secagg-bench-") as tmp:
        for values in args.sizes:
            timings = Path(tmp) / f"timings-{values}.jsonl"
            polls: list[float | None] = [None, *args.poll]
            backend = {"client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": 0.0},
                       "init_args": {"include_dashboard": False}}
            records = simulate(schedule(args.clients, args.repeats, polls), values=values, num_nodes=args.clients,
                               timings=timings, secagg=sa, backend_config=backend)
            for poll in polls:
                row, lines = summarise(values, records, client_spans(timings), args.project, poll)
                rows.append(row)
                stage_lines += lines
    elapsed = now() - start
    headers = ["values", "server waits with", "pairs", "plain s", "SecAgg+ s", "x plain", "added s",
               f"x on a {args.project:g} s round", "stock x", "target", "verdict"]
    settings = (f"{args.clients} simulated no-op clients (veil's SecAgg+ guard mod, DeltaFedAvg, RoundLoop), "
                f"all sampled each round; SecAgg+ num_shares={sa.num_shares}, reconstruction_threshold="
                f"{sa.reconstruction_threshold}, clipping_range={sa.clipping_range:g}, quantization 2^22, modulus "
                f"2^32; Flower simulation engine, Ray backend, client_resources num_cpus="
                f"{args.cpus_per_client:g}; {args.repeats} interleaved "
                f"plain/SecAgg+ round pairs per size and grid polling after one warm-up round of each")
    report("secagg_overhead", args, argv, info, settings=settings, headers=headers, rows=rows, notes=stage_lines,
           elapsed=elapsed, extra_versions=("flwr", "ray", "numpy"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
