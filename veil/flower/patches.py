"""Patches of Flower's transport waits and of the simulation engine (issue 14), and the patched SuperNode.

Why patches: none of these is a setting of ``flower-supernode``, the SuperLink, the ServerApp or ``run_simulation``;
the waits are most of a deployed round's wall time and the sweep most of a round of a 10,000-client simulation
(docs/benchmarks.md, deploy_overhead and sim_scale, with the traces that found them). SecAgg+'s mask generator is
patched in :mod:`veil.flower.secagg`, node sessions in :mod:`veil.flower.sessions`.

1. **The SuperNode loop's sleeps** (``flwr/supernode/start_client_internal.py``): ``time.sleep(3)`` whenever a pull
   finds no message and ``time.sleep(0.5)`` while it waits for the ClientApp's reply. A SecAgg+ round is four or
   five message exchanges, so a node idled up to ~3.5 s per exchange. :func:`cap_supernode_sleeps` replaces that
   module's reference to ``time`` by a proxy whose ``sleep`` waits at most ``--poll-interval`` seconds after an
   empty pull and at most :data:`LOCAL_WAIT` seconds in the 0.5-s waits on the node's own state (every other
   attribute is the real ``time``). Cost: an idle node sends one ``PullMessages`` per interval (default 0.25 s)
   instead of one per 3 s; raise it for federations of hundreds of nodes. The local waits send nothing.
2. **The object-pull back-off** (``flwr/supercore/inflatable/inflatable_utils.py``, ``pull_objects``): a message
   travels as a list of ids first and its objects (arrays, records) after; whoever pulls a message whose objects
   are still being pushed gets ``ObjectUnavailableError`` and waits ``PULL_INITIAL_BACKOFF`` = 1 s, doubling to
   10 s. That happens on every hop of every exchange (ServerApp <- SuperLink for replies, SuperNode <- SuperLink and
   executor <- SuperNode for instructions): ~1.2 s of the ~2 s an exchange took on a quiet machine, and 1 + 2 s on
   a message with model weights. :func:`shorten_object_pull_backoff` makes the first retry wait
   :data:`PULL_BACKOFF` seconds and caps the back-off at :data:`PULL_BACKOFF_CAP` (the retry count and total-time
   limits stay Flower's). The bindings patched are the three through which Flower 1.41 calls ``pull_objects``.

3. **The simulation engine's node sweep** (``flwr/server/superlink/fleet/vce/vce_api.py``,
   ``add_messages_to_queue``): every 0.1 s it calls ``get_message_ins(node_id, limit=1)`` for *every* simulated
   node, and each call scans the whole message store: O(nodes x messages) per pass, 14 / 96 / 974 ms at 100 /
   1,000 / 10,000 nodes, so at 10,000 it runs almost continuously and starves the ServerApp's thread.
   :func:`sweep_only_addressed_nodes` replaces it with the same loop over only the nodes that have an undelivered
   message (one scan of the in-memory store per pass, under the state's lock), calling Flower's own
   ``get_message_ins`` for each of them exactly as before (so delivery marks, TTL checks and the one-message-per-
   node-per-pass order are Flower's). Other LinkStates keep Flower's loop.

4. **The patched SuperNode** (:func:`main`, ``python -m veil.flower.patches``, started by ``veil client``): items 1
   and 2, then the three node-session fixes that run in the SuperNode (:mod:`veil.flower.sessions`: a 10-s
   heartbeat, activation retried for as long as a stale session can last, a message of a run that ended mid-pull
   dropped), then Flower's own ``flower-supernode``. Upstream proposal: docs/upstream/node-sessions.md.

Each patch checks the Flower version (:func:`veil.flower.check_version`) and that the code it patches is still there
(the rows of :data:`REACHES`), and fails with one line otherwise; it changes nothing else, and the processes it runs
in are veil's own (the node's SuperNode and executor, the ServerApp of a deployment, ``veil simulate``). Upstream
proposals: docs/upstream/poll-interval.md, docs/upstream/object-pull.md, docs/upstream/node-sweep.md.

    python -m veil.flower.patches --poll-interval 0.25 -- --superlink HOST:PORT ...   # a patched flower-supernode
"""

from __future__ import annotations

import functools
import importlib
import sys
import time as _time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from veil.flower import FlowerVersionError, Reach, check_version
from veil.flower.sessions import clean_stale_receive, patient_activation, short_node_heartbeat

DEFAULT_POLL_INTERVAL = 0.25  # seconds; Flower's own: 3 s between empty pulls, 0.5 s while awaiting a reply
LOCAL_WAIT = 0.02  # seconds between the SuperNode's looks at its own state while the executor works (Flower: 0.5)
PULL_BACKOFF = 0.02  # seconds before the first retry of an object still being pushed (Flower: 1 s)
PULL_BACKOFF_CAP = 0.5  # seconds at most between retries (Flower: 10 s)
_SUPERNODE_LOOP = "flwr.supernode.start_client_internal"
_PULL_OBJECTS = "flwr.supercore.inflatable.inflatable_utils"
_PULL_CALLERS = (_PULL_OBJECTS, "flwr.superlink.grid.http_grid", _SUPERNODE_LOOP)
_ENGINE = "flwr.server.superlink.fleet.vce.vce_api"
_SWEEP_PARAMS = ("state", "queue", "nodes_mapping", "f_stop")

REACHES = (
    Reach(_SUPERNODE_LOOP, "time.sleep"),  # item 1: the loop's module-level `time`
    *(Reach(name, "pull_objects", keywords=("initial_backoff", "backoff_cap", "max_time")) for name in _PULL_CALLERS),
    Reach(_PULL_OBJECTS, "ObjectUnavailableError"),
    Reach(_ENGINE, "add_messages_to_queue", _SWEEP_PARAMS),
    Reach("flwr.server.superlink.linkstate.in_memory_linkstate", "InMemoryLinkState.get_message_ins",
          ("self", "node_id", "limit")),
    Reach("flwr.supernode.cli", "flower_supernode"),
)


class _CappedSleepTime(ModuleType):
    """The ``time`` module with ``sleep`` capped: Flower's 3 s after an empty pull (a request to the SuperLink) at
    ``limit`` seconds, its 0.5 s waits on the node's own in-memory state (the executor's reply, an object's
    content) at ``local`` seconds, as those cost a dictionary look-up, not a request."""

    def __init__(self, limit: float, local: float = LOCAL_WAIT) -> None:
        super().__init__("time")
        self.limit, self.local = limit, min(limit, local)

    def sleep(self, seconds: float) -> None:
        seconds = float(seconds)
        _time.sleep(min(seconds, self.limit if seconds >= 1.0 else self.local))

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)


def cap_supernode_sleeps(limit: float) -> ModuleType:
    """Make Flower's SuperNode loop wait at most ``limit`` seconds between polls; returns the patched module.

    Upstream proposal: docs/upstream/poll-interval.md."""
    if not limit > 0:
        raise ValueError(f"poll interval must be > 0 seconds, got {limit}")
    version = check_version("SuperNode poll patch")
    module = importlib.import_module(_SUPERNODE_LOOP)
    if not hasattr(module, "time") or getattr(module.time, "sleep", None) is None:
        raise FlowerVersionError(f"flwr {version}: {_SUPERNODE_LOOP} no longer uses time.sleep; "
                                 "veil's SuperNode poll patch does not fit it")
    module.time = _CappedSleepTime(limit)  # type: ignore[attr-defined]
    return module


def _unwrapped(function: Any) -> Any:
    """Flower's own function behind one of this module's wrappers (``function`` itself when not wrapped)."""
    return getattr(function, "__wrapped__", function)


def _with_short_backoff(pull_objects: Callable[..., Any], first: float, cap: float) -> Callable[..., Any]:
    """``pull_objects`` whose retries start at ``first`` s and never wait more than ``cap`` s (or the caller's)."""

    @functools.wraps(pull_objects)
    def pull(*args: Any, initial_backoff: float = first, backoff_cap: float = cap, **kwargs: Any) -> Any:
        return pull_objects(*args, initial_backoff=min(initial_backoff, first), backoff_cap=min(backoff_cap, cap),
                            **kwargs)

    pull.veil_short_backoff = True  # type: ignore[attr-defined]
    return pull


def shorten_object_pull_backoff(first: float = PULL_BACKOFF, cap: float = PULL_BACKOFF_CAP) -> None:
    """Make Flower's object pulls retry after ``first`` s, at most ``cap`` s apart (idempotent).

    Upstream proposal: docs/upstream/object-pull.md."""
    if not 0 < first <= cap:
        raise ValueError(f"need 0 < first <= cap seconds, got first={first}, cap={cap}")
    version = check_version("object-pull patch")
    original = _unwrapped(importlib.import_module(_PULL_OBJECTS).pull_objects)
    for name in _PULL_CALLERS:
        module = importlib.import_module(name)
        if _unwrapped(getattr(module, "pull_objects", None)) is not original:
            raise FlowerVersionError(f"flwr {version}: {name} no longer calls flwr's pull_objects; "
                                     "veil's object-pull patch does not fit it")
        module.pull_objects = _with_short_backoff(original, first, cap)  # type: ignore[attr-defined]



def _addressed_nodes(state: Any, nodes: Any) -> list[int] | None:
    """Ids in ``nodes`` with an undelivered message in ``state``'s in-memory store; None when the state has none."""
    store = getattr(state, "message_ins_store", None)
    lock = getattr(state, "lock", None)
    if not isinstance(store, dict) or lock is None:
        return None
    with lock:
        pending = {m.metadata.dst_node_id for m in list(store.values()) if m.metadata.delivered_at == ""}
    return [node_id for node_id in pending if node_id in nodes]


def sweep_only_addressed_nodes() -> Callable[..., Any]:
    """Make the simulation engine poll only the nodes that have a message waiting (idempotent); returns the sweep.

    Upstream proposal: docs/upstream/node-sweep.md."""
    version = check_version("node-sweep patch")
    engine = importlib.import_module(_ENGINE)
    flower_sweep = _unwrapped(engine.add_messages_to_queue)
    code = getattr(flower_sweep, "__code__", None)
    if code is None or code.co_varnames[:4] != _SWEEP_PARAMS:
        raise FlowerVersionError(f"flwr {version}: {_ENGINE}.add_messages_to_queue changed; "
                                 "veil's node-sweep patch does not fit it")

    @functools.wraps(flower_sweep)
    def sweep(state: Any, queue: Any, nodes_mapping: Any, f_stop: Any) -> None:
        if _addressed_nodes(state, nodes_mapping) is None:  # not the in-memory state: Flower's own loop
            flower_sweep(state, queue, nodes_mapping, f_stop)
            return
        while not f_stop.is_set():
            for node_id in _addressed_nodes(state, nodes_mapping) or ():
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(0.1)

    engine.add_messages_to_queue = sweep  # type: ignore[attr-defined]
    return sweep


def main(argv: Sequence[str] | None = None) -> None:
    """``--poll-interval S`` then ``flower-supernode``'s own arguments (after an optional ``--``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    limit = DEFAULT_POLL_INTERVAL
    if args[:1] == ["--poll-interval"]:
        limit, args = float(args[1]), args[2:]
    def apply() -> None:
        cap_supernode_sleeps(limit)
        shorten_object_pull_backoff()
        short_node_heartbeat()  # a killed node is offline after 20 s, not 60 (veil.flower.sessions, fix 2)
        patient_activation()  # a restarted node waits out its own stale session instead of exiting (fix 1)
        clean_stale_receive()  # a message of a run that ended mid-pull is dropped, not left to wedge the node (fix 5)

    run_patched("flower-supernode", args, apply, "flwr.supernode.cli:flower_supernode")


def run_patched(program: str, args: list[str], apply: Callable[[], object], entry: str) -> None:
    """Apply ``apply``'s patches, then run Flower's CLI ``entry`` ("module:function", imported only after the
    patches) as ``program`` with ``args`` (after an optional ``--``); a Flower release the patches were not tested
    with ends in one line and its exit code."""
    if args[:1] == ["--"]:
        args = args[1:]
    try:
        apply()
    except FlowerVersionError as err:
        print(f"veil: error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    module, function = entry.split(":")
    sys.argv = [program, *args]
    getattr(importlib.import_module(module), function)()


if __name__ == "__main__":
    main()
