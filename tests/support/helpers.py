"""Helpers for end-to-end tests: run the real `veil` command in a subprocess, bounded in time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

TINY = ["model=tiny_bert", "federation.batch_size=16", "federation.lr=0.02", "federation.partitioner=iid"]
# Simulations of tiny models in one Ray actor: each actor imports torch, transformers and veil before its first
# round, which costs more than a tiny model's training (a 2-round, 3-client run: 27 CPU-s with one actor, 42 with
# two, on this 2-core machine; make test runs two sessions on those cores). Tests that need a second actor (a
# silent node holding one) override it.
ONE_ACTOR = f"federation.num_cpus_per_client={os.cpu_count() or 1}"
TINY_SIM = [*TINY, ONE_ACTOR]


def run_veil(args: list[str], *, timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "RAY_DEDUP_LOGS": "0", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))}  # this checkout
    return subprocess.run([sys.executable, "-m", "veil", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def data_overrides(train: Path, test: Path) -> list[str]:
    return ["data=csv", f"data.train_path={train}", f"data.test_path={test}"]


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def write_small_csv(directory: Path) -> tuple[Path, Path]:
    """A tiny 4-class train/test pair (CSV with a header) in ``directory``."""
    words = {"card": "my card was lost", "cash": "the atm kept my cash", "fee": "why a fee on transfer",
             "pin": "i forgot my pin code"}
    train = ["text,label"] + [f"{text} {i},{label}" for label, text in words.items() for i in range(15)]
    test = ["text,label"] + [f"{text} again {i},{label}" for label, text in words.items() for i in range(3)]
    tr, te = directory / "train.csv", directory / "test.csv"
    tr.write_text("\n".join(train) + "\n", encoding="utf-8")
    te.write_text("\n".join(test) + "\n", encoding="utf-8")
    return tr, te
