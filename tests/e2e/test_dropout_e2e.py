"""Drop-outs and silence under SecAgg+: a node that dies after key sharing, or before it, does not fail the round,
and the aggregate equals the plain mean of the survivors' updates within the quantisation step (no DP noise); a node
that never answers does not hold the round past the configured stage timeout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from support.fault_sim import DONE
from support.helpers import ONE_ACTOR, ROOT, TINY, data_overrides, metrics, write_small_csv

pytestmark = pytest.mark.slow

SIX = [*TINY, "federation.num_clients=6", "federation.rounds=1", "privacy=none"]
SHARES = ["secagg.num_shares=5", "secagg.reconstruction_threshold=3"]  # SecAgg+ that survives one drop-out of six


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The four faulty federations of this file, one after the other in one process (tests/support/fault_sim.py: its
    imports load once): node 2 crashes after key sharing (``secagg``), before it (``early``), after the fit
    instructions without SecAgg+ (``plain``, the reference sum), or stays silent (``hang``). Returns (their parent
    directory, the process's stderr); each run that ended without an exception holds fault_sim.DONE."""
    root = tmp_path_factory.mktemp("dropout")
    data = data_overrides(*write_small_csv(root))
    runs = {"secagg": ("crash", [*SIX, ONE_ACTOR, *data, *SHARES]),
            "early": ("crash-keys", [*SIX, ONE_ACTOR, *data, *SHARES]),
            "plain": ("crash", [*SIX, ONE_ACTOR, *data, "secagg=off"]),
            "hang": ("hang", [*SIX, *data, *SHARES, "secagg.timeout=60"])}  # two actors: the silent node holds one
    argv = [arg for name, (fault, overrides) in runs.items() for arg in ["--", str(root / name), fault, "2", *overrides]]
    # a private Ray instance for each of the four runs, as veil simulate starts one (not make test's shared head:
    # several run_simulation calls with crashing and silent nodes in one process did not run on a shared head)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0", "PYTHONWARNINGS": "ignore"})
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "support" / "fault_sim.py"), *argv[1:]], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1000, check=False)
    return root, proc.stderr


def _ran(runs: tuple[Path, str], name: str) -> Path:
    root, stderr = runs
    assert (root / name / DONE).is_file(), stderr[-3000:]
    return root / name


def _weights(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(run_dir / "global_trainable.npz") as data:
        return {k: data[k] for k in data.files}


def test_dropout_before_or_after_key_sharing_keeps_the_round(runs: tuple[Path, str]) -> None:
    # secagg, and the same node dropping one stage earlier, before it shared its keys (veil.flower.workflows)
    dirs = {name: _ran(runs, name) for name in ("secagg", "early", "plain")}
    for run, run_dir in dirs.items():
        row = metrics(run_dir)[0]
        assert row["completed"] and row["clients"] == 5, f"{run}: the five survivors make the round: {row}"
    step = 2 * 8.0 / 2**22  # one quantisation level of SecAgg+ (clipping range 8, 2**22 levels)
    b = _weights(dirs["plain"])
    for run in ("secagg", "early"):
        a = _weights(dirs[run])
        for name in b:
            assert float(np.abs(a[name] - b[name]).max()) <= step, f"{run}: {name}"

    from veil.conf.schema import ModelConfig
    from veil.task.model import build_model, get_trainable, trainable_names

    model = build_model(ModelConfig(tiny=True, max_length=24, lora_r=4, lora_alpha=8, head_init="random"),
                        ["card", "cash", "fee", "pin"], seed=0)
    initial = dict(zip(trainable_names(model), get_trainable(model), strict=True))
    moved = max(float(np.abs(b[name] - initial[name]).max()) for name in b)
    assert moved > 1000 * step, "the round must move the weights far more than the tolerance"


def test_silent_node_does_not_hold_the_round(runs: tuple[Path, str]) -> None:
    """The silent node stays silent until the server has recorded the round (at most 240 s): with a 60 s stage
    timeout the round finishes without it (60 s, not 30: the silent node holds one of the simulation's two Ray
    actors, and on a loaded machine the other five nodes' first stage in the remaining actor took over 30 s in CI). (The node then wakes so that the simulation's process can end: a
    simulation artefact; a real node is a process of its own.)"""
    row = metrics(_ran(runs, "hang"))[0]
    assert row["completed"] and row["clients"] == 5
    # had the server waited for it, the silent node (awake only once the round is recorded, or after 240 s,
    # fault_sim.HANG_SECONDS) would have held the round 240 s
    assert row["seconds"] < 240, f"the round waited {row['seconds']:.0f} s for the silent node"
