"""A deployment's scale curve, soak and coordinator kills on loopback (issue 27, cases 2, 5 and 6), with the fault harness of
:mod:`benchmarks.loopback` (``veil server`` with TLS, node authentication and SecAgg+; ``veil client`` nodes with
``--threads 1``; DP-SGD on the tiny BERT, 24 examples per node).

Scale: seconds per deployed round at 3, 6 and 12 nodes, every node in every round (the ServerApp's ``seconds`` in
``metrics.jsonl``, median of rounds 2.. ; round 1 includes the nodes' start). Soak: 50 rounds with 3 nodes; the
resident memory (RSS, kernel's figure) and open file descriptors of the coordinator's process tree and of each
node's tree, sampled at every round's end; reported as the least-squares slope per round over the second half of
the run (the first rounds load models and caches) and the change from the first to the last sample; and each
node's ledger event count against the rounds it trained.

Coordinator kills: one deployment of 3 nodes; ``veil server`` gets SIGKILL at each SecAgg+ stage in turn (when node
1's executor receives that stage's message; ``between``: the moment a round's line appears), then ``veil server
--resume`` with the same flags. Per kill: the round in flight, the last checkpoint (the project's reader), whether
the resumed run said it continued from that checkpoint's weights, what the first resumed round sampled and whether a
node dropped out of it, and the seconds from the kill to the next completed round. At the end: each round exactly
once in ``metrics.jsonl``, and each node's ledger (one event per run and round) against the rounds it trained.

    python -m benchmarks.deploy_faults                       # scale 3,6,12 x 4 rounds; soak 50 rounds; 5 kills
    python -m benchmarks.deploy_faults --quick --no-record   # scale 3 x 2 rounds; soak 6 rounds; kill at unmask
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_output_args, machine_info, now, pick_device, report  # noqa: E402
from benchmarks.loopback import Loopback, alive, wait_for  # noqa: E402
from veil.server.checkpoint import checkpoint_files, latest_checkpoint, read_checkpoint, weights_sha256  # noqa: E402
from veil.supervise import _descendants  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _tree_usage(root_pid: int) -> tuple[float, int]:
    """(RSS in MiB, open file descriptors) of ``root_pid`` and its descendants."""
    rss_kb, fds = 0, 0
    for pid in [root_pid, *_descendants(root_pid)]:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss_kb += int(line.split()[1])
            fds += sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
    return rss_kb / 1024, fds


def _overrides(rounds: int) -> list[str]:
    return [f"federation.rounds={rounds}", "privacy.noise_multiplier=0.8", "privacy.target_epsilon=0"]


def _deploy(root: Path, nodes: int, rounds: int, sample: bool = False) -> tuple[list[dict], list[list[float]]]:  # type: ignore[type-arg]
    """One deployment to its end; returns the metrics rows and, with ``sample``, one row per round end:
    [round, coordinator MiB, coordinator fds, then MiB and fds per node]."""
    # a soak's nodes may spend more than the default budget: 50 rounds at sigma 0.8 pass epsilon 100 near round 27
    lb = Loopback(root, nodes, node_flags=["--max-epsilon", "1000"] if sample else None)
    samples: list[list[float]] = []
    try:
        lb.start_server(_overrides(rounds), timeout=60 * 60)
        for n in range(1, nodes + 1):
            lb.start_node(n)
        assert lb.server is not None
        seen = 0
        while lb.server.poll() is None:
            done = lb.rounds_done()
            if sample and done > seen:
                seen = done
                row: list[float] = [done, *_tree_usage(lb.server.pid)]
                for n in range(1, nodes + 1):
                    row += list(_tree_usage(lb.clients[n].pid))
                samples.append(row)
            time.sleep(0.2)
        lb.server.wait_output()
        if lb.server.poll() != 0:
            raise RuntimeError(f"veil server exited with {lb.server.poll()}: {' | '.join(lb.server_out[-5:])}")
        rows = [json.loads(ln) for ln in (lb.run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        if sample:  # ledger events against rounds trained, per node
            from veil.privacy.ledger import PrivacyLedger

            for n in range(1, nodes + 1):
                trained = lb.log_text(n).count(": trained on ")
                samples.append([-n, len(PrivacyLedger.open(lb.ledger_path(n), create=False).events), trained])
        return rows, samples
    finally:
        lb.close()


STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask", "between")


def _kill_coordinator_at(lb: Loopback, stage: str, overrides: list[str]) -> str:
    """Kill ``veil server`` at ``stage`` of the next round, resume it, wait for the round after; one line."""
    if stage == "between":
        done = lb.rounds_done()
        wait_for(lambda: lb.rounds_done() > done, 300, "a round to end")
    else:
        lb.wait_stage(1, stage, lb.log_size(1))
    in_flight, killed = lb.rounds_done() + 1, time.monotonic()
    tree = lb.kill_server()
    ckpt = latest_checkpoint(lb.run_dir)
    last = ckpt.round if ckpt else 0
    lingering = len(alive(tree))  # Flower processes shutting down after their SuperLink died
    lb.start_server(overrides, resume=True, timeout=60 * 60)
    left = alive(tree)
    lb.wait_round(last + 1, timeout=600)
    text = lb.serverapp_log()
    sha = weights_sha256(ckpt.arrays) if ckpt else ""
    first = text.split("Secure aggregation completed", 1)[0]
    sampled = first.split("strategy sampled ", 1)[1].split(")", 1)[0] + ")" if "strategy sampled " in first else "?"
    resumed = "resumed from its weights" if f"resuming after round {last} from weights sha256 {sha}" in text else \
        "did NOT say it resumed from its weights"
    return (f"coordinator kill at {stage}: round {in_flight} in flight, last checkpoint round {last}, {resumed}; "
            f"first resumed round sampled {sampled}, {'a node dropped out' if 'dropped out' in first else 'no drop-out'}; "
            f"{time.monotonic() - killed:.1f} s from the kill to round {last + 1}'s end; {lingering} coordinator "
            f"process(es) still ran when the SuperLink had died, {len(left)} once resumed")


def _coordinator_kills(root: Path, stages: list[str]) -> list[str]:
    """One 3-node deployment, the coordinator killed at each of ``stages`` in turn; the notes to report."""
    from veil.privacy.ledger import PrivacyLedger

    rounds = 2 * len(stages) + 2
    overrides = [*_overrides(rounds), "secagg.timeout=20"]
    lb = Loopback(root, 3)
    try:
        lb.start_server(overrides, timeout=60 * 60)
        for n in (1, 2, 3):
            lb.start_node(n)
        lb.wait_round(1)
        notes = [_kill_coordinator_at(lb, stage, overrides) for stage in stages]
        server = lb.server
        assert server is not None
        wait_for(lambda: server.poll() is not None, 900, "the resumed run to finish")
        server.wait_output()
        rows = [json.loads(ln) for ln in (lb.run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        saved = {read_checkpoint(p).round: read_checkpoint(p).meta["weights_sha256"] for p in checkpoint_files(lb.run_dir)}
        notes += [f"coordinator kills: veil server exit {server.poll()}; metrics rounds "
                 f"{[r['round'] for r in rows]} (planned 1..{rounds}, each once); checkpoint weights == metrics "
                 f"weights for every round: {all(saved.get(r['round']) == r['weights_sha256'] for r in rows)}"]
        for n in (1, 2, 3):
            events = PrivacyLedger.open(lb.ledger_path(n), create=False).events
            booked = {(e.run_id, e.round) for e in events}
            notes.append(f"coordinator kills, node {n}: ledger events {len(events)} ({len(booked)} distinct run/round), "
                         f"rounds trained {lb.log_text(n).count(': trained on ')}, runs {len({e.run_id for e in events})}")
        return notes
    finally:
        lb.close()


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="3,6,12", help="node counts of the scale curve")
    ap.add_argument("--scale-rounds", type=int, default=4, help="rounds per scale point (the first is apart)")
    ap.add_argument("--soak-rounds", type=int, default=50, help="rounds of the soak (3 nodes; 0: no soak)")
    ap.add_argument("--coordinator-kills", default=",".join(STAGES),
                    help=f"stages at which veil server is killed and resumed, in turn ('': none; of {','.join(STAGES)})")
    add_output_args(ap, quick="scale 3 nodes x 2 rounds, soak 6 rounds, coordinator kill at unmask (minutes)", root=ROOT)
    args = ap.parse_args(argv)
    if args.quick:
        args.scale, args.scale_rounds, args.soak_rounds, args.coordinator_kills = "3", 2, 6, "unmask"
    args.scale = [int(n) for n in str(args.scale).split(",") if n.strip()]
    args.coordinator_kills = [s.strip() for s in str(args.coordinator_kills).split(",") if s.strip()]
    if set(args.coordinator_kills) - set(STAGES):
        ap.error(f"--coordinator-kills takes stages of {','.join(STAGES)}, got {','.join(args.coordinator_kills)}")
    if args.scale_rounds < 2 or any(n < 3 for n in args.scale):
        ap.error("--scale-rounds must be >= 2 and every --scale node count >= 3 (SecAgg+ needs 3)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    info = machine_info(pick_device())
    start = now()
    table, notes = [], []
    with tempfile.TemporaryDirectory(prefix="veil-faults-bench-") as tmp:
        base = None
        for nodes in args.scale:
            rows, _ = _deploy(Path(tmp) / f"scale-{nodes}", nodes, args.scale_rounds)
            steady = statistics.median(float(r["seconds"]) for r in rows[1:])
            base = base or steady
            table.append([f"scale: {nodes} nodes", f"{float(rows[0]['seconds']):.1f}", f"{steady:.1f}",
                          f"x{steady / base:.2f}", str(min(int(r["clients"]) for r in rows))])
            notes.append(f"{nodes} nodes: round seconds " + ", ".join(f"{float(r['seconds']):.1f}" for r in rows))
        if args.soak_rounds:
            rows, samples = _deploy(Path(tmp) / "soak", 3, args.soak_rounds, sample=True)
            usage = [s for s in samples if s[0] > 0]
            half = usage[len(usage) // 2:]
            steady = statistics.median(float(r["seconds"]) for r in rows[1:])
            table.append(["soak: 3 nodes", f"{float(rows[0]['seconds']):.1f}", f"{steady:.1f}", "",
                          str(min(int(r["clients"]) for r in rows))])
            notes.append(f"soak: {len(rows)} of {args.soak_rounds} rounds ran (fewer: the nodes' budgets ran out)")
            for label, col in [("coordinator", 1)] + [(f"node {n}", 1 + 2 * n) for n in (1, 2, 3)]:
                xs, mib, fds = [s[0] for s in half], [s[col] for s in half], [s[col + 1] for s in half]
                notes.append(f"soak {label}: RSS {usage[0][col]:.0f} -> {usage[-1][col]:.0f} MiB, slope over rounds "
                             f"{int(xs[0])}-{int(xs[-1])} {_slope(xs, mib) * 1024:+.0f} KiB/round; open fds "
                             f"{usage[0][col + 1]:.0f} -> {usage[-1][col + 1]:.0f} (slope {_slope(xs, fds):+.2f}/round)")
            for s in samples:
                if s[0] < 0:
                    notes.append(f"soak node {int(-s[0])}: ledger events {int(s[1])}, rounds trained {int(s[2])}")
        if args.coordinator_kills:
            notes += _coordinator_kills(Path(tmp) / "kills", args.coordinator_kills)
    headers = ["deployment", "round 1 s (nodes start)", "s/round (rounds 2..)", "vs first scale point",
               "fewest clients in a round"]
    settings = ("loopback: veil server (SuperLink, TLS, node auth, SecAgg+ 3 shares) + n veil client nodes "
                "(--threads 1, --max-epsilon 100; 1000 in the soak), model=tiny_bert, DP-SGD sigma=0.8, 24 examples per node, batch "
                f"16; scale rounds {args.scale_rounds}, soak rounds {args.soak_rounds}; coordinator kills "
                f"{','.join(args.coordinator_kills) or 'none'} (3 nodes, secagg.timeout=20)")
    report("deploy_faults", args, argv, info, settings=settings, headers=headers, rows=table, notes=notes,
           elapsed=now() - start, extra_versions=("flwr",))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
