"""The only module in veil that patches Flower: two hard-coded waits of Flower 1.41's deployment transport, the
simulation engine's sweep over every node (issue 14), and SecAgg+'s 32-bit mask generator (issue 24).

Why patches: none of the three is a setting of ``flower-supernode``, the SuperLink, the ServerApp or
``run_simulation``; the waits are most of a deployed round's wall time and the sweep most of a round of a
10,000-client simulation (docs/benchmarks.md, deploy_overhead and sim_scale, with the traces that found them).

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

4. **SecAgg+'s mask generator** (``flwr/common/secure_aggregation/secaggplus_utils.py``, ``pseudo_rand_gen``):
   every mask (a node's private mask from its 32-byte seed, each pairwise mask from a 32-byte ECDH-derived key)
   comes from ``np.random.RandomState(seed32)`` where ``seed32`` XOR-folds the key's 4-byte words into one 32-bit
   integer. A coordinator who holds a node's masked vector and can remove all but one mask (privacy review N5)
   needs ~2^32 generator runs to find the last one. :func:`full_strength_masks` rebinds the name in the three
   modules that hold it (the utils module, the node's ``secaggplus_mod`` module and the ServerApp's
   ``secaggplus_workflow`` module, both of which import it by name) to :func:`full_key_masks`: ChaCha20 keyed with
   SHA-256 of the *whole* key, so finding a mask costs a 256-bit key search. Node and ServerApp must use the same
   generator or the masks do not cancel: veil's workflow announces :data:`MASK_GENERATOR` in its SETUP message and
   a node refuses a SETUP without it (:mod:`veil.client.secagg_guard`). The patch refuses any Flower version
   outside :data:`MASK_PATCH_TESTED` (one line). Upstream proposal: docs/upstream/mask-seed-strength.md.

5. **Node sessions** (issue 27): a SuperNode restarted after a kill is refused while the SuperLink still holds
   its old session, a dead node counts as online for a minute, and a resumed SuperLink counts every node of the
   crashed run as online; a reply half-pushed by a killed node held a SecAgg+ stage for minutes. The fixes live in
   :mod:`veil.flower_sessions`; :func:`main` applies the three that run in the SuperNode (a 10-s heartbeat, activation
   retried for as long as a stale session can last, a message of a run that ended mid-pull dropped), ``veil server
   --resume`` the third, the ServerApp the fourth. Upstream proposal: docs/upstream/node-sessions.md.

Each patch checks that the code it patches is still there and fails with one line otherwise; it changes nothing
else, and the processes it runs in are veil's own (the node's SuperNode and executor, the ServerApp of a
deployment). Upstream proposals, one file each: docs/upstream/ (poll-interval.md, object-pull.md, node-sweep.md,
mask-seed-strength.md).

    python -m veil.flower_patches --poll-interval 0.25 -- --superlink HOST:PORT ...   # a patched flower-supernode
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import sys
import time as _time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from veil.flower_sessions import clean_stale_receive, patient_activation, short_node_heartbeat

DEFAULT_POLL_INTERVAL = 0.25  # seconds; Flower's own: 3 s between empty pulls, 0.5 s while awaiting a reply
LOCAL_WAIT = 0.02  # seconds between the SuperNode's looks at its own state while the executor works (Flower: 0.5)
PULL_BACKOFF = 0.02  # seconds before the first retry of an object still being pushed (Flower: 1 s)
PULL_BACKOFF_CAP = 0.5  # seconds at most between retries (Flower: 10 s)
_SUPERNODE_LOOP = "flwr.supernode.start_client_internal"
_PULL_OBJECTS = "flwr.supercore.inflatable.inflatable_utils"
_PULL_CALLERS = (_PULL_OBJECTS, "flwr.superlink.grid.http_grid", _SUPERNODE_LOOP)


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
    module = importlib.import_module(_SUPERNODE_LOOP)
    if not hasattr(module, "time") or getattr(module.time, "sleep", None) is None:
        raise RuntimeError(f"{_SUPERNODE_LOOP} no longer uses time.sleep; this patch is for flwr 1.41")
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
    original = _unwrapped(importlib.import_module(_PULL_OBJECTS).pull_objects)
    for name in _PULL_CALLERS:
        module = importlib.import_module(name)
        if _unwrapped(getattr(module, "pull_objects", None)) is not original:
            raise RuntimeError(f"{name} no longer calls flwr's pull_objects; this patch is for flwr 1.41")
        module.pull_objects = _with_short_backoff(original, first, cap)  # type: ignore[attr-defined]


_ENGINE = "flwr.server.superlink.fleet.vce.vce_api"


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
    engine = importlib.import_module(_ENGINE)
    flower_sweep = _unwrapped(engine.add_messages_to_queue)
    code = getattr(flower_sweep, "__code__", None)
    if code is None or code.co_varnames[:4] != ("state", "queue", "nodes_mapping", "f_stop"):
        raise RuntimeError(f"{_ENGINE}.add_messages_to_queue changed; this patch is for flwr 1.41")

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

    engine.add_messages_to_queue = sweep
    return sweep


MASK_GENERATOR = "chacha20-sha256/1"  # what a node checks the ServerApp announces (both sides must agree)
MASK_PATCH_TESTED = ("1.41.0", "1.42.0")  # Flower versions whose pseudo_rand_gen and its callers were read
_MASK_UTILS = "flwr.common.secure_aggregation.secaggplus_utils"
_MASK_CALLERS = (_MASK_UTILS, "flwr.client.mod.secure_aggregation.secaggplus_mod",
                 "flwr.server.workflow.secure_aggregation.secaggplus_workflow")
_MASK_DOMAIN = b"veil secagg+ mask " + MASK_GENERATOR.encode() + b"\x00"


def full_key_masks(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Masks in ``[0, num_range)`` (a power of 2) for arrays of the given shapes, from every bit of ``seed``.

    The stream is ChaCha20 (RFC 8439; ``cryptography``) under the key SHA-256(domain || seed), nonce and counter 0;
    each value is one little-endian 64-bit word of the stream reduced mod ``num_range`` (exactly uniform, as
    ``num_range`` divides 2^64). Arrays take consecutive words in order; a 0-d shape takes one word. Same seed, same
    masks on the node and in the ServerApp; the signature is Flower's ``pseudo_rand_gen``'s.
    """
    if not isinstance(seed, bytes) or len(seed) < 16:
        raise ValueError(f"a SecAgg+ mask seed must be at least 16 bytes, got {seed!r:.40}")
    if num_range < 2 or num_range & (num_range - 1) or num_range > 2**62:
        raise ValueError(f"num_range={num_range} is invalid: expected a power of 2 in [2, 2**62]")
    sizes = [int(np.prod(dim, dtype=np.int64)) for dim in dimensions_list]
    key = hashlib.sha256(_MASK_DOMAIN + seed).digest()
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(8 * sum(sizes)))
    words = np.frombuffer(stream, dtype="<u8") & np.uint64(num_range - 1)
    values = words.astype(np.int64)
    out, start = [], 0
    for dim, size in zip(dimensions_list, sizes):
        out.append(values[start:start + size].reshape(dim))
        start += size
    return out


full_key_masks.veil_full_key_masks = True  # type: ignore[attr-defined]


def full_strength_masks() -> None:
    """Make every SecAgg+ mask of this process come from :func:`full_key_masks` (idempotent; see item 4 above).

    Call it in every process that masks or unmasks: the node's (veil's guard does, on each message) and the
    ServerApp's (:func:`veil.server.app.fit_workflow_for` does). Raises RuntimeError, one line, on an untested Flower
    or when a module no longer holds Flower's generator under that name."""
    import flwr

    version = getattr(flwr, "__version__", "?")
    if version not in MASK_PATCH_TESTED:
        raise RuntimeError(f"flwr {version}: veil's SecAgg+ mask patch is tested on flwr "
                           f"{', '.join(MASK_PATCH_TESTED)} only; install one of those")
    modules = [importlib.import_module(name) for name in _MASK_CALLERS]
    flower_gens = {id(g): g for g in (getattr(m, "pseudo_rand_gen", None) for m in modules) if g is not full_key_masks}
    for gen in flower_gens.values():
        code = getattr(gen, "__code__", None)
        if len(flower_gens) > 1 or code is None or code.co_varnames[:3] != ("seed", "num_range", "dimensions_list"):
            raise RuntimeError(f"flwr {version} no longer calls one pseudo_rand_gen in {', '.join(_MASK_CALLERS)}; "
                               "veil's SecAgg+ mask patch does not fit it")
    for module in modules:
        module.pseudo_rand_gen = full_key_masks  # type: ignore[attr-defined]


def main(argv: Sequence[str] | None = None) -> None:
    """``--poll-interval S`` then ``flower-supernode``'s own arguments (after an optional ``--``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    limit = DEFAULT_POLL_INTERVAL
    if args[:1] == ["--poll-interval"]:
        limit, args = float(args[1]), args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    cap_supernode_sleeps(limit)
    shorten_object_pull_backoff()
    short_node_heartbeat()  # a killed node is offline after 20 s, not 60 (veil.flower_sessions, fix 2)
    patient_activation()  # a restarted node waits out its own stale session instead of exiting (fix 1)
    clean_stale_receive()  # a message of a run that ended mid-pull is dropped, not left to wedge the node (fix 5)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *args]
    flower_supernode()


if __name__ == "__main__":
    main()
