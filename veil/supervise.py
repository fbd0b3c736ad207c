"""Starting and stopping the Flower processes of a deployment (``veil server``, ``veil client``).

Every Flower process veil starts runs in its own process group (``start_new_session``), so stopping it also stops
what it started itself (``flower-superlink`` starts ``flower-superexec``, which starts ``flwr-serverapp``; a
``flwr-clientapp`` may ignore SIGTERM). :meth:`Supervised.stop` signals the group, waits, then kills it by PID.
Every process gets an environment without telemetry or update checks (DESIGN.md decision 9), and the
virtualenv's ``bin`` first on ``PATH`` because Flower starts its helpers by name.

Because each runs in a session of its own, a SIGKILL of veil's own process (an OOM killer, ``kill -9`` of the
``veil client`` process group) would leave them running without a supervisor: a node's SuperNode went on answering
rounds and held the node's session on the SuperLink, so the node could not rejoin (fault probe 2026-12-07). On Linux
every process veil starts therefore asks the kernel for a signal when its parent dies (``PR_SET_PDEATHSIG``,
SIGTERM: Flower's SuperNode then deactivates its session and the SuperLink stops, as on Ctrl-C); the processes they
start themselves follow their parent's pid (Flower's ``--parent-pid``, the executor's ``--supernode-pid``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

__all__ = ["Supervised", "dies_with_this_process", "flower_command", "flower_env", "free_port", "stop_on_signals"]

log = logging.getLogger("veil")

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
try:  # resolved here, not in the child between fork and exec
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
    _PRCTL = None


def _die_with(parent: int, sig: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get ``sig`` when ``parent`` (this process) dies; None off Linux."""
    prctl = _PRCTL
    if prctl is None:
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), sig)

    return preexec


def dies_with_this_process(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for a short-lived child (a ``flwr`` CLI call): it gets ``sig`` when this process dies, so a
    SIGKILL of ``veil server`` leaves no call in flight behind (None off Linux)."""
    return _die_with(os.getpid(), sig)


def _bin_dir() -> Path:
    return Path(sys.executable).parent


def flower_env(*, flwr_home: Path | None = None) -> dict[str, str]:
    """The environment of every process veil starts: quiet, offline, this virtualenv's commands first."""
    env = {**os.environ, **QUIET_ENV}
    env["PATH"] = os.pathsep.join([str(_bin_dir()), env.get("PATH", "")])
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def flower_command(name: str) -> str:
    """The path of a Flower command in this virtualenv (``flower-superlink``, ``flwr``, ...)."""
    path = _bin_dir() / name
    return str(path) if path.exists() else name


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Supervised:
    """One started process (group leader) whose output goes to a log file and, line by line, to a callback."""

    def __init__(self, name: str, argv: Sequence[str], *, log_path: Path, env: dict[str, str],
                 on_line: Callable[[str], None] | None = None, cwd: Path | None = None,
                 death_signal: int = signal.SIGTERM) -> None:
        self.name, self.log_path = name, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(  # noqa: S603 - argv built by veil, no shell
            list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=cwd, start_new_session=True, text=True, errors="replace", bufsize=1,
            preexec_fn=_die_with(os.getpid(), death_signal),  # noqa: PLW1509 - prctl only, resolved beforehand
        )
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._pump, args=(on_line,), name=f"{name}-output", daemon=True)
        self._reader.start()

    def _pump(self, on_line: Callable[[str], None] | None) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._log.write(line)
            self._log.flush()
            if on_line is not None:
                on_line(line.rstrip("\n"))

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait_output(self, timeout: float = 5.0) -> None:
        """Wait until all output of an exited process has been read."""
        self._reader.join(timeout=timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the process group, then SIGKILL to the group and the PID; never raises.

        Descendants that left the group (``flower-superexec`` starts its own session) are collected first and
        killed by PID after the group is down.
        """
        strays = _descendants(self.pid)
        for pid in strays:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if sig == signal.SIGKILL:
                    os.kill(self.pid, sig)
            try:
                self.proc.wait(timeout=wait)
                if sig == signal.SIGTERM:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(self.pid, signal.SIGKILL)  # children that ignored SIGTERM
                break
            except subprocess.TimeoutExpired:
                continue
        for pid in strays:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self._reader.join(timeout=2)
        self._log.close()


def _descendants(root: int) -> list[int]:
    """PIDs of every live descendant of ``root`` (empty when ``root`` is gone)."""
    try:
        return [child.pid for child in psutil.Process(root).children(recursive=True)]
    except psutil.Error:
        return []


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def stop_on_signals() -> None:
    """SIGTERM and SIGINT (even when inherited as ignored) raise KeyboardInterrupt, so cleanup code runs."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupt)
