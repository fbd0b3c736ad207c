"""Shared fixtures: offline environment, the BANKING77 files, small configs."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

from support.helpers import write_small_csv
from veil.cli import quiet_environment

quiet_environment()  # offline, no telemetry: the same environment the `veil` command sets
# A deployed node keeps its ledgers under $XDG_STATE_HOME/veil/ledgers: never the tester's own
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="veil-test-state-")

ROOT = Path(__file__).resolve().parents[1]
BANKING77 = ROOT / "veil" / "data" / "banking77"  # shipped inside the package


def pytest_report_header() -> str:
    """Which Flower this run imports (``make check-flower-newest`` shadows the pinned one), found without importing it."""
    spec = importlib.util.find_spec("flwr")
    where = Path(spec.origin).parent if spec and spec.origin else "not installed"
    return f"flwr {importlib.metadata.version('flwr') if spec else '-'} ({where})"


@pytest.fixture(scope="session")
def banking77() -> Path:
    if not (BANKING77 / "train.csv").is_file():
        pytest.skip(f"BANKING77 not found at {BANKING77}")
    return BANKING77


@pytest.fixture
def small_csv(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny 4-class train/test pair (CSV with a header)."""
    return write_small_csv(tmp_path)

