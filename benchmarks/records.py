"""One raw record per benchmark run (issue 25): what ``benchmarks.common.report`` writes to
``benchmarks/results/<module>.jsonl``, how a record prints as a Markdown section, and the one-off parser that turned
the old log (docs/benchmarks.md before issue 25, a file of such sections) into records.

A record is a JSON object, one per line, keys in this order:

- ``script``: the name the run reports under (``dp_overhead``, ``utility_banking77 --study``); the file is named
  after its first word, the module;
- ``date``: ``YYYY-MM-DD HH:MM UTC`` (imported hand-written sections may give a range, ``05:30–06:46 UTC``);
- ``command``: the command line that produced it, ``python -m benchmarks.<module> ...``;
- ``settings``, ``machine`` (cpu, device, load average at start, versions, load average at end, in that order),
  ``elapsed`` (seconds), ``details`` (further ``key: value`` lines), ``headers``, ``rows``, ``notes_heading`` and
  ``notes`` (one line each);
- optional: ``heading`` (when the section's title is not ``<script> — <date>``), ``annotation`` (Markdown written
  by hand under the section, kept verbatim), and for sections written by hand throughout ``by_hand: true`` with the
  verbatim ``body`` (``command``, ``headers`` and ``rows`` then hold what could be read from it, for the tables).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

Record = dict[str, Any]
RESULTS = Path(__file__).resolve().parent / "results"
_DATE = re.compile(r"(\d{4}-\d\d-\d\d) (\d\d:\d\d)")
_HEADING = re.compile(r"^(?P<script>[a-z][a-z0-9_]*(?: --[a-z]+)?)(?::[^—]*)? — (?P<date>\d{4}-\d\d-\d\d \S+ UTC)")
_RUN_END = re.compile(r"^(?P<load>.*) \(run took (?P<elapsed>[\d.]+) s\)$")
_MACHINE_END = ("versions", "load average at end")


def module_of(record: Record) -> str:
    """The benchmark module a record belongs to (its jsonl file's stem)."""
    return str(record["script"]).split()[0]


def sort_key(record: Record) -> str:
    """``YYYY-MM-DD HH:MM`` of the run's start, for ordering."""
    found = _DATE.search(str(record["date"]))
    return f"{found.group(1)} {found.group(2)}" if found else str(record["date"])


def identity(record: Record) -> tuple[str, str, str]:
    """What makes a run the same run (for de-duplication on import): script, date, and command or heading."""
    return record["script"], record["date"], record.get("command") or record.get("heading", "")


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def render(record: Record) -> str:
    """The record as a Markdown section (``## ...`` to its last line, no trailing newline)."""
    heading = record.get("heading") or f"{record['script']} — {record['date']}"
    if record.get("by_hand"):
        return f"## {heading}\n\n{record['body']}"
    machine = dict(record["machine"])
    lines = [f"## {heading}", "", f"`{record['command']}`", "", f"- settings: {record['settings']}"]
    lines += [f"- {k}: {v}" for k, v in machine.items() if k not in _MACHINE_END]
    lines.append(f"- versions: {machine['versions']}")
    lines.append(f"- load average at end: {machine['load average at end']} (run took {record['elapsed']:.0f} s)")
    lines += [f"- {d}" for d in record.get("details", [])]
    lines += ["", markdown_table(record["headers"], record["rows"]), ""]
    if record.get("notes_heading"):
        lines += [record["notes_heading"], ""]
    lines += [f"- {n}" for n in record["notes"]]
    text = "\n".join(lines).rstrip("\n")
    return text + (f"\n\n{record['annotation']}" if record.get("annotation") else "")


def append(record: Record, results: Path = RESULTS) -> Path:
    """Append ``record`` as one line to ``results/<module>.jsonl``; returns that path."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{module_of(record)}.jsonl"
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def load(results: Path = RESULTS) -> list[Record]:
    """Every record under ``results``, newest first (ties: the later line first), deterministic."""
    found: list[tuple[str, str, int, Record]] = []
    for path in sorted(results.glob("*.jsonl")):
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                record = json.loads(line)
                found.append((sort_key(record), path.stem, i, record))
    found.sort(key=lambda t: t[:3], reverse=True)
    return [t[3] for t in found]


def _table(lines: list[str], i: int) -> tuple[list[str], list[list[str]], int]:
    """The Markdown table starting at ``lines[i]``: headers, rows and the index after it."""
    cells = [ln[2:-2].split(" | ") for ln in _take(lines, i, lambda ln: ln.startswith("|"))]
    return cells[0], cells[2:], i + len(cells)


def _take(lines: list[str], i: int, keep: Any) -> list[str]:
    out = []
    while i < len(lines) and keep(lines[i]):
        out.append(lines[i])
        i += 1
    return out


def _bullets(lines: list[str], i: int) -> tuple[list[str], int]:
    """Consecutive ``- `` items from ``lines[i]``, each with its indented continuation lines."""
    items: list[str] = []
    while i < len(lines) and (lines[i].startswith("- ") or (items and lines[i].startswith("  "))):
        if lines[i].startswith("- "):
            items.append(lines[i][2:])
        else:
            items[-1] += "\n" + lines[i]
        i += 1
    return items, i


def _structured(head: re.Match[str], heading: str, lines: list[str]) -> Record:
    """Read a section written by ``report()``; raises ValueError (or IndexError/KeyError) where it is not one."""
    if len(lines) < 3 or lines[0] != "" or not (lines[1].startswith("`") and lines[1].endswith("`")) or lines[2]:
        raise ValueError("no command line")
    record: Record = {"script": head["script"], "date": head["date"]}
    if heading != f"{head['script']} — {head['date']}":
        record["heading"] = heading
    record["command"] = lines[1][1:-1]
    items, i = _bullets(lines, 3)
    pairs = [item.split(": ", 1) for item in items]
    keys = [k for k, _ in pairs]
    if keys[0] != "settings" or "load average at end" not in keys:
        raise ValueError("no settings or load average at end")
    end = keys.index("load average at end")
    record["settings"] = pairs[0][1]
    record["machine"] = dict(pairs[1:end])
    run_end = _RUN_END.match(pairs[end][1])
    if run_end is None:
        raise ValueError("no run time")
    record["machine"]["load average at end"] = run_end["load"]
    record["elapsed"] = float(run_end["elapsed"])
    record["details"] = [item for item in items[end + 1:]]
    if lines[i] != "" or not lines[i + 1].startswith("|"):
        raise ValueError("no table")
    record["headers"], record["rows"], i = _table(lines, i + 1)
    if i < len(lines) and lines[i] == "" and i + 2 < len(lines) and not lines[i + 1].startswith(("- ", "|")) \
            and lines[i + 2] == "" and lines[i + 3: i + 4] and lines[i + 3].startswith("- "):
        record["notes_heading"], i = lines[i + 1], i + 2
    record["notes"], i = _bullets(lines, i + 1) if i < len(lines) and lines[i] == "" else ([], i)
    rest = "\n".join(lines[i:]).strip("\n")
    if rest:
        record["annotation"] = rest
    return record


def _by_hand(head: re.Match[str], heading: str, lines: list[str]) -> Record:
    """A section written by hand: kept verbatim, with the first command and table that can be read from it."""
    body = "\n".join(lines).strip("\n")
    record: Record = {"script": head["script"], "date": head["date"], "heading": heading, "by_hand": True}
    command = re.search(r"^`(python -m benchmarks\.[^`]+)`", body, re.M)
    if command:
        record["command"] = command.group(1)
    cpu = re.search(r"^- cpu: (.+)$", body, re.M)
    if cpu:
        record["machine"] = {"cpu": cpu.group(1)}
    start = next((j for j, ln in enumerate(lines) if ln.startswith("|")), None)
    if start is not None:
        record["headers"], record["rows"], _ = _table(lines, start)
    record["body"] = body
    return record


def parse_section(section: str) -> Record | None:
    """A Markdown section of the old log as a record, or None where it is not a benchmark run (a summary, a note).
    A section is read as ``report()``'s output only where rendering the record gives it back exactly; anything else
    is kept whole as a hand-written record."""
    lines = section.rstrip("\n").split("\n")
    heading = lines[0][3:]
    head = _HEADING.match(heading)
    if head is None or not (Path(__file__).parent / f"{head['script'].split()[0]}.py").exists():
        return None
    try:
        record = _structured(head, heading, lines[1:])
        if render(record) == "\n".join(lines).rstrip("\n"):
            return record
    except (ValueError, IndexError, KeyError):
        pass
    return _by_hand(head, heading, lines[1:])


def split_sections(text: str) -> list[str]:
    """The ``## `` sections of a Markdown file (the preamble before the first is dropped)."""
    parts = re.split(r"^(?=## )", text, flags=re.M)
    return [p.rstrip("\n") for p in parts if p.startswith("## ")]
