"""The ledger belongs to the owner's node, not to a hash of the file's bytes (review 2026-12-07, M4): a data file
that grows keeps its ledger, and only ``--new-ledger`` starts a fresh one (the old one kept, renamed)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from veil.client.node import _node_config, configure_parser, preflight
from veil.client.settings import node_settings
from veil.errors import LedgerError
from veil.privacy.ledger import LedgerEvent, PrivacyLedger


def _args(data: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return parser.parse_args(["--superlink", "127.0.0.1:1", "--data", str(data), "--max-epsilon", "8", "--insecure",
                              *extra])


def _ledger(data: Path, *extra: str) -> PrivacyLedger:
    args = _args(data, *extra)
    preflight(args)
    return PrivacyLedger.open(node_settings(_node_config(args)).ledger_path)


def test_a_file_with_one_row_appended_keeps_its_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    data = tmp_path / "owner.csv"
    data.write_text("text,label\n" + "".join(f"row {i},a\n" for i in range(20)), encoding="utf-8")
    first = _ledger(data)
    first.record(LedgerEvent(run_id="r1", round=1, noise_multiplier=1.0, sample_rate=0.05, steps=10, delta=1e-5))
    with open(data, "a", encoding="utf-8") as fh:
        fh.write("row 20,a\n")
    again = _ledger(data)
    assert again.path == first.path and len(again.events) == 1, "the grown file continues its ledger"
    fresh = _ledger(data, "--new-ledger")
    assert fresh.path == first.path and len(fresh.events) == 0
    kept = [p for p in first.path.parent.iterdir() if p.name.endswith(".old")]
    assert len(kept) == 1 and len(PrivacyLedger.open(kept[0], create=False).events) == 1, "never deleted"


def test_the_same_bytes_at_another_path_are_refused_a_fresh_ledger(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    data = tmp_path / "owner.csv"
    data.write_text("text,label\n" + "".join(f"row {i},a\n" for i in range(20)), encoding="utf-8")
    _ledger(data).record(LedgerEvent(run_id="r1", round=1, noise_multiplier=1.0, sample_rate=0.05, steps=10,
                                     delta=1e-5))
    moved = tmp_path / "moved.csv"
    moved.write_bytes(data.read_bytes())
    with pytest.raises(LedgerError, match="already has a privacy ledger"):
        _ledger(moved)
