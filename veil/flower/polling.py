"""The ServerApp's grid, waiting for replies with a short pull interval (issue 14).

Flower 1.41's deployment grid (``flwr/superlink/grid/http_grid.py``, ``HttpGrid.send_and_receive``) sleeps a fixed
3 s between pulls for replies, and the simulation's ``InMemoryGrid`` 0.1 s; neither is a setting the ServerApp can
change. SecAgg+ makes four or five such exchanges per round, so in a deployment the server alone idles up to ~15 s
per round. :class:`PollingGrid` wraps the grid Flower hands the ServerApp (composition through ``Grid``'s public
abstract interface, not a patch): every call is delegated, and ``send_and_receive`` keeps Flower's contract (push,
then pull until every reply is in or ``timeout`` passes) with ``interval`` seconds between pulls. The pulls go to
the SuperLink's local Runtime API, so a short interval costs little. Upstream proposal: docs/upstream/poll-interval.md.

Not a patch, but bound to the shape of ``Grid`` (:data:`REACHES`): Flower 1.43.dev renames
``pull_messages(message_ids)`` to ``pull_messages(reply_to_message_ids=None, *, message_ids=None)``, so
:class:`PollingGrid` checks the Flower version when it is built (:func:`veil.flower.check_version`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.common import Message
from flwr.supercore.run import Run
from flwr.serverapp import Grid

from veil.flower import Reach, check_version

PULL_INTERVAL = 0.05  # seconds between pulls for replies (Flower: 3 s deployed, 0.1 s simulated)

REACHES = (
    Reach("flwr.supercore.run", "Run"),
    Reach("flwr.serverapp", "Grid.pull_messages", ("self", "message_ids")),
    Reach("flwr.serverapp", "Grid.push_messages", ("self", "messages")),
    Reach("flwr.serverapp", "Grid.send_and_receive", ("self", "messages"), keywords=("timeout",)),
    Reach("flwr.serverapp", "Grid.create_message",
          ("self", "content", "message_type", "dst_node_id", "group_id", "ttl")),
    Reach("flwr.serverapp", "Grid.get_node_ids", ("self",)),
    Reach("flwr.serverapp", "Grid.set_run", ("self", "run")),
)


class DelegatingGrid(Grid):
    """A ``Grid`` that hands every call to ``inner``; subclasses override what they change."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, content: Any, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.inner.send_and_receive(messages, timeout=timeout)


class PollingGrid(DelegatingGrid):
    """Delegates to ``inner``; ``send_and_receive`` pulls every ``interval`` seconds."""

    def __init__(self, inner: Grid, *, interval: float = PULL_INTERVAL) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        check_version("reply polling grid")
        super().__init__(inner)
        self.interval = interval

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull until every reply is in or ``timeout`` seconds pass (None: no limit).

        Once the timeout has passed, one last pull collects what reached the SuperLink in time: a single pull can
        itself last until the deadline, held by the objects of a reply that a dying node half-pushed
        (:func:`veil.flower.sessions.bound_reply_pulls`), and the replies that arrived meanwhile count (issue 27:
        without it a node killed at unmask sank a round that its survivors had answered in time)."""
        pending = set(self.inner.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        last = False
        while pending:
            got = list(self.inner.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or last:
                break
            if deadline is not None and time.monotonic() >= deadline:
                last = True
                continue
            time.sleep(self.interval)
        return replies

    def __getattr__(self, name: str) -> Any:  # anything else a Flower version adds (close, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
