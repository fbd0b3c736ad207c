"""`veil privacy report`: JSON ε checked independently with dp-accounting; missing ledger → one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.references import pld_epsilon
from veil.cli import main
from veil.privacy.ledger import LedgerEvent, PrivacyLedger




@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    path = tmp_path / "node" / "ledger.json"
    ledger = PrivacyLedger.open(path)
    for round_, sigma in enumerate((1.0, 1.0, 1.2)):
        ledger.record(LedgerEvent(run_id="run-7", round=round_, noise_multiplier=sigma, sample_rate=0.02,
                                  steps=150, delta=1e-5, timestamp=1_700_000_000.0 + round_))
    return path


def test_json_report_matches_an_independent_accountant(ledger_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["privacy", "report", "--ledger", str(ledger_path), "--json"])

    out = capsys.readouterr().out
    report = json.loads(out)
    assert code == 0
    assert report["delta"] == 1e-5 and report["accountant"] == "prv"
    assert [(e["run_id"], e["round"]) for e in report["events"]] == [("run-7", 0), ("run-7", 1), ("run-7", 2)]
    history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in report["events"]]
    reference = pld_epsilon(history, report["delta"])
    assert reference <= report["epsilon"] <= 1.03 * reference


def test_text_report_shows_budget_and_history(ledger_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["privacy", "report", "--ledger", str(ledger_path), "--max-epsilon", "10", "--accountant", "rdp"])

    out = capsys.readouterr().out
    assert code == 0
    assert "epsilon" in out and "1e-05" in out and "rdp" in out and "remaining" in out
    assert out.count("run-7") == 3


def test_delta_flag_overrides_recorded_delta(ledger_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["privacy", "report", "--ledger", str(ledger_path), "--json"])
    default = json.loads(capsys.readouterr().out)
    main(["privacy", "report", "--ledger", str(ledger_path), "--json", "--delta", "1e-7"])
    stricter = json.loads(capsys.readouterr().out)

    assert stricter["delta"] == 1e-7
    assert stricter["epsilon"] > default["epsilon"]


def test_default_delta_is_the_smallest_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """ε grows as δ shrinks: without --delta the report uses the most conservative δ in the ledger (review L1)."""
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path)
    for round_, delta in enumerate((1e-5, 1e-7, 1e-3)):
        ledger.record(LedgerEvent(run_id="r", round=round_, noise_multiplier=1.0, sample_rate=0.05, steps=100,
                                  delta=delta))

    assert main(["privacy", "report", "--ledger", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)

    assert report["delta"] == 1e-7
    reference = pld_epsilon([(1.0, 0.05, 300)], 1e-7)
    assert reference <= report["epsilon"] <= 1.03 * reference


def test_missing_ledger_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere" / "ledger.json"

    code = main(["privacy", "report", "--ledger", str(missing)])

    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err and str(missing) in err
    assert not missing.exists()  # a report never creates a ledger


def test_empty_ledger_without_delta_asks_for_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ledger.json"
    PrivacyLedger.open(path)

    assert main(["privacy", "report", "--ledger", str(path)]) == 2
    assert "--delta" in capsys.readouterr().err
    assert main(["privacy", "report", "--ledger", str(path), "--json", "--delta", "1e-5"]) == 0
    assert json.loads(capsys.readouterr().out)["epsilon"] == 0.0


def test_corrupt_ledger_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ledger.json"
    path.write_text("{ truncated")

    assert main(["privacy", "report", "--ledger", str(path), "--json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not valid JSON" in err
