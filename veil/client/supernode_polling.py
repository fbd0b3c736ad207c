"""``flower-supernode`` with a shorter poll interval: the one monkey-patch of Flower in veil (issue 14).

Why a patch: Flower 1.41's SuperNode loop (``flwr/supernode/start_client_internal.py``) sleeps a hard-coded
``time.sleep(3)`` whenever a pull finds no message, and ``time.sleep(0.5)`` while it waits for the ClientApp's
reply; ``flower-supernode`` has no option for either. A SecAgg+ round is four or five message exchanges, so a node
idles up to ~3.5 s per exchange: most of a deployed round's wall time (docs/benchmarks.md, deploy_overhead). No
supported setting changes it (the heartbeat interval only decides when a silent node counts as gone).

What it changes, and nothing else: that module's reference to the ``time`` module is replaced by a proxy whose
``sleep`` waits at most ``--poll-interval`` seconds; every other attribute is the real ``time``. Then Flower's own
``flower-supernode`` entry point runs with the remaining arguments, unchanged. Cost: an idle node sends one
``PullMessages`` request per interval (default 0.25 s: 4 requests/s) instead of one per 3 s; raise it for
federations of hundreds of nodes. The upstream proposal (a ``--poll-interval`` option, or a long-poll
``PullMessages``) is in docs/benchmarks.md.

    python -m veil.client.supernode_polling --poll-interval 0.25 -- --superlink HOST:PORT ...
"""

from __future__ import annotations

import sys
import time as _time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

DEFAULT_POLL_INTERVAL = 0.25  # seconds; Flower's own: 3 s between empty pulls, 0.5 s while awaiting a reply
_PATCHED_MODULE = "flwr.supernode.start_client_internal"


class _CappedSleepTime(ModuleType):
    """The ``time`` module with ``sleep`` capped at ``limit`` seconds."""

    def __init__(self, limit: float) -> None:
        super().__init__("time")
        self.limit = limit

    def sleep(self, seconds: float) -> None:
        _time.sleep(min(float(seconds), self.limit))

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)


def cap_supernode_sleeps(limit: float) -> ModuleType:
    """Make Flower's SuperNode loop wait at most ``limit`` seconds between polls; returns the patched module."""
    if not limit > 0:
        raise ValueError(f"poll interval must be > 0 seconds, got {limit}")
    import importlib

    module = importlib.import_module(_PATCHED_MODULE)
    if not hasattr(module, "time") or getattr(module.time, "sleep", None) is None:
        raise RuntimeError(f"{_PATCHED_MODULE} no longer uses time.sleep; this patch is for flwr 1.41")
    module.time = _CappedSleepTime(limit)  # type: ignore[attr-defined]
    return module


def main(argv: Sequence[str] | None = None) -> None:
    """``--poll-interval S`` then ``flower-supernode``'s own arguments (after an optional ``--``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    limit = DEFAULT_POLL_INTERVAL
    if args[:1] == ["--poll-interval"]:
        limit, args = float(args[1]), args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    cap_supernode_sleeps(limit)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *args]
    flower_supernode()


if __name__ == "__main__":
    main()
