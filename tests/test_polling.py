"""Shorter waits for replies: the ServerApp's PollingGrid keeps Flower's send_and_receive contract, and veil's one
module of Flower patches (veil.flower.patches) caps only the SuperNode loop's sleeps and shortens only the back-off
of Flower's object pulls."""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace
from typing import Any

import pytest

from veil.flower import patches as supernode_polling
from veil.flower.polling import PollingGrid


class _FakeGrid:
    """Replies to message i become available at the pull number ``ready[i]``; records every pull."""

    def __init__(self, ready: list[int]) -> None:
        self.ready, self.pulls, self.pushed = ready, 0, []

    def push_messages(self, messages: Any) -> list[str]:
        self.pushed = list(messages)
        return [f"m{i}" for i in range(len(self.pushed))]

    def pull_messages(self, ids: Any) -> list[Any]:
        self.pulls += 1
        want = set(ids)
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{i}"))
                for i, at in enumerate(self.ready) if at == self.pulls and f"m{i}" in want]

    def get_node_ids(self) -> list[int]:
        return [7, 8]


def test_polling_grid_collects_every_reply_with_its_own_interval() -> None:
    inner = _FakeGrid(ready=[1, 3, 3, 5])
    grid = PollingGrid(inner, interval=0.01)  # type: ignore[arg-type]

    start = time.monotonic()
    replies = list(grid.send_and_receive(["a", "b", "c", "d"], timeout=None))
    took = time.monotonic() - start

    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2", "m3"]
    assert inner.pushed == ["a", "b", "c", "d"] and inner.pulls == 5, "stops at the pull that completes the set"
    assert took < 1.0, "4 waits of 0.01 s, not Flower's 3 s"
    assert list(grid.get_node_ids()) == [7, 8]


def test_polling_grid_returns_what_arrived_when_the_timeout_passes() -> None:
    inner = _FakeGrid(ready=[1, 10_000])
    grid = PollingGrid(inner, interval=0.01)  # type: ignore[arg-type]
    replies = list(grid.send_and_receive(["a", "b"], timeout=0.1))
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert 2 <= inner.pulls < 100


def test_polling_grid_takes_one_last_look_when_a_pull_held_it_past_the_timeout() -> None:
    class _HeldGrid(_FakeGrid):  # the first pull lasts past the deadline (a half-pushed reply's objects)
        def pull_messages(self, ids: Any) -> list[Any]:
            if self.pulls == 0:
                time.sleep(0.15)
            return super().pull_messages(ids)

    inner = _HeldGrid(ready=[1, 2, 10_000])  # m1 reached the SuperLink while the first pull was held
    replies = list(PollingGrid(inner, interval=0.01).send_and_receive(["a", "b", "c"], timeout=0.1))  # type: ignore[arg-type]
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert inner.pulls == 2, "one last pull after the deadline, no more"


def test_polling_grid_refuses_a_non_positive_interval() -> None:
    with pytest.raises(ValueError, match="interval"):
        PollingGrid(_FakeGrid([]), interval=0)  # type: ignore[arg-type]


def test_supernode_patch_caps_only_the_loops_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.supernode.start_client_internal as loop

    monkeypatch.setattr(loop, "time", loop.time)  # restored after the test
    slept: list[float] = []
    monkeypatch.setattr(supernode_polling._time, "sleep", slept.append)

    patched = supernode_polling.cap_supernode_sleeps(0.25)
    patched.time.sleep(3)  # the loop's sleep after an empty pull: a request to the SuperLink
    patched.time.sleep(0.5)  # its waits on its own state (the executor's reply): a look-up
    patched.time.sleep(0.01)

    assert patched is loop
    assert slept == [0.25, supernode_polling.LOCAL_WAIT, 0.01] and supernode_polling.LOCAL_WAIT < 0.25
    assert patched.time.monotonic is time.monotonic, "every other attribute is the real time module"
    assert sys.modules["time"] is time is supernode_polling._time, "the global time module is not replaced"
    with pytest.raises(ValueError, match="poll interval"):
        supernode_polling.cap_supernode_sleeps(0)


_PULL_BINDINGS = ("flwr.supercore.inflatable.inflatable_utils", "flwr.superlink.grid.http_grid",
                  "flwr.supernode.start_client_internal")


@pytest.fixture
def restored_pull_bindings(monkeypatch: pytest.MonkeyPatch) -> Any:
    import importlib

    modules = [importlib.import_module(name) for name in _PULL_BINDINGS]
    for module in modules:
        monkeypatch.setattr(module, "pull_objects", module.pull_objects)  # restored after the test
    return modules


def test_object_pull_backoff_starts_short_at_every_flower_binding(restored_pull_bindings: Any) -> None:
    original = restored_pull_bindings[0].pull_objects
    supernode_polling.shorten_object_pull_backoff(0.02, 0.5)
    supernode_polling.shorten_object_pull_backoff(0.02, 0.5)  # idempotent: wraps Flower's function, not a wrapper
    for module in restored_pull_bindings:
        assert module.pull_objects is not original and module.pull_objects.__wrapped__ is original, module.__name__


def test_object_pull_backoff_passes_the_shorter_waits_and_keeps_the_rest() -> None:
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    pull = supernode_polling._with_short_backoff(lambda *a, **k: calls.append((a, k)) or "done", 0.02, 0.5)
    assert pull(["id"], "fn", max_time=7) == "done"
    pull(["id"], "fn", initial_backoff=0.01, backoff_cap=10.0)  # a caller's shorter wait wins, a longer cap not
    assert calls == [((["id"], "fn"), {"initial_backoff": 0.02, "backoff_cap": 0.5, "max_time": 7}),
                     ((["id"], "fn"), {"initial_backoff": 0.01, "backoff_cap": 0.5})]
    with pytest.raises(ValueError, match="first"):
        supernode_polling.shorten_object_pull_backoff(1.0, 0.5)


def test_patched_pull_still_waits_for_an_object_being_pushed(restored_pull_bindings: Any) -> None:
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    supernode_polling.shorten_object_pull_backoff(0.001, 0.002)
    tries: list[str] = []

    def pull_one(object_id: str) -> bytes:
        tries.append(object_id)
        if len(tries) < 4:  # unavailable three times: the sender is still pushing it
            raise ObjectUnavailableError(object_id)
        return b"content"

    got = restored_pull_bindings[0].pull_objects(["obj"], pull_one, max_tries_per_object=10)
    assert got == {"obj": b"content"} and tries == ["obj"] * 4


def test_pull_patch_refuses_a_flower_that_changed(restored_pull_bindings: Any) -> None:
    restored_pull_bindings[1].pull_objects = lambda *a, **k: None  # http_grid no longer calls Flower's function
    with pytest.raises(RuntimeError, match="http_grid no longer calls"):
        supernode_polling.shorten_object_pull_backoff()


def test_executor_asks_often_while_a_run_is_under_way_and_rarely_when_idle() -> None:
    from veil.client.executor import ACTIVE_POLL, ACTIVE_SECONDS, IDLE_POLL, poll_interval

    assert poll_interval(0.0) == ACTIVE_POLL and poll_interval(ACTIVE_SECONDS - 1) == ACTIVE_POLL
    assert poll_interval(ACTIVE_SECONDS + 1) == IDLE_POLL == poll_interval(float("inf"))
    assert ACTIVE_POLL < IDLE_POLL
