"""Owners' signing keys and rosters (``veil keygen``, :mod:`veil.security.roster`): files, parsing, refusals."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from veil.cli import main
from veil.client.settings import node_settings
from veil.errors import ConfigError
from veil.security.certs import make_node_key_pair
from veil.security.roster import (check_neighbour_keys, key_statement, load_roster, load_signing_key, raw_public,
                                  verify_statement)


def _keygen(out: Path, *names: str) -> Path:
    for name in names:
        assert main(["keygen", "--out", str(out), "--name", name]) == 0
    roster = out / "roster.pub"
    roster.write_text("# the owners of the federation\n" + "".join((out / f"{n}.pub").read_text() for n in names))
    return roster


def test_keygen_writes_a_private_key_only_its_owner_reads_and_a_roster_line(tmp_path: Path) -> None:
    roster = load_roster(_keygen(tmp_path, "alice", "bob", "carol"))
    assert stat.S_IMODE((tmp_path / "alice.key").stat().st_mode) == 0o600
    assert (tmp_path / "alice.pub").read_text().startswith("ssh-ed25519 ")
    assert sorted(roster.members.values()) == ["alice", "bob", "carol"]
    assert raw_public(load_signing_key(tmp_path / "bob.key")) in roster.members


def test_keygen_refuses_to_overwrite_and_bad_names_in_one_line(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    _keygen(tmp_path, "alice")
    assert main(["keygen", "--out", str(tmp_path), "--name", "alice"]) == 2
    assert main(["keygen", "--out", str(tmp_path), "--name", "a b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "refusing to overwrite" in err[0] and "--name 'a b' is invalid" in err[1]


@pytest.mark.parametrize(("line", "message"), [
    ("not a key", "line 5 is not an OpenSSH public key"),
    (make_node_key_pair(comment="n")[1].decode().strip(), "line 5 is not an ssh-ed25519 key"),
    (None, "line 5 repeats the key of alice"),
], ids=["garbage", "ecdsa-node-key", "repeat"])
def test_a_bad_roster_line_is_named(tmp_path: Path, line: str | None, message: str) -> None:
    roster = _keygen(tmp_path, "alice", "bob", "carol")
    extra = line if line is not None else (tmp_path / "alice.pub").read_text().strip()
    roster.write_text(roster.read_text() + extra + "\n")
    with pytest.raises(ConfigError, match=message):
        load_roster(roster)


def test_a_roster_needs_three_owners(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 3"):
        load_roster(_keygen(tmp_path, "alice", "bob"))


def test_the_signature_binds_run_round_node_and_both_keys() -> None:
    key = Ed25519PrivateKey.generate()
    fields = {"run_id": 7, "round_id": "3", "node_id": 22, "pk1": b"P" * 90, "pk2": b"Q" * 90}
    signature = key.sign(key_statement(**fields))
    assert verify_statement(raw_public(key), signature, key_statement(**fields))
    for name, other in [("run_id", 8), ("round_id", "4"), ("node_id", 33), ("pk1", b"X" * 90), ("pk2", b"Q" * 89)]:
        assert not verify_statement(raw_public(key), signature, key_statement(**{**fields, name: other})), name
    assert not verify_statement(b"short", signature, key_statement(**fields))


def test_the_own_owner_cannot_sign_for_a_neighbour(tmp_path: Path) -> None:
    roster = load_roster(_keygen(tmp_path, "alice", "bob", "carol"))
    alice = load_signing_key(tmp_path / "alice.key")
    statement = key_statement(run_id=1, round_id="1", node_id=22, pk1=b"a", pk2=b"b")
    signed = {22: (b"a", b"b", raw_public(alice), alice.sign(statement))}
    assert "already in this neighbourhood" in str(check_neighbour_keys(roster, own=raw_public(alice), signed=signed,
                                                                       run_id=1, round_id="1"))


def test_node_settings_take_roster_and_signing_key_together() -> None:
    base = {"data-path": "/x.csv", "max-epsilon": 1.0, "ledger-path": "/tmp/l.json"}
    assert node_settings({**base, "max-dropouts": 1}).max_dropouts == 1
    with pytest.raises(ConfigError, match="go together"):
        node_settings({**base, "roster-path": "/r.pub"})
    with pytest.raises(ConfigError, match="max-dropouts=-1"):
        node_settings({**base, "max-dropouts": -1})
