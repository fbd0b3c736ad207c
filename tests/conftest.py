"""Shared fixtures: offline environment, the BANKING77 files, small configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from veil.cli import quiet_environment

quiet_environment()  # offline, no telemetry: the same environment the `veil` command sets

ROOT = Path(__file__).resolve().parents[1]
BANKING77 = ROOT.parent / "shared" / "data" / "banking77"


@pytest.fixture(scope="session")
def banking77() -> Path:
    if not (BANKING77 / "train.csv").is_file():
        pytest.skip(f"BANKING77 not found at {BANKING77}")
    return BANKING77


@pytest.fixture
def small_csv(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny 4-class train/test pair (CSV with a header)."""
    words = {"card": "my card was lost", "cash": "the atm kept my cash", "fee": "why a fee on transfer",
             "pin": "i forgot my pin code"}
    train = ["text,label"] + [f"{text} {i},{label}" for label, text in words.items() for i in range(15)]
    test = ["text,label"] + [f"{text} again {i},{label}" for label, text in words.items() for i in range(3)]
    tr, te = tmp_path / "train.csv", tmp_path / "test.csv"
    tr.write_text("\n".join(train) + "\n", encoding="utf-8")
    te.write_text("\n".join(test) + "\n", encoding="utf-8")
    return tr, te
