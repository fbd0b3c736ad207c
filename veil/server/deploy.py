"""``veil server``: the coordinator of a real deployment — a SuperLink with TLS and node authentication, one run.

Steps: (1) compose and validate the configuration (Hydra overrides, as for ``veil simulate``); (2) check the TLS
certificate and the node public keys; (3) resolve the evaluation file and the label set, write the resolved config,
the run config and the veil app directory (:func:`veil.security.bundle.write_app_dir`, the bundle every node pins)
into the run directory; (4) start ``flower-superlink`` (state database under the run directory) and register the
node keys; (5) ``flwr run`` the app with the run config, print one line per round while the ServerApp writes
``metrics.jsonl``, and report the result; (6) stop every process started, on success, failure or Ctrl-C.

The ServerApp runs next to the SuperLink (``flwr-serverapp``) and writes the same outputs as ``veil simulate``
into the run directory (``veil.output_dir``). Nodes receive the run config: it names the operator's evaluation file
and output directory, never a node's data (DESIGN.md decision 7).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from veil.errors import ConfigError, VeilError

log = logging.getLogger("veil.server")

# data.train_path in a deployment's run config: every node trains on its own --data file, named only in its node
# config (the schema wants a non-empty value).
NODE_LOCAL = "node-local"

INSECURE_WARNING = ("WARNING: --insecure: the SuperLink speaks PLAINTEXT and accepts any node without "
                    "authentication; model updates and run configs cross the network unencrypted. Tests only.")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=tiny_bert federation.rounds=5")
    tls = parser.add_argument_group("TLS (default: on)")
    tls.add_argument("--certs", type=Path, help="directory written by `veil certs` (ca.crt, server.pem, server.key)")
    tls.add_argument("--ca", type=Path, help="CA certificate (overrides --certs/ca.crt)")
    tls.add_argument("--cert", type=Path, help="server certificate, PEM (overrides --certs/server.pem)")
    tls.add_argument("--key", type=Path, help="server private key, PEM (overrides --certs/server.key)")
    parser.add_argument("--node-keys", nargs="+", type=Path, default=[],
                        help="node public keys to register: a directory of *.pub files or the files")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000,
                        help="the one HTTPS port of the Fleet, Control and Runtime APIs (Flower's default 8000)")
    parser.add_argument("--run-dir", type=Path, help="outputs and state (default: outputs/deploy-<date>-<time>)")
    parser.add_argument("--timeout", type=float, default=0.0, help="stop the run after this many seconds (0: none)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue a run from its last checkpoint (same overrides; outputs go back into RUN_DIR)")
    parser.add_argument("--insecure", action="store_true", help="plaintext, no node authentication (tests only)")


def _tls_files(args: argparse.Namespace) -> tuple[Path, Path, Path] | None:
    """(ca, cert, key), checked; None with --insecure."""
    from veil.security.credentials import check_server_certificate

    if args.insecure:
        return None
    base = args.certs
    files = [args.ca or (base and base / "ca.crt"), args.cert or (base and base / "server.pem"),
             args.key or (base and base / "server.key")]
    if not all(files):
        raise ConfigError("TLS is on by default: give --certs DIR (from `veil certs`) or --ca, --cert and --key "
                          "(or --insecure for a plaintext test)")
    ca, cert, key = (Path(f).expanduser().resolve() for f in files)
    wildcard = args.host in ("0.0.0.0", "::")  # noqa: S104
    check_server_certificate(cert, key, ca, names=None if wildcard else [args.host])
    return ca, cert, key


def _node_keys(args: argparse.Namespace) -> list[Path]:
    from veil.security.credentials import load_public_keys

    if args.insecure:
        if args.node_keys:
            log.warning("--insecure: node keys are not registered (no node authentication without TLS)")
        return []
    if not args.node_keys:
        raise ConfigError("give --node-keys DIR (the node-*.pub files of `veil certs`): only registered nodes may join")
    source = args.node_keys[0] if len(args.node_keys) == 1 else args.node_keys
    return [path.resolve() for path in load_public_keys(source)]


def resolve_config(cfg: Any, run_dir: Path) -> Any:
    """Absolute evaluation path, a fixed label set, the output directory; every path is the operator's."""
    from veil.task import get_task
    from veil.task.shards import absolute

    data = dataclasses.replace(cfg.data, test_path=absolute(cfg.data.test_path))
    if not data.labels:  # the task's label set (causal_lm: none, "[]"), from the operator's files only
        train = absolute(data.train_path) if data.train_path not in ("", "???", NODE_LOCAL) else ""
        if not (train and Path(train).is_file()):  # a coordinator usually has no training data: its evaluation file
            train = data.test_path
        labels = get_task(cfg.task.name).labels(dataclasses.replace(cfg, data=dataclasses.replace(data, train_path=train)))
        data = dataclasses.replace(data, labels=json.dumps(labels))
    data = dataclasses.replace(data, train_path=NODE_LOCAL)  # nodes train on their own --data file only
    return dataclasses.replace(cfg, data=data, output_dir=str(run_dir))


def _resumable(cfg: Any, run_dir: Path) -> Any:
    """The config of a resumed run, after refusing an incompatible one (naming the field) before anything starts."""
    from veil.conf.runconfig import to_run_config
    from veil.server.checkpoint import check_resumable

    if not (run_dir / "config.resolved.yaml").is_file():
        raise ConfigError(f"--resume {run_dir} is not a veil run directory (no config.resolved.yaml); give a run's directory")
    cfg = dataclasses.replace(cfg, resume=str(run_dir))
    check_resumable(cfg, to_run_config(cfg))
    return cfg


def _prepare(cfg: Any, run_dir: Path) -> tuple[Path, Path]:
    """Write config.resolved.yaml, run_config.toml and the app directory; returns (app_dir, run_config)."""
    import tomli_w
    from omegaconf import OmegaConf

    from veil.security.bundle import write_app_dir
    from veil.conf.runconfig import to_run_config

    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.resolved.yaml")
    run_config = run_dir / "run_config.toml"
    run_config.write_text(tomli_w.dumps(to_run_config(cfg)), encoding="utf-8")
    return write_app_dir(run_dir / "app"), run_config


def run(args: argparse.Namespace) -> int:
    from veil.preflight import follow_defaults, preflight

    overrides = follow_defaults(list(args.overrides))
    if "data=csv" in overrides and not any(o.startswith(("data.test_path=", "+data.test_path=")) for o in overrides):
        raise ConfigError("veil server evaluates the global model on data.test_path; give data.test_path=FILE")
    if not any(o.startswith(("data.train_path=", "+data.train_path=")) for o in overrides):
        # A coordinator needs no training file; the checks before the run read the evaluation file instead.
        overrides.append("data.train_path=${data.test_path}")
    cfg = preflight(overrides)  # (1)
    tls = _tls_files(args)  # (2)
    if args.insecure:  # once the checks pass, so a refused start stays one line
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    keys = _node_keys(args)
    if keys and cfg.federation.num_clients > len(keys):
        raise ConfigError(f"federation.num_clients={cfg.federation.num_clients} but only {len(keys)} node keys are "
                          "registered; lower it or pass more --node-keys")
    priv = cfg.privacy
    if priv.enabled and priv.level == "sample" and not cfg.federation.sample_rate > 0:
        raise ConfigError("a deployed DP-SGD run states its Poisson sampling rate, so that no node's budget bit reads "
                          "its data size (docs/privacy.md); give federation.sample_rate=Q, e.g. "
                          "federation.sample_rate=0.05 (each node's expected batch is then Q times its rows)")
    run_dir = (args.resume or args.run_dir or Path("outputs") / time.strftime("deploy-%Y-%m-%d-%H-%M-%S")).expanduser().resolve()
    cfg = resolve_config(cfg, run_dir)  # (3)
    if args.resume:
        cfg = _resumable(cfg, run_dir)
    elif (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"{run_dir} already holds a run; pick a new --run-dir or continue it with --resume {run_dir}")
    app_dir, run_config = _prepare(cfg, run_dir)
    from veil.server.session import Session
    from veil.supervise import stop_on_signals

    stop_on_signals()
    if args.resume:  # nodes the crashed SuperLink held as online are not there until they heartbeat again
        from veil.flower.sessions import forget_online_nodes
        from veil.server.superlink import end_leftovers

        for command in end_leftovers(run_dir / "state"):
            log.warning("resume: ended a process the crashed coordinator left running: %s", command)
        forget_online_nodes(run_dir / "state" / "superlink.db")
    with Session(run_dir, host=args.host, port=args.port, tls=tls) as session:  # (4)-(6)
        for key in keys:
            session.cli.register(key)
        print(f"veil server ready on {session.endpoint.address}: {len(keys)} node key(s) registered, "
              f"{'TLS' if tls else 'PLAINTEXT'}; nodes may connect; outputs in {run_dir}", flush=True)
        summary = session.run(app_dir, run_config, rounds=cfg.federation.rounds, timeout=args.timeout)
    from veil.server.metrics import summary_epsilon

    eps = summary_epsilon(summary, delta=cfg.privacy.delta) if cfg.privacy.enabled else "no DP"
    print(f"final accuracy {summary.get('accuracy', float('nan')):.4f}; {summary.get('rounds_completed', 0)} of "
          f"{cfg.federation.rounds} rounds completed; {eps}; model in {run_dir / 'model'}", flush=True)
    if not summary.get("rounds_completed"):
        raise VeilError(f"no round completed (nodes refused or failed; see the nodes' logs); outputs in {run_dir}")
    return 0
