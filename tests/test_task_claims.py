"""veil.flower.task_claims: a ServerApp task the SuperLink has claimed waits START_WINDOW s for its process to show
itself, where Flower refuses a process more than 30 s late (and restarts it, for ever on a busy machine); once the
process runs, Flower's own heartbeat patience holds. Checked on Flower's SQL state with its clock moved."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest


def _state(tmp_path: Path) -> Any:
    from flwr.supercore.corestate.sql_corestate import SqlCoreState
    from flwr.supercore.object_store import ObjectStoreFactory

    class State(SqlCoreState):  # the two abstract methods; a task claim calls neither
        def get_node_id(self) -> int:
            return 0

        def store_message_and_object_tree(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError

    state = State(str(tmp_path / "state.db"), ObjectStoreFactory().store())
    state.initialize()
    return state


def test_a_claimed_serverapp_task_waits_for_its_late_process_and_a_running_one_keeps_flower_s_patience(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.corestate import sql_corestate
    from flwr.supercore.date import now

    from veil.flower.task_claims import START_WINDOW, patient_task_claims

    state, clock = _state(tmp_path), {"ahead": 0.0}
    monkeypatch.setattr(sql_corestate, "now", lambda: now() + timedelta(seconds=clock["ahead"]))
    monkeypatch.setattr(sql_corestate.SqlCoreState, "claim_task", sql_corestate.SqlCoreState.claim_task)  # undone after

    def accepted(late: float, *, running_for: float | None = None) -> bool:
        """Is a process that shows itself ``late`` s after its task's claim (or ``running_for`` s after its start,
        which came 10 s after the claim) still accepted?"""
        clock["ahead"] = 0.0
        task = state.create_task("serverapp", 7)
        token = state.claim_task(task)
        assert token
        if running_for is not None:
            clock["ahead"] = 10.0
            assert state.activate_task(task)
            late = 10.0 + running_for
        clock["ahead"] = late
        return state.get_task_by_token(token) is not None

    interval = sql_corestate.HEARTBEAT_DEFAULT_INTERVAL  # 30 s in flwr 1.41
    assert accepted(interval - 5) and not accepted(interval + 5), "Flower's own claim: 30 s to start"
    patient_task_claims()
    assert patient_task_claims() is sql_corestate.SqlCoreState  # idempotent
    assert accepted(interval + 5) and accepted(START_WINDOW - 5)
    assert not accepted(START_WINDOW + 5), "a process that never starts is still retried, after the window"
    # running: Flower's patience (2 x 30 s without a heartbeat), not the start window
    assert accepted(0, running_for=2 * interval - 5) and not accepted(0, running_for=2 * interval + 5)
