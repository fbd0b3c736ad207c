"""Seconds per round and memory of ``veil simulate`` at population scale (issue 14 item 2): populations of simulated
clients (100, 1,000 and 10,000 by default), a few sampled per round, tiny BERT, DP-SGD and SecAgg+.

Each configuration is one ``python -m veil simulate`` subprocess, run one after the other; round seconds are the
ServerApp's own figure (``seconds`` in ``metrics.jsonl``). Memory is the kernel's peak resident set (``VmHWM`` in
``/proc/PID/status``; psutil's current RSS where that is unreadable), read once a second for every process of the
tree: the coordinator (the ``veil simulate`` process: ServerApp, LinkState, simulation engine), each Ray worker
(the ClientApp actors and idle workers; the largest and each one's peak are reported) and Ray's own daemons (summed).
``--before REF`` runs the same configuration on the code of git revision ``REF`` too (extracted with
``git archive``), interleaved with the working tree's runs, so before/after figures share the machine's load; on a
shared machine compare them only side by side.

It also times, in this process, one pass of Flower's simulation engine over its node registry with 10 messages
pending (``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue`` asks the in-memory LinkState for each
node's messages every 0.1 s, and each ask scans every pending message): the cost that grows with the population
inside Flower (docs/benchmarks.md).

    python -m benchmarks.sim_scale                                  # 100, 1,000, 10,000 clients x 10 per round
    python -m benchmarks.sim_scale --populations 1000 --before be7cb10
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
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_output_args, machine_info, now, pick_device, report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "veil" / "data" / "banking77"  # the packaged BANKING77 (a fresh clone has no ../shared)
TARGET = 3.0  # s per round after the first, issue 14 item 2


@dataclass
class Sample:
    """Peak resident memory (bytes) of each part of the process tree."""

    coordinator: int = 0
    worker_peaks: dict[int, int] = field(default_factory=dict)  # Ray worker pid -> its peak
    ray_daemons: int = 0

    @property
    def worker_max(self) -> int:
        return max(self.worker_peaks.values(), default=0)


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


def peak_rss(proc: Any) -> int:
    """The process' peak resident set so far (kernel ``VmHWM``), else its current RSS."""
    try:
        with open(f"/proc/{proc.pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(proc.memory_info().rss)


def _watch(pid: int, stop: threading.Event, peak: Sample) -> None:
    import psutil

    root = psutil.Process(pid)
    while not stop.wait(1.0):
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        daemons = 0
        for p in procs:
            try:
                rss, cmd = peak_rss(p), " ".join(p.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if p.pid == pid:
                peak.coordinator = max(peak.coordinator, rss)
            elif "default_worker.py" in cmd or (cmd.startswith("ray::") and "Agent" not in cmd):
                peak.worker_peaks[p.pid] = max(peak.worker_peaks.get(p.pid, 0), rss)
            else:
                daemons += p.memory_info().rss
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
    found = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True)
    if found.returncode != 0:
        raise SystemExit(f"--before {ref}: not a git revision of this repository (see `git log --oneline`)")
    archive = found.stdout
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def rows_for(outcomes: list[Outcome], sweeps: dict[int, float], app_bytes: dict[int, int]) -> list[list[str]]:
    out = []
    for o in outcomes:
        later = o.seconds[1:]
        steady = statistics.median(later) if later else float("nan")
        verdict = ("met" if steady <= TARGET else "NOT met") if later else ""
        sweep = sweeps.get(o.population)
        out.append([o.code, f"{o.population:,}", " / ".join(f"{s:.1f}" for s in o.seconds) or "-",
                    f"{steady:.2f}" if later else "-", verdict, _mib(o.memory.coordinator),
                    f"{_mib(o.memory.worker_max)} ({len(o.memory.worker_peaks)})", _mib(o.memory.ray_daemons),
                    f"{sweep * 1e3:.0f}" if sweep is not None else "-",
                    f"{app_bytes[o.population] / 1024:.1f}" if o.code == "this tree" and o.population in app_bytes else "-",
                    f"{o.wall:.0f}", o.error[:200]])
    return out


HEADERS = ["code", "clients", "round s (1 / 2 / ...)", "s/round after the first", f"<= {TARGET:g} s",
           "coordinator peak MiB", "Ray worker peak MiB, max (workers)", "Ray daemons MiB",
           "Flower node sweep ms (10 pending)", "ClientApp KiB per message", "wall s", "error"]


def flower_sweep_seconds(population: int, *, pending: int = 10) -> float:
    """One pass of Flower's simulation engine over its node registry (``add_messages_to_queue``: one
    ``get_message_ins(node_id, limit=1)`` per node, every 0.1 s) with ``pending`` messages in the in-memory
    LinkState, as during a round."""
    state, nodes = engine_state(population, list(range(pending)))
    start = now()
    for node in nodes:
        state.get_message_ins(node_id=node, limit=1)
    return now() - start


def engine_state(population: int, addressed: list[int]) -> tuple[Any, list[int]]:
    """The in-memory LinkState of a simulation of ``population`` nodes holding one "train" message for each entry
    of ``addressed`` (an index counted from the last node; repeats give a node several messages). Built with
    Flower's own start-up functions (``_register_nodes``, ``InMemoryGrid``)."""
    from flwr.app import Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord, Task
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=1)  # as flwr.simulation.run_simulation registers its run
    run.primary_task_id, run.federation_id = 1, NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    state.run_ids[1] = RunRecord(run=run)  # type: ignore[attr-defined]
    state.task_store[1] = Task(task_id=1, run_id=1)  # type: ignore[attr-defined]
    nodes = list(_register_nodes(population, factory))
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    grid.push_messages([Message(RecordDict(), nodes[-1 - i], "train", group_id="sweep") for i in addressed])
    return state, nodes


def client_app_bytes(population: int) -> int:
    """Bytes of the simulated ClientApp as Flower's Ray backend ships it with every message (``RayBackend``
    submits ``app_fn`` with each ``ClientAppActor.run.remote``; Ray pickles it each time)."""
    from ray import cloudpickle

    from veil.conf.runconfig import to_run_config
    from veil.conf.schema import VeilConfig
    from veil.client.app import make_client_app
    from veil.simulation import NamedCauses, simulated_node_configs

    cfg = VeilConfig()
    cfg.data.train_path, cfg.data.test_path = str(DATA / "train.csv"), str(DATA / "test.csv")
    cfg.federation.num_clients = population
    app = NamedCauses(make_client_app(to_run_config(cfg), simulation_root=Path("nodes") / "nodes",
                                      simulated_nodes=simulated_node_configs(cfg)))
    return len(cloudpickle.dumps(lambda: app))


def memory_notes(outcomes: list[Outcome]) -> list[str]:
    notes = []
    for o in outcomes:
        peaks = ", ".join(_mib(v) for v in sorted(o.memory.worker_peaks.values(), reverse=True))
        notes.append(f"{o.code}, {o.population:,} clients: each Ray worker's peak MiB: {peaks or '-'}")
    done = [o for o in outcomes if o.code == "this tree" and not o.error]
    if len(done) > 1:
        small, large = min(done, key=lambda o: o.population), max(done, key=lambda o: o.population)
        for part, a, b in (("coordinator", small.memory.coordinator, large.memory.coordinator),
                           ("largest Ray worker", small.memory.worker_max, large.memory.worker_max)):
            notes.append(f"{part}: {_mib(a)} MiB at {small.population:,} clients, {_mib(b)} MiB at "
                         f"{large.population:,} ({(b - a) / 2**20:+.0f} MiB, {b / max(a, 1):.2f}x)")
    return notes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--populations", default="100,1000,10000", help="comma-separated population sizes")
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
    sweeps = {pop: flower_sweep_seconds(pop) for pop in pops}
    app_bytes = {pop: client_app_bytes(pop) for pop in pops}  # this tree's; a --before tree's may differ
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="veil-before-") as tmp:
        codes = [("this tree", ROOT)]
        if args.before:
            codes.insert(0, (f"before ({args.before})", checkout(args.before, Path(tmp) / "tree")))
        for pop in pops:
            for label, code in codes:
                outcomes.append(run_one(code, label, pop, per_round, rounds, args.set, args.timeout))
                print(rows_for(outcomes[-1:], sweeps, app_bytes)[0], flush=True)
    settings = (f"veil simulate, model=tiny_bert, BANKING77 train file split IID across the population, "
                f"{per_round} clients per round, {rounds} rounds, DP-SGD (sigma=1, 2 steps of B=8) + SecAgg+, "
                f"central evaluation on 200 test texts; Ray backend with veil's client_resources; "
                f"memory = each process' peak resident set (VmHWM), read every second")
    notes = [f"extra overrides: {' '.join(args.set)}" if args.set else "no extra overrides", *memory_notes(outcomes)]
    report("sim_scale", args, argv, info, settings=settings, headers=HEADERS, rows=rows_for(outcomes, sweeps, app_bytes),
           notes=notes, elapsed=now() - start, extra_versions=("flwr", "ray"))


if __name__ == "__main__":
    main()
