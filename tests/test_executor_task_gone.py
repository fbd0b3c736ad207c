"""A task whose run stopped under it (the coordinator died mid-round) ends that task, not the node's executor.

Flower's HTTP retry invoker answers HTTP 401 (the task's token is no longer valid) with SIGINT to its own process:
right for ``flwr-clientapp`` (one process per task), fatal for veil's long-lived executor, which served every task
of the node. The fault suite's coordinator kill found it (nodes stopped with "executor stopped (status 130)"). Here
a loopback HTTP server answers every Runtime API call with 401, and the executor's ``run_task`` must return
promptly without any SIGINT reaching the process.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


class _Unauthorized(BaseHTTPRequestHandler):
    calls: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.calls.append(self.path)
        self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        body = b'{"code": 1008, "message": "Runtime task-token authentication failed."}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        return


@pytest.fixture()
def runtime_401() -> Iterator[str]:
    _Unauthorized.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unauthorized)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_task_whose_token_was_revoked_ends_without_signalling_the_executor(runtime_401: str) -> None:
    from veil.client.executor import run_task

    signals: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: signals.append(signum))
    try:
        start = time.monotonic()
        trusted = run_task(runtime_401, "revoked-token", expected_hash="0" * 64)
        took = time.monotonic() - start
    finally:
        signal.signal(signal.SIGINT, previous)
    assert signals == [], "the executor signalled itself: the whole node would stop"
    assert _Unauthorized.calls, "the task's calls reached the Runtime API"
    assert trusted and took < 5.0, (trusted, took)


def test_only_a_revoked_token_changes_flower_s_rule() -> None:
    """401 gives up; every other error is decided by Flower's own rule, unchanged."""
    import httpx

    from veil.flower.runtime import _task_gone_gives_up

    request = httpx.Request("POST", "http://127.0.0.1:1/")

    def status(code: int) -> httpx.HTTPStatusError:
        return httpx.HTTPStatusError(str(code), request=request, response=httpx.Response(code, request=request))

    asked: list[Exception] = []
    rule = _task_gone_gives_up(lambda exc: asked.append(exc) or False)
    assert rule(status(401)) is True and asked == [], "a revoked token never reaches Flower's SIGINT"
    assert rule(status(503)) is False and len(asked) == 1, "anything else: Flower decides"
    assert _task_gone_gives_up(None)(status(500)) is False
