"""Crash and resume: the server process is killed with SIGKILL during round 2; `veil simulate resume=<run dir>`
continues from the last checkpoint; rounds 1-3 are each applied exactly once; an incompatible resume is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from support.helpers import ROOT, TINY_SIM, data_overrides, metrics, run_veil, write_small_csv

pytestmark = pytest.mark.slow

COMMON = [*TINY_SIM, "federation.num_clients=3", "federation.clients_per_round=3", "federation.rounds=3",
          "privacy=dp_sgd", "secagg=secaggplus"]


def _start(args: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "veil", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the server and every process it started (Ray included)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[Path, Path], int, str, str]:
    """One run killed during round 2 and resumed: (run dir, data files, last round before the kill, its weights'
    sha256, the resumed process's output). Shared: the refused-resume test reads this run and changes nothing."""
    tmp_path = tmp_path_factory.mktemp("resume")
    small_csv = write_small_csv(tmp_path)
    run_dir = tmp_path / "run"
    proc = _start(["simulate", *COMMON, *data_overrides(*small_csv), f"hydra.run.dir={run_dir}"])
    first = run_dir / "checkpoints" / "round-0001.npz"
    try:
        deadline = time.monotonic() + 240
        while not first.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert first.exists(), "round 1 never finished"
    finally:
        _kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    done = [r["round"] for r in metrics(run_dir)]
    assert done and done[0] == 1 and len(done) < 3, f"the kill must land before the run ends: {done}"
    last = max(done)
    checkpoint_sha = metrics(run_dir)[last - 1]["weights_sha256"]
    resumed = run_veil(["simulate", *COMMON, *data_overrides(*small_csv), f"resume={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return run_dir, small_csv, last, checkpoint_sha, resumed.stdout + resumed.stderr


def test_kill_during_round_2_then_resume(resumed: tuple[Path, tuple[Path, Path], int, str, str]) -> None:
    run_dir, _small_csv, last, checkpoint_sha, log = resumed
    rows = metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3], "every round exactly once"
    assert f"resuming after round {last} from weights sha256 {checkpoint_sha}" in log
    with np.load(run_dir / "global_trainable.npz") as final:
        digest = __import__("veil.server.checkpoint", fromlist=["weights_sha256"]).weights_sha256(
            [final[k] for k in final.files])
    assert digest == rows[-1]["weights_sha256"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 3
    ledger = json.loads((run_dir / "nodes" / "node-0" / "privacy_ledger.json").read_text())
    rounds_recorded = sorted(e["round"] for e in ledger["events"])
    assert rounds_recorded[:last] == list(range(1, last + 1)) and rounds_recorded[-1] == 3, (
        "the ledger keeps every release, including one from the round in flight when the server died")


def test_incompatible_resume_is_refused(resumed: tuple[Path, tuple[Path, Path], int, str, str]) -> None:
    run_dir, small_csv = resumed[0], resumed[1]
    before = sorted(p.name for p in run_dir.rglob("*"))
    bad = run_veil(["simulate", *COMMON, *data_overrides(*small_csv), "privacy.noise_multiplier=2.0", f"resume={run_dir}"])
    assert bad.returncode != 0
    err = bad.stderr.strip().splitlines()
    assert err[-1].startswith("veil: error: cannot resume: privacy.noise_multiplier"), err[-3:]
    assert "Traceback" not in bad.stderr
    assert sorted(p.name for p in run_dir.rglob("*")) == before, "a refused resume changes nothing"
