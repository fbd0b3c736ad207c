"""Privacy ledger tests: atomic writes under an injected crash, restarts, corruption, budget refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from veil.errors import LedgerError, PrivacyBudgetExhausted
from veil import atomic
from veil.privacy.accounting import compute_epsilon
from veil.privacy.ledger import LEDGER_VERSION, LedgerEvent, PrivacyLedger

DELTA = 1e-5


def event(round_: int, *, sigma: float = 1.0, q: float = 0.01, steps: int = 200, run_id: str = "run-1") -> LedgerEvent:
    return LedgerEvent(run_id=run_id, round=round_, noise_multiplier=sigma, sample_rate=q, steps=steps,
                       delta=DELTA, timestamp=1_700_000_000.0 + round_)


def test_open_creates_file_and_parents(tmp_path: Path) -> None:
    path = tmp_path / "node" / "state" / "ledger.json"

    ledger = PrivacyLedger.open(path)

    assert path.is_file()
    assert len(ledger) == 0
    assert ledger.epsilon(delta=DELTA).epsilon == 0.0
    assert json.loads(path.read_text())["version"] == LEDGER_VERSION


def test_record_persists_and_reopen_sees_it(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path)

    ledger.record(event(0))
    reopened = PrivacyLedger.open(path)

    assert reopened.events == (event(0),)
    assert reopened.history() == [(1.0, 0.01, 200)]
    assert reopened.epsilon(delta=DELTA) == compute_epsilon([(1.0, 0.01, 200)], delta=DELTA)


def test_epsilon_grows_across_three_restarts(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    spent = []

    for round_ in range(3):  # each iteration is a fresh process: reopen from disk, record one round
        ledger = PrivacyLedger.open(path)
        ledger.record(event(round_))
        spent.append(ledger.epsilon(delta=DELTA).epsilon)

    assert spent[0] < spent[1] < spent[2]
    assert spent[2] == compute_epsilon([(1.0, 0.01, 600)], delta=DELTA).epsilon
    assert len(PrivacyLedger.open(path)) == 3


def test_crash_between_temp_write_and_rename_keeps_old_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path)
    ledger.record(event(0))
    before = path.read_bytes()

    def crash(src: str, dst: str) -> None:
        raise KeyboardInterrupt("power cut")  # not an OSError: must propagate unchanged

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        ledger.record(event(1))
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []
    assert ledger.events == (event(0),)  # the in-memory view did not run ahead of the disk
    restarted = PrivacyLedger.open(path)
    assert restarted.events == (event(0),)
    restarted.record(event(1))  # the node can go on after the restart
    assert PrivacyLedger.open(path).events == (event(0), event(1))


def test_failed_rename_is_a_ledger_error_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path)

    def disk_full(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", disk_full)
    with pytest.raises(LedgerError, match="ledger.json"):
        ledger.record(event(0))

    assert not list(tmp_path.glob("*.tmp"))
    assert len(PrivacyLedger.open(path)) == 0


def test_stray_temp_file_from_a_hard_crash_does_not_break_load(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    PrivacyLedger.open(path).record(event(0))
    (tmp_path / ".ledger.json.abc123.tmp").write_text('{"format": "veil-privacy-ledger", "ver')  # killed mid-write

    assert PrivacyLedger.open(path).events == (event(0),)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("this is not json", "not valid JSON"),
        ('{"format": "veil-privacy-ledger", "version": 1, "events": [{"run_id": "r"', "not valid JSON"),
        ("", "not valid JSON"),
        ('{"format": "veil-privacy-ledger", "version": 99, "events": []}', "version 99"),
        ('{"format": "something-else", "version": 1, "events": []}', "not a veil ledger"),
        ("[1, 2, 3]", "not a veil ledger"),
        ('{"format": "veil-privacy-ledger", "version": 1, "events": [{"round": 0}]}', "event 0"),
        ('{"format": "veil-privacy-ledger", "version": 1, "events": [{"run_id": "r", "round": 0, '
         '"noise_multiplier": 1.0, "sample_rate": 7.0, "steps": 1, "delta": 1e-5, "timestamp": 0.0}]}', "sample_rate"),
    ],
)
def test_corrupt_ledger_raises_and_is_never_reset(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "ledger.json"
    path.write_text(content)

    with pytest.raises(LedgerError, match=match) as info:
        PrivacyLedger.open(path)

    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert path.read_text() == content  # untouched


def test_check_budget_refuses_exactly_when_the_round_would_exceed_it(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path / "ledger.json")
    per_round = [compute_epsilon([(1.0, 0.01, 200 * (r + 1))], delta=DELTA).epsilon for r in range(4)]
    budget = (per_round[2] + per_round[3]) / 2  # rounds 0..2 fit, round 3 does not

    for r in range(3):
        after = ledger.check_budget(event(r), max_epsilon=budget, delta=DELTA)
        assert after.epsilon == pytest.approx(per_round[r])
        ledger.record(event(r))
    with pytest.raises(PrivacyBudgetExhausted) as info:
        ledger.check_budget(event(3), max_epsilon=budget, delta=DELTA)

    message = str(info.value)
    assert "\n" not in message
    assert f"{per_round[2]:.4g}" in message and f"{per_round[3]:.4g}" in message and f"{budget:g}" in message
    assert len(ledger) == 3  # a refused round records nothing
    assert ledger.epsilon_if(event(3), delta=DELTA).epsilon == pytest.approx(per_round[3])


def test_state_dict_round_trip_and_checks(tmp_path: Path) -> None:
    source = PrivacyLedger.open(tmp_path / "a.json")
    source.record(event(0))
    source.record(event(1, sigma=1.5))
    state = json.loads(json.dumps(source.state_dict()))  # what a checkpoint would hold

    target = PrivacyLedger.open(tmp_path / "b.json")
    target.load_state_dict(state)

    assert target.events == source.events
    assert PrivacyLedger.open(tmp_path / "b.json").events == source.events
    with pytest.raises(LedgerError, match="version"):
        target.load_state_dict({**state, "version": 2})
    with pytest.raises(LedgerError, match="keys"):
        target.load_state_dict({"events": []})
    with pytest.raises(LedgerError, match="only grows"):
        target.load_state_dict({**state, "events": state["events"][:1]})  # would shrink the ledger
    assert len(PrivacyLedger.open(tmp_path / "b.json")) == 2


def test_no_api_removes_events() -> None:
    public = {name for name in dir(PrivacyLedger) if not name.startswith("_")}

    assert not public & {"reset", "clear", "delete", "remove", "pop", "truncate"}


def test_event_validation_is_keyword_only_and_names_the_field() -> None:
    with pytest.raises(TypeError):
        LedgerEvent("r", 0, 1.0, 0.01, 10, DELTA)  # type: ignore[misc]
    with pytest.raises(ValueError, match="sample_rate"):
        event(0, q=0.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        event(0, sigma=-1.0)
    with pytest.raises(ValueError, match="round"):
        event(-1)


def test_missing_ledger_without_create_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="does not exist"):
        PrivacyLedger.open(tmp_path / "absent.json", create=False)
    assert not (tmp_path / "absent.json").exists()


def test_stopped_runs_survive_a_reopen_and_every_later_write(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path)
    ledger.record(LedgerEvent(run_id="r1", round=1, noise_multiplier=1.0, sample_rate=0.1, steps=3, delta=1e-5))
    ledger.stop_run("r1")
    other = PrivacyLedger.open(path)  # another process, opened after the stop
    other.record(LedgerEvent(run_id="r2", round=1, noise_multiplier=1.0, sample_rate=0.1, steps=3, delta=1e-5))
    reread = PrivacyLedger.open(path, create=False)
    assert reread.stopped("r1") and not reread.stopped("r2") and len(reread) == 2
    assert json.loads(path.read_text())["stopped_runs"] == ["r1"]
    assert not list(tmp_path.glob(".ledger.json.*.tmp")), "written through a temp file, renamed"
    with pytest.raises(LedgerError, match="only grows"):
        reread.load_state_dict({**reread.state_dict(), "stopped_runs": []})  # a stop is never undone
