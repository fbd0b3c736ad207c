"""Shared fixtures: offline environment, the BANKING77 files, small configs."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.helpers import write_small_csv
from veil.cli import quiet_environment

quiet_environment()  # offline, no telemetry: the same environment the `veil` command sets
# A deployed node keeps its ledgers under $XDG_STATE_HOME/veil/ledgers: never the tester's own
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="veil-test-state-")

ROOT = Path(__file__).resolve().parents[1]
BANKING77 = ROOT / "veil" / "data" / "banking77"  # shipped inside the package


def pytest_report_header() -> str:
    """Which Flower this run imports (``make check-flower-newest`` shadows the pinned one), found without importing it."""
    spec = importlib.util.find_spec("flwr")
    where = Path(spec.origin).parent if spec and spec.origin else "not installed"
    return f"flwr {importlib.metadata.version('flwr') if spec else '-'} ({where})"


@pytest.fixture(scope="session", autouse=True)
def shared_ray_cluster() -> Iterator[None]:
    """With ``VEIL_TEST_RAY_CLUSTER=1`` (make test's Ray session): one Ray head on loopback for the whole session, joined by every
    simulation through ``RAY_ADDRESS`` (:func:`veil.simulation.ray_init_args`), instead of a private instance started
    and stopped by each (~5 s and ~5 CPU-s a run on 2 cores). Stopped at the end with its whole process group, and
    anything it spawned still alive: nothing of it outlives the session. Without the variable: nothing."""
    if os.environ.get("VEIL_TEST_RAY_CLUSTER") != "1":
        yield
        return
    import shutil
    import signal
    import socket
    import subprocess
    import sys
    import time

    import psutil

    temp = tempfile.mkdtemp(prefix="vr-", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                             f"--num-cpus={os.cpu_count() or 1}",
                             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}", "--block"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the session's Ray head did not start") from None
            time.sleep(0.3)
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    try:
        yield
    finally:
        os.environ.pop("RAY_ADDRESS", None)
        spawned = psutil.Process(head.pid).children(recursive=True)
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        for proc in spawned:  # a process of the head's that left its group: killed too
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                proc.kill()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def banking77() -> Path:
    if not (BANKING77 / "train.csv").is_file():
        pytest.skip(f"BANKING77 not found at {BANKING77}")
    return BANKING77


@pytest.fixture
def small_csv(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny 4-class train/test pair (CSV with a header)."""
    return write_small_csv(tmp_path)

