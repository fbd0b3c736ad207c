"""The audit's no-noise control arm (issue 26, scope 1): both arms draw the same canaries, the control has DP off and
everything else equal, both bounds are stated side by side, and a control bound near zero gives one warning line."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from veil.atomic import atomic_write
from veil.audit import cli as audit_mod
from veil.audit.cli import configure_parser
from veil.audit.control import power_warning, side_by_side, write_control
from veil.audit.result import AuditResult, write_outputs


def _result(bound: float, *, claimed: float = 4.0, correct: int = 60) -> AuditResult:
    return AuditResult(claimed_epsilon=claimed, delta=1e-5, lower_bound=bound, confidence=0.95, canaries=200,
                       included=100, guesses=80, correct=correct, score="loss", privacy="sample-level DP-SGD")


def test_both_bounds_side_by_side_and_a_warning_only_without_power(tmp_path: Path) -> None:
    dp, control = _result(0.0), _result(1.3, claimed=math.inf)
    assert side_by_side(dp, control) == "without DP this attack finds epsilon >= 1.300; with DP >= 0.000; claimed 4.000"
    assert power_warning(control) is None
    weak = _result(0.02, claimed=math.inf)
    line = power_warning(weak)
    assert line is not None and "\n" not in line and "no power" in line and "federation.rounds" in line

    write_outputs(tmp_path, dp, [])
    write_control(tmp_path, dp, weak, atomic_write)
    doc = json.loads((tmp_path / "audit.json").read_text())
    assert doc["lower_bound"] == 0.0 and doc["control"]["lower_bound"] == 0.02
    md = (tmp_path / "audit.md").read_text()
    assert "without DP this attack finds ε ≥ 0.020; with DP ≥ 0.000; claimed 4.000" in md and "no power" in md


def test_the_control_arm_draws_the_same_canaries_with_dp_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from veil.conf.schema import VeilConfig

    calls: list[dict[str, Any]] = []

    def fake_run_audit(cfg: Any, out_dir: Path, **kw: Any) -> AuditResult:
        calls.append({"cfg": cfg, "out_dir": out_dir, "draw": kw["rng"].integers(1 << 62, size=4).tolist()})
        result = _result(0.0 if cfg.privacy.enabled else 0.01)
        write_outputs(out_dir, result, [])
        return result

    monkeypatch.setattr(audit_mod, "run_audit", fake_run_audit)
    monkeypatch.setattr("veil.preflight.preflight", lambda overrides: VeilConfig())
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert audit_mod.run(parser.parse_args([f"hydra.run.dir={tmp_path / 'a'}"])) == 0
    dp, control = calls
    assert dp["draw"] == control["draw"], "both arms draw the same canaries"
    assert dp["cfg"].privacy.enabled and not control["cfg"].privacy.enabled
    assert control["cfg"].privacy.target_epsilon == 0 and control["cfg"].federation == dp["cfg"].federation
    assert control["out_dir"] == tmp_path / "a" / "control"
    out, err = capsys.readouterr()
    assert "without DP this attack finds epsilon >= 0.010; with DP >= 0.000" in out
    assert len(err.strip().splitlines()) == 1 and "no power" in err

    calls.clear()
    assert audit_mod.run(parser.parse_args(["--control", "off", f"hydra.run.dir={tmp_path / 'b'}"])) == 0
    assert len(calls) == 1 and np.isfinite(calls[0]["draw"][0])
