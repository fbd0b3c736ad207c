"""The plots of the benchmarks page (issue 25), drawn from the raw records: accuracy against ε (head_study), round
time against the population (sim_scale, deploy_faults) and the DP throughput and memory ratios per mode
(dp_overhead). Each plot uses the newest run that has its figures; the caption names the runs. PNGs are written
without a timestamp, so that an unchanged record set draws unchanged files."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from benchmarks.records import Record, sort_key

Plot = tuple[str, str]  # (file name under docs/img/, caption)


def _rows(r: Record) -> list[dict[str, str]]:
    return [dict(zip(r["headers"], cells)) for cells in r.get("rows", [])]


def _number(text: str) -> float | None:
    found = re.match(r"^[\d,]+(?:\.\d+)?", text.strip())
    return float(found.group(0).replace(",", "")) if found else None


def _newest(runs: list[Record], script: str, need: str) -> list[Record]:
    return [r for r in runs if r["script"] == script and need in r.get("headers", []) and not r.get("by_hand")]


def _save(fig: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})  # type: ignore[attr-defined]


def accuracy_vs_epsilon(runs: list[Record], out: Path | None) -> Plot | None:
    """Test accuracy of the federated head at each ε, one line per (model, banks) setting; no DP dashed."""
    series: dict[str, tuple[Record, list[tuple[float, float]], float | None]] = {}
    for r in _newest(runs, "head_study", "test acc %"):
        banks, source = re.search(r"(\d+) banks", r["settings"]), re.search(r"(\w+) frozen", r["settings"])
        label = f"{source.group(1) if source else '?'}, {banks.group(1) if banks else '?'} banks"
        if label in series:
            continue
        points, plain = [], None
        for row in _rows(r):
            eps = re.match(r"federated ε=([\d.]+)", row["arm"])
            if eps and _number(row["test acc %"]) is not None:
                points.append((float(eps.group(1)), _number(row["test acc %"]) or 0.0))
            elif row["arm"].startswith("federated no DP"):
                plain = _number(row["test acc %"])
        if points:
            series[label] = (r, sorted(points), plain)
    if not series:
        return None
    if out is not None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for n, (label, (_, points, plain)) in enumerate(sorted(series.items())):
            color = f"C{n}"
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=color, label=f"{label}, DP")
            if plain is not None:
                ax.axhline(plain, color=color, linestyle="--", linewidth=1, label=f"{label}, no DP")
        ax.set(xlabel="ε (δ = 1e-5, per bank)", ylabel="BANKING77 test accuracy (%)",
               title="Federated head (head_study): accuracy against ε")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        _save(fig, out / "accuracy-vs-epsilon.png")
        plt.close(fig)
    runs_named = ", ".join(f"{label}: {sort_key(r)}" for label, (r, _, _) in sorted(series.items()))
    return "accuracy-vs-epsilon.png", f"Accuracy against ε, head_study ({runs_named})."


def round_time_vs_population(runs: list[Record], out: Path | None) -> Plot | None:
    """Seconds per round after the first: simulated clients (sim_scale) and deployed nodes (deploy_faults)."""
    sim: dict[str, list[tuple[float, float]]] = {}  # run date -> (clients, s/round); runs with >= 2 populations
    for r in _newest(runs, "sim_scale", "s/round after the first"):
        points = [(_number(row["clients"]), _number(row["s/round after the first"])) for row in _rows(r)
                  if not row["code"].startswith("before")]
        found = sorted((c, t) for c, t in points if c and t is not None)
        if len(found) >= 2 and len(sim) < 3:
            sim[sort_key(r)] = found
    dep: dict[float, tuple[float, str]] = {}
    for r in _newest(runs, "deploy_faults", "s/round (rounds 2..)"):
        for row in _rows(r):
            nodes = re.match(r"scale: (\d+) nodes", row["deployment"])
            sec = _number(row["s/round (rounds 2..)"])
            if nodes and sec is not None and float(nodes.group(1)) not in dep:
                dep[float(nodes.group(1))] = (sec, sort_key(r))
    if not sim and not dep:
        return None
    if out is not None:
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(8.0, 3.6))
        for date, found in sorted(sim.items()):
            left.plot([c for c, _ in found], [t for _, t in found], "o-", label=date)
        left.set_xscale("log")
        left.legend(fontsize=7, title="run", title_fontsize=7)
        left.set(xlabel="clients in the population (10 per round)", title="simulation (sim_scale)")
        xs = sorted(dep)
        right.plot(xs, [dep[x][0] for x in xs], "s-")
        right.set(xlabel="nodes (every node in every round)", title="loopback deployment (deploy_faults)")
        for ax in (left, right):
            ax.set(ylabel="s per round after the first")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        _save(fig, out / "round-time-vs-population.png")
        plt.close(fig)
    dates = sorted({*sim, *(d for _, d in dep.values())})
    return "round-time-vs-population.png", ("Round time against the population: each sim_scale run with two or more "
                                            f"populations is one line (runs of {', '.join(dates)}).")


def dp_throughput(runs: list[Record], out: Path | None) -> Plot | None:
    """Throughput and peak memory of each DP mode relative to the same step without DP (newest dp_overhead)."""
    found = _newest(runs, "dp_overhead", "x non-private mem")
    if not found:
        return None
    r = found[0]
    rows = [row for row in _rows(r) if not row["configuration"].endswith("non-private")]
    if out is not None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7.0, 3.8))
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [_number(row["x non-private"]) or 0.0 for row in rows], 0.4,
               label="throughput × non-private")
        ax.bar([x + 0.2 for x in xs], [_number(row["x non-private mem"]) or 0.0 for row in rows], 0.4,
               label="peak memory × non-private")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(list(xs), [row["configuration"] for row in rows], rotation=20)
        ax.set_yscale("log")
        ax.set_yticks([0.25, 0.5, 1, 2, 4, 8], ["0.25", "0.5", "1", "2", "4", "8"])
        ax.minorticks_off()
        ax.set(ylabel="ratio to non-private (log)", title=f"DP-SGD modes (dp_overhead, {sort_key(r)})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        _save(fig, out / "dp-throughput-ratio.png")
        plt.close(fig)
    device = r["machine"].get("device", "cpu")
    return "dp-throughput-ratio.png", (f"DP throughput and memory ratio per mode, dp_overhead {sort_key(r)} on "
                                       f"{device} (`{r['command']}`).")


PLOTS: tuple[Callable[[list[Record], Path | None], Plot | None], ...] = (
    dp_throughput, round_time_vs_population, accuracy_vs_epsilon)


def draw_all(runs: list[Record], out: Path | None) -> list[Plot]:
    """Every plot that has data: (file name, caption); drawn into ``out`` unless it is None."""
    if out is not None:
        import matplotlib

        matplotlib.use("Agg")
    return [p for p in (plot(runs, out) for plot in PLOTS) if p is not None]
