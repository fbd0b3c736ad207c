"""SecAgg+ against a malicious coordinator (issue 24, privacy review N5): veil's ServerApp workflow against real node
ClientApps (tests/support/secagg_loopback.py), with the coordinator's lies played by the grid.

References: the honest rounds unmask to the plain mean of the updates; each attack is first shown to work against
a node without the new defence (so the test can fail), then refused by a node with it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_separate
from flwr.supercore.primitives.asymmetric import (bytes_to_public_key, generate_key_pairs, public_key_to_bytes)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.secagg_loopback import QUANTUM, LoopbackGrid, node_app, run_round, update_of

import flwr
from veil.flower import secagg as flower_secagg
from veil.client.secagg_guard import REFUSAL_CODE, REFUSAL_REASON, secagg_policy
from veil.conf.schema import VeilConfig
from veil.flower.secagg import full_key_masks, full_strength_masks
from veil.security.roster import OWNER_KEY, RECORD, Roster, raw_public

NODES = (11, 22, 33)


def _owners(nodes: tuple[int, ...]) -> dict[int, Ed25519PrivateKey]:
    return {n: Ed25519PrivateKey.generate() for n in nodes}


def _roster(keys: dict[int, Ed25519PrivateKey]) -> Roster:
    return Roster({raw_public(k): f"owner-{n}" for n, k in keys.items()})


def _apps(nodes: tuple[int, ...], *, keys: dict[int, Ed25519PrivateKey] | None = None,
          roster: Roster | None = None, max_dropouts: int = 0) -> dict[int, Any]:
    return {n: node_app(secagg_policy(VeilConfig(), require_secagg=True, max_dropouts=max_dropouts,
                                      roster=None if keys is None else (roster or _roster(keys)),
                                      signing_key=None if keys is None else keys[n])) for n in nodes}


def _refused(reply: Any) -> bool:
    return (reply.has_error() and not reply.has_content() and reply.error.code == REFUSAL_CODE
            and reply.error.reason == REFUSAL_REASON)


def _plain_mean(nodes: tuple[int, ...]) -> np.ndarray:
    return np.mean([update_of(n) for n in nodes], axis=0)


# --- honest federations still complete ------------------------------------------------------------------------------

@pytest.mark.parametrize("nodes", [NODES, (11, 22, 33, 44, 55)], ids=["3-nodes", "5-nodes"])
def test_an_honest_roster_federation_unmasks_to_the_plain_mean(nodes: tuple[int, ...]) -> None:
    keys = _owners(nodes)
    grid = LoopbackGrid(_apps(nodes, keys=keys))
    got = run_round(grid)
    assert got is not None
    np.testing.assert_allclose(got, _plain_mean(nodes), atol=len(nodes) * QUANTUM)
    setup = grid.replies["setup"]
    assert {bytes(setup[n].content.config_records[RECORD][OWNER_KEY]) for n in nodes} == {
        raw_public(k) for k in keys.values()}  # every node signed its round keys with its owner's key


def test_drop_outs_within_the_owners_tolerance_unmask_the_survivors_mean() -> None:
    grid = LoopbackGrid(_apps(NODES, keys=_owners(NODES), max_dropouts=1), drop={"collect_masked_vectors": {33}})
    got = run_round(grid)
    assert got is not None  # 33's pairwise masks were removed from its secret-key shares: exact cancellation
    np.testing.assert_allclose(got, _plain_mean((11, 22)), atol=2 * QUANTUM)


def test_with_max_dropouts_0_no_survivor_unmasks_a_shrunk_neighbourhood() -> None:
    grid = LoopbackGrid(_apps(NODES), drop={"collect_masked_vectors": {33}})
    assert run_round(grid) is None
    assert all(_refused(r) for r in grid.replies["unmask"].values())  # no share of anyone left the survivors


# --- key substitution -----------------------------------------------------------------------------------------------

class Substitute:
    """The coordinator plays every neighbour of ``victim`` with key pairs of its own at SHARE_KEYS."""

    def __init__(self, victim: int, signatures: str = "keep") -> None:
        self.victim, self.signatures, self.secret2 = victim, signatures, {}
        self.forger = Ed25519PrivateKey.generate()

    def __call__(self, node: int, content: RecordDict) -> None:
        configs = content.config_records[RECORD_KEY_CONFIGS]
        if node != self.victim or configs.get(Key.STAGE) != "share_keys":
            return
        for name in [k for k in configs if k.isdigit() and int(k) != node]:
            sk1, pk1 = generate_key_pairs()
            sk2, pk2 = generate_key_pairs()
            self.secret2[int(name)] = sk2
            configs[name] = [public_key_to_bytes(pk1), public_key_to_bytes(pk2)]
            if self.signatures == "forge":
                content.config_records[RECORD][name] = [raw_public(self.forger), self.forger.sign(b"anything")]
        if self.signatures == "drop":
            content.config_records[RECORD] = ConfigRecord({})

    def opened_shares(self, reply: Any, own_pk2: bytes) -> int:
        """How many of the victim's encrypted key shares the coordinator can decrypt."""
        rec = reply.content.config_records[RECORD_KEY_CONFIGS]
        opened = 0
        for dst, ciphertext in zip(rec[Key.DESTINATION_LIST], rec[Key.CIPHERTEXT_LIST]):
            key = generate_shared_key(self.secret2[dst], bytes_to_public_key(own_pk2))
            src, _dst, rd_share, sk_share = share_keys_plaintext_separate(decrypt(key, ciphertext))
            opened += int(src == self.victim and len(rd_share) > 0 and len(sk_share) > 0)
        return opened


def test_key_substitution_opens_a_node_without_a_roster() -> None:
    """The reference: against today's node the substituted keys get the node's key shares (privacy review N5a)."""
    attack = Substitute(11)
    grid = LoopbackGrid(_apps(NODES), tamper=attack)
    run_round(grid)
    reply = grid.replies["share_keys"][11]
    own_pk2 = bytes(grid.replies["setup"][11].content.config_records[RECORD_KEY_CONFIGS][Key.PUBLIC_KEY_2])
    assert not reply.has_error() and attack.opened_shares(reply, own_pk2) == 2  # both shares: threshold 2 reached


@pytest.mark.parametrize("signatures", ["keep", "forge", "drop"])
def test_a_key_substituting_coordinator_is_refused(signatures: str) -> None:
    attack = Substitute(11, signatures)
    grid = LoopbackGrid(_apps(NODES, keys=_owners(NODES)), tamper=attack)
    assert run_round(grid) is None
    assert _refused(grid.replies["share_keys"][11])  # no ciphertext, so no share, left the victim
    assert 11 not in grid.replies.get("collect_masked_vectors", {})


def test_an_owners_signature_moved_to_another_node_id_is_refused() -> None:
    """One owner's signed keys cannot stand for a second node (a Sybil neighbour)."""

    def move(node: int, content: RecordDict) -> None:
        configs = content.config_records[RECORD_KEY_CONFIGS]
        if node == 11 and configs.get(Key.STAGE) == "share_keys":
            configs["33"] = list(configs["22"])
            content.config_records[RECORD]["33"] = list(content.config_records[RECORD]["22"])

    grid = LoopbackGrid(_apps(NODES, keys=_owners(NODES)), tamper=move)
    run_round(grid)
    assert _refused(grid.replies["share_keys"][11])


# --- roster mismatch ------------------------------------------------------------------------------------------------

def test_a_neighbour_outside_the_roster_is_refused() -> None:
    keys = _owners(NODES)
    pinned = _roster({**{n: keys[n] for n in (11, 22)}, 99: Ed25519PrivateKey.generate()})  # 33's owner unknown
    apps = _apps(NODES, keys=keys)
    apps[11] = _apps((11,), keys=keys, roster=pinned)[11]
    grid = LoopbackGrid(apps)
    assert run_round(grid) is None
    assert _refused(grid.replies["share_keys"][11])
    assert not grid.replies["share_keys"][22].has_error()  # the others' rosters are intact


def test_a_cohort_larger_than_the_roster_is_refused_at_setup() -> None:
    nodes = (11, 22, 33, 44)
    keys = _owners(nodes)
    three = _roster({n: keys[n] for n in NODES})  # 44 joined without the owners' agreement
    grid = LoopbackGrid({n: _apps((n,), keys=keys, roster=three)[n] for n in NODES} | _apps((44,), keys=keys))
    assert run_round(grid) is None
    assert all(_refused(grid.replies["setup"][n]) for n in NODES)


# --- the mask generator ---------------------------------------------------------------------------------------------

def _flowers_own_generator() -> Any:
    """Flower's ``pseudo_rand_gen`` loaded afresh from the installed file (the patch cannot have touched it)."""
    path = Path(flwr.__file__).parent / "common" / "secure_aggregation" / "secaggplus_utils.py"
    spec = importlib.util.spec_from_file_location("flower_secaggplus_utils_copy", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.pseudo_rand_gen


def test_masks_come_from_the_whole_key() -> None:
    rng = np.random.default_rng(0)
    a = bytearray(rng.bytes(32))
    b = bytearray(a)
    for i in (0, 4):  # flip the same bits in two 4-byte words: the XOR-fold to 32 bits is unchanged
        b[i] ^= 0x5A
    shapes = [(1000,)]
    flower = _flowers_own_generator()
    assert np.array_equal(flower(bytes(a), 2**32, shapes)[0], flower(bytes(b), 2**32, shapes)[0])  # the weakness
    run_round(LoopbackGrid(_apps(NODES)))  # the node's guard and veil's workflow have run in this process
    for name in flower_secagg._MASK_CALLERS:
        gen = sys.modules[name].pseudo_rand_gen
        assert not np.array_equal(gen(bytes(a), 2**32, shapes)[0], gen(bytes(b), 2**32, shapes)[0]), name


def test_pairwise_and_private_masks_cancel_exactly_in_the_sum() -> None:
    rng = np.random.default_rng(1)
    modulus, shapes, nodes = 2**32, [(3, 4), (), (7,)], list(range(5))
    pair = {(i, j): rng.bytes(44) for i in nodes for j in nodes if i < j}
    private = {i: rng.bytes(32) for i in nodes}
    values = {i: [rng.integers(0, 2**20, s, dtype=np.int64) for s in shapes] for i in nodes}
    total = [np.zeros(s, dtype=np.int64) for s in shapes]
    for i in nodes:
        masked = [v + m for v, m in zip(values[i], full_key_masks(private[i], modulus, shapes))]
        for (lo, hi), seed in pair.items():
            if i in (lo, hi):
                sign = 1 if i == hi else -1
                masked = [x + sign * m for x, m in zip(masked, full_key_masks(seed, modulus, shapes))]
        total = [t + np.mod(x, modulus) for t, x in zip(total, masked)]
    for i in nodes:
        total = [t - m for t, m in zip(total, full_key_masks(private[i], modulus, shapes))]
    plain = [sum(values[i][k] for i in nodes) for k in range(len(shapes))]
    assert all(np.array_equal(np.mod(t, modulus), p) for t, p in zip(total, plain))
    masks = full_key_masks(b"k" * 32, modulus, shapes)
    assert all(m.min() >= 0 and m.max() < modulus and m.dtype == np.int64 for m in masks)


def test_the_mask_patch_refuses_an_untested_flower(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    with pytest.raises(RuntimeError, match=r"^flwr 1\.43\.0: .*tested on flwr 1\.41\.0, 1\.42\.0"):
        full_strength_masks()


def test_the_mask_generator_refuses_a_short_seed_and_an_odd_range() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        full_key_masks(b"\x01\x02\x03\x04", 2**32, [(2,)])
    with pytest.raises(ValueError, match="power of 2"):
        full_key_masks(b"k" * 32, 3 * 2**20, [(2,)])
