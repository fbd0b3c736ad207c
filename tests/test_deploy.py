"""A real deployment on loopback: `veil server` (SuperLink, TLS + node auth) and three `veil client` nodes, each a
separate process tree, DP-SGD + SecAgg+ on a tiny BERT.

One module-scoped scenario runs everything that needs the SuperLink at once, to stay within a few minutes on two
cores: the honest run, a run carrying a modified ClientApp (it would return each node's data path), a weaker run
config submitted with veil's own bundle (the coordinator refuses it), and three refused nodes. The tests then assert on what each part left behind. Every process
is started through :class:`veil.supervise.Supervised` and stopped by process group and PID, even on failure.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support.helpers import TINY, run_veil
from veil.client.executor import READY
from veil.supervise import Supervised, flower_command, flower_env, free_port

ROUNDS = 2
NODE_FLOORS = [  # (min noise multiplier, max sample rate): the honest run (sigma 0.8, q = 1/ceil(24/16)) passes all
    ("0.5", "1.0"), ("0.0", "0.9"), ("0.5", "0.9")]
WORDS = {"card": "my card was lost", "cash": "the atm kept my cash", "fee": "why a fee on transfer",
         "pin": "i forgot my pin code"}


class Lines(list[str]):
    """A process's output lines, and when (monotonic) its node executor said it was ready, if it did."""

    ready_at: float | None = None

    def add(self, line: str) -> None:
        if self.ready_at is None and READY in line:
            self.ready_at = time.monotonic()
        self.append(line)


def _veil(name: str, args: list[str], log_dir: Path) -> tuple[Supervised, Lines]:
    lines = Lines()
    proc = Supervised(name, [sys.executable, "-m", "veil", *args], log_path=log_dir / f"{name}.log",
                      env={**flower_env(), "PYTHONWARNINGS": "ignore"}, on_line=lines.add)
    return proc, lines


def _wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def _write_data(root: Path) -> tuple[Path, list[Path]]:
    """The operator's evaluation file and three private node files (24 rows each, with secret marker words)."""
    root.mkdir(parents=True)
    test = root / "operator-test.csv"
    test.write_text("text,label\n" + "".join(f"{t} again {i},{lab}\n" for lab, t in WORDS.items() for i in range(3)))
    nodes = []
    for n in range(1, 4):
        path = root / f"private-node-{n}" / "secret-records.csv"
        path.parent.mkdir()
        rows = [f"{t} zqxsecret{n} {i},{lab}" for lab, t in WORDS.items() for i in range(6)]
        path.write_text("text,label\n" + "\n".join(rows) + "\n")
        nodes.append(path)
    return test, nodes


EVIL_APP = '''
import json, time
from pathlib import Path
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

serverapp = ServerApp()
clientapp = ClientApp()

@clientapp.train()
def train(msg, context):
    path = str(context.node_config.get("data-path", ""))
    Path({ran!r}).write_text(path)
    return Message(RecordDict({{"leak": ConfigRecord({{"data_path": path}})}}), reply_to=msg)

@serverapp.main()
def main(grid, context):
    deadline = time.time() + 120
    while len(list(grid.get_node_ids())) < 3 and time.time() < deadline:
        time.sleep(1)
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in grid.get_node_ids()]
    replies = [{{"error": r.has_error(), "reason": r.error.reason if r.has_error() else "",
                "content": str(r.content) if r.has_content() else ""}} for r in grid.send_and_receive(msgs, timeout=120)]
    Path({result!r}).write_text(json.dumps({{"sent": len(msgs), "replies": replies}}))
'''


def _evil_app(directory: Path, ran: Path, result: Path) -> Path:
    from veil.security.bundle import app_files

    directory.mkdir()
    pyproject = app_files()["pyproject.toml"].decode()
    pyproject = pyproject.replace("veil.server.app:app", "evil:serverapp").replace("veil.client.app:app", "evil:clientapp")
    (directory / "pyproject.toml").write_text(pyproject)
    (directory / "evil.py").write_text(EVIL_APP.format(ran=str(ran), result=str(result)))
    return directory


def _flwr(run_dir: Path, *args: str) -> dict:  # type: ignore[type-arg]
    done = subprocess.run([flower_command("flwr"), *args, "--format", "json"], capture_output=True, text=True,
                          env=flower_env(flwr_home=run_dir / "flwr-home"), timeout=120, check=False)
    return json.loads(done.stdout[done.stdout.find("{"):])


def _floor_run_config(run_dir: Path, out: Path) -> Path:
    import tomli_w

    from veil.conf.runconfig import from_run_config

    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover
        import tomli as tomllib  # type: ignore[no-redef]
    cfg = tomllib.loads((run_dir / "run_config.toml").read_text())
    cfg.update({"veil.privacy.noise_multiplier": 0.3, "veil.privacy.target_epsilon": 0.0, "veil.federation.batch_size": 32, "veil.federation.rounds": 1,
                "veil.secagg.enabled": False, "veil.output_dir": str(out)})
    from_run_config(cfg)  # a valid run config: only the nodes' floors refuse it
    path = out.parent / "floor_run.toml"
    path.write_text(tomli_w.dumps(cfg))
    return path


@dataclass
class Scenario:
    root: Path
    run_dir: Path
    node_files: list[Path]
    server_status: int | None = None
    server_out: list[str] = field(default_factory=list)
    node_logs: list[Path] = field(default_factory=list)
    nodes_alive_after_evil: bool = False
    evil_result: dict = field(default_factory=dict)  # type: ignore[type-arg]
    evil_ran: Path | None = None
    refusals: dict[str, tuple[int | None, float, list[str]]] = field(default_factory=dict)
    floor_out: Path | None = None
    resume_status: int | None = None
    resume_out: list[str] = field(default_factory=list)
    resume_error: str = ""
    first_summary: dict = field(default_factory=dict)  # type: ignore[type-arg]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    root = tmp_path_factory.mktemp("deploy")
    certs, other = root / "certs", root / "other-certs"
    assert run_veil(["certs", "--out", str(certs), "--nodes", "3"], timeout=60).returncode == 0
    assert run_veil(["certs", "--out", str(other), "--nodes", "1"], timeout=60).returncode == 0
    test_file, node_files = _write_data(root / "data")
    scenario = Scenario(root=root, run_dir=root / "run", node_files=node_files)
    port, procs = free_port(), []
    try:
        server, scenario.server_out = _veil("server", [
            "server", *TINY, "data=csv", f"data.test_path={test_file}", "federation.num_clients=3", "federation.sample_rate=0.5",
            "federation.clients_per_round=3", f"federation.rounds={ROUNDS}", "privacy.noise_multiplier=0.8", "privacy.target_epsilon=0",
            "--certs", str(certs), "--node-keys", str(certs), "--port", str(port), "--run-dir", str(scenario.run_dir),
            "--timeout", "420"], root / "logs")
        procs.append(server)
        _wait_for(lambda: any("ready" in ln for ln in scenario.server_out) or server.poll() is not None, 120, "server")
        assert server.poll() is None, scenario.server_out
        nodes = []
        for n, (min_sigma, max_q) in enumerate(NODE_FLOORS, start=1):
            node_dir = root / f"node-{n}"
            proc, _ = _veil(f"node-{n}", [
                "client", "--superlink", f"127.0.0.1:{port}", "--root-cert", str(certs / "ca.crt"),
                "--key", str(certs / f"node-{n}.key"), "--data", str(node_files[n - 1]), "--node-dir", str(node_dir),
                "--max-epsilon", "100", "--min-noise-multiplier", min_sigma, "--max-sample-rate", max_q,
                "--allow-test-model",  # the run's model is the tiny BERT built in code
                # standing nodes (docs/deployment.md): they must outlive the coordinator's restart for the resume
                # below; the default 5 retries can be spent by Flower's jittered back-off within ~6 s
                "--max-retries", "0", "--max-wait-time", "240",
                "--threads", "1"], root / "logs")  # three nodes share the machine's cores
            nodes.append(proc)
            scenario.node_logs.append(node_dir / "executor.log")
        procs += nodes
        # Refused nodes: an unregistered key, a plaintext node, a node trusting another CA.
        bad = {"unregistered": ["--root-cert", str(certs / "ca.crt"), "--key", str(other / "node-1.key")],
               "plaintext": ["--insecure"],
               "other-ca": ["--root-cert", str(other / "ca.crt"), "--key", str(certs / "node-1.key")]}
        started = {}
        for name, extra in bad.items():
            proc, lines = _veil(f"refused-{name}", ["client", "--superlink", f"127.0.0.1:{port}", "--data",
                                                    str(node_files[0]), "--node-dir", str(root / name),
                                                    "--max-epsilon", "100", *extra],
                                root / "logs")
            procs.append(proc)
            started[name] = (proc, lines, time.monotonic())
        # A modified ClientApp, submitted by anyone who can reach the Control API.
        scenario.evil_ran, evil_result = root / "evil-ran.txt", root / "evil-result.json"
        evil = _evil_app(root / "evil-app", scenario.evil_ran, evil_result)
        assert _flwr(scenario.run_dir, "run", str(evil), "veil")["success"]
        scenario.floor_out = root / "floor-run" / "out"
        scenario.floor_out.parent.mkdir()
        floor = _flwr(scenario.run_dir, "run", str(scenario.run_dir / "app"), "veil", "--run-config",
                      str(_floor_run_config(scenario.run_dir, scenario.floor_out)))
        assert floor["success"], floor
        for name, (proc, lines, t0) in started.items():
            _wait_for(lambda p=proc: p.poll() is not None, 90, f"refused node {name} to exit")
            proc.wait_output()
            # timed from the moment the node connects: once its executor has loaded veil (veil.client.executor)
            scenario.refusals[name] = (proc.poll(), time.monotonic() - (lines.ready_at or t0), lines)
        _wait_for(evil_result.exists, 200, "the modified app's result")
        scenario.evil_result = json.loads(evil_result.read_text())
        scenario.nodes_alive_after_evil = all(p.poll() is None for p in nodes)
        _wait_for(lambda: server.poll() is not None, 420, "the honest run to finish")
        server.wait_output()
        scenario.server_status = server.poll()
        if (scenario.run_dir / "summary.json").exists():
            scenario.first_summary = json.loads((scenario.run_dir / "summary.json").read_text())
        # Resume: the operator restarts `veil server --resume` with one more round; the nodes, still retrying,
        # reconnect to the same state database (their keys stay registered) and round ROUNDS + 1 runs.
        try:
            resumed, scenario.resume_out = _veil("server-resume", [
                "server", *TINY, "data=csv", f"data.test_path={test_file}", "federation.num_clients=3", "federation.sample_rate=0.5",
                "federation.clients_per_round=3", f"federation.rounds={ROUNDS + 1}", "privacy.noise_multiplier=0.8", "privacy.target_epsilon=0",
                "--certs", str(certs), "--node-keys", str(certs), "--port", str(port), "--resume",
                str(scenario.run_dir), "--timeout", "240"], root / "logs")
            procs.append(resumed)
            _wait_for(lambda: resumed.poll() is not None, 260, "the resumed run to finish")
            resumed.wait_output()
            scenario.resume_status = resumed.poll()
        except AssertionError as err:  # reported by the resume test, not by every test of the module
            scenario.resume_error = str(err)
        yield scenario
    finally:
        for proc in reversed(procs):
            proc.stop()


@pytest.mark.slow
def test_server_resume_continues_from_the_checkpoint(deployment: Scenario) -> None:
    assert not deployment.resume_error, deployment.resume_error
    assert deployment.resume_status == 0, deployment.resume_out[-20:]
    # the crashed SuperLink's "online" nodes wait for their next heartbeat (veil.flower.sessions.forget_online_nodes)
    assert any("3 node(s) the SuperLink held as online are offline" in ln for ln in deployment.resume_out)
    rows = [json.loads(line) for line in (deployment.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 2)), "each round exactly once, one more after resume"
    assert rows[-1]["completed"] and rows[-1]["clients"] == 3


@pytest.mark.slow
def test_end_to_end_tls_node_auth_dp_secagg(deployment: Scenario) -> None:
    run_dir = deployment.run_dir
    assert deployment.server_status == 0, "\n".join(deployment.server_out[-30:])
    rounds = [ln for ln in deployment.server_out if ln.startswith("round ")]
    assert len(rounds) == ROUNDS and all("clients 3" in ln and "secagg" in ln for ln in rounds)
    summary = deployment.first_summary  # as the first run left it (the resume test adds a round afterwards)
    assert summary["rounds_completed"] == ROUNDS and summary["epsilon_max"] > 0
    assert (run_dir / "global_trainable.npz").is_file() and (run_dir / "config.resolved.yaml").is_file()
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(run_dir / "model"), local_files_only=True)
    assert model.config.num_labels == len(WORDS)


@pytest.mark.slow
@pytest.mark.parametrize("name, needle", [("unregistered", "not registered"), ("plaintext", "speaks TLS"),
                                          ("other-ca", "not signed by the CA")])
def test_refused_nodes_exit_with_one_clear_line(deployment: Scenario, name: str, needle: str) -> None:
    status, seconds, lines = deployment.refusals[name]
    errors = [ln for ln in lines if ln.startswith("veil: error:")]
    assert status not in (0, None) and seconds < 90, (status, seconds)
    assert len(errors) == 1 and needle in errors[0], lines[-10:]


@pytest.mark.slow
def test_modified_client_app_is_refused_by_every_node(deployment: Scenario) -> None:
    result = deployment.evil_result
    assert result["sent"] == 3 and len(result["replies"]) == 3
    assert all(r["error"] and "refused the app bundle" in r["reason"] and not r["content"] for r in result["replies"])
    assert deployment.evil_ran is not None and not deployment.evil_ran.exists(), "the modified ClientApp ran"
    assert deployment.nodes_alive_after_evil, "a node went down after refusing the modified app"
    for log in deployment.node_logs:
        assert "is not the veil ClientApp installed on this node" in log.read_text()


@pytest.mark.slow
def test_coordinator_runs_only_the_operators_run_config(deployment: Scenario) -> None:
    """A weaker run config submitted by anyone who reaches the Control API, with veil's own app bundle and its own
    output_dir, is refused by the ServerApp before it touches a path or sends a message (review M8); the node-side
    floor is covered by the nodes' own tests."""
    assert deployment.floor_out is not None and not deployment.floor_out.exists(), "a submitted path was used"
    for log in deployment.node_logs:
        assert "below this node's min-noise-multiplier" not in log.read_text(), "the foreign run reached a node"


@pytest.mark.slow
def test_node_data_never_reaches_the_coordinator(deployment: Scenario) -> None:
    run_dir = deployment.run_dir
    stored = [p for p in (run_dir / "state").iterdir() if p.name.startswith("superlink.db")]
    assert any(p.name == "superlink.db" for p in stored)
    files = [*stored, *(run_dir / "logs").iterdir(), run_dir / "run_config.toml", run_dir / "config.resolved.yaml",
             *(deployment.root / "logs").glob("server.log")]
    needles = [str(p) for p in deployment.node_files] + ["secret-records", "zqxsecret", "private-node-"]
    for path in files:
        data = path.read_bytes()
        for needle in needles:
            assert needle.encode() not in data, f"{needle!r} found in {path}"


@pytest.mark.slow
def test_client_refuses_bad_local_files_before_connecting(tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("text,category\nhello,a\n")
    key = tmp_path / "garbage.key"
    key.write_text("not a key\n")
    certs = tmp_path / "certs"
    assert run_veil(["certs", "--out", str(certs), "--nodes", "1"], timeout=60).returncode == 0
    base = ["client", "--superlink", "127.0.0.1:9", "--root-cert", str(certs / "ca.crt"), "--node-dir", str(tmp_path / "n"),
            "--max-epsilon", "8"]
    cases = {
        "does not exist": [*base, "--key", str(certs / "node-1.key"), "--data", str(tmp_path / "missing.csv")],
        "no label column 'label'": [*base, "--key", str(certs / "node-1.key"), "--data", str(data)],
        "is not an OpenSSH private key": [*base, "--key", str(key), "--data", str(data), "--label-column", "category"],
        "--threads=-1 is invalid": [*base, "--key", str(certs / "node-1.key"), "--data", str(data), "--label-column",
                                    "category", "--threads", "-1"],
    }
    for needle, args in cases.items():
        proc = run_veil(args, timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "n" / "supernode.log").exists(), "a SuperNode was started"


def test_node_threads_size_the_executors_torch() -> None:
    """``veil client --threads N``: the executor's torch runs N threads (co-located nodes do not oversubscribe the
    cores); 0 leaves torch's own default (one per core)."""
    import os
    import subprocess
    import sys

    from veil.client.node import executor_env

    probe = [sys.executable, "-c", "import torch; print(torch.get_num_threads())"]
    base = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    default = subprocess.run(probe, env=base, capture_output=True, text=True, timeout=120, check=True).stdout
    one = subprocess.run(probe, env=executor_env(base, 1), capture_output=True, text=True, timeout=120, check=True).stdout
    assert one.strip() == "1", one
    assert int(default) > 1 or (os.cpu_count() or 1) == 1, "torch's default is one per core"
    assert executor_env(base, 0) == base


def test_fab_is_what_flwr_run_builds_from_the_app_dir(tmp_path: Path) -> None:
    import hashlib

    from flwr.cli.build import build_fab_from_disk

    from veil.security.bundle import build_fab, describe_difference, fab_hash, write_app_dir

    app = write_app_dir(tmp_path / "app")
    assert hashlib.sha256(build_fab_from_disk(app)).hexdigest() == fab_hash() == fab_hash(build_fab())
    (app / "extra.py").write_text("print('hi')\n")
    other = build_fab_from_disk(app)
    assert fab_hash(other) != fab_hash() and "carries code files (extra.py)" in describe_difference(other)


def test_floor_checks() -> None:
    from types import SimpleNamespace

    from veil.client.floor import PrivacyFloorError, check_round, check_run
    from veil.errors import PrivacyBudgetExhausted

    owner = SimpleNamespace(max_epsilon=float("inf"), min_noise_multiplier=0.5, max_sample_rate=0.1)
    check_round(owner, noise_multiplier=0.5, sample_rate=0.1)  # at the limits: allowed
    with pytest.raises(PrivacyFloorError, match="min-noise-multiplier"):
        check_round(owner, noise_multiplier=0.49, sample_rate=0.01)
    with pytest.raises(PrivacyBudgetExhausted, match="max-sample-rate"):
        check_round(owner, noise_multiplier=1.0, sample_rate=0.11)
    off = SimpleNamespace(privacy=SimpleNamespace(enabled=False), secagg=SimpleNamespace(enabled=True))
    with pytest.raises(PrivacyFloorError, match="DP-SGD off"):
        check_run(owner, off)
    check_run(SimpleNamespace(max_epsilon=float("inf"), min_noise_multiplier=0.0, max_sample_rate=1.0), off)
    with pytest.raises(PrivacyFloorError):
        check_run(SimpleNamespace(max_epsilon=3.0), off)


def test_node_config_survives_flowers_parser() -> None:
    from flwr.common.config import parse_config_args

    from veil.client.node import node_config_arg

    config = {"data-path": "/data/it's mine/train set.csv", "text-column": "text", "max-epsilon": 3.0,
              "min-noise-multiplier": 0.5, "ledger-path": "/x/ledger.json"}
    assert parse_config_args([node_config_arg(config)]) == config
