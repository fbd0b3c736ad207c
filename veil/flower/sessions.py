"""Node sessions on the SuperLink that outlive their node: three fixes for Flower's deployment (issue 27), used by
:mod:`veil.flower.patches` (the patched SuperNode), the ServerApp and ``veil server --resume``.

The SuperLink counts a node as online until ``online_until`` = its last heartbeat + ``HEARTBEAT_PATIENCE`` (2) x the
interval the node announced (``HEARTBEAT_DEFAULT_INTERVAL`` = 30 s in flwr 1.41, hard-coded in the SuperNode). Three
faults follow (the fault probe of 2026-12-07; docs/deployment.md, "What survives what"):

1. **A node killed and restarted cannot rejoin.** ``ActivateNode`` succeeds only for a node that is registered or
   offline (``SqlLinkState.activate_node``); for up to 60 s after a kill -9 the old session still counts as online,
   so the restarted SuperNode is refused with ``[code: 2004] Failed to activate SuperNode`` and exits, exactly as a
   node whose key is not registered. :func:`patient_activation` makes the SuperNode retry a refused activation for
   :data:`ACTIVATION_WINDOW` seconds (longer than a stale session can last) before it gives up as before.
2. **A dead node counts as online for a minute.** Rounds sampled meanwhile wait on it until their stage timeouts.
   :func:`short_node_heartbeat` makes the SuperNode announce and keep Flower's shortest allowed interval
   (``HEARTBEAT_MIN_INTERVAL`` = 10 s), so a vanished node is offline after 20 s. Cost: one heartbeat request per
   ~4 s per node instead of per ~20 s.
3. **After ``veil server --resume`` the SuperLink counts nodes that are not there.** The state database keeps each
   node's ``online`` status and ``online_until`` from before the crash; a restarted SuperLink reports those nodes as
   online although they are in reconnect back-off or gone, and the resumed round waits on them. :func:`forget_online_nodes`
   marks every online node offline in the database before the SuperLink starts. A live node is online again at its
   next heartbeat (Flower's ``acknowledge_node_heartbeat`` re-activates an offline node); its node id, messages and
   registration are unchanged.

4. **A reply half-pushed by a node that died holds the round for minutes.** A node killed while it pushes a reply
   leaves the message listed and its objects missing; the ServerApp's grid (``http_grid.pull_messages``) then retries
   ``pull_objects`` for up to 500 tries per object (``PULL_MAX_TIME`` 7,200 s) until the SuperLink's object-push
   session expires, whatever the stage's ``timeout``: an unmask stage with a 10-s timeout took 196 s in
   tests/e2e/test_faults_e2e.py. :func:`bound_reply_pulls` caps the grid's object pulls at the stage timeout.

5. **A message of a run that ended while the node pulled it wedges the node.** After ``veil server --resume`` (a
   new run), a node still pulling the crashed run's message gets ``RunNotRunningException`` from its object pulls.
   ``start_client_internal._pull_and_store_message`` catches it (a ``BaseException``: its ``except Exception``
   clean-up is skipped) after it has stored the message and created a task: the executor acquires that task and
   waits for objects that never come, and the SuperNode waits for its reply for ever, heartbeating, so every round
   samples it and waits out a stage timeout (tests/e2e/test_faults_e2e.py, the node behind the lossy link).
   :func:`clean_stale_receive` turns that exception, raised by the object pulls, into an ordinary error, so
   Flower's own clean-up deletes the message and fails the task.

Each fix checks the Flower version (:func:`veil.flower.check_version`) and that what it patches is still there (the
rows of :data:`REACHES`), and fails with one line otherwise. Upstream proposal: docs/upstream/node-sessions.md.
"""

from __future__ import annotations

import importlib
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

from veil.flower import FlowerVersionError, Reach, check_version

__all__ = ["ACTIVATION_WINDOW", "HEARTBEAT_INTERVAL", "REACHES", "bound_reply_pulls", "clean_stale_receive",
           "forget_online_nodes", "patient_activation", "short_node_heartbeat"]

log = logging.getLogger("veil")

HEARTBEAT_INTERVAL = 10.0  # seconds; Flower's minimum (HEARTBEAT_MIN_INTERVAL), its default is 30
ACTIVATION_WINDOW = 35.0  # seconds: > HEARTBEAT_PATIENCE (2) x HEARTBEAT_INTERVAL, plus a heartbeat's call timeout
ACTIVATION_RETRY = 1.0  # seconds between activation attempts
_CONNECTION = "flwr.supernode.fleet_http_connection"
_HEARTBEAT = "flwr.supercore.heartbeat"
_GRID = "flwr.superlink.grid.http_grid"
_RECEIVE = "flwr.supernode.start_client_internal"
ACTIVATION_FAILED = 2004  # flwr.supercore.error.ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED

REACHES = (
    Reach(_CONNECTION, "HEARTBEAT_DEFAULT_INTERVAL"),
    Reach(_HEARTBEAT, "HEARTBEAT_DEFAULT_INTERVAL"),
    Reach("flwr.common.constant", "HEARTBEAT_MIN_INTERVAL"),
    Reach("flwr.common.constant", "HEARTBEAT_MAX_INTERVAL"),
    Reach(_CONNECTION, "FleetHttpClient.ActivateNode", ("self", "request")),
    Reach("flwr.supercore.error", "FlowerError.from_json"),
    Reach("flwr.supercore.error", "ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED"),
    Reach("flwr.supercore.constant", "NodeStatus.ONLINE"),
    Reach("flwr.supercore.constant", "NodeStatus.OFFLINE"),
    Reach(_GRID, "pull_objects", keywords=("max_time",)),
    Reach("flwr.supercore.run", "RunNotRunningException"),
    Reach(_RECEIVE, "_pull_and_store_message", keywords=("pull_object",)),
)


def short_node_heartbeat(interval: float = HEARTBEAT_INTERVAL) -> None:
    """Make this process's SuperNode announce and send heartbeats every ``interval`` s (idempotent; fix 2)."""
    version = check_version("heartbeat patch")
    from flwr.common.constant import HEARTBEAT_MAX_INTERVAL, HEARTBEAT_MIN_INTERVAL

    if not HEARTBEAT_MIN_INTERVAL <= interval <= HEARTBEAT_MAX_INTERVAL:
        raise ValueError(f"heartbeat interval must be in [{HEARTBEAT_MIN_INTERVAL}, {HEARTBEAT_MAX_INTERVAL}] s, "
                         f"got {interval}")
    modules = [importlib.import_module(name) for name in (_CONNECTION, _HEARTBEAT)]
    for module in modules:
        if not isinstance(getattr(module, "HEARTBEAT_DEFAULT_INTERVAL", None), (int, float)):
            raise FlowerVersionError(f"flwr {version}: {module.__name__} no longer reads HEARTBEAT_DEFAULT_INTERVAL; "
                                     "veil's heartbeat patch does not fit it")
    for module in modules:
        module.HEARTBEAT_DEFAULT_INTERVAL = interval  # type: ignore[attr-defined]


def _is_activation_refusal(exc: BaseException) -> bool:
    import httpx
    from flwr.supercore.error import FlowerError

    if not isinstance(exc, httpx.HTTPStatusError):
        return False
    error = FlowerError.from_json(exc.response.text)
    return error is not None and int(error.code) == ACTIVATION_FAILED


def patient_activation(window: float = ACTIVATION_WINDOW, retry: float = ACTIVATION_RETRY) -> type:
    """Make this process's SuperNode retry a refused ``ActivateNode`` for ``window`` s (idempotent; fix 1).

    A refusal that lasts the whole window (an unregistered or revoked key, or another live node holding this key)
    ends the SuperNode as Flower does, ``[code: 2004]``, ``window`` seconds later. Returns the client class in use."""
    version = check_version("activation patch")
    module = importlib.import_module(_CONNECTION)
    flower_client = getattr(module, "FleetHttpClient", None)
    if getattr(flower_client, "veil_patient_activation", False):
        return flower_client  # type: ignore[return-value]
    if flower_client is None or not callable(getattr(flower_client, "ActivateNode", None)):
        raise FlowerVersionError(f"flwr {version}: {_CONNECTION} no longer activates through "
                                 "FleetHttpClient.ActivateNode; veil's activation patch does not fit it")

    class PatientFleetHttpClient(flower_client):  # type: ignore[misc, valid-type]
        """Flower's Fleet client whose ``ActivateNode`` waits out a stale session of this node's key."""

        veil_patient_activation = True

        def ActivateNode(self, request: Any) -> Any:  # noqa: N802 - Flower's name
            deadline, told = time.monotonic() + window, False
            while True:
                try:
                    return super().ActivateNode(request)
                except Exception as exc:
                    if not _is_activation_refusal(exc) or time.monotonic() + retry > deadline:
                        raise
                    if not told:
                        log.warning("the SuperLink refused to activate this node (code %d): it may still hold the "
                                    "session of this node's previous process; retrying for up to %.0f s",
                                    ACTIVATION_FAILED, window)
                        told = True
                    time.sleep(retry)

    module.FleetHttpClient = PatientFleetHttpClient  # type: ignore[attr-defined]
    return PatientFleetHttpClient


def forget_online_nodes(database: Path) -> int:
    """Mark every node that the SuperLink state ``database`` holds as online as offline (fix 3); returns how many.

    Run it only while no SuperLink uses the database (before ``veil server --resume`` starts one). A missing
    database (nothing to resume) changes nothing."""
    version = check_version("resume patch")
    if not database.is_file():
        return 0
    from flwr.supercore.constant import NodeStatus

    with sqlite3.connect(database, timeout=30) as conn:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(node)")}
        if not {"status", "online_until"} <= columns:
            raise FlowerVersionError(f"flwr {version}: the SuperLink database {database} has no node table with "
                                     "status and online_until; veil's resume patch does not fit it")
        done = conn.execute("UPDATE node SET status = ?, online_until = ? WHERE status = ?",
                            (NodeStatus.OFFLINE, time.time(), NodeStatus.ONLINE)).rowcount
    log.info("resume: %d node(s) the SuperLink held as online are offline until their next heartbeat", done)
    return int(done)


def bound_reply_pulls(max_time: float) -> None:
    """Make the ServerApp's grid give up pulling a reply's objects after ``max_time`` s (fix 4; idempotent: a new
    bound replaces the old). The reply then arrives as Flower's own error message ("Reply message objects are
    unavailable"), which the SecAgg+ stage counts as a drop-out."""
    version = check_version("reply pull patch")
    if not max_time > 0:
        raise ValueError(f"max_time must be > 0 seconds, got {max_time}")
    grid = importlib.import_module(_GRID)
    current = getattr(grid, "pull_objects", None)
    inner = getattr(current, "veil_bounded", current)  # what was there before an earlier bound
    if not callable(inner):
        raise FlowerVersionError(f"flwr {version}: {_GRID} no longer calls pull_objects; "
                                 "veil's reply-pull patch does not fit it")

    def pull(*args: Any, max_time: float | None = None, **kwargs: Any) -> Any:
        return inner(*args, max_time=bound if max_time is None else min(max_time, bound), **kwargs)

    bound = float(max_time)
    pull.veil_bounded = inner  # type: ignore[attr-defined]
    pull.__wrapped__ = getattr(inner, "__wrapped__", inner)  # type: ignore[attr-defined] # Flower's, for other patches
    grid.pull_objects = pull  # type: ignore[attr-defined]


class StaleRunMessage(RuntimeError):
    """The run of a message being received is no longer running (Flower's ``RunNotRunningException``)."""


def clean_stale_receive() -> None:
    """Make this process's SuperNode drop a message whose run ended while its objects were pulled (fix 5;
    idempotent): the object pulls raise :class:`StaleRunMessage` instead of ``RunNotRunningException``, so
    ``_pull_and_store_message`` deletes the stored message and fails its task, as for any failed pull."""
    version = check_version("stale receive patch")
    from flwr.supercore.run import RunNotRunningException

    module = importlib.import_module(_RECEIVE)
    inner = getattr(module, "_pull_and_store_message", None)
    if getattr(inner, "veil_clean_stale", False):
        return
    code = getattr(inner, "__code__", None)
    if code is None or "pull_object" not in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]:
        raise FlowerVersionError(f"flwr {version}: {_RECEIVE} no longer pulls objects through _pull_and_store_message("
                                 "pull_object=...); veil's stale-receive patch does not fit it")

    def pull_and_store(*args: Any, pull_object: Any, **kwargs: Any) -> Any:
        def pull(run_id: int, object_id: str) -> bytes:
            try:
                return pull_object(run_id, object_id)  # type: ignore[no-any-return]
            except RunNotRunningException:
                raise StaleRunMessage(f"run {run_id} is no longer running") from None

        return flower_receive(*args, pull_object=pull, **kwargs)

    flower_receive: Any = inner
    pull_and_store.veil_clean_stale = True  # type: ignore[attr-defined]
    module._pull_and_store_message = pull_and_store  # type: ignore[attr-defined]
