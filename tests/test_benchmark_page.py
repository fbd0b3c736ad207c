"""docs/benchmarks.md and docs/benchmarks-history.md are generated from benchmarks/results/*.jsonl (issue 25): the
committed pages are what the generator makes of the committed records (a stale page fails here), the generator is
deterministic, ``report()`` writes a record that parses back, and the one-off import of the old log renders every
run section it read exactly as it was."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import page, plots, records
from benchmarks.common import report

INFO = {"date": "2026-12-08 10:00 UTC", "cpu": "AMD EPYC, 2 logical cores visible, torch threads 2", "device": "cpu",
        "load average at start": "1.00 / 1.00 / 1.00 (1 / 5 / 15 min)"}


def test_committed_pages_are_what_the_generator_makes_of_the_committed_records() -> None:
    # act
    generated = page.generate(write_plots=False)
    # assert
    for path, text in generated.items():
        assert path.read_text(encoding="utf-8") == text, f"{path.name} is stale: run python -m benchmarks.page"


def test_the_generator_is_deterministic() -> None:
    assert page.generate(write_plots=False) == page.generate(write_plots=False)


def test_the_page_links_plots_that_exist_and_keeps_the_hand_written_notes() -> None:
    text = page.PAGE.read_text(encoding="utf-8")
    for name, _ in plots.draw_all(records.load(), None):
        assert f"(img/{name})" in text and (page.IMG / name).exists()
    for note in sorted(page.NOTES.glob("*.md")):
        assert note.read_text(encoding="utf-8").strip("\n") in text


def test_report_writes_a_record_that_round_trips(tmp_path: Path) -> None:
    # arrange
    args = argparse.Namespace(no_record=False, output=None, results=tmp_path)
    # act
    report("dp_overhead", args, ["--steps", "2"], INFO, settings="tiny BERT, B=4", headers=["configuration", "x"],
           rows=[["lora hooks", "0.95"]], notes=["a note"], elapsed=12.3, details=("memory: RSS",),
           notes_heading="Targets:")
    # assert
    [line] = (tmp_path / "dp_overhead.jsonl").read_text(encoding="utf-8").splitlines()
    record = json.loads(line)
    assert record["command"] == "python -m benchmarks.dp_overhead --steps 2"
    assert record["date"] == "2026-12-08 10:00 UTC" and record["rows"] == [["lora hooks", "0.95"]]
    assert records.load(tmp_path) == [record]
    assert records.parse_section(records.render(record)) == record


def test_scratch_output_writes_a_section_and_its_record_beside_it(tmp_path: Path) -> None:
    args = argparse.Namespace(no_record=False, output=tmp_path / "run.md", results=tmp_path / "unused")
    report("audit", args, [], INFO, settings="s", headers=["h"], rows=[["1"]], notes=[], elapsed=1.0)
    [record] = [json.loads(ln) for ln in (tmp_path / "run.jsonl").read_text(encoding="utf-8").splitlines()]
    assert records.render(record) in (tmp_path / "run.md").read_text(encoding="utf-8")
    assert not (tmp_path / "unused").exists()


def test_importing_the_history_again_adds_nothing(tmp_path: Path) -> None:
    # arrange: the committed records and notes, copied
    results, notes = tmp_path / "results", tmp_path / "notes"
    results.mkdir()
    for path in records.RESULTS.glob("*.jsonl"):
        (results / path.name).write_bytes(path.read_bytes())
    notes.mkdir()
    for path in page.NOTES.glob("*.md"):
        (notes / path.name).write_bytes(path.read_bytes())
    # act: both generated pages, as an old-style log would carry them after a merge
    added = [page.import_markdown(p, results, notes) for p in (page.HISTORY, page.PAGE)]
    # assert
    assert added == [(0, 0), (0, 0)]


def test_a_new_section_in_an_old_style_log_becomes_a_record(tmp_path: Path) -> None:
    section = records.render({"script": "sim_scale", "date": "2026-12-09 01:00 UTC", "command":
                              "python -m benchmarks.sim_scale", "settings": "s", "machine": {
                                  "cpu": "x", "device": "cpu", "load average at start": "1", "versions": "v",
                                  "load average at end": "2"}, "elapsed": 5.0, "details": [], "headers": ["clients"],
                              "rows": [["10"]], "notes": ["n"]})
    old = tmp_path / "old.md"
    old.write_text("# veil benchmarks\n\n## Summary: by hand\n\ntext\n\n" + section + "\n\nNote (by hand): ok\n")
    added = page.import_markdown(old, tmp_path / "results", tmp_path / "notes")
    assert added == (1, 1)
    [imported] = records.load(tmp_path / "results")
    assert imported["annotation"] == "Note (by hand): ok"
    assert (tmp_path / "notes" / "01-summary-by-hand.md").read_text() == "## Summary: by hand\n\ntext\n"
