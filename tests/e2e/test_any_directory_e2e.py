"""The first hour, end to end: `veil simulate` started from an unrelated directory finds its packaged default data
(BANKING77) and, when every client fails, its last line names the client-side cause (exception class and message)
while the tracebacks go to the run's flower.log, not the console; no Flower deprecation banner is printed."""

from __future__ import annotations

from pathlib import Path

from support.helpers import ONE_ACTOR, run_veil


def test_from_any_directory_a_failing_client_names_its_cause(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # federation.lr=1e39 overflows float32 in the clients' first optimizer step: every client raises RuntimeError
    proc = run_veil(["simulate", "model=tiny_bert", "federation.num_clients=2", "federation.rounds=1", "secagg=off",
                     "privacy=none", "federation.local_steps=1", "federation.batch_size=8", "federation.lr=1e39",
                     "data.eval_max_examples=20", ONE_ACTOR, f"hydra.run.dir={run_dir}"], cwd=tmp_path, timeout=400)
    console = proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, console[-3000:]
    assert last.startswith("veil: error: no round completed: every client failed (RuntimeError: "), last
    assert "overflow" in last and f"tracebacks in {run_dir / 'flower.log'}" in last, last
    assert "Traceback" not in console and "DEPRECATED" not in console, console[-3000:]
    assert "Traceback" in (run_dir / "flower.log").read_text(encoding="utf-8")
    assert "77 labels in all" in proc.stdout  # the packaged BANKING77 files were read from tmp_path
