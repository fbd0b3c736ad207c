"""The ServerApp process's start window, and the patched SuperLink that gives it (``veil server``).

A deployed run's ServerApp is a process of its own. The SuperLink's ``flower-superexec`` claims the run's task
(``AcquireTask``: a token, the task STARTING) and starts ``flwr-serverapp --token``, which must show itself (a
heartbeat or ``PullTaskInput``) before the claim expires, ``HEARTBEAT_DEFAULT_INTERVAL`` = 30 s after it was made
(``SqlCoreState.claim_task``, flwr 1.41). An expired claim goes back to pending; the late process is refused
(``[ApiError:1008] Runtime task-token authentication failed`` in superlink.log) and exits before it has uploaded a
line of log, and SuperExec starts another one, which gets the same 30 s. Python and Flower's imports cost ~1.5 s of
CPU (``flwr-serverapp`` imports the whole SuperLink package) and the claim is made the moment the run is submitted,
when an operator's nodes often start too. On a 2-core CI machine that started five nodes (each importing torch)
beside a Ray simulation, one start took longer than 30 s and so did every retry: the run never began and its
ServerApp log held only the CLI's "Using SuperLink" (tests/e2e/test_faults_e2e.py, 2026-12-07). Delaying
``flwr-serverapp``'s start by 40 s reproduces it exactly: a new process every ~31 s, none accepted.

:func:`patient_task_claims` gives a claimed task :data:`START_WINDOW` seconds to start instead: right after Flower's
own claim, the claim's ``active_until`` moves to now + the window while the task is still STARTING. Nothing else
changes: once the process pulls its input the task is RUNNING under Flower's heartbeat patience (2 x 30 s), and a
process that never shows itself (it crashed at start) is retried after the window instead of after 30 s. Only the
SQL state is patched: ``veil server`` always gives the SuperLink a database file.

    python -m veil.flower.task_claims -- --host 127.0.0.1 --port 8000 ...   # a patched flower-superlink

Upstream proposal: docs/upstream/serverapp-start-window.md.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from veil.flower import FlowerVersionError, Reach, check_version

__all__ = ["REACHES", "START_WINDOW", "main", "patient_task_claims"]

START_WINDOW = 300.0  # seconds a claimed ServerApp task has to start (Flower: HEARTBEAT_DEFAULT_INTERVAL, 30)
_STATE = "flwr.supercore.corestate.sql_corestate"

REACHES = (
    Reach(_STATE, "SqlCoreState.claim_task", ("self", "task_id")),
    Reach(_STATE, "SqlCoreState.session", ("self",)),
    Reach(_STATE, "TaskModel.active_until"),
    Reach(_STATE, "TaskModel.running_at"),
    Reach(_STATE, "TaskModel.finished_at"),
    Reach(_STATE, "TaskModel.token"),
    Reach(_STATE, "now"),
    Reach(_STATE, "HEARTBEAT_DEFAULT_INTERVAL"),
    Reach("flwr.superlink.cli", "flower_superlink"),
)


def patient_task_claims(window: float = START_WINDOW) -> type:
    """Give every task this process's SQL state claims ``window`` s to start (idempotent); returns the class."""
    version = check_version("task claim patch")
    module = importlib.import_module(_STATE)
    state = getattr(module, "SqlCoreState", None)
    claim = getattr(state, "claim_task", None)
    if getattr(claim, "veil_start_window", None) is not None:
        return state  # type: ignore[return-value]
    model = getattr(module, "TaskModel", None)
    if claim is None or model is None or not all(hasattr(model, c) for c in ("active_until", "running_at", "token")):
        raise FlowerVersionError(f"flwr {version}: {_STATE} no longer claims tasks as veil's task claim patch expects")
    from sqlalchemy import update

    @functools.wraps(claim)
    def claim_task(self: Any, task_id: int) -> str | None:
        token: str | None = claim(self, task_id)
        if token is not None:
            with self.session() as session:  # the claim just made, while its process has not started
                session.execute(update(model).where(model.token == token, model.running_at.is_(None),
                                                    model.finished_at.is_(None))
                                .values(active_until=module.now() + timedelta(seconds=window)))
        return token

    claim_task.veil_start_window = window  # type: ignore[attr-defined]
    state.claim_task = claim_task  # type: ignore[union-attr]
    return state  # type: ignore[return-value]


def main(argv: Sequence[str] | None = None) -> None:
    """``flower-superlink``'s own arguments (after an optional ``--``), with :func:`patient_task_claims` applied."""
    args = list(sys.argv[1:] if argv is None else argv)
    from veil.flower.patches import run_patched

    run_patched("flower-superlink", args, patient_task_claims, "flwr.superlink.cli:flower_superlink")


if __name__ == "__main__":
    main()
