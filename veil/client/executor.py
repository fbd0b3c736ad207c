"""The node's app executor: runs each ClientApp task with the veil ClientApp its owner installed, or refuses it.

Flower 1.41's SuperNode with ``--isolation process`` stores the messages and the run's bundle (FAB) it receives but
executes nothing itself: an executor process acquires each task from the node's local Runtime API
(``flower-superexec`` normally, which starts ``flwr-clientapp`` to unpack and import the FAB's code). ``veil client``
starts this module instead. For every task it pulls the task input through Flower's own Runtime API client, checks
``sha256`` of the FAB *content* (not the hash the SuperLink declares) against the FAB the node rebuilds from its
installed veil (:mod:`veil.security.bundle`), and only then calls the *installed* ``veil.client.app:app``; the FAB is
never unpacked or imported. A foreign FAB gets an error reply and one log line, and the executor waits for the next
task, so the node stays up for legitimate runs. Upstream proposal: docs/upstream/fab-hash-pin.md. What talks to the
Runtime API (Flower's private client and task helpers) is :mod:`veil.flower.runtime`; this module decides.

The owner's policy is applied inside the ClientApp (:mod:`veil.client.floor`), whose refusals are ordinary replies.
An error reply never carries an error's text or even its class: either may depend on the owner's data or name local
paths (DESIGN.md decision 7), so the server gets one fixed line and the node's log keeps the cause.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from veil.errors import VeilError
from veil.flower.runtime import TaskHeartbeat, acquire_task, error_reply, pull_task, push_output, push_reply
from veil.flower.runtime import runtime_client, secagg_stage

log = logging.getLogger("veil.client")

DECLINED = "veil node declined the round; the reason is in the node's own log"


def _veil_error_in(err: BaseException) -> VeilError | None:
    """The VeilError behind ``err`` (Flower wraps exceptions raised inside a ClientApp)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, VeilError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _execute(message: Any, context: Any) -> tuple[Any, bool, str]:
    """Run the installed veil ClientApp on one message; returns (reply, completed, details for the server)."""
    from veil.client.app import app as installed_app

    log.info("run %d: %s message (%s)", context.run_id, message.metadata.message_type, secagg_stage(message))
    try:
        return installed_app(message=message, context=context), True, ""
    except Exception as err:  # every failure becomes the same error reply; the executor lives on
        veil_err = _veil_error_in(err)
        if veil_err is not None:
            log.error("run %d: round declined: %s", context.run_id, veil_err)
        else:
            log.exception("run %d: the veil ClientApp failed", context.run_id)
        return error_reply(message, reason=DECLINED), False, DECLINED


def run_task(address: str, token: str, expected_hash: str) -> bool:
    """Handle one acquired task; returns False when its bundle was refused."""
    import hashlib

    from veil.security.bundle import describe_difference

    client = runtime_client(address, token)
    context, completed, details, trusted = None, False, "veil node failed to read the task", True
    try:
        with TaskHeartbeat(client):
            message, context, run, fab = pull_task(client)
            actual = hashlib.sha256(fab.content).hexdigest()
            if actual != expected_hash:
                trusted = False
                log.error("run %d refused: its app bundle (FAB %s, %s) is not the veil ClientApp installed on this "
                          "node (FAB %s): %s; none of its code was run", run.run_id, actual[:12], run.fab_id or "?",
                          expected_hash[:12], describe_difference(fab.content))
                details = "veil node refused the app bundle: not byte-identical to its installed veil ClientApp"
                reply = error_reply(message, reason=details, bad_bundle=True)
            else:
                reply, completed, details = _execute(message, context)
            push_reply(client, reply, context)
    except Exception as err:  # the node expires a task we could not finish; keep serving
        log.error("a task could not be completed: %s", type(err).__name__)
    finally:
        try:
            push_output(client, context, completed=completed, details=details)
        except Exception as err:  # the task is gone (its run stopped): nothing to hand back, keep serving
            log.error("a task's end state could not be handed back: %s", type(err).__name__)
        client.close()
    return trusted


ACTIVE_POLL = 0.05  # seconds between asks for a task while a run is under way (the node's loopback API)
IDLE_POLL = 0.5  # seconds between asks once no task came for ACTIVE_SECONDS
ACTIVE_SECONDS = 30.0


def poll_interval(since_last_task: float) -> float:
    """How long to wait before asking again: a SecAgg+ round is four or five tasks in a row, so while a run is under
    way the next one is near (0.05 s instead of 0.2 s, with the SuperNode's shorter local waits, shortened a deployed
    round by about a sixth: benchmark deploy_overhead, docs/benchmarks.md); an idle node asks twice a second."""
    return ACTIVE_POLL if since_last_task < ACTIVE_SECONDS else IDLE_POLL


def serve(address: str, *, expected_hash: str, stop: threading.Event | None = None) -> None:
    """Acquire and run ClientApp tasks from the node's Runtime API until ``stop`` is set."""
    stop = stop or threading.Event()
    client = runtime_client(address, None)
    log.info("%s: runs only the installed veil ClientApp (FAB %s)", READY, expected_hash[:12])
    last_task = float("-inf")
    try:
        while not stop.is_set():
            token = acquire_task(client)
            if token is not None:
                run_task(address, token, expected_hash)
                last_task = time.monotonic()
            else:
                stop.wait(poll_interval(time.monotonic() - last_task))
    finally:
        client.close()


READY = "executor ready"  # the line ``veil client`` waits for before its SuperNode connects


def preload() -> None:
    """Import the installed ClientApp and what its first training step needs (torch, transformers, Opacus, peft:
    ~5 CPU-s) before the node connects. A node is sampled as soon as its SuperNode is connected, and a SecAgg+ stage
    has a deadline (``secagg.timeout``): imported on the first task instead, a node (re)started on a busy machine
    missed its first round's first stage (seen in CI: every node of a five-node deployment, round 1)."""
    import peft  # noqa: F401
    import veil.client.app  # noqa: F401


def _watch_process(pid: int, stop: threading.Event) -> None:
    """Set ``stop`` when process ``pid`` (the node's SuperNode) is gone."""

    def watch() -> None:
        while not stop.wait(0.5):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                stop.set()
                signal.raise_signal(signal.SIGINT)  # interrupts a Runtime API call stuck in its retries
            except PermissionError:
                continue

    threading.Thread(target=watch, name="veil-supernode-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """``python -m veil.client.executor --runtime-api-address 127.0.0.1:PORT`` (started by ``veil client``)."""
    parser = argparse.ArgumentParser(prog="veil-node-executor", description=main.__doc__)
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--supernode-pid", type=int, default=None, help="stop when this process ends")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from veil.client.secagg_guard import quiet_worker
    from veil.flower.patches import shorten_object_pull_backoff
    from veil.security.bundle import fab_hash

    quiet_worker()
    stop = threading.Event()
    try:
        shorten_object_pull_backoff()  # a task's objects: first retry after 0.02 s, not 1 s
        if args.supernode_pid is not None:
            _watch_process(args.supernode_pid, stop)
        preload()
        serve(args.runtime_api_address, expected_hash=fab_hash(), stop=stop)
    except KeyboardInterrupt:
        return 130
    except VeilError as err:  # an untested Flower (veil.flower.check_version): one line, no traceback
        print(f"veil: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
