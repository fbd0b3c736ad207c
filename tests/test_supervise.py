"""veil.supervise: stopping a supervised process also stops what it started in a session of its own (as
``flower-superexec`` does), found with psutil rather than a hand-written /proc walk."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import psutil

from veil.supervise import Supervised, _descendants, flower_env

# A parent that starts a grandchild in a new session (out of the parent's process group), prints its pid, waits.
_PARENT = (
    "import subprocess, sys, time\n"
    "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
    "print(c.pid, flush=True)\n"
    "time.sleep(120)\n"
)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_stop_kills_a_descendant_that_left_the_process_group(tmp_path: Path) -> None:
    lines: list[str] = []
    printed = threading.Event()

    def on_line(line: str) -> None:
        lines.append(line)
        printed.set()

    proc = Supervised("parent", [sys.executable, "-c", _PARENT], log_path=tmp_path / "parent.log", env=flower_env(),
                      on_line=on_line)
    try:
        assert printed.wait(30), "the parent never printed its child's pid"
        grandchild = int(lines[0])
        assert _descendants(proc.pid) == [grandchild]
    finally:
        proc.stop(timeout=5)
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild), "the grandchild in its own session outlived stop()"


def test_a_process_that_is_gone_has_no_descendants() -> None:
    gone = psutil.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert _descendants(gone.pid) == []
