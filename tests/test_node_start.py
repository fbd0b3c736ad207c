"""Start-up and follow-up costs of a deployment: a node connects only once its executor has loaded veil
(``veil.client.node._wait_ready``), and ``veil server`` asks the run's status (a ``flwr`` CLI start, ~1.2 CPU-s)
when the run's ServerApp process ends rather than every few seconds (``veil.server.session``). Real processes,
started and stopped by the tests, nothing else touched."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

from veil.client.executor import READY
from veil.client.node import NodeError, _executor_output, _wait_ready
from veil.supervise import Supervised, flower_env


def _process(tmp_path: Path, name: str, code: str, ready: threading.Event | None = None) -> Supervised:
    """``python -c code``; with ``ready``, its lines go through the node's own executor line handler."""
    return Supervised(name, [sys.executable, "-c", code], log_path=tmp_path / f"{name}.log", env=flower_env(),
                      on_line=_executor_output(ready) if ready is not None else None)


def test_the_node_waits_for_its_executor_s_ready_line(tmp_path: Path) -> None:
    ready = threading.Event()
    proc = _process(tmp_path, "executor", f"import time; time.sleep(1.5); print('INFO veil.client: {READY}: x', "
                                          "flush=True); time.sleep(60)", ready)
    try:
        start = time.monotonic()
        _wait_ready(proc, ready, timeout=30)
        assert ready.is_set() and 1.0 <= time.monotonic() - start < 20
    finally:
        proc.stop()


@pytest.mark.parametrize("code, timeout, named", [
    ("import sys; print('ImportError: no torch', flush=True); sys.exit(3)", 30.0,
     r"executor stopped while loading veil \(status 3\); see .*executor.log"),  # dies while loading: one line
    ("import time; time.sleep(60)", 1.0, "did not load veil within 1 s"),  # never ready: bounded
], ids=["dies", "never-ready"])
def test_an_executor_that_does_not_get_ready_ends_the_node_with_one_line(tmp_path: Path, code: str, timeout: float,
                                                                       named: str) -> None:
    ready = threading.Event()
    proc = _process(tmp_path, "executor", code, ready)
    try:
        with pytest.raises(NodeError, match=named):
            _wait_ready(proc, ready, timeout=timeout)
    finally:
        proc.stop()


# A stand-in SuperLink: its child carries "flwr-serverapp" in its command line (as flower-superexec starts it),
# runs RUN_SECONDS and exits, as a run's ServerApp does; the SuperLink itself stays up.
RUN_SECONDS = 8.0
_SUPERLINK = ("import subprocess, sys, time\n"
              f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep({RUN_SECONDS})', 'flwr-serverapp'])\n"
              "time.sleep(120)\n")


class _Cli:
    """The ``flwr`` CLI of the session, counted: "running" while the stand-in ServerApp runs."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.asked, self.end = run_dir, [], 0.0

    def submit(self, app_dir: Path, run_config: Path) -> int:
        return 7

    def status(self, run_id: int) -> str:
        self.asked.append(time.monotonic())
        if self.end and time.monotonic() > self.end:
            (self.run_dir / "summary.json").write_text(json.dumps({"rounds_completed": 1}))
            return "finished:completed"
        return "running"

    def stop(self, run_id: int) -> None: ...

    def logs(self, run_id: int) -> str:
        return ""


def test_the_coordinator_asks_the_run_status_when_its_server_app_ends(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import veil.server.session as session_mod

    run_dir = tmp_path / "run"
    def start_superlink(endpoint: object, *, state_dir: Path, log_dir: Path, env: dict[str, str]) -> Supervised:
        log_dir.mkdir(parents=True)
        return _process(tmp_path, "superlink", _SUPERLINK)

    monkeypatch.setattr(session_mod, "start_superlink", start_superlink)
    with session_mod.Session(run_dir, host="127.0.0.1", port=9, tls=None) as session:
        cli = session.cli = _Cli(run_dir)  # type: ignore[assignment]
        start = time.monotonic()
        cli.end = start + RUN_SECONDS
        summary = session.run(tmp_path, tmp_path / "run_config.toml", rounds=1, timeout=60)
        took = time.monotonic() - start
    assert summary == {"rounds_completed": 1}
    assert RUN_SECONDS <= took < RUN_SECONDS + 10, f"the run's end was noticed {took - RUN_SECONDS:.1f} s late"
    while_running = [t for t in cli.asked if t < cli.end]
    assert len(while_running) == 1, f"asked {len(while_running)} times while the ServerApp ran (once: at submission)"
