"""veil.flower.patches.sweep_only_addressed_nodes: the simulation engine's sweep delivers exactly what Flower's own
sweep delivers (every addressed node's messages, one per node per pass), and keeps Flower's loop for other states."""

from __future__ import annotations

import queue
import threading
from collections import Counter
from typing import Any

import pytest

from benchmarks.sim_scale import engine_state
from veil.flower import patches as flower_patches


@pytest.fixture
def restored_engine(monkeypatch: pytest.MonkeyPatch) -> Any:
    import flwr.server.superlink.fleet.vce.vce_api as engine

    monkeypatch.setattr(engine, "add_messages_to_queue", engine.add_messages_to_queue)  # restored after the test
    return engine


class _Passes(threading.Event):
    """The sweeps' stop event; both sweeps wait on it once per pass, so its waits count the passes."""

    def __init__(self) -> None:
        super().__init__()
        self.passes = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.passes += 1
        return super().wait(timeout)


def _deliveries(sweep: Any, state: Any, nodes: list[int], expected: int) -> Counter[tuple[int, int]]:
    """(pass, node counted from the end) of every message ``sweep`` queues, until ``expected`` arrived (<= 20 s)."""
    stop, got = _Passes(), queue.Queue()  # type: ignore[var-annotated]

    class _Recorded(queue.Queue):  # type: ignore[type-arg]
        def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
            got.put((stop.passes, len(nodes) - 1 - nodes.index(item.metadata.dst_node_id)))

    worker = threading.Thread(target=sweep, args=(state, _Recorded(), {n: i for i, n in enumerate(nodes)}, stop),
                              daemon=True)
    worker.start()
    try:
        out = [got.get(timeout=20) for _ in range(expected)]
    finally:
        stop.set()
        worker.join(timeout=5)
    return Counter(out)


def test_the_patched_sweep_delivers_what_flowers_delivers(restored_engine: Any) -> None:
    addressed = [0, 3, 3, 7, 41]  # node 3 (from the end) has two messages: the second comes in a later pass
    flower_state, flower_nodes = engine_state(60, addressed)
    flower = _deliveries(restored_engine.add_messages_to_queue, flower_state, flower_nodes, len(addressed))

    patched_sweep = flower_patches.sweep_only_addressed_nodes()
    assert restored_engine.add_messages_to_queue is patched_sweep
    assert flower_patches.sweep_only_addressed_nodes().__wrapped__ is patched_sweep.__wrapped__  # idempotent
    state, nodes = engine_state(60, addressed)
    patched = _deliveries(patched_sweep, state, nodes, len(addressed))

    expected = Counter({(0, 0): 1, (0, 3): 1, (1, 3): 1, (0, 7): 1, (0, 41): 1})  # node 3's second: next pass
    assert patched == flower == expected
    assert not state.get_message_ins(node_id=nodes[-1 - 3], limit=1), "every message was marked delivered"


def test_a_state_without_the_in_memory_store_keeps_flowers_loop(restored_engine: Any) -> None:
    class _OtherState:
        def __init__(self) -> None:
            self.asked: list[int] = []

        def get_message_ins(self, *, node_id: int, limit: int) -> list[Any]:
            self.asked.append(node_id)
            return []

    sweep = flower_patches.sweep_only_addressed_nodes()
    state, stop = _OtherState(), threading.Event()
    threading.Timer(0.25, stop.set).start()
    sweep(state, queue.Queue(), {11: 0, 12: 1, 13: 2}, stop)
    assert state.asked[:3] == [11, 12, 13], "Flower's loop asks every node"


def test_the_patch_refuses_a_changed_engine(restored_engine: Any) -> None:
    restored_engine.add_messages_to_queue = lambda queue, state: None
    with pytest.raises(RuntimeError, match="add_messages_to_queue changed"):
        flower_patches.sweep_only_addressed_nodes()
