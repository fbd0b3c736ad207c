"""The DP-overhead benchmark (issue 7) runs end to end on the tiny BERT and prints its table; no timing assertions
(the machines are shared), and ``--no-record`` keeps docs/benchmarks.md untouched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dp_overhead_quick_prints_table(tmp_path: Path) -> None:
    # arrange
    doc = ROOT / "docs" / "benchmarks.md"
    before = doc.read_bytes() if doc.exists() else None
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    # act
    proc = subprocess.run([sys.executable, "-m", "benchmarks.dp_overhead", "--quick", "--no-record"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    # assert
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "samples/s" in out and "x non-private" in out
    for name in ("lora non-private", "lora hooks", "lora ghost", "full non-private", "full hooks", "full ghost"):
        assert name in out, f"row {name!r} missing from:\n{out}"
    assert "target" in out
    assert (doc.read_bytes() if doc.exists() else None) == before, "--no-record must not write docs/benchmarks.md"


def test_dp_overhead_records_to_given_file(tmp_path: Path) -> None:
    out_file = tmp_path / "bench.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "benchmarks/dp_overhead.py", "--quick", "--output", str(out_file)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out_file.read_text(encoding="utf-8")
    assert text.startswith("# veil benchmarks")
    assert "## dp_overhead" in text and "| full ghost |" in text and "versions: Python" in text
