"""Shared helpers for veil's benchmarks: device-aware timing and peak memory, a description of the machine,
plain-text tables, and ``report()``, through which every benchmark records its run: one raw record per run appended
to ``benchmarks/results/<module>.jsonl`` (issue 25), from which ``python -m benchmarks.page`` generates
docs/benchmarks.md.

Peak memory on CPU is read from the kernel, not from ``tracemalloc`` (which only sees Python's allocator, not
torch's): writing ``5`` to ``/proc/self/clear_refs`` resets the process' resident-set high-water mark ``VmHWM``, so
the peak of a block of work is ``VmHWM`` after it minus ``VmRSS`` before it. Where that file cannot be written, a
thread samples ``psutil``'s RSS every 2 ms instead (it can miss short spikes). On CUDA it is
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

import torch

from benchmarks import records
from benchmarks.records import Record

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def configure_allocator() -> bool:
    """Make glibc give freed large blocks back to the OS at once (fixed 1 MiB mmap threshold), so the RSS deltas
    of configurations measured one after another in the same process do not depend on their order.
    Best effort: returns False where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 20))
    except (OSError, AttributeError):
        return False


def pick_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    """Wait for queued kernels so wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: ``peak_bytes`` is the peak memory of the block above what was resident when it began
    (CPU: resident set; CUDA: allocated by torch, absolute, since the CUDA baseline is the model itself)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self._base = 0
        self._use_proc = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._use_proc = _reset_hwm()
        if self._use_proc:
            self._base = _proc_kb("VmRSS") * 1024
        else:
            import psutil

            proc = psutil.Process()
            self._base = self._sampled = proc.memory_info().rss

            def _sample() -> None:
                while not self._stop.wait(0.002):
                    self._sampled = max(self._sampled, proc.memory_info().rss)

            self._thread = threading.Thread(target=_sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        elif self._use_proc:
            self.peak_bytes = _proc_kb("VmHWM") * 1024 - self._base
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_bytes = self._sampled - self._base


def now() -> float:
    return time.perf_counter()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"
    except OSError:
        return "n/a"


def versions(packages: tuple[str, ...] = ("torch", "opacus", "transformers", "peft")) -> str:
    found = []
    for name in packages:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return f"Python {platform.python_version()}, " + ", ".join(found)


def machine_info(device: torch.device) -> dict[str, str]:
    """What a reader needs to compare figures: CPU, cores, torch threads, accelerator, load, library versions."""
    info = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu_model()}, {os.cpu_count()} logical cores visible, torch threads {torch.get_num_threads()}",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "load average at start": load_average(),
        "versions": versions(),
    }
    return info


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]  # rows may be empty
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


DOC_HEADER = """# veil benchmarks (scratch)

Sections appended by `--output`; the records beside them (`.jsonl`) go into benchmarks/results/ with
`python -m benchmarks.page --add FILE.jsonl`, and docs/benchmarks.md is generated from those (`make bench-page`).
"""


def append_section(path: Path, body: str) -> None:
    """Append ``body`` (a Markdown section starting with ``## ``) to ``path``, creating it with its header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text(encoding="utf-8") if path.exists() else DOC_HEADER
    path.write_text(text.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n", encoding="utf-8")


def add_output_args(ap: argparse.ArgumentParser, *, quick: str, root: Path) -> None:
    """The flags every benchmark shares: ``--quick`` (its help says what it shrinks), ``--no-record``, ``--output``
    and ``--results``. ``root`` is the repository (records go to ``root/benchmarks/results``)."""
    ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--no-record", action="store_true", help="print only; record nothing")
    ap.add_argument("--output", type=Path, default=None,
                    help="scratch run: append the Markdown section to this file and the record to the same name with "
                    ".jsonl, instead of the repository's benchmarks/results/")
    ap.add_argument("--results", type=Path, default=root / "benchmarks" / "results",
                    help="where the run's record is appended, as <module>.jsonl (default: %(default)s)")


def make_record(script: str, argv: list[str] | None, info: dict[str, str], *, settings: str, headers: list[str],
                rows: list[list[str]], notes: list[str], elapsed: float, extra_versions: tuple[str, ...] = (),
                details: tuple[str, ...] = (), notes_heading: str = "") -> Record:
    """The raw record of one run (``benchmarks.records`` describes the keys)."""
    args = argv if argv is not None else sys.argv[1:]
    machine = {k: v for k, v in info.items() if k != "date"}
    machine["versions"] = versions((*("torch", "opacus", "transformers", "peft"), *extra_versions))
    machine["load average at end"] = load_average()
    record: Record = {"script": script, "date": info["date"],
                      "command": f"python -m benchmarks.{script.split()[0]} {shlex.join(args)}".rstrip(),
                      "settings": settings, "machine": machine, "elapsed": round(elapsed), "details": list(details),
                      "headers": headers, "rows": rows}
    if notes_heading:
        record["notes_heading"] = notes_heading
    record["notes"] = notes
    return record


def report(script: str, args: argparse.Namespace, argv: list[str] | None, info: dict[str, str], *, settings: str,
           headers: list[str], rows: list[list[str]], notes: list[str], elapsed: float,
           extra_versions: tuple[str, ...] = (), details: tuple[str, ...] = (), notes_heading: str = "") -> None:
    """Print settings, table and notes; unless ``args.no_record``, append the run's raw record (machine, load
    average at start and end, library versions, command) to ``benchmarks/results/<module>.jsonl`` (``--results``),
    or with ``--output FILE`` to ``FILE``'s ``.jsonl`` twin plus a Markdown section to ``FILE``. The page,
    docs/benchmarks.md, is generated from the results by ``python -m benchmarks.page`` (``make bench-page``)."""
    print(settings)
    print(text_table(headers, rows))
    if notes_heading:
        print(notes_heading)
    print("\n".join(notes))
    print(f"elapsed {elapsed:.0f} s; load average at start {info['load average at start']}, at end {load_average()}")
    if args.no_record:
        return
    record = make_record(script, argv, info, settings=settings, headers=headers, rows=rows, notes=notes,
                         elapsed=elapsed, extra_versions=extra_versions, details=details, notes_heading=notes_heading)
    output: Path | None = getattr(args, "output", None)
    if output is not None:
        append_section(output, records.render(record))
        path = output.with_suffix(".jsonl")
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(f"appended to {output} and {path}")
        return
    path = records.append(record, getattr(args, "results", records.RESULTS))
    print(f"recorded in {path}; regenerate docs/benchmarks.md with: python -m benchmarks.page")
