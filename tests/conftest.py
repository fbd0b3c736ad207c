"""Shared fixtures: offline environment, the BANKING77 files, small configs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from helpers import write_small_csv
from veil.cli import quiet_environment

quiet_environment()  # offline, no telemetry: the same environment the `veil` command sets
# A deployed node keeps its ledgers under $XDG_STATE_HOME/veil/ledgers: never the tester's own
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="veil-test-state-")

ROOT = Path(__file__).resolve().parents[1]
BANKING77 = ROOT / "veil" / "data" / "banking77"  # shipped inside the package


@pytest.fixture(scope="session")
def banking77() -> Path:
    if not (BANKING77 / "train.csv").is_file():
        pytest.skip(f"BANKING77 not found at {BANKING77}")
    return BANKING77


@pytest.fixture
def small_csv(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny 4-class train/test pair (CSV with a header)."""
    return write_small_csv(tmp_path)


# `make test` runs two pytest-xdist workers with --dist loadgroup. Every file is one group (its module fixtures,
# such as the fault suite's shared deployment, are built once), except the files that run simulations on Ray:
# they form one group, so two private Ray instances never start at once on a 2-core machine (a sweep that takes
# 40 s alone took 376 s beside another), while the other worker runs the loopback deployments and unit tests.
RAY_FILES = frozenset({
    "test_any_directory_e2e.py", "test_audit_clients.py", "test_audit_e2e.py", "test_budget_e2e.py",
    "test_causal_lm_e2e.py", "test_docs_commands.py", "test_dropout_e2e.py", "test_families.py", "test_report.py",
    "test_resume_e2e.py", "test_server_strategies.py", "test_sim_population.py", "test_simulate_e2e.py",
    "test_config.py", "test_utility_study.py", "test_benchmarks_quick.py",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group("ray" if name in RAY_FILES else name))
