"""Seconds per SecAgg+ round in a real loopback deployment (issue 7): ``veil server`` (SuperLink, TLS, node
authentication) and three ``veil client`` nodes, DP-SGD + SecAgg+ on the tiny BERT, split into client compute
and waiting.

Round time is the ServerApp's own figure (``seconds`` in the run's ``metrics.jsonl``: the fit workflow, all five
SecAgg+ message exchanges, and central evaluation); round 1 also waits for the nodes to connect and load, so the
steady state is the median of rounds 2.. . Client compute is measured apart, in this process, by calling veil's own
``VeilClient.fit`` with the same configuration and each node's data file (the executor's log lines carry no
timestamps): the median per-node ``fit`` of rounds 2.. . The nodes run concurrently on the same cores in the
deployment, so ``waiting = round - compute`` is an upper bound on what the transport's polling costs.

    python -m benchmarks.deploy_overhead                      # 3 rounds; records to benchmarks/results/
    python -m benchmarks.deploy_overhead --quick --no-record  # 2 rounds (about 2 minutes on 2 cores)
    python -m benchmarks.deploy_overhead --before be7cb10     # that revision's veil first, then this tree's
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

ROOT = Path(__file__).resolve().parents[1]
NODES = 3
WORDS = {"card": "my card was lost", "cash": "the atm kept my cash", "fee": "why a fee on transfer",
         "pin": "i forgot my pin code"}
STOCK = "~32 s per round for 1.3 s of client compute (LIBRARY_NOTES.md, 2 nodes)"


def overrides(test_file: Path, rounds: int) -> list[str]:
    return ["model=tiny_bert", "federation.batch_size=16", "federation.lr=0.02", "federation.partitioner=iid",
            "data=csv", f"data.test_path={test_file}", f"federation.num_clients={NODES}", "++federation.sample_rate=0.67",
            f"federation.clients_per_round={NODES}", f"federation.rounds={rounds}", "privacy.noise_multiplier=0.8"]


def write_data(root: Path, rows_per_label: int) -> tuple[Path, list[Path]]:
    """The operator's evaluation file and one private file per node."""
    root.mkdir(parents=True, exist_ok=True)
    test = root / "operator-test.csv"
    test.write_text("text,label\n" + "".join(f"{t} again {i},{lab}\n" for lab, t in WORDS.items() for i in range(3)))
    nodes = []
    for n in range(1, NODES + 1):
        path = root / f"node-{n}.csv"
        path.write_text("text,label\n" + "".join(f"{t} n{n} {i},{lab}\n" for lab, t in WORDS.items()
                                                 for i in range(rows_per_label)))
        nodes.append(path)
    return test, nodes


def busy_cpu_seconds() -> float:
    """CPU-seconds this machine has spent busy (user + system, every process) since boot."""
    import psutil

    times = psutil.cpu_times()
    return float(times.user + times.system + getattr(times, "nice", 0.0))


def deploy(root: Path, test: Path, node_files: list[Path], rounds: int, timeout: float,
           code: Path = ROOT, node_threads: int = 1) -> tuple[list[dict[str, float]], float]:
    """Run the deployment with veil from ``code`` (server, ServerApp and nodes); returns the metrics rows and the
    machine's busy CPU-seconds from ``veil server``'s start to its exit (every process: run on a quiet machine)."""
    from veil.client.node import executor_env
    from veil.supervise import Supervised, flower_env, free_port

    # cwd and PYTHONPATH both: `python -m veil` puts its working directory first on sys.path
    # the nodes' privacy ledgers in this run's own directory: a ledger is kept per data file, and every run of this
    # benchmark writes the same files, so the user's own state directory would fill up to max_epsilon and refuse
    env = {**flower_env(), "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(code),
           "XDG_STATE_HOME": str(root / "state")}
    certs, run_dir, logs = root / "certs", root / "run", root / "logs"
    done = Supervised("certs", [sys.executable, "-m", "veil", "certs", "--out", str(certs), "--nodes", str(NODES)],
                      log_path=logs / "certs.log", env=env, cwd=code)
    while done.poll() is None:
        time.sleep(0.2)
    if done.poll() != 0:
        raise RuntimeError(f"veil certs failed; see {logs / 'certs.log'}")
    port, procs, lines = free_port(), [], []
    cpu0 = busy_cpu_seconds()
    try:
        server = Supervised("server", [sys.executable, "-m", "veil", "server", *overrides(test, rounds), "--certs",
                                       str(certs), "--node-keys", str(certs), "--port", str(port), "--run-dir",
                                       str(run_dir), "--timeout", str(timeout)],
                            log_path=logs / "server.log", env=env, on_line=lines.append, cwd=code)
        procs.append(server)
        deadline = time.monotonic() + 120
        while not any("ready" in ln for ln in lines) and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        for n, data in enumerate(node_files, start=1):
            procs.append(Supervised(f"node-{n}", [
                sys.executable, "-m", "veil", "client", "--superlink", f"127.0.0.1:{port}", "--root-cert",
                str(certs / "ca.crt"), "--key", str(certs / f"node-{n}.key"), "--data", str(data), "--node-dir",
                str(root / f"node-{n}"), "--max-epsilon", "100",
                "--allow-test-model"], log_path=logs / f"node-{n}.log",
                # each node's share of the cores, as `veil client --threads` gives it (the environment, so that
                # a --before revision without the flag is treated alike)
                env=executor_env(env, node_threads), cwd=code))
        while server.poll() is None:
            time.sleep(0.5)
        server.wait_output()
        if server.poll() != 0:
            raise RuntimeError(f"veil server exited with {server.poll()}: {' | '.join(lines[-5:])}")
        cpu = busy_cpu_seconds() - cpu0
    finally:
        for proc in reversed(procs):
            proc.stop()
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()], cpu


def client_compute(root: Path, test: Path, node_files: list[Path], rounds: int,
                   threads: int = 1) -> list[list[float]]:
    """Seconds of ``VeilClient.fit`` per node and round, veil's own client with the deployment's configuration and
    the nodes' torch threads."""
    import torch

    from veil.client.app import VeilClient
    from veil.client.settings import ALLOW_TEST_MODEL, node_settings
    from veil.server.deploy import resolve_config
    from veil.preflight import preflight
    from veil.task.model import build_model, get_trainable
    from veil.wire import REFUSED

    cfg = resolve_config(preflight([*overrides(test, rounds), "data.train_path=${data.test_path}"]), root / "sim")
    labels = json.loads(cfg.data.labels)
    weights = get_trainable(build_model(cfg.model, labels, seed=cfg.federation.seed))
    out, before = [], torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    for n, data in enumerate(node_files, start=1):
        settings = node_settings({"data-path": str(data), "max-epsilon": 100.0, ALLOW_TEST_MODEL: True,
                                  "ledger-path": str(root / "sim" / f"ledger-{n}.json")})
        client, times = VeilClient(cfg, settings, run_id=1), []
        for rnd in range(1, rounds + 1):
            start = now()
            update, _, metrics = client.fit(weights, {"server_round": rnd})
            times.append(now() - start)
            if metrics.get(REFUSED):  # the figure is of training, not of a refusal (0.00 s a round until 2026-12-08)
                raise RuntimeError(f"the in-process client refused round {rnd}; see the log above")
            weights = [w + u for w, u in zip(weights, update, strict=True)]
        out.append(times)
    torch.set_num_threads(before)
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4, help="rounds (the first is reported apart)")
    ap.add_argument("--rows-per-label", type=int, default=6, help="examples per label in each node's file")
    ap.add_argument("--timeout", type=float, default=540.0, help="stop the deployment after this many seconds")
    ap.add_argument("--before", default="", help="also deploy veil of this git revision first (same machine load)")
    ap.add_argument("--node-threads", type=int, default=1, help="torch threads per node (the three share the "
                    "machine; 0: torch's default, one per core, in each node)")
    add_output_args(ap, quick="2 rounds (about 2 minutes)", root=ROOT)
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds = 2
    if args.rounds < 2:
        ap.error(f"--rounds={args.rounds} must be >= 2 (round 1 includes the nodes' start)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    info = machine_info(pick_device())
    start = now()
    runs: list[tuple[str, list[dict[str, float]], float]] = []
    with tempfile.TemporaryDirectory(prefix="veil-deploy-bench-") as tmp:
        root = Path(tmp)
        test, node_files = write_data(root / "data", args.rows_per_label)
        codes = [("this tree", ROOT)]
        if args.before:
            from benchmarks.sim_scale import checkout

            codes.insert(0, (f"before ({args.before})", checkout(args.before, root / "before")))
        for i, (label, code) in enumerate(codes):
            runs.append((label, *deploy(root / f"deploy-{i}", test, node_files, args.rounds, args.timeout, code,
                                        args.node_threads)))
        compute = client_compute(root, test, node_files, args.rounds, args.node_threads)
    elapsed = now() - start
    fit = [t for times in compute for t in times[1:]]
    per_fit = statistics.median(fit)
    headers = ["code", "rounds", "round 1 s (nodes start)", "s/round (rounds 2..)", "client compute s (fit, per node)",
               "waiting s", "waiting share", "SecAgg+ exchanges", "s per exchange", "<= compute + 2 s",
               "CPU-s per round (all processes)"]
    table = []
    for label, rows, cpu in runs:
        per_round = statistics.median(float(r["seconds"]) for r in rows[1:])
        table.append([label, str(len(rows)), f"{float(rows[0]['seconds']):.1f}", f"{per_round:.1f}", f"{per_fit:.2f}",
                      f"{per_round - per_fit:.1f}", f"{(per_round - per_fit) / per_round:.0%}", "4 + evaluation",
                      f"{(per_round - per_fit) / 4:.1f}", "met" if per_round <= per_fit + 2 else "NOT met",
                      f"{cpu / len(rows):.1f}"])
    settings = (f"loopback: veil server (SuperLink, TLS, node auth) + {NODES} veil client nodes (SuperNode + "
                f"veil executor), model=tiny_bert, DP-SGD sigma=0.8, SecAgg+ on, {args.rows_per_label * len(WORDS)} "
                f"examples per node, batch 16, torch threads per node "
                f"{args.node_threads or 'default (one per core)'}; stock: {STOCK}")
    notes = [f"{label}: round seconds (ServerApp metrics): " + ", ".join(f"{float(r['seconds']):.1f}" for r in rows)
             + f"; busy CPU-s of the machine from veil server's start to its exit {cpu:.0f}" for label, rows, cpu in runs]
    notes.append("fit seconds per node and round (in-process VeilClient.fit, this tree, same config): "
                 + "; ".join(", ".join(f"{t:.2f}" for t in times) for times in compute))
    report("deploy_overhead", args, argv, info, settings=settings, headers=headers, rows=table, notes=notes,
           elapsed=elapsed, extra_versions=("flwr", "grpcio"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
