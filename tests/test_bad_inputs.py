"""The bad-input corpus (``tests/bad_inputs/cases.yaml``) through the real ``veil`` command, in process.

Every bad configuration value, data file, key or certificate must end in exactly one stderr line
``veil: error: <problem>; <fix>``, the case's non-zero exit code, no traceback, and nothing written: no run
directory, no new or changed file in the case's working directory or among the corpus files. Positive controls
must parse (and pass ``veil simulate``'s preflight) without writing anything. No case starts a simulation.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pytest

from bad_inputs.corpus import DOCS, FILES, Case, filled_accept, load_cases, materialise, snapshot
from veil.cli import main

CASES = load_cases()
# Warnings Python shows by default (DeprecationWarning & co. are hidden outside __main__).
_HIDDEN = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def _param(case: Case) -> object:
    marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                   caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrange: the case's files exist before the "before" listing; the command runs inside tmp_path.
    argv = materialise(case, tmp_path) if case.accept is None else []
    accept = filled_accept(case, tmp_path) if case.accept is not None else None
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path, FILES)

    # Act + assert
    if accept is not None:
        _check_accepted(accept)
    else:
        _check_refused(case, argv, capsys, caplog)

    assert not (tmp_path / "run").exists(), "a run directory was left behind"
    assert snapshot(tmp_path, FILES) == before, "files were written or changed"
    assert f"`{case.id}`" in DOCS.read_text(encoding="utf-8"), "run python tests/bad_inputs/corpus.py"


def _check_refused(case: Case, argv: list[str], capsys: pytest.CaptureFixture[str],
                   caplog: pytest.LogCaptureFixture) -> None:
    """One line, the right exit code, problem and fix named, no traceback. Log records and shown warnings count as
    stderr lines: `veil` logs to stderr at INFO (pytest's own handler keeps them out of capsys)."""
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")
        code = main(argv)
    out, err = capsys.readouterr()
    logged = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records]
    warned = [str(w.message) for w in shown if not issubclass(w.category, _HIDDEN)]
    lines = err.splitlines() + logged + warned
    assert "Traceback" not in out + err
    assert code == case.exit != 0, (code, lines)
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("veil: error: "), line
    assert case.error in line, f"{case.error!r} not in {line!r}"
    assert case.fix in line, f"fix hint {case.fix!r} not in {line!r}"
    assert len(line) < 600, f"error line of {len(line)} characters"


def _check_accepted(accept: dict[str, Any]) -> None:
    """The file parses with the given data settings; with `preflight`, veil simulate's checks pass too."""
    from veil.conf.schema import DataConfig
    from veil.preflight import preflight
    from veil.task.data import read_examples

    examples = read_examples(accept["path"], DataConfig(**accept["data"]))
    assert len(examples) == accept["examples"]
    assert sorted(set(examples.labels)) == accept["labels"]
    for text in accept.get("contains", []):
        assert text in examples.texts, (text, examples.texts)
    if "preflight" in accept:
        preflight(accept["preflight"])
