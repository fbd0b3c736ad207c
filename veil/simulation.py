"""``veil simulate``: a federation of simulated data owners on one machine, on Flower's simulation engine.

The configuration is composed by Hydra (``veil/conf``), so a sweep is a command line
(``veil simulate -m privacy.noise_multiplier=0.6,1.0``). The run uses the very same ServerApp and ClientApp as a
deployment: this module only composes and validates the config, resolves paths and the label set once, writes the
resolved config next to the outputs, and hands both apps to ``flwr.simulation.run_simulation``.

Steps of one run: (1) compose and validate; (2) resolve data paths and labels; (3) write the resolved config;
(4) simulate; (5) report the final accuracy beside the majority-class baseline and the ε reached.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from veil.errors import ConfigError, VeilError

log = logging.getLogger("veil")

_failures: list[str] = []


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--multirun", action="store_true",
                        help="a Hydra sweep: one run per combination of comma-separated values, each in its own directory")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="Hydra overrides, e.g. federation.num_clients=10 privacy=none")


def _register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    from veil.conf.schema import VeilConfig

    ConfigStore.instance().store(name="veil_schema", node=VeilConfig)


def preflight(overrides: list[str]) -> Any:
    """Compose once with Hydra's compose API so a typo or bad value fails with one line before anything starts."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from veil.conf import CONF_DIR
    from veil.conf.runconfig import to_veil_config

    _register_schema()
    plain = [o for o in overrides if not o.startswith("-") and not o.startswith("hydra.") and not o.startswith("hydra/")]
    sweeping = "-m" in overrides or "--multirun" in overrides
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            # In a sweep, every swept value is composed and validated once (beside the first of the others), so a
            # typo in any value fails before the first member starts; combinations are left to the members.
            variants = _sweep_variants(plain) if sweeping else [plain]
            cfgs = [compose(config_name="config", overrides=variant) for variant in variants]
    except Exception as err:  # Hydra/OmegaConf raise many types; all mean "the command line is wrong"
        raise ConfigError(_one_line(err)) from err
    finally:
        GlobalHydra.instance().clear()
    for cfg in cfgs:
        check_set(cfg)
    veil_cfgs = [to_veil_config(cfg) for cfg in cfgs]
    for each in veil_cfgs:
        check_model(each.model)
    veil_cfg = veil_cfgs[0]
    if not sweeping:
        check_data(veil_cfg)
    return veil_cfg


def check_set(cfg: Any) -> None:
    """Every mandatory value (``???`` in a group file, e.g. ``data=csv``'s paths) is given."""
    from omegaconf import OmegaConf

    missing = sorted(OmegaConf.missing_keys(cfg), key=lambda key: ("test" in key, key))  # train before test
    if missing:
        given = " ".join(f"{key}=..." for key in missing)
        raise ConfigError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; give {given}")


def check_model(model: Any) -> None:
    """The model directory holds a config.json (a tiny test model needs only the default tokenizer's)."""
    from veil.task.model import default_model_dir, model_dir

    if model.tiny:
        default_model_dir()
    else:
        model_dir(model)


def check_data(cfg: Any) -> list[str]:
    """Read the data files once before any output exists: a bad file fails with one line and writes nothing."""
    from veil.task.data import encode_labels, read_examples

    data = resolve_paths_and_labels(cfg, Path.cwd()).data
    labels: list[str] = json.loads(data.labels)
    if cfg.data.labels:  # a fixed label set: the files were not read to derive it, so read them here
        for path in (data.train_path, data.test_path):
            encode_labels(read_examples(path, data), labels, path=path)
    return labels


def _sweep_values(override: str) -> list[str]:
    """``key=a,b,c`` -> ``[key=a, key=b, key=c]``; any other override stands for itself."""
    key, sep, value = override.partition("=")
    if sep and "," in value and not value.startswith(("[", "{", "'", '"')):
        return [f"{key}={v}" for v in value.split(",")]
    return [override]


def _sweep_variants(overrides: list[str]) -> list[list[str]]:
    """The first value of every swept key, then each other value of each swept key in turn."""
    values = [_sweep_values(o) for o in overrides]
    first = [v[0] for v in values]
    return [first] + [[*first[:i], other, *first[i + 1:]] for i, v in enumerate(values) for other in v[1:]]


def _one_line(err: BaseException) -> str:
    """Hydra's multi-line error and its causes, as one line without search paths or internals."""
    parts: list[str] = []
    seen: BaseException | None = err
    while seen is not None and len(parts) < 4:
        for line in str(seen).split("\n"):
            line = line.strip()
            if line.startswith(("Config search path", "provider=", "full_key", "object_type", "reference_type",
                                "Set the environment variable")):
                break
            if "$VALUE" in line:
                continue
            if line and line not in parts:
                parts.append(line)
        seen = seen.__cause__ or seen.__context__
    text = " ".join(parts).replace("To append to your config use", "(to add a new key use")
    if "(to add a new key use" in text:
        text = text.replace(" Key ", ") Key ", 1) if " Key " in text else text + ")"
    return f"invalid configuration: {text or type(err).__name__}"


def run(args: argparse.Namespace) -> int:
    from veil.conf.runconfig import to_run_config

    overrides = ["-m", *args.overrides] if getattr(args, "multirun", False) else list(args.overrides)
    resume = [o.split("=", 1)[1] for o in overrides if o.startswith("resume=")]
    if resume and resume[-1]:
        run_dir = Path(resume[-1]).expanduser().resolve()
        if not (run_dir / "config.resolved.yaml").is_file():
            raise ConfigError(f"resume={resume[-1]} is not a veil run directory (no config.resolved.yaml); give a run's output directory")
        overrides = [*overrides, f"hydra.run.dir={run_dir}"]  # outputs go back into the run being resumed
    cfg = preflight(overrides)
    if cfg.resume:  # refuse an incompatible resume before Hydra touches the run directory
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


def simulate(dict_cfg: Any, out_dir: Path, *, client_mods: Sequence[Any] = ()) -> dict[str, Any]:
    """Run one simulated federation into ``out_dir``; returns the final summary.

    ``client_mods``: extra Flower mods around every simulated ClientApp (Python callers only, never from a
    config: the tests' deliberately broken mechanism for ``veil audit`` enters here).
    """
    from omegaconf import OmegaConf

    from veil.conf.runconfig import to_run_config, to_veil_config

    # (1) compose and validate
    cfg = to_veil_config(dict_cfg)
    # (2) absolute paths (Ray workers may start elsewhere) and one label set for every process
    cfg = resolve_paths_and_labels(cfg, out_dir)
    # (3) the resolved config next to the outputs
    if not cfg.resume and (out_dir / "metrics.jsonl").exists():
        raise ConfigError(f"{out_dir} already holds a run; pick a new hydra.run.dir or continue it with resume={out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(cfg), out_dir / "config.resolved.yaml")
    flat = to_run_config(cfg)
    simulated_node_configs(cfg.federation)
    if cfg.resume:
        check_resumable(cfg, flat)
    write_partition_table(cfg, out_dir / "partitions.csv")
    baseline = majority_baseline_of(cfg)
    log.info("simulating %d clients x %d rounds (DP %s, SecAgg+ %s) into %s", cfg.federation.num_clients,
             cfg.federation.rounds, "on" if cfg.privacy.enabled else "off", "on" if cfg.secagg.enabled else "off", out_dir)
    # (4) simulate
    _run_flower(cfg, flat, out_dir, client_mods=client_mods)
    summary_path = out_dir / "summary.json"
    if not summary_path.exists():
        raise VeilError(f"the simulation in {out_dir} ended without a result; see the log above for the failing step")
    summary: dict[str, Any] = json.loads(summary_path.read_text(encoding="utf-8"))
    summary["majority_baseline"] = baseline
    summary_path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    # (5) report
    eps = f"epsilon {summary['epsilon_max']:.3f} (delta {cfg.privacy.delta:g})" if cfg.privacy.enabled else "no DP"
    print(f"final accuracy {summary.get('accuracy', float('nan')):.4f} vs majority-class baseline {baseline:.4f}; "
          f"{eps}; model in {out_dir / 'model'}", flush=True)
    return summary


def resolve_paths_and_labels(cfg: Any, out_dir: Path) -> Any:
    """The config every process gets: absolute data paths, the label set fixed once, the output directory."""
    from veil.task.shards import absolute, resolve_labels

    data = dataclasses.replace(cfg.data, train_path=absolute(cfg.data.train_path), test_path=absolute(cfg.data.test_path))
    data = dataclasses.replace(data, labels=json.dumps(resolve_labels(data)))
    return dataclasses.replace(cfg, data=data, output_dir=str(out_dir.resolve()),
                               resume=str(Path(cfg.resume).expanduser().resolve()) if cfg.resume else "")


def check_resumable(cfg: Any, flat: dict[str, Any]) -> None:
    """Refuse an incompatible resume before starting Flower (the ServerApp checks again)."""
    from veil.server.checkpoint import check_compatible, latest_checkpoint

    ckpt = latest_checkpoint(Path(cfg.resume))
    if ckpt is not None:
        check_compatible(ckpt.meta["run_config"], flat)
        log.info("resuming %s after round %d of %d", cfg.resume, ckpt.round, cfg.federation.rounds)


def majority_baseline_of(cfg: Any) -> float:
    """Accuracy of predicting the most frequent training label on the evaluation split."""
    import numpy as np

    from veil.server.evaluate import majority_baseline
    from veil.task.data import encode_labels, read_examples

    labels = json.loads(cfg.data.labels)
    train = encode_labels(read_examples(cfg.data.train_path, cfg.data), labels, path=cfg.data.train_path)
    test = encode_labels(read_examples(cfg.data.test_path, cfg.data), labels, path=cfg.data.test_path)
    return majority_baseline(np.asarray(train), np.asarray(test))


def write_partition_table(cfg: Any, path: Path, *, top: int = 3) -> list[dict[str, Any]]:
    """Each simulated client's size and label mix, from the very split the clients make; printed and saved as CSV."""
    import csv
    from collections import Counter

    from veil.task.data import read_examples
    from veil.task.shards import simulated_partitions

    labels = json.loads(cfg.data.labels)
    examples = read_examples(cfg.data.train_path, cfg.data)
    ids, parts = simulated_partitions(examples, labels, dataclasses.asdict(cfg.federation), path=cfg.data.train_path)
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
    for row in rows:
        print(f"{row['client']:>6} {row['examples']:>8} {row['labels']:>6}  {row['top_labels']}", flush=True)
    return rows


def simulated_node_configs(fed: Any) -> dict[int, dict[str, Any]]:
    """Per-partition node config of the simulated owners, from ``federation.node_max_epsilon``."""
    spec = fed.node_max_epsilon.strip()
    if not spec:
        return {}
    try:
        if ":" not in spec:
            return {i: {"max-epsilon": float(spec)} for i in range(fed.num_clients)}
        pairs = (item.split(":") for item in spec.split(","))
        return {int(i): {"max-epsilon": float(eps)} for i, eps in pairs}
    except ValueError as err:
        raise ConfigError(
            f"federation.node_max_epsilon={spec!r} is invalid: expected a number or 'ID:EPS,ID:EPS'"
        ) from err


def _run_flower(cfg: Any, flat: dict[str, Any], out_dir: Path, *, client_mods: Sequence[Any] = ()) -> None:
    from flwr.simulation import run_simulation

    from veil.server.app import make_server_app

    fed = cfg.federation
    backend = {
        "client_resources": {"num_cpus": fed.num_cpus_per_client, "num_gpus": fed.num_gpus_per_client},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
    }
    client_app = _simulated_client_app(flat, out_dir, simulated_node_configs(fed), client_mods)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # run_simulation's deprecation notice: `flwr run` needs a SuperLink
        try:
            run_simulation(
                server_app=make_server_app(flat),
                client_app=client_app,
                num_supernodes=fed.num_clients, backend_config=backend,
            )
        except VeilError:
            raise
        except RuntimeError as err:
            cause = err.__cause__ or err
            if isinstance(cause, VeilError):
                raise cause from None
            raise VeilError(f"the simulation failed: {str(cause).splitlines()[0] if str(cause) else type(cause).__name__}") from err


def _simulated_client_app(flat: dict[str, Any], out_dir: Path, nodes: dict[int, dict[str, Any]],
                          client_mods: Sequence[Any]) -> Any:
    """The veil ClientApp for the simulated nodes; with ``client_mods`` (tests only), those mods around it too."""
    from flwr.clientapp import ClientApp

    from veil.client.app import make_client_app, make_client_fn, secagg_when_asked

    if not client_mods:
        return make_client_app(flat, simulation_root=out_dir / "nodes", simulated_nodes=nodes)
    client_fn = make_client_fn(flat, simulation_root=out_dir / "nodes", simulated_nodes=nodes)
    return ClientApp(client_fn=client_fn, mods=[secagg_when_asked, *client_mods])
