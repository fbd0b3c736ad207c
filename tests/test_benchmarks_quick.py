"""The benchmarks of issue 7 run end to end at their ``--quick`` sizes and print their tables: DP overhead on the
tiny BERT, upload bytes, SecAgg+ and round overhead in small simulations, and (slow) a loopback deployment. No timing
assertions (the machines are shared); ``--no-record`` keeps docs/benchmarks.md untouched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert "lora: grad_sample_mode=auto picks hooks" in out and "full: grad_sample_mode=auto picks bk" in out
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


# (module, text every run prints); the two that run Flower's engine for ~20 s each are `make test-bench` only
_SLOW = pytest.mark.bench
FEDERATION_BENCHMARKS = [
    pytest.param("upload_bytes", ["SecAgg+ bytes", "lora", "full", "int64"], id="upload_bytes"),
    pytest.param("secagg_overhead", ["SecAgg+ s", "x plain", "collect masked vectors"], marks=_SLOW, id="secagg_overhead"),
    pytest.param("round_overhead", ["s/round", "dispatch s", "collection s"], marks=_SLOW, id="round_overhead"),
]


def _run_quick(module: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_DEDUP_LOGS": "0"}
    return subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--quick", "--no-record"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("module, needles", FEDERATION_BENCHMARKS)
def test_federation_benchmark_quick_prints_table(module: str, needles: list[str]) -> None:
    # arrange
    doc = ROOT / "docs" / "benchmarks.md"
    before = doc.read_bytes() if doc.exists() else None
    # act
    proc = _run_quick(module, timeout=300)
    # assert
    assert proc.returncode == 0, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stdout, f"{needle!r} missing from:\n{proc.stdout}"
    assert (doc.read_bytes() if doc.exists() else None) == before, "--no-record must not write docs/benchmarks.md"


@pytest.mark.slow
@pytest.mark.bench
def test_deploy_overhead_quick_prints_table() -> None:
    """A real loopback deployment (SuperLink + 3 SuperNodes, TLS, SecAgg+): about two minutes on two cores."""
    proc = _run_quick("deploy_overhead", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "s/round (rounds 2..)" in proc.stdout and "client compute s" in proc.stdout


@pytest.mark.slow
@pytest.mark.bench
def test_sim_scale_quick_prints_table() -> None:
    """A 20-client simulation with SecAgg+ through `veil simulate` (about a minute on two cores)."""
    proc = _run_quick("sim_scale", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "s/round after the first" in proc.stdout and "coordinator peak MiB" in proc.stdout
    assert "exit" not in proc.stdout.split("code", 1)[-1], f"the simulation failed:\n{proc.stdout}"


@pytest.mark.bench
@pytest.mark.slow
def test_deploy_faults_quick_prints_scale_soak_and_a_coordinator_kill() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.deploy_faults", "--quick", "--no-record"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scale: 3 nodes" in proc.stdout and "soak: 3 nodes" in proc.stdout
    assert "soak coordinator: RSS" in proc.stdout and "ledger events" in proc.stdout
    assert "coordinator kill at unmask: " in proc.stdout and "resumed from its weights" in proc.stdout
