"""Parts of `veil audit` without a federation: canaries drawn from OS entropy, the planted-examples seam of the
simulated shards, the verdict, and `veil report` showing the audit beside the claimed ε."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from test_report import fake_run
from veil.errors import ConfigError
from veil.audit.records import Canaries, make_canaries, write_planted
from veil.audit.result import SCORES, AuditResult
from veil.task.data import TextExamples
from veil.task.shards import with_planted

VOCAB = [f"word{i}" for i in range(5000)]


def test_canaries_are_fresh_random_records() -> None:
    a = make_canaries(count=400, labels=["x", "y", "z"], vocabulary=VOCAB, num_clients=3)
    b = make_canaries(count=400, labels=["x", "y", "z"], vocabulary=VOCAB, num_clients=3)
    assert not np.array_equal(a.included, b.included), "inclusion comes from OS entropy, not a seed"
    assert 140 < int(a.included.sum()) < 260  # Binomial(400, 1/2): 6 standard deviations either side
    words = [w for t in a.texts for w in t.split()]
    assert len(words) == 400 * 8 and len(set(words)) == len(words), "no word shared between canaries"
    assert set(a.labels) <= {"x", "y", "z"} and set(a.partition.tolist()) == {0, 1, 2}


def test_planted_file_holds_only_included_canaries_and_the_shard_takes_its_own(tmp_path: Path) -> None:
    canaries = Canaries(texts=["c0", "c1", "c2", "c3"], labels=["x", "y", "x", "y"],
                        included=np.array([True, False, True, True]), partition=np.array([0, 0, 1, 0]))
    path = tmp_path / "planted.jsonl"
    assert write_planted(canaries, path) == 3
    assert "c1" not in path.read_text(), "an excluded canary never reaches a client"
    own = TextExamples(["a", "b"], ["x", "y"])
    merged = with_planted(own, str(path), partition=0)
    assert sorted(zip(merged.texts, merged.labels, strict=True)) == [("a", "x"), ("b", "y"), ("c0", "x"), ("c3", "y")]
    assert sorted(with_planted(own, str(path), partition=1).texts) == ["a", "b", "c2"]
    orders = {tuple(with_planted(TextExamples([str(i) for i in range(20)], ["x"] * 20), str(path), partition=0).texts)
              for _ in range(5)}
    assert len(orders) > 1, "planted examples are mixed in, not appended at a fixed place"


def test_unreadable_planted_file_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no partition"}\n')
    with pytest.raises(ConfigError, match="planted examples .*bad.jsonl"):
        with_planted(TextExamples(["a"], ["x"]), str(bad), partition=0)


def _result(claimed: float, bound: float) -> AuditResult:
    return AuditResult(claimed_epsilon=claimed, delta=1e-5, lower_bound=bound, confidence=0.95, canaries=100,
                       included=50, guesses=20, correct=15, score=SCORES["gradient"], privacy="p")


def test_verdict() -> None:
    assert _result(1.0, 0.4).verdict == "consistent"
    assert _result(1.0, 1.2).verdict == "VIOLATION"
    assert _result(math.inf, 3.0).verdict == "consistent" and _result(math.inf, 3.0).to_json()["claimed_epsilon"] is None


def test_report_shows_the_audit_beside_the_claim(tmp_path: Path) -> None:
    from veil.report import find_runs, load_run, write_report

    fake_run(tmp_path / "a", eps=1.0, clients=3)
    fake_run(tmp_path / "b", eps=8.0, clients=3)
    (tmp_path / "a" / "audit.json").write_text(json.dumps(_result(0.998, 1.234).to_json()))
    runs = [load_run(p) for p in find_runs([tmp_path])]
    write_report(runs, tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    row = next(line for line in text.splitlines() if "VIOLATION" in line)
    assert "0.998" in row and "1.234" in row and "95%" in row and "| white-box |" in row
    assert text.count("VIOLATION") == 1, "only the audited run has an audit row"


def test_report_shows_the_control_arm_beside_the_dp_bound_and_warns_without_power(tmp_path: Path) -> None:
    from veil.report import find_runs, load_run, write_report

    for name, control_bound in (("strong", 4.166), ("weak", 0.0)):
        fake_run(tmp_path / name, eps=4.0, clients=1)
        control = {**_result(math.inf, control_bound).to_json(), "correct": 200 if control_bound else 100,
                   "guesses": 200}
        (tmp_path / name / "audit.json").write_text(json.dumps({**_result(3.997, 1.505).to_json(), "control": control}))
    write_report([load_run(p) for p in find_runs([tmp_path])], tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    row = next(line for line in text.splitlines() if "4.166 (200 of 200)" in line)
    assert "| 3.997 | 1.505 |" in row, row
    said = [line for line in text.splitlines() if "without DP this attack finds ε ≥" in line]
    assert len(said) == 2 and "with DP ≥ 1.505; claimed 3.997" in said[0]
    assert sum("no power" in line for line in said) == 1, "one warning, for the control that found nothing"


def test_audit_refuses_an_unknown_score_and_record_canaries_for_a_task_without_labels() -> None:
    import dataclasses

    from veil.conf.schema import DataConfig, VeilConfig
    from veil.audit.cli import _check

    cfg = VeilConfig(data=DataConfig(train_path="a.csv", test_path="b.csv"))
    _check(cfg, canaries=100, guesses=10, confidence=0.95, score="gradient")  # accepted
    with pytest.raises(ConfigError, match="--score=hessian"):
        _check(cfg, canaries=100, guesses=10, confidence=0.95, score="hessian")
    lm = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, name="causal_lm"))
    with pytest.raises(ConfigError, match="task=classification") as err:
        _check(lm, canaries=100, guesses=10, confidence=0.95, score="loss")
    assert "--score gradient-canary" in str(err.value), "the refusal names the score that fits"
    _check(lm, canaries=100, guesses=10, confidence=0.95, score="gradient-canary")  # gradient canaries fit any task


def test_score_has_one_name_and_the_cli_still_reads_its_earlier_spelling() -> None:
    """``--score grad`` (main from 2026-12-07 until the rename) parses as ``gradient-canary``; ``gradient`` stays the
    other score (canary records), and an unknown name is still refused by argparse."""
    import argparse

    from veil.audit.cli import configure_parser

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert parser.parse_args(["--score", "grad"]).score == "gradient-canary"
    assert parser.parse_args(["--score", "gradient-canary"]).score == "gradient-canary"
    assert parser.parse_args(["--score", "gradient"]).score == "gradient"
    assert parser.parse_args([]).score is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--score", "hessian"])
    assert "grad" not in SCORES and "gradient-canary" in SCORES
