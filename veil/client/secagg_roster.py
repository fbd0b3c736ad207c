"""The node's half of roster-pinned SecAgg+ keys (:mod:`veil.security.roster` holds the keys and the statement).

Three steps inside veil's guard (:mod:`veil.client.secagg_guard`), around Flower's unmodified ``secaggplus_mod``:
a SETUP is refused when its cohort cannot be the roster's (more nodes than owners, or fewer than the roster less
the owner's tolerated drop-outs); the SETUP reply carries the owner's public key and its signature over this node's
round keys (in veil's own record, beside Flower's, which the ServerApp relays); a SHARE_KEYS is refused unless
every neighbour's keys carry such a signature by a distinct roster member (:func:`check_neighbour_keys`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Message, Metadata

from veil.flower.secagg import RECORD_KEY_CONFIGS, Key
from veil.security.roster import (OWNER_KEY, RECORD, SIGNATURE_KEY, Roster, check_neighbour_keys, key_statement,
                                  raw_public, sign_statement)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def setup_roster_refusal(configs: ConfigRecord, roster: Roster | None, max_dropouts: int) -> str | None:
    """Why a SETUP's cohort cannot be this node's roster, or None (no roster: None)."""
    if roster is None:
        return None
    sample_num, owners = configs.get(Key.SAMPLE_NUMBER), len(roster.members)
    if not isinstance(sample_num, int) or sample_num > owners:
        return f"SecAgg+ setup samples {sample_num!r} nodes, more than the {owners} owners of this node's roster"
    if sample_num < owners - max_dropouts:
        return (f"SecAgg+ setup samples {sample_num} nodes; this node's roster has {owners} owners and it tolerates "
                f"{max_dropouts} absent")
    return None


def sign_setup_reply(reply: Message, key: Ed25519PrivateKey, request: Metadata) -> None:
    """Add the owner's public key and signature over this node's round keys to Flower's SETUP reply."""
    keys = reply.content.config_records[RECORD_KEY_CONFIGS]
    statement = key_statement(run_id=request.run_id, round_id=request.group_id, node_id=request.dst_node_id,
                              pk1=_bytes(keys.get(Key.PUBLIC_KEY_1)), pk2=_bytes(keys.get(Key.PUBLIC_KEY_2)))
    reply.content.config_records[RECORD] = ConfigRecord({OWNER_KEY: raw_public(key),
                                                         SIGNATURE_KEY: sign_statement(key, statement)})


def roster_refusal(msg: Message, state: ConfigRecord, roster: Roster, key: Ed25519PrivateKey | None) -> str | None:
    """Why a SHARE_KEYS message's neighbour keys are not the roster's, or None."""
    if key is None:
        return "this node has a roster but no signing key"
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    signatures = msg.content.config_records.get(RECORD, ConfigRecord({}))
    own = state.get("nid", msg.metadata.dst_node_id)
    signed: dict[int, tuple[bytes, bytes, bytes, bytes]] = {}
    for name, keys in configs.items():
        if name == Key.STAGE:
            continue
        if not name.isdigit() or not isinstance(keys, list) or len(keys) != 2:
            return f"SecAgg+ share-keys entry {name!r} is not a node id with two public keys"
        if int(name) == own:
            continue
        entry = signatures.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or not all(isinstance(b, bytes) for b in entry):
            return f"SecAgg+ share-keys brings no owner signature for node {name}"
        signed[int(name)] = (_bytes(keys[0]), _bytes(keys[1]), entry[0], entry[1])
    return check_neighbour_keys(roster, own=raw_public(key), signed=signed, run_id=msg.metadata.run_id,
                                round_id=msg.metadata.group_id)


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else b""
