"""A fault harness for real loopback deployments (issue 27): ``veil certs``, ``veil server`` (SuperLink, TLS, node
authentication, SecAgg+) and n ``veil client`` nodes, each a process tree of its own, plus the faults an owner's
machine meets: ``kill -9`` of a node at a SecAgg+ stage (read from the node's executor log), a restart with the same
flags, a full disk (the node's executor gets ``RLIMIT_FSIZE`` 0: every file write fails as on a full disk, and
no root or mount is needed), a slow or lossy link (a node may reach the SuperLink through a
:class:`~benchmarks.lossy_link.LossyLink`), and ``kill -9`` of ``veil server`` followed by ``veil server --resume``.

Used by tests/e2e/test_faults_e2e.py and benchmarks/deploy_faults.py (scale curve and soak). It starts and signals only the processes it
started (by PID, never by name), listens on loopback only, and bounds every wait.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.lossy_link import LossyLink
from veil.supervise import Supervised, _descendants, flower_command, flower_env, free_port

ROOT = Path(__file__).resolve().parents[1]
WORDS = {"card": "my card was lost", "cash": "the atm kept my cash", "fee": "why a fee on transfer",
         "pin": "i forgot my pin code"}
TINY = ["model=tiny_bert", "federation.batch_size=16", "federation.lr=0.02", "federation.partitioner=iid"]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


class Loopback:
    """One deployment on 127.0.0.1 with ``nodes`` data owners; every process stopped by :meth:`close`."""

    def __init__(self, root: Path, nodes: int, *, rows_per_label: int = 6, node_flags: list[str] | None = None,
                 links: dict[int, float] | None = None) -> None:
        """``links``: node -> delay in seconds of the :class:`LossyLink` that node connects through."""
        self.root, self.nodes, self.port = root, nodes, free_port()
        self.node_flags = node_flags or []
        self.links = {n: LossyLink(self.port, delay=delay) for n, delay in (links or {}).items()}
        self.env = {**flower_env(), "PYTHONWARNINGS": "ignore", "XDG_STATE_HOME": str(root / "state"),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))}
        self.procs: list[Supervised] = []
        self.clients: dict[int, Supervised] = {}
        self.server: Supervised | None = None
        self.server_out: list[str] = []
        self.leftovers: list[int] = []  # PIDs of a killed veil server's tree
        self.certs, self.run_dir, self.logs = root / "certs", root / "run", root / "logs"
        self.test_file, self.data = self._write_data(rows_per_label)

    # ---- set-up ---------------------------------------------------------------------------------------
    def _write_data(self, rows: int) -> tuple[Path, list[Path]]:
        folder = self.root / "data"
        folder.mkdir(parents=True, exist_ok=True)
        test = folder / "operator-test.csv"
        test.write_text("text,label\n" + "".join(f"{t} again {i},{lab}\n" for lab, t in WORDS.items() for i in range(3)))
        files = []
        for n in range(1, self.nodes + 1):
            path = folder / f"node-{n}.csv"
            path.write_text("text,label\n" + "".join(f"{t} n{n} {i},{lab}\n" for lab, t in WORDS.items()
                                                     for i in range(rows)))
            files.append(path)
        return test, files

    def _veil(self, name: str, args: list[str], on_line: Callable[[str], None] | None = None) -> Supervised:
        proc = Supervised(name, [sys.executable, "-m", "veil", *args], log_path=self.logs / f"{name}.log",
                          env=self.env, on_line=on_line, cwd=ROOT)
        self.procs.append(proc)
        return proc

    def start_server(self, overrides: list[str], *, timeout: float = 600, per_round: int | None = None,
                     resume: bool = False) -> None:
        """``veil server`` (after ``veil certs``); with ``resume``, ``veil server --resume`` of the same run directory
        with the same flags, as an operator restarts it after a crash. Its output lines join :attr:`server_out`."""
        if not resume:
            certs = self._veil("certs", ["certs", "--out", str(self.certs), "--nodes", str(self.nodes)])
            wait_for(lambda: certs.poll() is not None, 120, "veil certs")
            assert certs.poll() == 0, (self.logs / "certs.log").read_text()[-2000:]
        self._server_args = [
            "server", *TINY, "data=csv", f"data.test_path={self.test_file}", f"federation.num_clients={self.nodes}", "federation.sample_rate=0.67",
            f"federation.clients_per_round={per_round or self.nodes}", *overrides, "--certs", str(self.certs), "--node-keys",
            str(self.certs), "--port", str(self.port), "--timeout", str(timeout)]
        starts = sum(1 for p in self.procs if p.name.startswith("server"))
        ready = len(self.server_out)
        where = ["--resume", str(self.run_dir)] if resume else ["--run-dir", str(self.run_dir)]
        self.server = server = self._veil(f"server-{starts}" if starts else "server", [*self._server_args, *where],
                                          on_line=self.server_out.append)
        wait_for(lambda: any("ready" in ln for ln in self.server_out[ready:]) or server.poll() is not None, 120,
                 "veil server to be ready")
        assert server.poll() is None, self.server_out[-20:]

    def kill_server(self) -> list[int]:
        """SIGKILL to the ``veil server`` process alone (as an OOM killer or a power cut of its supervisor); waits
        until its SuperLink is gone (it dies with its parent) and returns the PIDs of its whole tree before the
        kill. Whatever of them still runs then is ended by :meth:`close` at the latest (the test's own processes)."""
        assert self.server is not None
        tree = [self.server.pid, *_descendants(self.server.pid)]
        self.leftovers += tree
        os.kill(self.server.pid, signal.SIGKILL)
        self.server.proc.wait(timeout=30)
        superlink = [pid for pid in tree if "veil.flower.task_claims" in cmdline(pid)]  # the patched SuperLink
        wait_for(lambda: not alive(superlink), 60, "the SuperLink to die with veil server")
        return tree

    def node_dir(self, n: int) -> Path:
        return self.root / f"node-{n}"

    def ledger_path(self, n: int) -> Path:
        return self.node_dir(n) / "ledger" / "privacy_ledger.json"

    def executor_log(self, n: int) -> Path:
        return self.node_dir(n) / "executor.log"

    def start_node(self, n: int) -> Supervised:
        """``veil client`` for node ``n``, the same flags every time (a restart is this call again)."""
        port = self.links[n].port if n in self.links else self.port
        proc = self._veil(f"node-{n}-{sum(1 for p in self.procs if p.name.startswith(f'node-{n}-'))}", [
            "client", "--superlink", f"127.0.0.1:{port}", "--root-cert", str(self.certs / "ca.crt"),
            "--key", str(self.certs / f"node-{n}.key"), "--data", str(self.data[n - 1]),
            "--node-dir", str(self.node_dir(n)), "--ledger", str(self.ledger_path(n)), "--max-epsilon", "100",
            "--max-retries", "0", "--max-wait-time", "300", "--threads", "1",
            "--allow-test-model",  # the run's model is the tiny BERT built in code (a node refuses it otherwise)
            *self.node_flags])
        self.clients[n] = proc
        return proc

    # ---- observation ----------------------------------------------------------------------------------
    def log_text(self, n: int, since: int = 0) -> str:
        path = self.executor_log(n)
        return path.read_bytes()[since:].decode("utf-8", "replace") if path.exists() else ""

    def log_size(self, n: int) -> int:
        path = self.executor_log(n)
        return path.stat().st_size if path.exists() else 0

    def rounds_done(self) -> int:
        """The last round ``veil server`` reported done (``round N/M | ...``), across a kill and ``--resume``."""
        done = [int(ln.split()[1].split("/")[0]) for ln in self.server_out if ln.startswith("round ") and "/" in ln]
        return max(done, default=0)

    def serverapp_log(self, which: int = -1) -> str:
        """The ServerApp log of a run ``veil server`` submitted (``which``: 0 the first, -1 the latest), as the
        SuperLink holds it now (its state database outlives a killed ``veil server``)."""
        runs = [ln.split("run ", 1)[1].split()[0] for ln in self.server_out if " submitted; " in ln]
        assert runs, self.server_out[-20:]
        home = self.run_dir / "flwr-home"
        done = subprocess.run([flower_command("flwr"), "log", runs[which], "veil", "--show"], cwd=home, timeout=60,
                              env=flower_env(flwr_home=home), capture_output=True, text=True, check=False)
        return done.stdout

    def wait_round(self, k: int, timeout: float = 300) -> None:
        assert self.server is not None
        try:
            wait_for(lambda: self.rounds_done() >= k or self.server.poll() is not None, timeout, f"round {k}")
        except AssertionError as err:
            raise AssertionError(f"{err}\n{self.where_the_server_is()}") from None
        assert self.rounds_done() >= k, self.server_out[-20:]

    def where_the_server_is(self) -> str:
        """For a failure message: veil server's last lines, what the SuperLink did with the run's ServerApp task
        (started, or its process refused as too late: veil.flower.task_claims) and the coordinator's processes."""
        superlink = self.run_dir / "logs" / "superlink.log"
        lines = superlink.read_text(errors="replace").splitlines() if superlink.exists() else []
        tasks = [ln for ln in lines if "Started task" in ln or "Finished task" in ln or "authentication failed" in ln]
        tree = [self.server.pid, *_descendants(self.server.pid)] if self.server is not None else []
        return "\n".join(["veil server:", *self.server_out[-8:], f"superlink.log ({len(lines)} lines), its tasks:",
                          *tasks[-8:], "coordinator processes:", *(cmdline(pid)[:160] for pid in alive(tree))])

    def wait_stage(self, n: int, stage: str, since: int, timeout: float = 300) -> None:
        """Until node ``n``'s executor logs a message of SecAgg+ ``stage`` after byte ``since`` of its log."""
        wait_for(lambda: f"({stage})" in self.log_text(n, since), timeout, f"node {n} at stage {stage}", poll=0.05)

    def executor_pid(self, n: int) -> int:
        for pid in _descendants(self.clients[n].pid):
            try:
                if b"veil.client.executor" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            except OSError:
                continue
        raise AssertionError(f"node {n} has no executor process")

    def node_tree(self, n: int) -> list[int]:
        return [self.clients[n].pid, *_descendants(self.clients[n].pid)]

    # ---- faults ---------------------------------------------------------------------------------------
    def kill_node(self, n: int, *, group: bool) -> list[int]:
        """SIGKILL to node ``n``'s ``veil client`` (its process group with ``group``, else the process alone, as an
        OOM killer does); returns the PIDs of its tree before the kill."""
        tree, proc = self.node_tree(n), self.clients[n]
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, signal.SIGKILL)
        proc.proc.wait(timeout=30)
        return tree

    def fill_disk(self, n: int, full: bool) -> None:
        """Every file write by node ``n``'s executor fails (EFBIG) with ``full``, as on a full disk; else lifts it."""
        limit = 0 if full else resource.RLIM_INFINITY
        resource.prlimit(self.executor_pid(n), resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        for pid in alive(self.leftovers):
            os.kill(pid, signal.SIGKILL)
        for link in self.links.values():
            link.close()


def cmdline(pid: int) -> str:
    """The command line of ``pid`` ("" once it has gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pids: list[int]) -> list[int]:
    """Those of ``pids`` still running (not zombies)."""
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            out.append(pid)
    return out
