"""A simulated federation with one faulty node, for the drop-out and timeout tests.

Usage: python tests/support/fault_sim.py OUT_DIR FAULT PARTITION [hydra overrides...] [-- OUT_DIR FAULT ...]...
Several runs separated by ``--`` go one after the other in this one process (Python, torch and Flower load once);
each that ends without an exception writes OUT_DIR/fault_sim.done, a failed one prints its traceback and the next
runs anyway; the exit status is 1 if any failed.
FAULT is "crash" (the node's ClientApp dies with an error after SecAgg+ key sharing, when the fit instructions
arrive: the server gets an error reply), "crash-keys" (it dies when asked to share its keys, after SETUP; without
SecAgg+, at the fit instructions), "hang" (it does not answer from that point until the server has recorded the round, or HANG_SECONDS at most: the
server gets nothing in time), or
"none". In simulation a virtual node shares a Ray worker process with others, so killing the process would kill
its neighbours too; a real process kill is exercised by the deployment tests. The federation runs veil's own ServerApp and ClientApp;
only a fault-injecting mod is put in front of the ClientApp's own mods.
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

from flwr.clientapp import ClientApp
from flwr.common import Context, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.simulation import run_simulation


HANG_SECONDS = 240


def _stay_silent(round_recorded: Path) -> None:
    """Sleep until the server has written the round's metrics line (the round ended without this node), so the
    process can end then rather than after a fixed silence; bounded by HANG_SECONDS."""
    deadline = time.monotonic() + HANG_SECONDS
    while time.monotonic() < deadline and not (round_recorded.is_file() and round_recorded.stat().st_size > 0):
        time.sleep(0.5)


def fault_mod(kind: str, partition: int, out_dir: Path):  # noqa: ANN201
    def mod(msg: Message, context: Context, call_next):  # noqa: ANN001, ANN202
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = configs.get(Key.STAGE) if configs is not None else "fit"
        mine = int(context.node_config.get("partition-id", -1)) == partition
        if mine and kind == "crash-keys" and stage in (Stage.SHARE_KEYS, "fit"):
            raise RuntimeError("injected crash before key sharing")
        hit = mine and stage in (Stage.COLLECT_MASKED_VECTORS, "fit")
        if hit and kind == "crash":
            raise RuntimeError("injected crash after key sharing")
        if hit and kind == "hang":
            _stay_silent(out_dir / "metrics.jsonl")  # bounded, so the simulation can shut its workers down afterwards
        return call_next(msg, context)

    return mod


DONE = "fault_sim.done"  # written into a run's OUT_DIR once its simulation has returned


def main() -> None:
    from veil.preflight import register_schema

    register_schema()
    groups: list[list[str]] = [[]]
    for arg in sys.argv[1:]:
        if arg == "--":
            groups.append([])
        else:
            groups[-1].append(arg)
    failed = 0
    for out, kind, partition, *overrides in filter(None, groups):
        try:
            run(Path(out), kind, int(partition), overrides)
        except (Exception, SystemExit):  # noqa: BLE001 - reported, and the next run still goes
            failed += 1
            print(f"fault_sim: the run in {out} ({kind}) failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        else:
            (Path(out) / DONE).write_text("ok\n", encoding="utf-8")
    sys.exit(1 if failed else 0)


def run(out_dir: Path, kind: str, partition: int, overrides: list[str]) -> None:
    from hydra import compose, initialize_config_dir

    import veil.client.app as client_app_module
    from veil.conf import CONF_DIR
    from veil.conf.runconfig import to_run_config, to_veil_config
    from veil.server.app import make_server_app
    from veil.preflight import resolve_paths_and_labels

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = resolve_paths_and_labels(to_veil_config(compose(config_name="config", overrides=overrides)), out_dir)
    flat = to_run_config(cfg)
    from veil.simulation import simulated_node_configs

    nodes = simulated_node_configs(cfg)
    client_fn = client_app_module.make_client_fn(flat, simulation_root=out_dir / "nodes", simulated_nodes=nodes)
    guard = client_app_module.make_secagg_mod(flat, simulation_root=out_dir / "nodes", simulated_nodes=nodes)
    app = ClientApp(client_fn=client_fn, mods=[fault_mod(kind, partition, out_dir), guard])
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}}
    run_simulation(server_app=make_server_app(flat), client_app=app, num_supernodes=cfg.federation.num_clients,
                   backend_config=backend)


if __name__ == "__main__":
    main()
