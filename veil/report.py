"""``veil report RUN_DIR [RUN_DIR ...] [--out DIR]``: tables and plots of one run, several runs, or a Hydra sweep.

A RUN_DIR is a run's output directory (it holds ``metrics.jsonl``) or any directory above runs, e.g. a multirun
sweep (``multirun/DATE/TIME``): every directory below it holding a ``metrics.jsonl`` is a run. Each run's
``config.resolved.yaml`` tells which settings differ between the runs (the swept factors).

Written to ``--out`` (default: ``<first RUN_DIR>/report``): ``summary.csv`` (one row per run: its factors and its
last metrics line), ``report.md``, and PNG plots: accuracy, loss and ε per round (one line per run; perplexity too for
``task=causal_lm`` runs, whose per-round table and sample generations go into ``report.md``) and the
privacy–utility curve (final accuracy against final ε; one line per value of the other swept factors; non-private
runs as dashed reference lines, the majority-class baseline dotted).

Over 300 lines: one command's output (tables, plots, the control arm's lines, the generation section); a split would
move the plots to their own module.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from veil.errors import VeilError

log = logging.getLogger("veil")

# Keys that differ between any two runs without being a factor of the study.
# The last: each audit's own file, in run directories that `veil audit` wrote before its settings left the run config.
_NOT_FACTORS = {"output_dir", "resume", "data.labels", "federation.planted_examples"}
# The privacy axis of the privacy–utility curve: not a line of its own.
_PRIVACY_AXIS = {"privacy.enabled", "privacy.name", "privacy.target_epsilon", "privacy.noise_multiplier"}
_PLOTS = {  # file -> (metrics key, y label, title)
    "accuracy_per_round.png": ("accuracy", "test accuracy (fraction correct)", "Test accuracy per round"),
    "loss_per_round.png": ("loss", "test loss (cross-entropy, nats)", "Test loss per round"),
    "epsilon_per_round.png": ("epsilon_max", "ε (the run's stated bound, see its model card)", "Privacy spent per round"),
}
# Plotted only when some run's rows hold the key (task=causal_lm).
_TASK_PLOTS = {"perplexity_per_round.png": ("perplexity", "held-out perplexity (exp of the token loss)",
                                            "Held-out perplexity per round"),
               "choice_accuracy_per_round.png": ("choice_accuracy", "closed-set accuracy (log-likelihood choice)",
                                                 "Closed-set choice accuracy per round")}
SAMPLES_KEY = "samples"  # causal_lm rows: the global model's greedy generations for the first held-out prompts
PRIVACY_UTILITY_PNG = "privacy_utility.png"


class ReportError(VeilError):
    """No run to report on, or a run directory that cannot be read."""


@dataclass
class Run:
    path: Path
    rows: list[dict[str, Any]]
    config: dict[str, Any]  # flattened: "privacy.target_epsilon" -> 4.0
    summary: dict[str, Any] = field(default_factory=dict)
    audit: dict[str, Any] = field(default_factory=dict)  # audit.json of `veil audit`, when the run was audited

    @property
    def last(self) -> dict[str, Any]:
        return self.rows[-1]

    @property
    def private(self) -> bool:
        return bool(self.config.get("privacy.enabled", True))

    @property
    def complete(self) -> bool:
        return bool(self.summary)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="a run's output directory, or a directory above runs (e.g. a multirun sweep)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: RUN_DIR/report)")


def run(args: argparse.Namespace) -> int:
    runs = [load_run(path) for path in find_runs(args.run_dirs)]
    out = (args.out or args.run_dirs[0] / "report").expanduser()
    written = write_report(runs, out)
    print(f"report of {len(runs)} run(s) in {out}: {', '.join(p.name for p in written)}")
    return 0


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories named by ``paths``: each itself if it holds metrics.jsonl, else every run below it."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise ReportError(f"{path} is not a directory; give a run's output directory or a sweep directory")
        below = [path] if (path / "metrics.jsonl").is_file() else sorted(
            (m.parent for m in path.rglob("metrics.jsonl")), key=_natural)
        if not below:
            raise ReportError(f"{path} holds no run (no metrics.jsonl in it or below it); give a run's output directory")
        found += [p for p in below if p not in found]
    return found


def _natural(path: Path) -> list[tuple[int, str]]:
    return [(int(part), "") if part.isdigit() else (1 << 62, part) for part in path.parts]  # member 2 before 10


def load_run(path: Path) -> Run:
    from omegaconf import OmegaConf

    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise ReportError(f"{path}/metrics.jsonl has no round yet; wait for the first round or drop this run")
    config_path = path / "config.resolved.yaml"
    if not config_path.is_file():
        raise ReportError(f"{path} has no config.resolved.yaml; give a directory written by `veil simulate`")
    config = _flatten(OmegaConf.to_container(OmegaConf.load(config_path), resolve=True))
    summary_path = path / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    audit_path = path / "audit.json"
    audit = json.loads(audit_path.read_text(encoding="utf-8")) if audit_path.is_file() else {}
    return Run(path=path, rows=rows, config=config, summary=summary, audit=audit)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in (tree or {}).items():
        name = f"{prefix}{key}"
        flat.update(_flatten(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return flat


def swept_factors(runs: list[Run]) -> list[str]:
    """Config keys whose value differs between the runs, in config order (privacy axis first).

    ``privacy.*`` settings count among the private runs only (a non-private run's noise settings mean nothing),
    plus ``privacy.enabled`` when private and non-private runs are mixed. A key that some runs lack comes from
    another veil version, not from the study, and is left out.
    """
    keys = [k for k in dict.fromkeys(k for r in runs for k in r.config)
            if k not in _NOT_FACTORS and all(k in r.config for r in runs)]
    private = [r for r in runs if r.private]
    differ = [k for k in keys if _differs(k, private if k.startswith("privacy.") else runs)]
    if 0 < len(private) < len(runs):
        differ.insert(0, "privacy.enabled")
    return sorted(differ, key=lambda k: k not in _PRIVACY_AXIS)


def _differs(key: str, runs: list[Run]) -> bool:
    return len({repr(r.config.get(key)) for r in runs}) > 1


def run_label(run: Run, factors: list[str], *, skip: tuple[str, ...] = ("privacy.enabled", "privacy.name")) -> str:
    """``target_epsilon=1.0, num_clients=10``; ``non-private, num_clients=10``."""
    shown = [k for k in factors if k not in skip and (run.private or not k.startswith("privacy."))]
    parts = ([] if run.private else ["non-private"]) + [f"{_short(k, factors)}={run.config.get(k)}" for k in shown]
    return ", ".join(parts) or run.path.name


def _short(key: str, keys: list[str]) -> str:
    tail = key.rsplit(".", 1)[-1]
    return tail if sum(k.rsplit(".", 1)[-1] == tail for k in keys) == 1 else key


def write_report(runs: list[Run], out: Path) -> list[Path]:
    """Write summary.csv, the plots and report.md into ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    factors = swept_factors(runs)
    written = [write_csv(runs, factors, out / "summary.csv")]
    plots = {**_PLOTS, **{name: spec for name, spec in _TASK_PLOTS.items()
                          if any(spec[0] in row for r in runs for row in r.rows)}}
    for name, (key, ylabel, title) in plots.items():
        shown = [r for r in runs if r.private] if key == "epsilon_max" else runs
        written.append(plot_per_round(shown or runs, factors, key=key, ylabel=ylabel, title=title, path=out / name))
    written.append(plot_privacy_utility(runs, factors, out / PRIVACY_UTILITY_PNG))
    written.append(write_markdown(runs, factors, out / "report.md", plots=[p.name for p in written[1:]]))
    return written


def write_csv(runs: list[Run], factors: list[str], path: Path) -> Path:
    """One row per run: directory, status, factors, then every field of its last metrics line."""
    metric_keys = list(dict.fromkeys(k for r in runs for k in r.last))
    header = ["run", "status", *factors, *metric_keys, "majority_baseline"]
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for r in runs:
            status = "complete" if r.complete else "incomplete"
            values = [r.config.get(k) for k in factors] + [r.last.get(k) for k in metric_keys]
            values = [json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v for v in values]
            writer.writerow([str(r.path), status, *("" if v is None else v for v in values),
                             r.summary.get("majority_baseline", "")])
    return path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_per_round(runs: list[Run], factors: list[str], *, key: str, ylabel: str, title: str, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        before = r.summary.get("before_training") or {}  # task.evaluate_before: the starting model as round 0
        points = [(0, before[key])] if _finite(before.get(key)) else []
        points += [(row["round"], row[key]) for row in r.rows if row.get(key) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=run_label(r, factors),
                linestyle="-" if r.private else "--")
    ax.set(title=title, xlabel="round (0: before training)" if any(r.summary.get("before_training") for r in runs)
           else "round", ylabel=ylabel, yscale="log" if key == "perplexity" else "linear")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    return _save(fig, path)


def plot_privacy_utility(runs: list[Run], factors: list[str], path: Path) -> Path:
    """Final accuracy against final ε, one line per combination of the other factors; references as lines."""
    plt = _pyplot()
    others = [k for k in factors if k not in _PRIVACY_AXIS]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[tuple[str, ...], list[Run]] = {}
    for r in (r for r in runs if r.private):
        groups.setdefault(tuple(repr(r.config.get(k)) for k in others), []).append(r)
    colors: dict[tuple[str, ...], str] = {}  # non-privacy factor values -> colour of the line
    for group in groups.values():
        group[:] = [r for r in group if _finite(r.last.get("epsilon_max"))]  # no stated ε: not on the curve
        if not group:
            continue
        group.sort(key=lambda r: r.last["epsilon_max"])
        label = ", ".join(f"{_short(k, others)}={group[0].config.get(k)}" for k in others) or "DP-SGD"
        (line,) = ax.plot([r.last["epsilon_max"] for r in group], [r.last["accuracy"] for r in group], marker="o",
                          label=label)
        colors.setdefault(_plain_factors(group[0], others), line.get_color())
    for r in (r for r in runs if not r.private):
        ax.axhline(r.last["accuracy"], linestyle="--", color=colors.get(_plain_factors(r, others), "black"),
                   label=f"{run_label(r, others)} ({r.last['accuracy']:.3f})")
    baselines = {r.summary["majority_baseline"] for r in runs if "majority_baseline" in r.summary}
    if len(baselines) == 1:
        ax.axhline(baselines.pop(), linestyle=":", color="grey", label="majority-class baseline")
    deltas = sorted({r.config.get("privacy.delta") for r in runs if r.private})
    delta = f" (δ={deltas[0]:g})" if len(deltas) == 1 and deltas[0] is not None else ""
    ax.set(title=f"Privacy–utility: final test accuracy vs ε{delta}", xlabel=f"ε after the last round{delta}",
           ylabel="test accuracy (fraction correct)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    return _save(fig, path)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _plain_factors(run: Run, others: list[str]) -> tuple[str, ...]:
    return tuple(repr(run.config.get(k)) for k in others if not k.startswith("privacy."))


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _audit_lines(runs: list[Run], factors: list[str]) -> list[str]:
    """The claimed ε beside the empirical lower bounds of `veil audit` with DP and, when its control arm ran, without
    DP (the attack's power), for the runs that were audited; then each run's sentence and no-power warning."""
    from types import SimpleNamespace

    from veil.audit.control import power_warning, side_by_side

    audited = [r for r in runs if r.audit]
    if not audited:
        return []
    lines = ["", "Privacy audit (one run, arXiv:2305.08846): a lower bound above the claimed ε is a bug; below it "
             "proves nothing, and without DP it shows what the attack can find at all.", "",
             "| run | claimed ε | lower bound on ε | without DP (control) | confidence | guesses (right) | score "
             "| verdict |", "|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in audited:
        a, control = r.audit, r.audit.get("control")
        claimed = "∞ (no DP)" if a.get("claimed_epsilon") is None else f"{a['claimed_epsilon']:.3f}"
        power = "–" if not control else f"{control['lower_bound']:.3f} ({control['correct']} of {control['guesses']})"
        lines.append(f"| {run_label(r, factors)} | {claimed} | {a['lower_bound']:.3f} | {power} | {a['confidence']:.0%} "
                     f"| {a['guesses']} ({a['correct']}) | {str(a.get('score', '')).split(':')[0]} | {a['verdict']} |")
        if control:
            dp = SimpleNamespace(lower_bound=a["lower_bound"], claimed_epsilon=a.get("claimed_epsilon") or math.inf)
            off = SimpleNamespace(lower_bound=control["lower_bound"])
            notes.append(f"- {run_label(r, factors)}: " + side_by_side(dp, off).replace(">=", "≥").replace("epsilon", "ε")
                         + "." + (f" **{power_warning(off)}**" if power_warning(off) else ""))
    return lines + ([""] + notes if notes else [])


def write_markdown(runs: list[Run], factors: list[str], path: Path, *, plots: list[str]) -> Path:
    lines = ["# veil report", "", f"{len(runs)} run(s); factors that differ: "
             + (", ".join(f"`{k}`" for k in factors) or "none"), "",
             "| run | directory | rounds | final accuracy | ε max | non-private | status |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        eps = "–" if not r.private else f"{r.last['epsilon_max']:.3f}" if _finite(r.last.get("epsilon_max")) else "n/a"
        lines.append(f"| {run_label(r, factors)} | `{r.path}` | {r.last['round']} | {r.last['accuracy']:.4f} | {eps} "
                     f"| {'' if r.private else 'yes'} | {'complete' if r.complete else 'incomplete'} |")
    baselines = sorted({r.summary["majority_baseline"] for r in runs if "majority_baseline" in r.summary})
    if baselines:
        lines += ["", "Majority-class baseline: " + ", ".join(f"{b:.4f}" for b in baselines) + "."]
    lines += _audit_lines(runs, factors)
    for r in runs:
        lines += _generation_lines(r, factors)
    lines += ["", "Per-run tables: `summary.csv` (factors and each run's last metrics line)."]
    for name in plots:
        lines += ["", f"![{name[:-4].replace('_', ' ')}]({name})"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _cell(text: Any, limit: int = 120) -> str:
    """``text`` as one Markdown table cell: one line, pipes escaped, at most ``limit`` characters."""
    flat = " ".join(str(text).split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


def _generation_lines(run: Run, factors: list[str]) -> list[str]:
    """Per round: held-out loss, perplexity, exact match and ε, then the sample generations (causal_lm runs)."""
    rows = [row for row in run.rows if "perplexity" in row]
    if not rows:
        return []
    before = run.summary.get("before_training") or {}
    if "perplexity" in before:  # task.evaluate_before: the starting model, as round 0
        rows = [{**before, "round": "0 (before training)", "epsilon_max": 0.0}, *rows]
    lines = ["", f"## Generations: {run_label(run, factors)}", "",
             "| round | held-out loss | perplexity | exact match | choice accuracy | ε max |", "|---|---|---|---|---|---|"]
    for row in rows:
        eps = f"{row['epsilon_max']:.3f}" if run.private and _finite(row.get("epsilon_max")) else "–"
        match = f"{row['accuracy']:.4f}" if _finite(row.get("accuracy")) else "n/a"
        choice = f"{row['choice_accuracy']:.4f}" if _finite(row.get("choice_accuracy")) else "n/a"
        lines.append(f"| {row['round']} | {row['loss']:.4f} | {row['perplexity']:.2f} | {match} | {choice} | {eps} |")
    samples = [(row["round"], s) for row in rows for s in row.get(SAMPLES_KEY) or []]
    if samples:
        lines += ["", "Sample generations of the global model (greedy, the coordinator's own held-out prompts):", "",
                  "| round | prompt | generated | expected |", "|---|---|---|---|"]
        lines += [f"| {rnd} | {_cell(s.get('prompt', ''))} | {_cell(s.get('generated', ''))} "
                  f"| {_cell(s.get('expected', ''))} |" for rnd, s in samples]
    return lines
