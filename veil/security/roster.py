"""Owners' signing keys and the roster that pins them (``veil keygen``; ``veil client --roster --signing-key``).

Why: Flower's SecAgg+ (Bell et al. 2020, arXiv:2009.09039) relays every node's key-agreement public keys through
the coordinator, unauthenticated. A coordinator that answers a node's SETUP-to-SHARE_KEYS step with keys of its own
for the node's neighbours decrypts the node's key shares and unmasks its update alone (privacy review N5a). Bell et
al. (section 4, "malicious" setting) sign each node's round keys with a long-term key the other parties know; here
that is each data owner's Ed25519 key, made on the owner's machine by ``veil keygen`` (the operator never holds
it), and the roster is the list of the owners' public keys, agreed and copied out of band.

What is signed (:func:`key_statement`): a domain tag, the run id, the round (Flower's ``group_id``), the Flower node
id and the two SecAgg+ public keys, length-prefixed. The roster does not map node ids to owners (the coordinator
assigns node ids); instead a node accepts SHARE_KEYS only if every neighbour's keys carry a valid signature by a
roster member, all signers distinct and none of them this node's own owner (:func:`check_neighbour_keys`). So the
coordinator can neither invent a neighbour (no roster key), nor play one owner twice, nor move an owner's keys to
another node id or round. What it still can do: choose which roster members are a node's neighbours, and drop them.

Roster file: one OpenSSH public-key line per owner (``ssh-ed25519 AAAA... name``), ``#`` comments allowed — the
concatenation of the owners' ``.pub`` files from ``veil keygen``.
"""

from __future__ import annotations

import argparse
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from veil.errors import ConfigError, CredentialError

STATEMENT_TAG = b"veil secagg+ round keys/1"
#: veil's own record beside Flower's SecAgg+ configs: in SETUP the ServerApp's mask generator; in a SETUP reply the
#: owner's public key and signature; in SHARE_KEYS ``str(node id) -> [owner public key, signature]`` per neighbour.
RECORD = "veil.secagg"
MASK_GENERATOR_KEY, OWNER_KEY, SIGNATURE_KEY = "mask-generator", "owner", "signature"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Roster:
    """The owners a node accepts as SecAgg+ neighbours: raw 32-byte Ed25519 public key -> owner name."""

    members: Mapping[bytes, str]
    path: str = ""

    def __post_init__(self) -> None:
        if len(self.members) < 3:
            raise ConfigError(f"roster {self.path or '(given)'} lists {len(self.members)} owner(s); a SecAgg+ roster "
                              "needs every owner of the federation, at least 3")

    def name_of(self, public_key: bytes) -> str | None:
        return self.members.get(public_key)


def raw_public(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key (what travels in a SETUP reply)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_statement(*, run_id: int, round_id: str, node_id: int, pk1: bytes, pk2: bytes) -> bytes:
    """The bytes an owner signs for one node's SecAgg+ public keys in one round of one run."""
    parts = [STATEMENT_TAG, str(int(run_id)).encode(), str(round_id).encode(), str(int(node_id)).encode(), pk1, pk2]
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def sign_statement(key: Ed25519PrivateKey, statement: bytes) -> bytes:
    return key.sign(statement)


def verify_statement(public_key: bytes, signature: bytes, statement: bytes) -> bool:
    """True when ``signature`` is ``public_key``'s (raw Ed25519) over ``statement``; False for anything malformed."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, statement)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def check_neighbour_keys(roster: Roster, *, own: bytes, signed: Mapping[int, tuple[bytes, bytes, bytes, bytes]],
                         run_id: int, round_id: str) -> str | None:
    """Why a SHARE_KEYS message's neighbour keys must be refused, or None.

    ``signed``: node id -> (pk1, pk2, owner public key, signature) of every neighbour but this node.
    """
    if own not in roster.members:
        return "this node's own signing key is not in its roster"
    signers = {own}
    for node_id, (pk1, pk2, owner, signature) in sorted(signed.items()):
        if roster.name_of(owner) is None:
            return f"the keys of node {node_id} are signed by a key not in this node's roster"
        if owner in signers:
            return (f"the keys of node {node_id} are signed by an owner already in this neighbourhood "
                    f"({roster.name_of(owner)})")
        statement = key_statement(run_id=run_id, round_id=round_id, node_id=node_id, pk1=pk1, pk2=pk2)
        if not verify_statement(owner, signature, statement):
            return f"the keys of node {node_id} do not carry {roster.name_of(owner)}'s signature for this round"
        signers.add(owner)
    return None


@functools.lru_cache(maxsize=8)
def _load_roster(path: str, _mtime_ns: int) -> Roster:
    members: dict[bytes, str] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read roster {path}: {err}; give the owners' roster file") from err
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            key = serialization.load_ssh_public_key(" ".join(text.split()[:2]).encode())
        except (ValueError, TypeError, IndexError, UnsupportedAlgorithm) as err:
            raise ConfigError(f"roster {path} line {number} is not an OpenSSH public key; use the .pub files from "
                              "`veil keygen`") from err
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"roster {path} line {number} is not an ssh-ed25519 key; use `veil keygen`")
        raw = raw_public(key)
        if raw in members:
            raise ConfigError(f"roster {path} line {number} repeats the key of {members[raw]}; list each owner once")
        members[raw] = text.split()[2] if len(text.split()) > 2 else f"line-{number}"
    return Roster(members, path)


def load_roster(path: str | Path) -> Roster:
    """The roster in ``path`` (cached while the file is unchanged); ConfigError names the bad line."""
    try:
        mtime = Path(path).stat().st_mtime_ns
    except OSError as err:
        raise ConfigError(f"roster {path} does not exist; give the owners' roster file (--roster)") from err
    return _load_roster(str(path), mtime)


@functools.lru_cache(maxsize=8)
def _load_signing_key(path: str, _mtime_ns: int) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise CredentialError(f"cannot read signing key {path}: {err}; create one with `veil keygen`") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise CredentialError(f"signing key {path} is not an Ed25519 key; create one with `veil keygen`")
    return key


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    try:
        mtime = Path(path).stat().st_mtime_ns
    except OSError as err:
        raise CredentialError(f"signing key {path} does not exist; create one with `veil keygen`") from err
    return _load_signing_key(str(path), mtime)


def owner_key_files(name: str) -> dict[str, tuple[bytes, int]]:
    """A fresh owner key pair: ``NAME.key`` (PKCS8 PEM, mode 600) and ``NAME.pub`` (one OpenSSH line)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return {f"{name}.key": (private, 0o600), f"{name}.pub": (public + b" " + name.encode() + b"\n", 0o644)}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``veil keygen`` options."""
    parser.add_argument("--out", required=True, type=Path, help="directory to write NAME.key and NAME.pub into")
    parser.add_argument("--name", required=True, help="the owner's name in the roster (letters, digits, . _ -)")
    parser.add_argument("--force", action="store_true", help="replace existing files of the same names")


def run(args: argparse.Namespace) -> int:
    """Make an owner's signing key pair; prints what to do with each file."""
    from veil.security.certs import write_files

    if not _NAME.match(args.name):
        raise ConfigError(f"--name {args.name!r} is invalid: use 1-64 letters, digits, '.', '_' or '-'")
    args.out.mkdir(parents=True, exist_ok=True)
    write_files(args.out, owner_key_files(args.name), force=args.force)
    print(f"Wrote to {args.out}:")
    print(f"  {args.name}.key  your signing key: keep it on your node only (veil client --signing-key)")
    print(f"  {args.name}.pub  your public key: send it to the other owners; everyone's .pub lines together, in one "
          "file, are the roster (veil client --roster)")
    return 0
