"""``veil simulate``: a federation of simulated data owners on one machine, on Flower's simulation engine.

The configuration is composed by Hydra (``veil/conf``), so a sweep is a command line
(``veil simulate -m privacy.noise_multiplier=0.6,1.0``). The run uses the very same ServerApp and ClientApp as a
deployment: this module only composes and validates the config, resolves paths and the label set once, writes the
resolved config next to the outputs, and hands both apps to ``flwr.simulation.run_simulation``.

Steps of one run: (1) compose and validate; (2) resolve data paths and labels; (3) write the resolved config;
(4) simulate; (5) report the final accuracy beside the majority-class baseline and the ε reached.

Over 300 lines: the numbered steps of ``veil simulate`` with their one-line failures; a split would move the
simulated nodes' configs to their own module.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from veil.preflight import follow_defaults, preflight, resolve_paths_and_labels
from veil.errors import ConfigError, VeilError

if TYPE_CHECKING:
    from veil.task.shards import AuditPlan

log = logging.getLogger("veil")
MAX_ALONE_REPORTED = 20  # banks whose own probe the report shows (one line each); larger populations: none

_failures: list[str] = []


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--multirun", action="store_true",
                        help="a Hydra sweep: one run per combination of comma-separated values, each in its own directory")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="Hydra overrides, e.g. federation.num_clients=10 privacy=none")


def run(args: argparse.Namespace) -> int:
    from veil.conf.runconfig import to_run_config

    overrides = follow_defaults(["-m", *args.overrides] if getattr(args, "multirun", False) else list(args.overrides))
    resume = [o.split("=", 1)[1] for o in overrides if o.startswith("resume=")]
    if resume and resume[-1]:
        run_dir = Path(resume[-1]).expanduser().resolve()
        if not (run_dir / "config.resolved.yaml").is_file():
            raise ConfigError(f"resume={resume[-1]} is not a veil run directory (no config.resolved.yaml); give a run's output directory")
        overrides = [*overrides, f"hydra.run.dir={run_dir}"]  # outputs go back into the run being resumed
    cfg = preflight(overrides)
    if cfg.resume:  # refuse an incompatible resume before Hydra touches the run directory
        from veil.server.checkpoint import check_resumable

        resolved = resolve_paths_and_labels(cfg, Path(cfg.resume).expanduser().resolve())
        check_resumable(resolved, to_run_config(resolved))
    import hydra

    from veil.conf import CONF_DIR

    _failures.clear()
    main = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)(_task)
    saved = sys.argv
    sys.argv = ["veil simulate", *overrides]
    try:
        main()
    finally:
        sys.argv = saved
    if _failures:
        for line in _failures:
            print(f"veil: error: {line}", file=sys.stderr)
        return 2
    return 0


def _task(dict_cfg: Any) -> float | None:
    """The Hydra task: one simulated run. A VeilError is recorded (so a sweep goes on) and ends in one line."""
    from hydra.core.hydra_config import HydraConfig

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    sweeping = HydraConfig.get().mode.name == "MULTIRUN"
    try:
        summary = simulate(dict_cfg, out_dir)
    except VeilError as err:
        _failures.append(f"{out_dir}: {err}" if sweeping else str(err))
        log.error("run in %s failed: %s", out_dir, err)
        _remove_if_empty(out_dir)
        return None
    except Exception as err:  # in a sweep, an unexpected failure of one member must not stop the others
        if not sweeping:
            raise
        _failures.append(f"{out_dir}: unexpected {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        log.exception("run in %s failed", out_dir)
        _remove_if_empty(out_dir)
        return None
    return float(summary.get("accuracy", float("nan")))


def _remove_if_empty(out_dir: Path) -> None:
    """A run that failed before its first round leaves nothing behind (Hydra made the directory before us)."""
    import shutil

    if not (out_dir / "metrics.jsonl").exists():
        shutil.rmtree(out_dir, ignore_errors=True)


class ClientAppFactory(Protocol):
    """Builds the simulated nodes' ClientApp from the flat run config (``defaults``), the directory under which each
    simulated node keeps its ledger, and the simulated owners' node configs: the signature of
    :func:`veil.client.app.make_client_app`, the default."""

    def __call__(self, defaults: Mapping[str, Any], *, simulation_root: Path,
                 simulated_nodes: Mapping[int, Mapping[str, Any]]) -> Any: ...


def simulate(dict_cfg: Any, out_dir: Path, *, client_app: ClientAppFactory | None = None,
             audit: AuditPlan | None = None) -> dict[str, Any]:
    """Run one simulated federation into ``out_dir``; returns the final summary.

    ``client_app``: a :class:`ClientAppFactory` for the simulated nodes (Python callers only, never from a config);
    default veil's own ClientApp. ``veil audit`` passes one that builds its canary nodes around the same client
    (:mod:`veil.audit.nodes`), so the canaries' draw reaches the nodes only through Python, and the tests' broken
    mechanisms enter the same way. ``audit``: what ``veil audit`` adds to the run (:class:`veil.task.shards.AuditPlan`:
    planted canary records, canary clients), never part of the run config; the simulated owners learn it from their
    node configs, the partition table and the probe from here. Canary clients need a ``client_app`` that builds them.
    """
    from omegaconf import OmegaConf

    from veil.conf.runconfig import to_run_config, to_veil_config
    from veil.task.shards import AuditPlan

    # (1) compose and validate
    cfg = to_veil_config(dict_cfg)
    audit = audit or AuditPlan()
    if audit.canary_clients and (client_app is None or audit.canary_clients >= cfg.federation.num_clients):
        raise ValueError(f"canary_clients={audit.canary_clients} needs the audit's ClientApp factory and fewer than "
                         f"federation.num_clients={cfg.federation.num_clients} nodes (veil.audit.clients)")
    # (2) absolute paths (Ray workers may start elsewhere) and one label set for every process
    cfg = resolve_paths_and_labels(cfg, out_dir)
    if audit.planted_examples:
        audit = dataclasses.replace(audit, planted_examples=str(Path(audit.planted_examples).resolve()))
    # (3) the resolved config next to the outputs
    if not cfg.resume and (out_dir / "metrics.jsonl").exists():
        raise ConfigError(f"{out_dir} already holds a run; pick a new hydra.run.dir or continue it with resume={out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.data.test_path:  # one file: the exact held-out row ids, next to the outputs (a resume reuses them)
        from veil.task.split import write_split

        write_split(cfg, seed=cfg.federation.seed)
    OmegaConf.save(OmegaConf.structured(cfg), out_dir / "config.resolved.yaml")
    flat = to_run_config(cfg)
    simulated_node_configs(cfg, audit)
    if cfg.resume:
        from veil.server.checkpoint import check_resumable

        check_resumable(cfg, flat)
    write_partition_table(cfg, out_dir / "partitions.csv", audit=audit)
    if cfg.model.init_from and not cfg.resume:  # each simulated owner's ledger continues the earlier run's
        from veil.server.warm_start import carry_simulated_ledgers

        carry_simulated_ledgers(cfg, out_dir)
    baseline = majority_baseline_of(cfg)
    log.info("simulating %d clients x %d rounds (DP %s, SecAgg+ %s) into %s", cfg.federation.num_clients,
             cfg.federation.rounds, "on" if cfg.privacy.enabled else "off", "on" if cfg.secagg.enabled else "off", out_dir)
    # (4) simulate
    _run_flower(cfg, flat, out_dir, client_app=client_app, audit=audit)
    summary_path = out_dir / "summary.json"
    if not summary_path.exists():
        raise VeilError(f"the simulation in {out_dir} ended without a result; see the log above for the failing step")
    summary: dict[str, Any] = json.loads(summary_path.read_text(encoding="utf-8"))
    summary["majority_baseline"] = baseline
    from veil.task.probe import banks_alone

    alone = banks_alone(cfg, audit) if cfg.federation.num_clients <= MAX_ALONE_REPORTED else []
    if alone:
        summary["banks_alone"] = alone
    summary_path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    # (5) report
    from veil.server.metrics import summary_epsilon

    eps = summary_epsilon(summary, delta=cfg.privacy.delta) if cfg.privacy.enabled else "no DP"
    reference = f" vs majority-class baseline {baseline:.4f}" if baseline == baseline else ""  # NaN: the task has none
    ppl = f"; perplexity {summary['perplexity']:.3f}" if "perplexity" in summary else ""
    for row in alone:  # what each simulated owner gets without joining (veil.task.probe)
        points = 100 * (summary.get("accuracy", 0.0) - row["accuracy"])
        verdict = f"gains {points:.1f} points" if points > 0 else f"does NOT gain ({points:+.1f} points)"
        print(f"bank {row['bank']} alone (non-private probe on its own {row['examples']} examples): "
              f"{row['accuracy']:.4f}; by joining it {verdict}", flush=True)
    print(f"final accuracy {summary.get('accuracy', float('nan')):.4f}{reference}{ppl}; {eps}; "
          f"model in {out_dir / 'model'}", flush=True)
    return summary


def majority_baseline_of(cfg: Any) -> float:
    """The task's trivial reference accuracy (classification: the most frequent training label)."""
    from veil.task import get_task

    return get_task(cfg.task.name).baseline(cfg)


def write_partition_table(cfg: Any, path: Path, *, audit: AuditPlan | None = None, top: int = 3,
                          shown: int = 20) -> list[dict[str, Any]]:
    """Each simulated client's size and label mix, from the very split the clients make; saved as CSV, and the first
    ``shown`` rows printed (a population of thousands is read in the file, not on the console). The audit's canary
    clients (``audit``) hold no data and have no row."""
    import csv
    from collections import Counter

    import numpy as np

    from veil.task import get_task
    from veil.task.shards import simulated_partitions
    from veil.task.split import training_examples

    task = get_task(cfg.task.name)
    examples = training_examples(cfg)
    ids, parts = simulated_partitions(task, examples, json.loads(cfg.data.labels), dataclasses.asdict(cfg.federation),
                                      path=cfg.data.train_path, canary_clients=audit.canary_clients if audit else 0)
    labels = task.partition_names(examples, json.loads(cfg.data.labels))
    rows = []
    for client, idx in enumerate(parts):
        counts = Counter(int(i) for i in ids[idx]).most_common()
        mix = " ".join(f"{labels[k]}:{n}" for k, n in counts[:top])
        rows.append({"client": client, "examples": len(idx), "labels": len(counts), "top_labels": mix})
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["client", "examples", "labels", "top_labels"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"partitions ({cfg.federation.partitioner}, {len(labels)} labels in all; saved to {path}):")
    print(f"{'client':>6} {'examples':>8} {'labels':>6}  top labels (count)")
    for row in rows[:shown]:
        print(f"{row['client']:>6} {row['examples']:>8} {row['labels']:>6}  {row['top_labels']}")
    if len(rows) > shown:
        sizes = [int(r["examples"]) for r in rows]
        print(f"   ... {len(rows) - shown} more clients in {path.name} (examples per client: min {min(sizes)}, "
              f"median {int(np.median(sizes))}, max {max(sizes)})")
    sys.stdout.flush()
    return rows


def simulated_node_configs(cfg: Any, audit: AuditPlan | None = None) -> SimulatedNodes:
    """Per-partition node config of the simulated owners.

    In a simulation the researcher is every owner: each simulated node accepts the run's own choices (its δ, plain
    aggregation when secagg=off, central noise when asked, a cohort of clients_per_round for client-level noise
    shares), and its ε budget comes from ``federation.node_max_epsilon``. A real node sets all of these itself.
    ``audit`` (``veil audit`` only): the planted examples and canary clients every simulated node learns here.
    """
    fed, priv = cfg.federation, cfg.privacy
    policy: dict[str, Any] = {
        "delta": float(priv.delta), "allow-plain-aggregation": not cfg.secagg.enabled,
        "allow-central-noise": priv.noise_placement == "central",
        "min-cohort": int(getattr(fed, "clients_per_round", 0) or fed.num_clients),
        # the researcher tolerates the drop-outs the protocol does (a deployed owner's default is 0)
        "max-dropouts": int(cfg.secagg.num_shares - cfg.secagg.reconstruction_threshold),
    }
    if audit and audit.planted_examples:
        policy["planted-examples"] = audit.planted_examples
    if audit and audit.canary_clients:
        policy["canary-clients"] = audit.canary_clients
    spec = fed.node_max_epsilon.strip()
    try:
        if not spec or ":" not in spec:
            return SimulatedNodes(fed.num_clients, policy, every=float(spec) if spec else None)
        budgets = {int(i): float(eps) for i, eps in (item.split(":") for item in spec.split(","))}
    except ValueError as err:
        raise ConfigError(
            f"federation.node_max_epsilon={spec!r} is invalid: expected a number or 'ID:EPS,ID:EPS'"
        ) from err
    return SimulatedNodes(fed.num_clients, policy, budgets=budgets)


class SimulatedNodes(Mapping[int, dict[str, Any]]):
    """Partition id -> that simulated owner's node config: one shared policy, plus an ε budget for every node
    (``every``) or for some (``budgets``).

    Reads like a dict with one entry per node, but its size does not grow with the population: it is pickled into
    the ClientApp that travels to every Ray worker, and the population may be 10,000 (issue 14).
    """

    def __init__(self, size: int, policy: Mapping[str, Any], *, every: float | None = None,
                 budgets: Mapping[int, float] | None = None) -> None:
        self.size, self.policy, self.every = int(size), dict(policy), every
        self.budgets = dict(budgets or {})

    def __getitem__(self, node: int) -> dict[str, Any]:
        i = int(node)
        if not (0 <= i < self.size or i in self.budgets):
            raise KeyError(node)
        out = dict(self.policy)
        eps = self.budgets.get(i, self.every)
        if eps is not None:
            out["max-epsilon"] = eps
        return out

    def __iter__(self) -> Iterator[int]:
        yield from range(self.size)
        yield from sorted(i for i in self.budgets if not 0 <= i < self.size)

    def __len__(self) -> int:
        return self.size + sum(1 for i in self.budgets if not 0 <= i < self.size)


def ray_init_args(address: str) -> dict[str, Any]:
    """``ray.init`` arguments (Flower's ``backend_config["init_args"]``): a private Ray instance on this machine's
    cores, or, with ``federation.ray_address`` (else Ray's own ``RAY_ADDRESS`` variable), an existing cluster
    (whose size is its own: no ``num_cpus``)."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        return {"address": address}
    return {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}


def _run_flower(cfg: Any, flat: dict[str, Any], out_dir: Path, *, client_app: ClientAppFactory | None = None,
                audit: AuditPlan | None = None) -> None:
    from flwr.simulation import run_simulation

    from veil.client.app import make_client_app
    from veil.flower.patches import sweep_only_addressed_nodes
    from veil.server.app import make_server_app

    fed = cfg.federation
    backend = {
        "client_resources": {"num_cpus": fed.num_cpus_per_client, "num_gpus": fed.num_gpus_per_client},
        "init_args": ray_init_args(fed.ray_address),
    }
    app = (client_app or make_client_app)(flat, simulation_root=out_dir / "nodes",
                                          simulated_nodes=simulated_node_configs(cfg, audit))
    sweep_only_addressed_nodes()  # Flower's engine polls only nodes with a message, not all N (veil.flower.patches)
    # warnings off: Ray's and transformers' FutureWarnings about their own next versions are no user's business
    with _flower_log(out_dir / FLOWER_LOG), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            run_simulation(server_app=make_server_app(flat), client_app=NamedCauses(app),
                           num_supernodes=fed.num_clients, backend_config=backend)
        except VeilError as err:
            raise _with_log(err, out_dir / FLOWER_LOG) from None
        except RuntimeError as err:
            cause = err.__cause__ or err
            if isinstance(cause, VeilError):
                raise _with_log(cause, out_dir / FLOWER_LOG) from None
            raise VeilError(f"the simulation failed: {str(cause).splitlines()[0] if str(cause) else type(cause).__name__}"
                            f"; see {out_dir / FLOWER_LOG}") from err


FLOWER_LOG = "flower.log"  # Flower's own log of a simulated run, with the client-side tracebacks


class NamedCauses:
    """The simulated ClientApp, re-raising a client's exception as one line that starts with its class name.

    Flower's simulation engine reports a ClientApp failure to the ServerApp only as the exception's message, so the
    cause the server names in its last line ("every client failed (RuntimeError: ...)") would lose its class. In a
    deployment nothing is relayed this way: a node answers a failure with a generic refusal (DESIGN.md decision 7).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, message: Any, context: Any) -> Any:
        try:
            return self.app(message, context)
        except Exception as err:  # every failure of the node's code, named and passed on to Flower
            text = str(err).strip().splitlines()
            raise RuntimeError(f"{type(err).__name__}: {text[0] if text else 'no message'}") from err


def _with_log(err: VeilError, log_path: Path) -> VeilError:
    """``err`` naming the log that holds the clients' tracebacks, when there are any."""
    if not (log_path.parent / "metrics.jsonl").exists():  # the run directory is removed (nothing half-written)
        return err
    text = log_path.read_text(encoding="utf-8", errors="replace") if log_path.is_file() else ""
    return type(err)(f"{err}; tracebacks in {log_path}") if "Traceback" in text else err


class _Quiet(logging.Filter):
    """Keeps Flower's errors (tracebacks; they go to the run's flower.log) and deprecation banners off the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR and not str(record.msg).startswith("DEPRECATED FEATURE")


class _NoDeprecation(logging.Filter):
    """Drops Flower's "run_simulation is deprecated" banner at its logger: veil runs the same ServerApp and ClientApp
    in deployment through a SuperLink (``veil server``), and ``flwr run`` would need one for a simulation too."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith("DEPRECATED FEATURE") and "run_simulation" in str(record.args))


@contextlib.contextmanager
def _flower_log(path: Path) -> Iterator[None]:
    """While Flower runs: its full log (tracebacks included) in ``path``, only its short lines on the console."""
    flwr_log = logging.getLogger("flwr")
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    quiet, no_banner = _Quiet(), _NoDeprecation()
    consoles = list(flwr_log.handlers)
    for handler in consoles:
        handler.addFilter(quiet)
    flwr_log.addFilter(no_banner)
    flwr_log.addHandler(to_file)
    try:
        yield
    finally:
        flwr_log.removeHandler(to_file)
        flwr_log.removeFilter(no_banner)
        for handler in consoles:
            handler.removeFilter(quiet)
        to_file.close()
