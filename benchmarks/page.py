"""Generate docs/benchmarks.md and docs/benchmarks-history.md from the raw records in benchmarks/results/*.jsonl
(issue 25): one table per area with the newest run of each configuration (its machine, date and the command that
reproduces it), the plots (docs/img/*.png), the hand-written notes of benchmarks/notes/*.md verbatim, and every
run, newest first, in the history.

    python -m benchmarks.page                        # regenerate (make bench-page)
    python -m benchmarks.page --check                # exit 1 if the committed page is stale (tests/test_benchmark_page.py)
    python -m benchmarks.page --add $OUT/dp.jsonl    # file records of a scratch run (--output) under benchmarks/results/
    python -m benchmarks.page --import-markdown OLD.md   # sections of an old-style log (docs/benchmarks.md before
                                                         # issue 25): new runs become records, other sections notes

After merging a branch whose docs/benchmarks.md still gained sections the old way: take that file's version
(``git show main:docs/benchmarks.md > /tmp/old.md``), ``--import-markdown /tmp/old.md`` (runs and notes already
filed are skipped), then regenerate.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from benchmarks import records
from benchmarks.records import Record

ROOT = Path(__file__).resolve().parents[1]
PAGE, HISTORY, IMG = ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "benchmarks-history.md", ROOT / "docs" / "img"
NOTES = ROOT / "benchmarks" / "notes"


@dataclass(frozen=True)
class Source:
    """How one benchmark's rows enter its area's table."""

    script: str
    config: str  # the configuration, a template over the table's columns: "{values} values, {server waits with}"
    figures: tuple[str, ...]  # the columns shown as the result ("a|b": whichever the run has)
    args: tuple[str, ...] = ()  # command flags that are part of the configuration
    skip: tuple[str, str] = ("", "")  # (column, regex): rows left out (older code in side-by-side runs, ...)


@dataclass(frozen=True)
class Area:
    title: str
    about: str
    sources: tuple[Source, ...]


_BEFORE = ("code", r"^before")
AREAS = (
    Area("DP throughput and memory", "One DP-SGD training step against the same step without DP (MiniLM-L6, "
         "B=32, T=64 unless the command says otherwise): the modes hooks, ghost and bk (book-keeping).",
         (Source("dp_overhead", "{configuration}", ("samples/s", "x non-private", "peak MiB", "x non-private mem"),
                 ("--dtype", "--tuning")),)),
    Area("Federation round cost and deployment overhead", "What a round costs beyond the clients' own training: "
         "simulated no-op rounds, SecAgg+ against plain rounds, the mask generator, bytes on the wire, and a "
         "loopback deployment (3 nodes, TLS, node auth, SecAgg+).",
         (Source("round_overhead", "{clients} no-op clients, cpus/client {cpus/client}, {server waits with}",
                 ("s/round", "ClientApp work s")),
          Source("secagg_overhead", "{values} values, {server waits with}", ("plain s", "SecAgg+ s", "added s"),
                 ("--cpus-per-client",)),
          Source("secagg_crypto", "{values} values", ("x Flower", "added ms per node-round")),
          Source("upload_bytes", "{tuning}", ("values", "plain MiB", "SecAgg+ MiB")),
          Source("deploy_overhead", "3 nodes on loopback", ("s/round (rounds 2..)", "client compute s (fit, per node)",
                                                            "s per exchange", "CPU-s per round (all processes)"),
                 ("--node-threads",), _BEFORE))),
    Area("Simulation scale", "`veil simulate` with tiny BERT, DP-SGD and SecAgg+, 10 clients per round, as the "
         "population grows.",
         (Source("sim_scale", "{clients} clients", ("s/round after the first", "coordinator peak MiB|coordinator MiB",
                                                    "Ray worker peak MiB, max (workers)|Ray worker MiB, max (workers)"),
                 skip=_BEFORE),)),
    Area("Utility per ε", "BANKING77 accuracy (%, or a fraction for the utility runs) of the federation at each ε "
         "(δ 1e-5), against the non-private federation, the pooled data and each bank alone. Settings were chosen "
         "on validation texts carved from the training file; test figures were read after the choice.",
         (Source("head_study", "{arm}", ("validation acc %", "test acc %", "note"), ("--banks", "--source"),
                 ("arm", r"^bank \d+ alone")),
          Source("lpft_study", "LP-FT study (5 banks, MiniLM-L6, veil simulate): {arm}",
                 ("validation acc %", "ε (largest owner, both runs)", "seconds"), ("--epsilon", "--probe-epsilon")),
          Source("llm_demo_study", "SmolLM2-135M + LoRA (make demo-llm), {arm}, {split}",
                 ("choice acc. round 0", "choice acc. last round", "perplexity", "ε (δ=1e-5)", "wall clock min")),
          Source("utility_banking77", "{configuration}", ("accuracy", "ε (δ=1e-5)")),
          Source("utility_banking77 --study", "{arm}", ("val. accuracy", "mean σ"),
                 ("--rounds", "--steps", "--batch-size")))),
    Area("Closed-set scoring cost", "What `choice_accuracy` costs per evaluation query on `make demo-llm`'s model "
         "(SmolLM2-135M + LoRA, the 77 BANKING77 intent names as candidates): the padded batch against the packed "
         "prefix tree of `veil/task/choices.py`, side by side on the same queries.",
         (Source("choice_cost", "{path}, {threads} thread(s), OMP_WAIT_POLICY {OMP_WAIT_POLICY}",
                 ("CPU-s per query", "wall s per query", "positions", "x padded CPU-s")),)),
    Area("Shared cores", "Several torch processes on the same cores (make test, a simulation's Ray workers): "
         "torch's OpenMP threads spin-waiting (ACTIVE, libgomp's default) against sleeping (PASSIVE, what veil sets).",
         (Source("omp_wait", "{processes} process(es) at once, {OMP_WAIT_POLICY}",
                 ("slowest wall s", "mean CPU s", "speed-up vs ACTIVE")),)),
    Area("Privacy audit", "One-run lower bounds on ε (Steinke, Nasr, Jagielski, arXiv:2305.08846) against the "
         "claimed ε; a bound above the claim would be a bug.",
         (Source("audit", "{configuration}", ("claimed ε", "lower bound (95%)", "right guesses", "verdict"),
                 ("--score", "--level", "--epsilons")),)),
    Area("Faults and long runs (deployment)", "Loopback deployments as the node count grows (every node in every "
         "round) and a soak of many rounds.",
         (Source("deploy_faults", "{deployment}", ("s/round (rounds 2..)", "fewest clients in a round")),)),
)
GENERATED = {"Plots", "Hand-written notes", *(a.title for a in AREAS)}


def anchors(runs: list[Record]) -> dict[int, str]:
    """A stable HTML anchor per run (by position in ``runs``): module, date and time, a suffix for twins."""
    seen: dict[str, int] = {}
    out = {}
    for i, r in enumerate(reversed(runs)):
        base = f"{records.module_of(r)}-{re.sub(r'[^0-9]', '', records.sort_key(r))}"
        seen[base] = seen.get(base, 0) + 1
        out[len(runs) - 1 - i] = base if seen[base] == 1 else f"{base}-{seen[base]}"
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _flag(command: str, flag: str) -> str:
    found = re.search(rf"(?:^| ){re.escape(flag)}(?:=| )('[^']*'|\S+)", command)
    return found.group(1).strip("'") if found else ""


def reproduce(command: str) -> str:
    """The command without the flags that only say where a run was written."""
    command = re.sub(r" --output (?:'[^']*'|\S+)", "", command)
    return command.replace(" --no-record", "")


def machine(r: Record) -> str:
    m = r.get("machine", {})
    cpu = str(m.get("cpu", "see the history"))
    cores = re.search(r"(\d+) logical cores", cpu)
    name = cpu.split(",")[0].replace("Intel(R) Xeon(R) Processor", "Intel Xeon")
    device = m.get("device", "cpu")
    load = str(m.get("load average at start", "")).split(" / ")[0]
    return (f"{name}{f', {cores.group(1)} cores' if cores else ''}{', no GPU' if device == 'cpu' else f', {device}'}"
            + (f"; load {load}" if load else ""))


def _value(row: dict[str, str], column: str) -> str:
    return next((row[c] for c in column.split("|") if row.get(c)), "")


def area_rows(area: Area, runs: list[Record], ids: dict[int, str]) -> list[list[str]]:
    """The newest run of each configuration of ``area``, as table rows."""
    out, seen = [], set()
    for source in area.sources:
        for i, r in enumerate(runs):
            if r["script"] != source.script or not r.get("command") or not r.get("headers"):
                continue
            wanted = [*re.findall(r"\{([^{}]+)\}", source.config), *source.figures]
            if not all(any(c in r["headers"] for c in f.split("|")) for f in wanted):
                continue
            flags = " ".join(f"{f} {_flag(r['command'], f)}" for f in source.args if _flag(r["command"], f))
            for cells in r["rows"]:
                row = dict(zip(r["headers"], cells))
                if source.skip[0] and re.search(source.skip[1], row.get(source.skip[0], "")):
                    continue
                config = re.sub(r"\{([^{}]+)\}", lambda m: row.get(m.group(1), "?"), source.config)
                config += f" (`{flags}`)" if flags else ""
                key = (source.script, r.get("machine", {}).get("device", "cpu"), config)
                if key in seen:
                    continue
                seen.add(key)
                result = "; ".join(f"{f.split('|')[0]} {_value(row, f)}" for f in source.figures if _value(row, f))
                date = f"[{records.sort_key(r)}](benchmarks-history.md#{ids[i]})"
                out.append([source.script, _cell(config), _cell(result), _cell(machine(r)), date,
                            f"`{_cell(reproduce(r['command']))}`"])
    return out


def _slug(title: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w -]", "", title.lower()).replace(" ", "-")


def notes() -> str:
    return "\n\n".join(p.read_text(encoding="utf-8").strip("\n") for p in sorted(NOTES.glob("*.md")))


def _para(text: str) -> str:
    return textwrap.fill(text, width=118, break_long_words=False, break_on_hyphens=False)


def page(runs: list[Record], plots: list[tuple[str, str]]) -> str:
    ids = anchors(runs)
    lines = ["# veil benchmarks", "", _para(
             "Generated by `python -m benchmarks.page` (`make bench-page`) from the raw records in "
             "`benchmarks/results/*.jsonl`; do not edit it by hand. Every benchmark script appends one record per run "
             "there (`benchmarks/common.py: report()`). Each table row below is the newest run of its configuration, "
             "with the machine it ran on (these machines are shared, so the 1-minute load average at the start is "
             "given), its date (a link to the whole run in [the history](benchmarks-history.md), every run newest "
             "first) and the command that reproduces it. Compare figures within one run, or between runs on the same "
             "machine at a similar load."), ""]
    lines += [f"- [{a.title}](#{_slug(a.title)})" for a in AREAS]
    lines += ["- [Plots](#plots)", "- [Hand-written notes](#hand-written-notes): targets and verdicts per issue", ""]
    for area in AREAS:
        rows = area_rows(area, runs, ids)
        lines += [f"## {area.title}", "", _para(area.about), ""]
        lines += [records.markdown_table(["benchmark", "configuration", "result", "machine", "date", "command"], rows)
                  if rows else "No run recorded yet.", ""]
    lines += ["## Plots", ""]
    lines += [f"![{name.removesuffix('.png')}](img/{name})\n\n{caption}\n" for name, caption in plots]
    lines += ["## Hand-written notes", "", _para(
              "Written by hand from the runs (`benchmarks/notes/*.md`, included verbatim). Where they name a run "
              "(\"dp_overhead 02:14\", \"the 10:36 section\"), it is in [the history](benchmarks-history.md) under "
              "that script and time."), "", notes()]
    return "\n".join(lines).rstrip("\n") + "\n"


def history(runs: list[Record]) -> str:
    ids = anchors(runs)
    lines = ["# veil benchmarks: every run", "", _para(
             "Generated by `python -m benchmarks.page` from `benchmarks/results/*.jsonl`, newest first; the summary "
             "is [docs/benchmarks.md](benchmarks.md). Notes written by hand under a run are kept with it; those "
             "written before issue 25 were written when this log ran oldest first, so their \"above\" means earlier."),
             ""]
    for i, r in enumerate(runs):
        lines += [f'<a id="{ids[i]}"></a>', "", records.render(r), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def import_markdown(path: Path, results: Path = records.RESULTS, notes_dir: Path = NOTES) -> tuple[int, int]:
    """File the sections of an old-style log: runs not yet recorded become records, other sections not yet among
    the notes become notes files. Returns (records added, notes added)."""
    known = {records.identity(r) for r in records.load(results)} if results.exists() else set()
    notes_dir.mkdir(parents=True, exist_ok=True)
    filed = "\n".join(p.read_text(encoding="utf-8") for p in sorted(notes_dir.glob("*.md")))
    added = [0, 0]
    for section in records.split_sections(path.read_text(encoding="utf-8")):
        heading = section.split("\n", 1)[0]
        if heading[3:] in GENERATED:
            continue
        record = records.parse_section(section)
        if record is None and heading not in filed.split("\n"):
            slug = re.sub(r"[^a-z0-9]+", "-", heading[3:].lower()).strip("-")[:60].rstrip("-")
            (notes_dir / f"{len(list(notes_dir.glob('*.md'))) + 1:02d}-{slug}.md").write_text(section + "\n",
                                                                                              encoding="utf-8")
            filed += "\n" + section
            added[1] += 1
        elif record is not None and records.identity(record) not in known:
            records.append(record, results)
            known.add(records.identity(record))
            added[0] += 1
    return added[0], added[1]


def generate(*, write_plots: bool = True) -> dict[Path, str]:
    """The generated Markdown files and their text (plots are drawn into docs/img/ when ``write_plots``)."""
    from benchmarks import plots

    runs = records.load()
    drawn = plots.draw_all(runs, IMG if write_plots else None)
    return {PAGE: page(runs, drawn), HISTORY: history(runs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a generated page is stale")
    ap.add_argument("--import-markdown", type=Path, metavar="OLD.md", help="file an old-style log's sections first")
    ap.add_argument("--add", type=Path, nargs="+", default=[], metavar="FILE.jsonl",
                    help="file the records of scratch runs (--output) first")
    args = ap.parse_args(argv)
    if args.import_markdown:
        print("imported %d runs, %d notes from %s" % (*import_markdown(args.import_markdown), args.import_markdown))
    known = {records.identity(r) for r in records.load()}
    for path in args.add:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip() and records.identity(json.loads(line)) not in known:
                print(f"filed {records.append(json.loads(line))}")
    stale = []
    for path, text in generate(write_plots=not args.check).items():
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    if args.check and stale:
        print("stale: " + ", ".join(str(p.relative_to(ROOT)) for p in stale) + "; run python -m benchmarks.page",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
