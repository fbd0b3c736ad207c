"""`veil report` and the research outputs of a run: sweep expansion, summary.csv against each run's last metrics
line, valid PNGs, TensorBoard event files read back record by record, a sweep that survives a failed member."""

from __future__ import annotations

import csv
import math
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from support.helpers import TINY_SIM, data_overrides, metrics, run_veil
from veil.report import load_run, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNGS = ["accuracy_per_round.png", "loss_per_round.png", "epsilon_per_round.png", "privacy_utility.png"]


def read_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """Scalars of every event file in ``log_dir``, parsed from the TFRecord framing (u64 length, u32 crc, data,
    u32 crc) with the Event protobuf: an independent reader, not the writer's own code path."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def fake_run(run_dir: Path, *, eps: float, clients: int, private: bool = True, accuracy: float = 0.5) -> None:
    """A run directory as `veil simulate` leaves it (metrics, resolved config, summary), without running one."""
    run_dir.mkdir(parents=True)
    rows = [{"round": r, "accuracy": accuracy * r / 2, "loss": 2.0 / r, "epsilon_max": eps * r / 2 if private else 0.0,
             "secagg": False, "completed": True, "clients": clients} for r in (1, 2)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "config.resolved.yaml").write_text(
        f"privacy:\n  enabled: {str(private).lower()}\n  target_epsilon: {eps}\n  delta: 1.0e-05\n"
        f"federation:\n  num_clients: {clients}\n  seed: 0\noutput_dir: {run_dir}\n")
    (run_dir / "summary.json").write_text(json.dumps({**rows[-1], "majority_baseline": 0.1}))


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def assert_matches(row: dict[str, str], last: dict[str, Any]) -> None:
    for key, value in last.items():
        if isinstance(value, float):
            assert float(row[key]) == pytest.approx(value, rel=1e-12), key
        else:
            assert row[key] == ("" if value is None else str(value)), key


def test_report_of_a_sweep_directory(tmp_path: Path) -> None:
    from veil.report import find_runs, load_run, swept_factors, write_report

    sweep = tmp_path / "sweep"
    for i, (eps, clients) in enumerate([(1.0, 10), (8.0, 10), (1.0, 50), (8.0, 50)]):
        fake_run(sweep / str(i), eps=eps, clients=clients, accuracy=0.3 + 0.05 * i)
    fake_run(sweep / "np", eps=4.0, clients=10, private=False, accuracy=0.9)

    runs = [load_run(p) for p in find_runs([sweep])]
    written = write_report(runs, tmp_path / "report")

    assert [r.path.name for r in runs] == ["0", "1", "2", "3", "np"]
    assert swept_factors(runs) == ["privacy.enabled", "privacy.target_epsilon", "federation.num_clients"]
    rows = csv_rows(tmp_path / "report" / "summary.csv")
    assert len(rows) == 5
    for row, run in zip(rows, runs, strict=True):
        assert_matches(row, run.last)
    for name in PNGS:
        assert (tmp_path / "report" / name).read_bytes()[:8] == PNG_MAGIC
    assert {p.name for p in written} == {"summary.csv", "report.md", *PNGS}
    assert "non-private" in (tmp_path / "report" / "report.md").read_text()


def test_report_refuses_a_directory_without_runs(tmp_path: Path) -> None:
    proc = run_veil(["report", str(tmp_path)], timeout=60)
    assert proc.returncode == 2
    assert "holds no run" in proc.stderr and "Traceback" not in proc.stderr


def test_tensorboard_hook_writes_every_round(tmp_path: Path) -> None:
    from veil.server.tensorboard import TensorBoardHook

    hook = TensorBoardHook(tmp_path / "tb")
    for r in (1, 2):
        hook.write({"round": r, "accuracy": 0.25 * r, "loss": 1.5, "epsilon_max": 0.5 * r, "contributed": 3,
                    "upload_bytes_per_client": 4624.0, "seconds": 3.0, "node_epsilon_max": None, "secagg": True})
    hook.close()

    scalars = read_scalars(tmp_path / "tb")
    assert scalars["eval/accuracy"] == {1: 0.25, 2: 0.5}
    assert scalars["privacy/epsilon_max"] == {1: 0.5, 2: 1.0}
    assert scalars["cost/upload_bytes_per_client"][2] == 4624.0 and scalars["federation/contributed"][1] == 3
    assert "simulated_nodes/epsilon_max" not in scalars, "a missing value is left out, not written as NaN"


def test_a_bad_swept_value_fails_before_any_member_runs(small_csv: tuple[Path, Path], tmp_path: Path) -> None:
    proc = run_veil(["simulate", "-m", *TINY_SIM, *data_overrides(*small_csv), "privacy.target_epsilon=1,-3",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}"], timeout=120)
    assert proc.returncode == 2
    assert "privacy.target_epsilon=-3.0 is invalid" in proc.stderr
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_sweep_with_a_failing_member_then_report(small_csv: tuple[Path, Path], tmp_path: Path) -> None:
    """2 ε × 2 client counts; 1000 clients cannot split 60 examples, which only the run itself finds out: those
    two members fail with one line each, the two others finish (member 2 after a failed one), and the report covers
    exactly them."""
    sweep = tmp_path / "sweep"
    proc = run_veil(["simulate", "-m", *TINY_SIM, *data_overrides(*small_csv), "federation.clients_per_round=3",
                     "federation.rounds=1", "secagg=off", "privacy.target_epsilon=1,8",
                     "federation.num_clients=3,1000", f"hydra.sweep.dir={sweep}"], timeout=420)

    assert proc.returncode == 2, proc.stderr[-3000:]
    failed = [line for line in proc.stderr.splitlines() if line.startswith("veil: error:")]
    assert len(failed) == 2 and all("federation.num_clients=1000" in line for line in failed), failed
    members = sorted(p.parent for p in sweep.rglob("metrics.jsonl"))
    assert [p.name for p in members] == ["0", "2"], "the members after a failed one still ran"
    for member in members:
        resolved = (member / "config.resolved.yaml").read_text()
        assert "seed: 0" in resolved and "target_epsilon:" in resolved
        assert sum(int(r["examples"]) for r in csv_rows(member / "partitions.csv")) == 60
        scalars = read_scalars(member / "tensorboard")
        last = metrics(member)[-1]
        assert scalars["eval/accuracy"][1] == pytest.approx(last["accuracy"], rel=1e-6)
        assert scalars["privacy/epsilon_max"][1] == pytest.approx(last["epsilon_max"], rel=1e-6)
        assert scalars["cost/seconds"][1] == pytest.approx(last["seconds"], rel=1e-6)

    report = tmp_path / "report"
    proc = run_veil(["report", str(sweep), "--out", str(report)], timeout=120)

    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = csv_rows(report / "summary.csv")
    assert [Path(r["run"]).name for r in rows] == ["0", "2"]
    for row, member in zip(rows, members, strict=True):
        assert_matches(row, metrics(member)[-1])
        assert row["status"] == "complete"
    for name in PNGS:
        data = (report / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000, name
    assert "privacy.target_epsilon" in (report / "report.md").read_text()


def test_report_of_a_causal_lm_run_shows_perplexity_and_generations(tmp_path: Path) -> None:
    """A hand-made causal_lm metrics.jsonl: report.md holds each round's loss, perplexity, exact match and ε and
    every sample generation (pipes escaped), the perplexity plot is drawn, summary.csv keeps the samples as JSON."""
    run_dir = tmp_path / "llm"
    fake_run(run_dir, eps=2.0, clients=5)
    samples = [[{"prompt": f"query {r}.{i} | card", "generated": f"card_arrival {r}{i}", "expected": "card_arrival"}
                for i in range(2)] for r in (1, 2)]
    rows = [{"round": r, "accuracy": 0.25 * r, "loss": 3.0 / r, "perplexity": math.exp(3.0 / r), "epsilon_max": 1.5 * r,
             "secagg": True, "completed": True, "clients": 5, "samples": samples[r - 1], "choice_accuracy": 0.3 * r}
            for r in (1, 2)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = {"loss": 5.0, "perplexity": math.exp(5.0), "accuracy": 0.0, "choice_accuracy": 0.125,
              "samples": [{"prompt": "query 0", "generated": "I can help", "expected": "card_arrival"}]}
    (run_dir / "summary.json").write_text(json.dumps({**rows[-1], "before_training": before}))
    write_report([load_run(run_dir)], run_dir / "report")
    report = (run_dir / "report" / "report.md").read_text(encoding="utf-8")
    assert f"| 0 (before training) | 5.0000 | {math.exp(5.0):.2f} | 0.0000 | 0.1250 | 0.000 |" in report
    assert "| 0 (before training) | query 0 | I can help | card_arrival |" in report
    for r in (1, 2):
        assert (f"| {r} | {3.0 / r:.4f} | {math.exp(3.0 / r):.2f} | {0.25 * r:.4f} | {0.3 * r:.4f} | {1.5 * r:.3f} |"
                in report)
        for i in range(2):
            assert f"| {r} | query {r}.{i} \\| card | card_arrival {r}{i} | card_arrival |" in report
    assert (run_dir / "report" / "perplexity_per_round.png").read_bytes().startswith(PNG_MAGIC)
    assert (run_dir / "report" / "choice_accuracy_per_round.png").read_bytes().startswith(PNG_MAGIC)
    row = csv_rows(run_dir / "report" / "summary.csv")[0]
    assert json.loads(row["samples"]) == samples[1] and float(row["perplexity"]) == pytest.approx(math.exp(1.5))


def test_report_of_classification_runs_has_no_generation_section(tmp_path: Path) -> None:
    fake_run(tmp_path / "cls", eps=2.0, clients=5)
    write_report([load_run(tmp_path / "cls")], tmp_path / "cls" / "report")
    assert "Generations" not in (tmp_path / "cls" / "report" / "report.md").read_text(encoding="utf-8")
    assert not (tmp_path / "cls" / "report" / "perplexity_per_round.png").exists()
