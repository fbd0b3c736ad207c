"""Node sessions (issue 27, veil.flower.sessions and veil.supervise): what outlives a killed node, checked against
Flower's own classes and the kernel, without a deployment (tests/e2e/test_faults_e2e.py runs the real one)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from veil.flower import sessions as flower_sessions

ROOT = Path(__file__).resolve().parents[1]


def test_a_supervised_process_dies_with_its_parent_even_on_sigkill(tmp_path: Path) -> None:
    """The fault probe's orphans: a SuperNode in its own session outlived a SIGKILL of its ``veil client``."""
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from veil.supervise import Supervised, flower_env
        child = Supervised("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"],
                           log_path=Path({str(tmp_path / 'sleeper.log')!r}), env=flower_env())
        print(child.pid, flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert os.getsid(child) == child != os.getsid(parent.pid), "the child runs in a session of its own"
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(child), "the child outlived its parent's SIGKILL"
    finally:
        parent.kill()


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_resume_marks_only_online_nodes_offline_in_flowers_node_table(tmp_path: Path) -> None:
    from flwr.supercore.constant import NodeStatus
    from flwr.supercore.state.schema.linkstate_models import Node

    assert {"status", "online_until"} <= set(Node.__table__.columns.keys()) and Node.__tablename__ == "node"
    db = tmp_path / "superlink.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE node (node_id INTEGER, status TEXT, online_until REAL)")
        conn.executemany("INSERT INTO node VALUES (?, ?, ?)", [
            (1, NodeStatus.ONLINE, time.time() + 60), (2, NodeStatus.OFFLINE, 5.0),
            (3, NodeStatus.UNREGISTERED, 6.0), (4, NodeStatus.ONLINE, time.time() + 60)])
    before = time.time()
    assert flower_sessions.forget_online_nodes(db) == 2
    with sqlite3.connect(db) as conn:
        rows = dict((n, (s, t)) for n, s, t in conn.execute("SELECT node_id, status, online_until FROM node"))
    assert rows[2] == (NodeStatus.OFFLINE, 5.0) and rows[3] == (NodeStatus.UNREGISTERED, 6.0)
    assert all(rows[n][0] == NodeStatus.OFFLINE and before <= rows[n][1] <= time.time() for n in (1, 4))
    assert flower_sessions.forget_online_nodes(tmp_path / "absent.db") == 0


def test_resume_refuses_a_database_it_does_not_understand(tmp_path: Path) -> None:
    db = tmp_path / "superlink.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE node (node_id INTEGER, state TEXT)")
    with pytest.raises(RuntimeError, match="no node table with status and online_until"):
        flower_sessions.forget_online_nodes(db)


def _refusal(code: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "https://127.0.0.1/api/v0/fleet/activate-node")
    from flwr.supercore.error import ApiErrorCode, FlowerError

    body = json.dumps(FlowerError(ApiErrorCode(code), "internal").to_json("Failed to activate SuperNode."))  # the wire
    response = httpx.Response(412, request=request, text=body)
    return httpx.HTTPStatusError("412", request=request, response=response)


@pytest.fixture
def patched_connection(monkeypatch: pytest.MonkeyPatch) -> Any:
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.fleet_http_connection as connection

    for module in (connection, heartbeat):  # restored after the test
        monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", module.HEARTBEAT_DEFAULT_INTERVAL)
    monkeypatch.setattr(connection, "FleetHttpClient", connection.FleetHttpClient)
    return connection


def _client(cls: type, answers: list[object], monkeypatch: pytest.MonkeyPatch) -> Any:
    """An instance of the patched class whose Flower ``ActivateNode`` gives ``answers`` in turn."""
    calls: list[object] = []

    def flower_activate(self: Any, request: object) -> object:
        calls.append(request)
        answer = answers[min(len(calls), len(answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(cls.__mro__[1], "ActivateNode", flower_activate)  # Flower's own, under the patch
    client = object.__new__(cls)
    client.calls = calls
    return client


def test_activation_waits_out_a_stale_session_then_gives_up_as_flower_does(patched_connection: Any,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cls = flower_sessions.patient_activation(window=0.5, retry=0.01)
    assert patched_connection.FleetHttpClient is cls
    assert flower_sessions.patient_activation() is cls, "idempotent: never a wrapper around a wrapper"
    stale = _client(cls, [_refusal(2004), _refusal(2004), "activated"], monkeypatch)
    assert stale.ActivateNode("req") == "activated" and len(stale.calls) == 3
    never = _client(cls, [_refusal(2004)], monkeypatch)
    with pytest.raises(httpx.HTTPStatusError):
        never.ActivateNode("req")
    assert len(never.calls) > 3, "retried within the window"
    other = _client(cls, [_refusal(2001), "activated"], monkeypatch)
    with pytest.raises(httpx.HTTPStatusError):
        other.ActivateNode("req")
    assert len(other.calls) == 1, "any other refusal is Flower's, at once"


def test_node_heartbeat_is_flowers_shortest_allowed(patched_connection: Any) -> None:
    import flwr.supercore.heartbeat as heartbeat
    from flwr.common.constant import HEARTBEAT_MIN_INTERVAL, HEARTBEAT_PATIENCE

    flower_sessions.short_node_heartbeat()
    assert patched_connection.HEARTBEAT_DEFAULT_INTERVAL == heartbeat.HEARTBEAT_DEFAULT_INTERVAL == HEARTBEAT_MIN_INTERVAL
    assert flower_sessions.ACTIVATION_WINDOW > HEARTBEAT_PATIENCE * HEARTBEAT_MIN_INTERVAL, \
        "a restarted node must outwait the longest stale session"
    with pytest.raises(ValueError, match="heartbeat interval"):
        flower_sessions.short_node_heartbeat(1.0)


def test_a_ledger_that_cannot_be_locked_fails_in_one_line(tmp_path: Path) -> None:
    from veil.errors import LedgerError
    from veil.privacy.ledger import LedgerEvent, PrivacyLedger

    ledger = PrivacyLedger.open(tmp_path / "ledger.json")
    (tmp_path / "ledger.json.lock").unlink(missing_ok=True)
    (tmp_path / "ledger.json.lock").mkdir()  # unopenable for writing, even for root
    event = LedgerEvent(run_id="1", round=1, noise_multiplier=1.0, sample_rate=0.1, steps=1, delta=1e-5)
    with pytest.raises(LedgerError, match="cannot write privacy ledger .*check disk space and permissions"):
        ledger.record(event)
    assert PrivacyLedger.open(tmp_path / "ledger.json", create=False).events == ()


def test_version_guard_names_the_tested_releases(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr

    monkeypatch.setattr(flwr, "__version__", "9.9.9")
    with pytest.raises(RuntimeError, match=r"flwr 9\.9\.9: veil's activation patch is tested on flwr 1\.41\.0"):
        flower_sessions.patient_activation()


def test_reply_pulls_end_at_the_stage_timeout_and_other_patches_still_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.superlink.grid.http_grid as grid

    from veil.flower import patches as flower_patches

    monkeypatch.setattr(grid, "pull_objects", grid.pull_objects)  # restored after the test
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(grid, "pull_objects", lambda *a, **k: calls.append(k) or "pulled")
    flower_sessions.bound_reply_pulls(10.0)
    flower_sessions.bound_reply_pulls(12.0)  # replaces the bound, never stacks
    assert grid.pull_objects(object_ids=[]) == "pulled" and calls[-1]["max_time"] == 12.0
    grid.pull_objects(object_ids=[], max_time=3.0)
    assert calls[-1]["max_time"] == 3.0, "a shorter limit of Flower's own call is kept"
    assert flower_patches._unwrapped(grid.pull_objects) is not grid.pull_objects, "the backoff patch finds Flower's"
    with pytest.raises(ValueError, match="max_time"):
        flower_sessions.bound_reply_pulls(0)


def test_a_ledger_write_killed_midway_leaves_no_temp_file_after_the_next_write(tmp_path: Path) -> None:
    from veil.privacy.ledger import LedgerEvent, PrivacyLedger

    ledger = PrivacyLedger.open(tmp_path / "ledger.json")
    (tmp_path / ".ledger.json.abc123.tmp").write_text('{"half": ')  # what a kill -9 inside _write leaves
    ledger.record(LedgerEvent(run_id="1", round=1, noise_multiplier=1.0, sample_rate=0.1, steps=1, delta=1e-5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json", "ledger.json.lock"]
    assert [e.round for e in PrivacyLedger.open(tmp_path / "ledger.json", create=False).events] == [1]


def test_a_refused_activation_outranks_the_reconnection_give_up_that_follows() -> None:
    """Under load the retrying SuperNode may give up reconnecting before Flower prints its final [code: 2004]
    (test_deploy's unregistered case failed so once): the node still names the refused key, not the address."""
    import argparse
    from pathlib import Path

    from veil.client.node import _Watch

    watch = _Watch(argparse.Namespace(root_cert=Path("ca.crt"), key=Path("node-1.key")))
    watch("WARNING : the SuperLink refused to activate this node (code 2004): it may still hold the session of this "
          "node's previous process; retrying for up to 35 s")
    assert watch.refusal is None  # retrying: not stopped early on the warning
    watch("ERROR : Giving up reconnection after 60.00 seconds")
    assert "no SuperLink answered" in str(watch.refusal)
    assert "not registered" in str(watch.final_refusal()) and "node-1.pub" in str(watch.final_refusal())
    plain = _Watch(argparse.Namespace(root_cert=Path("ca.crt"), key=Path("node-1.key")))
    plain("ERROR : Giving up reconnection after 60.00 seconds")
    assert "no SuperLink answered" in str(plain.final_refusal())  # without a refused activation: the address


def test_resume_ends_only_the_flower_processes_a_crashed_coordinator_left(tmp_path: Path) -> None:
    from veil.server.superlink import GROUP_FILE, end_leftovers

    # a SuperLink (its stand-in), a "superexec" that follows its pid, a "serverapp" that follows the superexec's,
    # and a Flower-named process that follows another pid
    superlink = subprocess.Popen(["sleep", "60"])
    started = [superlink]
    try:
        exe = _named("flower-superexec", superlink.pid)
        app = _named("flwr-serverapp", exe.pid)
        orphan = _named("flwr-serverapp", 1, runtime="127.0.0.1:8123")  # its superexec already gone
        other = _named("flwr-serverapp", os.getpid(), runtime="127.0.0.1:81234")
        started += [exe, app, orphan, other]
        (tmp_path / GROUP_FILE).write_text(f"{superlink.pid} 8123")
        time.sleep(0.3)
        assert end_leftovers(tmp_path) == [], "its SuperLink runs: no crash, nothing ended"
        superlink.kill()
        superlink.wait(timeout=10)
        ended = end_leftovers(tmp_path)
        assert sorted(c.split()[0] for c in ended) == ["flower-superexec", "flwr-serverapp", "flwr-serverapp"], ended
        assert exe.wait(timeout=10) and app.wait(timeout=10) and orphan.wait(timeout=10)
        assert other.poll() is None, "another deployment's process is left alone"
    finally:
        for proc in started:
            proc.kill()
            proc.wait(timeout=10)


def _named(name: str, parent: int, runtime: str = "127.0.0.1:9") -> subprocess.Popen[bytes]:
    sleeper = f"{sys.executable} -c 'import time; time.sleep(60)'"
    return subprocess.Popen(["bash", "-c", f"exec -a {name} {sleeper} --runtime-api-address {runtime} "
                                           f"--parent-pid {parent} x"])


class _NodeState:
    """Records what Flower's receive step does to the node's state (only the calls it makes)."""

    def __init__(self) -> None:
        self.stored: list[str] = []
        self.deleted: list[str] = []
        self.finished: list[tuple[int, str]] = []

    def get_run(self, run_id: int) -> Any:
        from flwr.supercore.constant import TaskType

        return SimpleNamespace(run_id=run_id, fab_hash="fab", primary_task_type=TaskType.CLIENT_APP)

    def create_task(self, **_: Any) -> int:
        return 7

    def store_message(self, message: Any) -> None:
        self.stored.append(message.metadata.message_id)

    def delete_messages(self, message_ids: list[str]) -> None:
        self.deleted += message_ids

    def finish_task(self, task_id: int, sub_status: str, details: str) -> bool:
        self.finished.append((task_id, sub_status))
        return True


def _receive_a_message_of_a_run_that_ended() -> _NodeState:
    import flwr.supernode.start_client_internal as flower
    from flwr.supercore.run import RunNotRunningException

    def pull_object(run_id: int, object_id: str) -> bytes:
        raise RunNotRunningException  # the SuperLink, resumed, no longer runs the crashed run

    message = SimpleNamespace(metadata=SimpleNamespace(run_id=5, group_id="11", message_type="train",
                                                      message_id="m1"))
    state = _NodeState()
    store = SimpleNamespace(preregister=lambda run_id, tree: ["o1"], put=lambda *a: None, delete=lambda *a: None)
    assert flower._pull_and_store_message(
        state=state, object_store=store, node_config={}, receive=lambda: (message, object()), get_run=None,
        get_fab=None, pull_object=pull_object, confirm_message_received=None, trusted_entities=None) is None
    return state


def test_a_message_of_a_run_that_ended_mid_pull_is_dropped_not_left_to_wedge_the_node(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.supernode.start_client_internal as flower

    monkeypatch.setattr(flower, "_pull_and_store_message", flower._pull_and_store_message)  # restored afterwards
    flowers_own = _receive_a_message_of_a_run_that_ended()
    assert flowers_own.stored == ["m1"] and not flowers_own.deleted and not flowers_own.finished, \
        "Flower alone leaves the message stored and its task open (the executor then waits for ever)"
    flower_sessions.clean_stale_receive()
    flower_sessions.clean_stale_receive()  # idempotent
    patched = _receive_a_message_of_a_run_that_ended()
    assert patched.stored == ["m1"] and patched.deleted == ["m1"], patched.deleted
    assert [status for _, status in patched.finished] == ["failed"], patched.finished


def test_a_tls_port_is_told_from_a_silent_one(tmp_path: Path) -> None:
    """A plaintext node that gave up reconnecting is told the SuperLink speaks TLS when the port completes a TLS
    handshake (gRPC's own words for that case vary with load), and not when nothing answers there."""
    import datetime
    import socket
    import ssl
    import threading

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from veil.client.node import _speaks_tls

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server.wrap_socket(conn, server_side=True):
                pass
        except OSError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert _speaks_tls(f"127.0.0.1:{port}", timeout=10)
    thread.join(timeout=10)
    listener.close()
    assert not _speaks_tls(f"127.0.0.1:{port}", timeout=2)  # closed: nothing answers
