"""A slow or lossy link on loopback (issue 27, case 4): a TCP proxy in front of the SuperLink's port that a node
connects through, and that a test can make slow (a delay before every chunk it forwards), stall (hold every byte,
both ways, on every connection, old and new, until :meth:`LossyLink.flow`) or drop (reset every connection it
carries).

It forwards bytes and nothing else: the node's TLS session runs end to end through it, so the SuperLink's
certificate (SAN 127.0.0.1) still verifies. It listens on 127.0.0.1 only, runs in daemon threads of the test's own
process, and every wait in it is bounded (0.2 s socket timeouts).
"""

from __future__ import annotations

import socket
import struct
import threading
import time

__all__ = ["LossyLink"]

_TICK = 0.2  # seconds: how often a blocked forwarder looks at the link's state
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, as a dropped route or a NAT reset does


class _Pair:
    """One proxied connection: the node's socket and the SuperLink's."""

    def __init__(self, near: socket.socket, far: socket.socket) -> None:
        self.near, self.far, self.live = near, far, True
        self.ends = 2  # forwarders still running (counted under the link's lock); the last one closes both sockets

    def close(self) -> None:
        for sock in (self.near, self.far):
            sock.close()


class LossyLink:
    """A TCP proxy on 127.0.0.1 (``port``) to ``127.0.0.1:upstream``; ``delay`` seconds before each chunk."""

    def __init__(self, upstream: int, *, delay: float = 0.0) -> None:
        if delay < 0:
            raise ValueError(f"delay must be >= 0 seconds, got {delay}")
        self.upstream, self.delay = upstream, delay
        self.stats = {"connections": 0, "dropped": 0, "upstream_refused": 0}
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_TICK)
        self.port: int = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name=f"lossy-link-{self.port}", daemon=True).start()

    # ---- faults ---------------------------------------------------------------------------------------
    def stall(self) -> None:
        """Hold every byte from now on (connections stay open; new ones are accepted and held too)."""
        self._flowing.clear()

    def flow(self) -> None:
        """End a stall: what was held goes on, in order."""
        self._flowing.set()

    def drop(self) -> int:
        """Reset every connection the link carries now (RST to both ends); returns how many."""
        with self._lock:
            pairs, self._pairs = list(self._pairs), set()
            self.stats["dropped"] += len(pairs)
        for pair in pairs:
            pair.live = False
            for sock in (pair.near, pair.far):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                except OSError:
                    pass
        return len(pairs)

    def flap(self, seconds: float, every: float = 0.25) -> int:
        """Reset every connection every ``every`` s for ``seconds`` (blocking); returns how many were reset."""
        dropped, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            dropped += self.drop()
            time.sleep(every)
        return dropped

    def close(self) -> None:
        self._closed = True
        self.flow()
        self.drop()
        self._listener.close()

    # ---- forwarding -----------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed:
            try:
                near, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                far = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            except OSError:  # the SuperLink is down: the node sees its connection reset, as without a proxy
                self.stats["upstream_refused"] += 1
                near.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                near.close()
                continue
            pair = _Pair(near, far)
            for sock in (near, far):
                sock.settimeout(_TICK)
            with self._lock:
                self._pairs.add(pair)
                self.stats["connections"] += 1
            for src, dst in ((near, far), (far, near)):
                threading.Thread(target=self._forward, args=(pair, src, dst), daemon=True).start()

    def _forward(self, pair: _Pair, src: socket.socket, dst: socket.socket) -> None:
        try:
            while pair.live:
                try:
                    data = src.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                while not self._flowing.wait(_TICK):
                    if not pair.live:
                        return
                if self.delay:
                    time.sleep(self.delay)
                if pair.live:
                    self._send(pair, dst, data)
        except OSError:
            pass
        finally:
            pair.live = False  # one direction ended: so does the other
            with self._lock:
                self._pairs.discard(pair)
                pair.ends -= 1
                last = pair.ends == 0
            if last:
                pair.close()

    @staticmethod
    def _send(pair: _Pair, dst: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        while view and pair.live:
            try:
                view = view[dst.send(view):]
            except TimeoutError:
                continue
