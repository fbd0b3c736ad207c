"""The operator's Flower processes: a SuperLink with TLS and SuperNode authentication, and the ``flwr`` CLI.

Flags and formats follow LIBRARY_NOTES.md ("Flower deployment (1.41)"): one HTTPS port for the Fleet, Control and
Runtime APIs, a persistent state database, no runtime dependency installation, and a ``config.toml`` in
``$FLWR_HOME`` that points the CLI at the SuperLink (absolute CA path). Nothing here decides what a run is; the
caller (:mod:`veil.server.deploy`) does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veil.errors import VeilError
from veil.supervise import Supervised, dies_with_this_process, flower_command, flower_env

__all__ = ["Endpoint", "FlwrCli", "SuperLinkError", "start_superlink"]

log = logging.getLogger("veil.server")

GROUP_FILE = "superlink.pid"  # in the state directory: the SuperLink's pid and port, for end_leftovers
CONNECTION = "veil"  # the CLI's name for this SuperLink connection


class SuperLinkError(VeilError):
    """The SuperLink did not start, or refused a request from the operator's CLI."""


@dataclass(frozen=True)
class Endpoint:
    """Where the SuperLink listens and how it proves who it is (``tls`` None: plaintext, --insecure)."""

    host: str
    port: int
    tls: tuple[Path, Path, Path] | None  # (ca.crt, server.pem, server.key)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def dial(self) -> str:
        """The address the local CLI dials (a wildcard bind is reached on loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)  # noqa: S104
        return Endpoint(host, self.port, self.tls).address


def start_superlink(endpoint: Endpoint, *, state_dir: Path, log_dir: Path, env: dict[str, str],
                    ready_timeout: float = 60.0) -> Supervised:
    """Start ``flower-superlink`` and wait until it listens; raises SuperLinkError if it exits first.

    It runs patched (:mod:`veil.flower.task_claims`): the run's ServerApp process gets 300 s to start, not 30 s, so a
    busy coordinator does not reject and restart it for ever (the run would never begin)."""
    argv = [sys.executable, "-m", "veil.flower.task_claims", "--", "--host", endpoint.host, "--port", str(endpoint.port),
            "--database", str(state_dir / "superlink.db"), "--disable-runtime-dependency-installation"]
    if endpoint.tls is None:
        argv.append("--insecure")
    else:
        ca, cert, key = endpoint.tls
        argv += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                 "--enable-supernode-auth"]
    state_dir.mkdir(parents=True, exist_ok=True)
    ready: list[str] = []
    proc = Supervised("superlink", argv, log_path=log_dir / "superlink.log", env=env, cwd=state_dir,
                      on_line=lambda line: ready.append(line) if "Uvicorn running on" in line else None)
    (state_dir / GROUP_FILE).write_text(f"{proc.pid} {endpoint.port}", encoding="utf-8")  # see end_leftovers
    deadline = time.monotonic() + ready_timeout
    while not ready:
        if proc.poll() is not None:
            proc.wait_output()
            raise SuperLinkError(f"the SuperLink exited at start (status {proc.poll()}): "
                                 f"{_last_error(proc.log_path)}; see {proc.log_path}")
        if time.monotonic() > deadline:
            proc.stop()
            raise SuperLinkError(f"the SuperLink did not start within {ready_timeout:.0f} s; see {proc.log_path}")
        time.sleep(0.2)
    log.info("SuperLink listening on %s (%s)", endpoint.address, "TLS + node auth" if endpoint.tls else "PLAINTEXT")
    return proc


def end_leftovers(state_dir: Path) -> list[str]:
    """SIGKILL what a coordinator killed with SIGKILL left running on ``state_dir`` (Linux); returns what it ended.

    The SuperLink dies with ``veil server`` (``PR_SET_PDEATHSIG``), and Flower's processes below it follow their
    parent's pid (``flower-superexec --parent-pid``, which starts ``flwr-serverapp --parent-pid``, each in a session
    of its own), but a ``flwr-serverapp`` shutting down retries the dead SuperLink for a while (30 s and more under
    load, issue 27): a ``--resume`` started meanwhile would share the run directory with it. Only Flower commands
    that used the recorded SuperLink's port as their runtime API or descend from it through ``--parent-pid`` are
    ended, and only once that SuperLink is gone (before a new one takes the port)."""
    try:
        superlink, port = (int(v) for v in (state_dir / GROUP_FILE).read_text(encoding="utf-8").split())
        Path(f"/proc/{superlink}").stat()
        return []  # that SuperLink still runs (not a crash), or its pid is another process's now: nothing to end
    except FileNotFoundError:
        pass
    except (OSError, ValueError):
        return []
    flower = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            command = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            if "flwr" in command or "flower" in command:
                flower[int(cmdline.parent.name)] = command
    # its runtime API was its own port: flwr-serverapp --runtime-api-address HOST:PORT (its superexec may be gone)
    runtime = re.compile(rf"--runtime-api-address \S*:{port}(\s|$)")
    below = {superlink} | {pid for pid, command in flower.items() if runtime.search(command)}
    grew = True
    while grew:  # flower-superexec --parent-pid SUPERLINK, then flwr-serverapp --parent-pid SUPEREXEC
        found = {pid for pid, command in flower.items() if any(f"--parent-pid {p} " in f"{command} " for p in below)}
        grew = not found <= below
        below |= found
    ended = []
    for pid in sorted(below - {superlink}):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            ended.append(flower[pid][:120])
    return ended


def _last_error(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "ERROR" in ln or "rror" in ln]
    return (errors or lines or ["no output"])[-1][-200:]


class FlwrCli:
    """The ``flwr`` CLI bound to one SuperLink through its own ``$FLWR_HOME/config.toml``."""

    def __init__(self, endpoint: Endpoint, flwr_home: Path) -> None:
        self.home = flwr_home
        flwr_home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f"address = {json.dumps(endpoint.dial)}"]
        if endpoint.tls is None:
            lines.append("insecure = true")
        else:
            lines.append(f"root-certificates = {json.dumps(str(endpoint.tls[0].resolve()))}")
        (flwr_home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.env = flower_env(flwr_home=flwr_home)

    def call(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """Run ``flwr ARGS --format json`` and return its JSON answer (``success`` false on a refusal)."""
        argv = [flower_command("flwr"), *args, "--format", "json"]
        try:
            done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout, check=False,
                                  cwd=self.home, preexec_fn=dies_with_this_process())  # noqa: PLW1509 - prctl only
        except subprocess.TimeoutExpired:
            raise SuperLinkError(f"`flwr {args[0]}` did not answer within {timeout:.0f} s; is the SuperLink up?") from None
        try:
            answer: dict[str, Any] = json.loads(done.stdout[done.stdout.find("{"):])
        except ValueError:
            tail = (done.stderr or done.stdout).strip().splitlines()
            raise SuperLinkError(f"`flwr {args[0]}` failed: {tail[-1] if tail else 'no output'}") from None
        return answer

    def register(self, public_key: Path) -> str:
        """Register a node's public key; a key already registered in this state database is accepted."""
        answer = self.call("supernode", "register", str(public_key), CONNECTION)
        if answer.get("success"):
            return str(answer.get("node-id"))
        message = str(answer.get("error-message", "")).strip().splitlines()
        if message and "already in use" in message[-1]:
            log.info("node key %s was registered before (persistent state): kept", public_key.name)
            return "registered before"
        raise SuperLinkError(f"the SuperLink refused to register {public_key}: {message[-1] if message else '?'}")

    def submit(self, app_dir: Path, run_config: Path) -> int:
        """``flwr run`` the app directory with a run-config TOML file; returns the run id."""
        answer = self.call("run", str(app_dir), CONNECTION, "--run-config", str(run_config), timeout=300)
        if not answer.get("success") or answer.get("run-id") is None:
            message = str(answer.get("error-message", "")).strip().splitlines()
            raise SuperLinkError(f"the SuperLink refused the run: {message[-1] if message else answer}")
        return int(answer["run-id"])

    def status(self, run_id: int) -> str:
        """The run's status, e.g. ``running`` or ``finished:completed`` (``unknown`` if the CLI cannot tell)."""
        answer = self.call("ls", CONNECTION, "--run-id", str(run_id))
        runs = answer.get("runs") or []
        return str(runs[0].get("status", "unknown")) if runs else "unknown"

    def stop(self, run_id: int) -> None:
        try:
            self.call("stop", str(run_id), CONNECTION, timeout=30)
        except SuperLinkError as err:
            log.warning("could not stop run %d: %s", run_id, err)

    def logs(self, run_id: int) -> str:
        """The run's ServerApp log as the SuperLink stored it (``flwr log --show``)."""
        argv = [flower_command("flwr"), "log", str(run_id), CONNECTION, "--show"]
        try:
            done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60, check=False,
                                  cwd=self.home, preexec_fn=dies_with_this_process())  # noqa: PLW1509 - prctl only
        except subprocess.TimeoutExpired:
            return ""
        return done.stdout
