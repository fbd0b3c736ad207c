"""The node executor's Flower half: talking to the SuperNode's local Runtime API as ``flower-superexec`` and
``flwr-clientapp`` do, through Flower's own (private) client, request types and task helpers.

veil's node runs its own executor (:mod:`veil.client.executor`) in place of ``flower-superexec``/``flwr-clientapp``
so that only the veil ClientApp its owner installed ever runs (DESIGN.md decision 12). That executor decides; this
module only moves tasks: :func:`acquire_task` asks for one, :func:`pull_task` reads its message, context, run and
bundle (FAB), :func:`push_reply` and :func:`push_output` hand back the reply and the task's end state, and
:class:`TaskHeartbeat` tells the node a long task is alive. None of these is public Flower API (the Runtime API is
Flower's own protocol between its processes), hence the version check in :func:`runtime_client` and the rows of
:data:`REACHES`. Upstream proposal that would make the replacement unnecessary: docs/upstream/fab-hash-pin.md.

Flower is imported inside the functions: the executor sets its quiet environment before Flower loads.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from veil.flower import Reach, check_version

__all__ = ["HEARTBEAT_SECONDS", "REACHES", "TaskHeartbeat", "acquire_task", "error_reply", "pull_task", "push_output",
           "push_reply", "runtime_client", "secagg_stage"]

log = logging.getLogger("veil.client")

HEARTBEAT_SECONDS = 10.0
_RUN_CLIENTAPP = "flwr.supernode.runtime.run_clientapp"

REACHES = (
    Reach("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor", keywords=("component_name",)),
    Reach("flwr.supercore.interceptors", "RuntimeTokenHttpInterceptor"),
    Reach("flwr.supercore.retry", "make_simple_http_retry_invoker"),
    Reach("flwr.supercore.retry", "RetryInvoker.__init__", keywords=("should_giveup",)),
    Reach("flwr.supercore.runtime", "RuntimeHttpClient.from_server_address",
          keywords=("server_address", "insecure", "root_certificates", "interceptors", "retry_invoker")),
    Reach("flwr.supercore.runtime", "RuntimeHttpClient.AcquireTask"),
    Reach("flwr.supercore.runtime", "RuntimeHttpClient.SendTaskHeartbeat"),
    Reach("flwr.supercore.runtime", "RuntimeHttpClient.close"),
    Reach("flwr.proto.runtime_pb2", "AcquireTaskRequest"),
    Reach("flwr.proto.runtime_pb2", "SendTaskHeartbeatRequest"),
    Reach("flwr.supercore.constant", "TaskType.CLIENT_APP"),
    Reach(_RUN_CLIENTAPP, "pull_task_input", ("client",)),
    Reach(_RUN_CLIENTAPP, "push_message", ("client", "message", "context")),
    Reach(_RUN_CLIENTAPP, "push_task_output", keywords=("client", "context", "sub_status", "details")),
    Reach("flwr.common.constant", "SubStatus.COMPLETED"),
    Reach("flwr.common.constant", "SubStatus.FAILED"),
    Reach("flwr.common.constant", "ErrorCode.CLIENT_APP_RAISED_EXCEPTION"),
    Reach("flwr.common.constant", "ErrorCode.INVALID_FAB"),
)


def runtime_client(address: str, token: str | None) -> Any:
    """A Runtime API client for the node's loopback API (plain HTTP on 127.0.0.1, like flower-superexec's); with
    a task's ``token`` it speaks as that task's ``flwr-clientapp``, without one as the executor."""
    check_version("node executor")
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp" if token else "SuperExec")]
    invoker = make_simple_http_retry_invoker()
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
        invoker.should_giveup = _task_gone_gives_up(invoker.should_giveup)
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors, retry_invoker=invoker)


def _task_gone_gives_up(should_giveup: Any) -> Any:
    """A task client's retry rule: HTTP 401 (the task's token is no longer valid: its run stopped, e.g. the
    coordinator died mid-round) ends that call with its error instead of Flower's reaction.

    Flower's invoker answers a 401 with SIGINT to its own process (``flwr.supercore.retry.http_retry``): right for
    ``flwr-clientapp``, one process per task, but veil's executor is one long-lived process for every task, and the
    signal stopped the whole node (found by the fault suite's coordinator kill). Here the call raises; the executor
    logs that the task could not be completed and asks for the next one."""
    import httpx

    def giveup(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == httpx.codes.UNAUTHORIZED:
            return True
        return bool(should_giveup(exc)) if should_giveup is not None else False

    return giveup


def acquire_task(client: Any) -> str | None:
    """Ask the node for a ClientApp task; its token, or None when none is waiting."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.constant import TaskType

    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    return str(res.token) if res.HasField("task") and res.token else None


class TaskHeartbeat:
    """Tells the node a long task is alive (Flower's own sender raises SIGINT on a stale task; we only log)."""

    def __init__(self, client: Any) -> None:
        self.client, self.stop = client, threading.Event()
        self.thread = threading.Thread(target=self._beat, name="veil-task-heartbeat", daemon=True)

    def _beat(self) -> None:
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=no-name-in-module

        while not self.stop.wait(HEARTBEAT_SECONDS):
            try:
                self.client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
            except Exception as err:  # a missed beat is not fatal: the node expires the task itself
                log.debug("task heartbeat failed: %s", err)

    def __enter__(self) -> TaskHeartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=2)


def pull_task(client: Any) -> tuple[Any, Any, Any, Any]:
    """The acquired task's (message, context, run, fab); ``fab.content`` is the bundle's bytes."""
    from flwr.supernode.runtime.run_clientapp import pull_task_input

    return pull_task_input(client)


def push_reply(client: Any, reply: Any, context: Any) -> None:
    from flwr.supernode.runtime.run_clientapp import push_message

    push_message(client, reply, context)


def push_output(client: Any, context: Any, *, completed: bool, details: str) -> None:
    """End the task: Flower's sub-status COMPLETED or FAILED, with ``details`` for the server."""
    from flwr.common.constant import SubStatus
    from flwr.supernode.runtime.run_clientapp import push_task_output

    push_task_output(client=client, context=context, sub_status=SubStatus.COMPLETED if completed else SubStatus.FAILED,
                     details=details)


def error_reply(message: Any, *, reason: str, bad_bundle: bool = False) -> Any:
    """An error reply to ``message``: Flower's INVALID_FAB for a refused bundle, else CLIENT_APP_RAISED_EXCEPTION."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    code = ErrorCode.INVALID_FAB if bad_bundle else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    return Message(Error(code=code, reason=reason), reply_to=message)


def secagg_stage(message: Any) -> str:
    """The SecAgg+ stage a message asks for (``plain`` without SecAgg+), for the node's log."""
    try:
        from veil.flower.secagg import RECORD_KEY_CONFIGS, Key

        configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
        return str(configs.get(Key.STAGE)) if configs is not None else "plain"
    except Exception:  # noqa: BLE001 - a log line never fails a task
        return "?"
