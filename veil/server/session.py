"""One coordinator session: the SuperLink up, one run submitted and followed to its end, everything stopped.

A context manager so that the SuperLink (and the ``flower-superexec``/``flwr-serverapp`` it starts) is stopped by
PID and process group whatever happens: a finished run, a failure, a timeout or Ctrl-C (the run is stopped first).
Progress comes from the ``metrics.jsonl`` the ServerApp appends in the run directory: one console line per round.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from veil.server.operator import operator_env
from veil.server.superlink import Endpoint, FlwrCli, SuperLinkError, start_superlink
from veil.supervise import Supervised, flower_env

log = logging.getLogger("veil.server")

# `flwr ls` (the run's status) costs a Python start, ~1.2 CPU-s: asked every 5 s it kept a quarter of a core busy for
# the whole run. It is asked at submission, when the run's ServerApp process has ended (the run's end, whatever its
# cause), then every 2 s until the SuperLink says finished, and every 60 s meanwhile (tests/test_node_start.py).
_STATUS_EVERY = 60.0
_STATUS_AFTER_END = 2.0
_WATCH_EVERY = 2.0  # seconds between looks for the ServerApp process


class Session:
    """The SuperLink of one run directory, with a ``flwr`` CLI bound to it."""

    def __init__(self, run_dir: Path, *, host: str, port: int, tls: tuple[Path, Path, Path] | None) -> None:
        self.run_dir, self.endpoint = run_dir, Endpoint(host, port, tls)
        self.superlink: Supervised | None = None
        self.run_id: int | None = None
        self.finished = False

    def __enter__(self) -> Session:
        home = self.run_dir / "flwr-home"
        self.cli = FlwrCli(self.endpoint, home)
        # The ServerApp (started by the SuperLink, inheriting its environment) runs only this run directory's
        # own run config (veil.server.operator, review M8).
        self.superlink = start_superlink(self.endpoint, state_dir=self.run_dir / "state", log_dir=self.run_dir / "logs",
                                         env={**flower_env(flwr_home=home), **operator_env(self.run_dir)})
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if self.run_id is not None and not self.finished:
                log.warning("stopping run %d", self.run_id)
                self.cli.stop(self.run_id)
            if self.run_id is not None:  # appended: a resumed run keeps the log of the run it continues
                with (self.run_dir / "logs" / "serverapp.log").open("a", encoding="utf-8") as out:
                    out.write(f"==== flwr run {self.run_id} ====\n{self.cli.logs(self.run_id)}")
        finally:
            if self.superlink is not None:
                self.superlink.stop()
                log.info("SuperLink stopped; state in %s", self.run_dir / "state")

    def run(self, app_dir: Path, run_config: Path, *, rounds: int, timeout: float = 0.0) -> dict[str, Any]:
        """Submit the run and follow it to its end; returns summary.json (raises if the run failed)."""
        self.run_id = self.cli.submit(app_dir, run_config)
        log.info("run %d submitted; waiting for nodes (rounds: %d)", self.run_id, rounds)
        deadline = time.monotonic() + timeout if timeout > 0 else None
        printed, next_status, next_watch, status = 0, 0.0, 0.0, "pending"
        seen, ended = False, False  # the run's ServerApp process: seen running, then gone
        while True:
            printed = self._print_rounds(printed, rounds)
            if self.superlink is not None and self.superlink.poll() is not None:
                raise SuperLinkError(f"the SuperLink exited during the run; see {self.superlink.log_path}")
            if not ended and time.monotonic() >= next_watch:
                running, next_watch = self._serverapp_running(), time.monotonic() + _WATCH_EVERY
                seen, ended = seen or running, seen and not running
                if ended:
                    next_status = 0.0
            if time.monotonic() >= next_status:
                status = self.cli.status(self.run_id)
                next_status = time.monotonic() + (_STATUS_AFTER_END if ended else _STATUS_EVERY)
                if status.startswith("finished"):
                    break
            if deadline is not None and time.monotonic() > deadline:
                raise SuperLinkError(f"run {self.run_id} did not finish within --timeout {timeout:.0f} s; stopped")
            time.sleep(0.5)
        self.finished = True
        self._print_rounds(printed, rounds)
        summary_path = self.run_dir / "summary.json"
        if status != "finished:completed" or not summary_path.is_file():
            raise SuperLinkError(f"run {self.run_id} ended as {status} without a result; see "
                                 f"{self.run_dir / 'logs' / 'serverapp.log'}")
        summary: dict[str, Any] = json.loads(summary_path.read_text(encoding="utf-8"))
        return summary

    def _serverapp_running(self) -> bool:
        """Whether a ``flwr-serverapp`` process runs under this session's SuperLink (started for the run by its
        ``flower-superexec``; it exits when the run ends)."""
        if self.superlink is None:
            return False
        try:
            children = psutil.Process(self.superlink.pid).children(recursive=True)
        except psutil.Error:
            return False
        for child in children:
            try:
                if any("flwr-serverapp" in part for part in child.cmdline()):
                    return True
            except psutil.Error:
                continue
        return False

    def _print_rounds(self, printed: int, rounds: int) -> int:
        from veil.server.metrics import console_line

        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return printed
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                break  # a line being written
        for row in rows[printed:]:
            print(console_line(row, rounds), flush=True)
        return max(printed, len(rows))
