"""The lossy link of the fault harness (benchmarks/lossy_link.py) against a plain echo server on loopback: it
forwards bytes unchanged, a stall holds them until the link flows again, and a drop resets the connection."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from benchmarks.lossy_link import LossyLink


def _echo_server() -> tuple[socket.socket, int]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # a reset from the link ends the echo
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server, server.getsockname()[1]


@pytest.fixture
def link() -> Iterator[LossyLink]:
    server, port = _echo_server()
    proxy = LossyLink(port, delay=0.01)
    try:
        yield proxy
    finally:
        proxy.close()
        server.close()


def _client(link: LossyLink) -> socket.socket:
    return socket.create_connection(("127.0.0.1", link.port), timeout=5)


def _read(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def test_the_link_forwards_every_byte_unchanged(link: LossyLink) -> None:
    payload = bytes(range(256)) * 1000  # several chunks each way
    with _client(link) as sock:
        sock.sendall(payload)
        assert _read(sock, len(payload)) == payload
    assert link.stats["connections"] == 1


def test_a_stall_holds_bytes_until_the_link_flows_again(link: LossyLink) -> None:
    with _client(link) as sock:
        sock.sendall(b"warm")
        assert _read(sock, 4) == b"warm"
        link.stall()
        sock.sendall(b"held")
        sock.settimeout(0.6)
        with pytest.raises(TimeoutError):
            sock.recv(4)
        link.flow()
        sock.settimeout(5)
        assert _read(sock, 4) == b"held", "what was held goes on, in order"


def test_a_drop_resets_the_connection_and_a_new_one_works(link: LossyLink) -> None:
    with _client(link) as sock:
        sock.sendall(b"ping")
        assert _read(sock, 4) == b"ping"
        assert link.drop() == 1
        with pytest.raises(OSError):  # reset by peer (or EOF, then a reset on the write after it)
            for _ in range(50):
                if not sock.recv(4):
                    sock.sendall(b"x" * 65536)
    with _client(link) as sock:
        sock.sendall(b"again")
        assert _read(sock, 5) == b"again"
    assert link.stats == {"connections": 2, "dropped": 1, "upstream_refused": 0}


def test_a_connection_to_a_link_whose_upstream_is_down_is_reset() -> None:
    with socket.socket() as unused:  # a loopback port that nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    proxy = LossyLink(port)
    try:
        # the reset may reach the client while its connect() still returns (a loaded machine), or at its first read
        with pytest.raises(OSError):
            with _client(proxy) as sock:
                sock.settimeout(5)
                if not sock.recv(1):
                    raise ConnectionResetError("closed")
        assert proxy.stats["upstream_refused"] == 1
    finally:
        proxy.close()
