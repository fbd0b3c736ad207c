"""A data owner's own ε budget wins: a node whose budget does not cover a round refuses it without breaking the
SecAgg+ round, is not sampled again, and its ledger stays within its budget; the run finishes with the others,
and stops cleanly (still exporting) when too few owners have budget left."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.helpers import TINY_SIM, data_overrides, metrics, run_veil
from veil.privacy.accounting import compute_epsilon

pytestmark = pytest.mark.slow

SIGMA, BATCH, DELTA = 2.0, 4, 1e-5
# a fixed σ (no calibration) and one epoch per round, so the test can compute each round's ε independently
PRIVACY = ["privacy=dp_sgd", "privacy.target_epsilon=0", "federation.local_steps=0", f"privacy.noise_multiplier={SIGMA}",
           f"privacy.delta={DELTA}", f"federation.batch_size={BATCH}"]


def _round_epsilons(examples_per_client: int) -> tuple[float, float]:
    """ε after one and after two rounds of one local epoch, computed independently of the run."""
    batches = -(-examples_per_client // BATCH)
    q = 1 / batches
    one = compute_epsilon([(SIGMA, q, batches)], delta=DELTA).epsilon
    two = compute_epsilon([(SIGMA, q, 2 * batches)], delta=DELTA).epsilon
    return one, two


def _ledger_events(run_dir: Path, node: int) -> list[dict]:
    path = run_dir / "nodes" / f"node-{node}" / "privacy_ledger.json"
    return json.loads(path.read_text())["events"] if path.exists() else []


def test_owner_budget_refusal_and_exclusion(small_csv: tuple[Path, Path], tmp_path: Path) -> None:
    one, two = _round_epsilons(60 // 5)
    budget_1 = (one + two) / 2  # covers round 1, not round 2
    run_dir = tmp_path / "run"
    proc = run_veil(["simulate", *TINY_SIM, *data_overrides(*small_csv), *PRIVACY, "federation.num_clients=5",
                     "federation.clients_per_round=5", "federation.rounds=3", "secagg=secaggplus",
                     f"federation.node_max_epsilon='0:{one / 2},1:{budget_1}'", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[0]["clients"] == 5 and rows[0]["refused"] == 1, "node 0 answers round 1 with a refusal"
    assert all(r["completed"] for r in rows)
    assert [r["clients"] for r in rows[1:]] == [3, 3], "nodes 0 and 1 are not sampled again"
    assert _ledger_events(run_dir, 0) == [], "a refusing node releases nothing"
    events = _ledger_events(run_dir, 1)
    assert len(events) == 1
    spent = compute_epsilon([(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in events], delta=DELTA).epsilon
    assert spent <= budget_1
    assert len(_ledger_events(run_dir, 2)) == 3
    assert (run_dir / "model" / "config.json").is_file()


def test_too_few_owners_left_stops_cleanly(small_csv: tuple[Path, Path], tmp_path: Path) -> None:
    one, two = _round_epsilons(60 // 3)
    run_dir = tmp_path / "run"
    proc = run_veil(["simulate", *TINY_SIM, *data_overrides(*small_csv), *PRIVACY, "federation.num_clients=3",
                     "federation.clients_per_round=3", "federation.rounds=3", "secagg=secaggplus",
                     f"federation.node_max_epsilon=2:{(one + two) / 2}", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(run_dir)
    assert [r["round"] for r in rows] == [1], "after round 1 only 2 owners have budget; SecAgg+ needs 3"
    assert "privacy budget left" in proc.stderr
    assert (run_dir / "model" / "config.json").is_file() and (run_dir / "checkpoints" / "round-0001.npz").is_file()
