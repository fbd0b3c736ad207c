"""``veil client``: a data owner's node — a Flower SuperNode next to its private data, running only veil's code.

Steps: (1) check the data file (exists, parses, has the columns) and the credentials (CA certificate, node key)
before anything connects; (2) start the node's executor (:mod:`veil.client.executor`), which runs only the ClientApp
of the installed veil, and wait until it has loaded it; (3) only then start ``flower-supernode --isolation process``
(a connected node can be sampled at once), whose node config carries the owner's private settings (data path,
columns, ε budget, privacy floor, ledger, device: they never go into a run config);
(4) watch both: a refusal by the SuperLink (unregistered key, another CA, plaintext against TLS) ends the node with
one line and a non-zero exit instead of endless retries; Ctrl-C or either process ending stops both.

Over 300 lines: the ``veil client`` command (its flags, the pre-flight, supervision of the SuperNode and the
executor, the one-line diagnosis of a refused connection); the round's work is in :mod:`veil.client.app`.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable, Sized
from pathlib import Path

from veil.client.executor import READY
from veil.flower.patches import DEFAULT_POLL_INTERVAL
from veil.flower.sessions import ACTIVATION_WINDOW
from veil.errors import ConfigError, VeilError
from veil.supervise import Supervised, flower_env, free_port, stop_on_signals

EXECUTOR_START_SECONDS = 600.0  # loading torch and veil: ~4 s on an idle 2-core machine, minutes when it swaps
INSECURE_WARNING = ("WARNING: --insecure: this node talks PLAINTEXT to the SuperLink without authentication; "
                    "anyone on the network can read its model updates or impersonate the server. Tests only.")


NO_BUDGET_WARNING = ("WARNING: --no-budget: this node has no privacy budget; every run it joins adds to its "
                     "owner's epsilon without limit (see `veil privacy report`).")


class NodeError(VeilError):
    """The SuperNode was refused by the SuperLink, or stopped."""


# Substrings of flower-supernode's output -> (what happened, how to fix it). First match wins.
_REFUSALS = [
    ("CERTIFICATE_VERIFY_FAILED", "the SuperLink's TLS certificate is not signed by the CA in {root_cert}",
     "get the deployment's ca.crt from the operator"),
    ("[code: 2004]", "the SuperLink refused this node's key {key} for {window:.0f} s (not registered, revoked, or "
     "held by another node process that is still running)",
     "stop any other node using this key, or ask the operator to register {key_pub} (a revoked key cannot come back: "
     "use a new one from `veil certs`)"),
    ("Server disconnected without sending a response", "the SuperLink did not answer a plaintext node (it speaks TLS)",
     "drop --insecure and give --root-cert and --key"),
    ("WRONG_VERSION_NUMBER", "the SuperLink does not speak TLS (it was started with --insecure)",
     "ask the operator to start it with TLS, or check --superlink"),
    ("Unable to parse the private key", "Flower cannot read the node key {key}", "create one with `veil certs`"),
    ("Giving up reconnection", "no SuperLink answered at the address given",
     "check --superlink (host and port), that the server runs, and the firewall"),
]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the coordinator's address")
    parser.add_argument("--root-cert", type=Path, help="the deployment's CA certificate (ca.crt)")
    parser.add_argument("--key", type=Path, help="this node's private key (node-<i>.key from `veil certs`)")
    parser.add_argument("--data", type=Path, required=True, help="this node's private CSV/TSV/JSONL training file")
    parser.add_argument("--text-column", default="text",
                        help="text column of --data (default: text); in task=causal_lm runs the prompt column, or "
                             "the only column of a text-only file")
    parser.add_argument("--label-column", default="label",
                        help="label column of --data (default: label); in task=causal_lm runs the completion column; "
                             "'' for a text-only file (causal-LM runs only, every token learned)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--max-epsilon", type=float, help="the owner's ε budget over all runs (required)")
    budget.add_argument("--no-budget", action="store_true",
                        help="train without an ε budget (not recommended; warned at every start)")
    parser.add_argument("--delta", type=float, default=None,
                        help="the owner's δ for every ε figure; runs asking for more are refused (default: "
                             "1e-5, a constant so that no ε reads the data's size; a --data file of more than "
                             "10,000 rows needs --delta)")
    parser.add_argument("--min-noise-multiplier", type=float, default=0.0,
                        help="the least noise σ this node trains with: a run asking for less gets this much")
    parser.add_argument("--max-sample-rate", type=float, default=1.0,
                        help="caps the run's Poisson sampling rate federation.sample_rate, or sets q for a run "
                             "without one (default 1: no cap; a DP-SGD run then needs federation.sample_rate)")
    parser.add_argument("--dp-engine", choices=("auto", "hooks", "bk"), default="auto",
                        help="per-sample clipping engine (default auto: hooks for adapters, bk for full "
                             "fine-tuning); the run's privacy.grad_sample_mode is never used on a node")
    parser.add_argument("--reply-after", type=float, default=0.0, metavar="SECONDS",
                        help="hold every training reply until SECONDS after its instruction arrived, so that its "
                             "arrival time does not tell the coordinator how large your data is (default 0: not "
                             "held); set it above your slowest round's time, below the run's secagg.timeout")
    parser.add_argument("--allow-test-model", action="store_true",
                        help="tests only: accept runs with model.tiny (a small model built in code instead of "
                             "--model); without it such runs are refused")
    parser.add_argument("--allow-plain-aggregation", action="store_true",
                        help="also answer rounds without SecAgg+ (the coordinator then sees this node's update)")
    parser.add_argument("--min-cohort", type=int, default=1,
                        help="honest contributors counted on in each SecAgg+ sum, for client-level DP (this node's "
                             "noise share is z·S/sqrt(M)) and runs with privacy.share_noise (its DP-SGD noise is "
                             "σ/sqrt(M)); its ledger books its own share alone (default 1: its own noise suffices)")
    parser.add_argument("--allow-central-noise", action="store_true",
                        help="accept client-level DP runs whose noise the server adds (trusts the server)")
    parser.add_argument("--max-dropouts", type=int, default=0, metavar="K",
                        help="SecAgg+: neighbours that may go missing in a round (default 0: a round with a missing "
                             "neighbour is refused, so the coordinator can never unmask this node against fewer "
                             "neighbours than it announced)")
    parser.add_argument("--roster", type=Path, default=None,
                        help="SecAgg+: the owners' roster (their `veil keygen` .pub lines); neighbours' round keys "
                             "must be signed by distinct owners in it (needs --signing-key)")
    parser.add_argument("--signing-key", type=Path, default=None,
                        help="SecAgg+: this owner's signing key from `veil keygen` (its .pub must be in --roster)")
    parser.add_argument("--model", type=Path, default=None,
                        help="the only model directory this node loads (default: the model installed with veil)")
    parser.add_argument("--ledger", type=Path,
                        help="privacy ledger file (default: this node's, keyed by the data file's path under "
                             "$XDG_STATE_HOME/veil/ledgers; a file that grows keeps its ledger)")
    parser.add_argument("--new-ledger", action="store_true",
                        help="start a fresh ledger although this node or data already has one (its budget starts "
                             "again; the old ledger is kept, renamed)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="training device (default: the run's)")
    parser.add_argument("--node-dir", type=Path, default=Path("veil-node"), help="logs and ledger (default: ./veil-node)")
    parser.add_argument("--runtime-port", type=int, default=0, help="local Runtime API port on 127.0.0.1 (0: any free)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for training (default 0: torch's own, one per core); give each node its "
                             "share when several nodes run on one machine, or they slow each other down")
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL,
                        help=f"seconds between the node's pulls for work (default {DEFAULT_POLL_INTERVAL}; "
                             "Flower's own: 3)")
    parser.add_argument("--max-retries", type=int, default=5, help="reconnection attempts before giving up (0: no limit)")
    parser.add_argument("--max-wait-time", type=float, default=60.0,
                        help="seconds of reconnecting before giving up (0: no limit; a plaintext/TLS mismatch then "
                             "retries for ever)")
    parser.add_argument("--insecure", action="store_true", help="plaintext, no node authentication (tests only)")


def preflight(args: argparse.Namespace) -> None:
    """Check data, settings and credentials; raises a VeilError naming the first problem."""
    from veil.privacy.opacus_compat import require_tested_opacus

    require_tested_opacus()  # the node's DP engines use Opacus internals: an untested Opacus is refused at start
    from veil.client.settings import DEFAULT_DELTA, DELTA_ROWS, node_settings
    from veil.conf.schema import DataConfig
    from veil.security.credentials import check_ca_certificate, check_node_private_key
    from veil.task.data import read_examples, read_rows

    from veil.privacy.ledger_home import bind_ledger, data_fingerprint

    data = DataConfig(text_column=args.text_column, label_column=args.label_column)
    examples: Sized
    if args.label_column == "":  # a text-only file (--label-column ''): task=causal_lm runs only
        examples = read_rows(args.data, data)
        if not examples or args.text_column not in examples[0]:
            columns = ", ".join(sorted(examples[0])) if examples else "none"
            raise ConfigError(f"data file {args.data} has no text column {args.text_column!r} (columns: {columns}); "
                              "set --text-column")
    else:
        examples = read_examples(args.data, data)  # one line naming a missing column or an empty field
    if args.model is not None and not (args.model / "config.json").is_file():
        raise ConfigError(f"--model {args.model} is not a Hugging Face model directory (no config.json); "
                          "give the directory holding config.json and the weights")
    if args.model is not None:  # one line for a model no task can train; the run's task is checked at its first round
        from veil.task.model_check import check_model_dir

        check_model_dir(args.model)
    if not args.poll_interval > 0:
        raise ConfigError(f"--poll-interval={args.poll_interval} is invalid; give the seconds between polls (> 0)")
    if args.threads < 0:
        raise ConfigError(f"--threads={args.threads} is invalid; give a number of CPU threads (0: one per core)")
    _check_roster(args)
    if args.delta is None and len(examples) > DELTA_ROWS:  # the default δ is a constant, so no ε reads N
        raise ConfigError(f"--data has {len(examples)} rows: the default delta {DEFAULT_DELTA:g} is not below "
                          f"1/(10·N) for so many; give --delta D with D <= {1 / (10 * len(examples)):.1e}")
    args.data_sha256 = data_fingerprint(args.data)
    settings = node_settings(_node_config(args))  # ranges of the owner's limits
    bind_ledger(settings.ledger_path, args.data_sha256, new_ledger=args.new_ledger)
    args.data_rows = len(examples)  # fixed at start: the expected batch q·N never moves with a run
    args.owner_delta = settings.owner_delta(len(examples))
    if args.insecure:
        if args.key is not None:
            raise ConfigError("--insecure cannot be combined with --key: node authentication needs TLS")
        return
    if args.root_cert is None or args.key is None:
        raise ConfigError("TLS is on by default: give --root-cert ca.crt and --key node-<i>.key (from `veil certs`)")
    check_ca_certificate(args.root_cert)
    check_node_private_key(args.key)


def _check_roster(args: argparse.Namespace) -> None:
    """--roster and --signing-key: both or neither, both readable, the owner's key in the roster."""
    from veil.security.roster import load_roster, load_signing_key, raw_public

    if args.max_dropouts < 0:
        raise ConfigError(f"--max-dropouts={args.max_dropouts} is invalid; give how many neighbours may go missing "
                          "(>= 0)")
    if (args.roster is None) != (args.signing_key is None):
        raise ConfigError("--roster and --signing-key go together: give the owners' roster and your key from "
                          "`veil keygen`, or neither")
    if args.roster is not None:
        roster = load_roster(args.roster.expanduser().resolve())
        if raw_public(load_signing_key(args.signing_key.expanduser().resolve())) not in roster.members:
            raise ConfigError(f"your signing key {args.signing_key} is not in the roster {args.roster}; add your "
                              ".pub line to it (every owner's copy)")


def _node_config(args: argparse.Namespace) -> dict[str, object]:
    from veil.privacy.ledger_home import default_ledger_path, node_key

    fingerprint = getattr(args, "data_sha256", None)
    config: dict[str, object] = {
        "data-path": str(args.data.expanduser().resolve()), "text-column": args.text_column,
        "label-column": args.label_column, "min-noise-multiplier": float(args.min_noise_multiplier),
        "max-sample-rate": float(args.max_sample_rate), "min-cohort": int(args.min_cohort),
        "allow-plain-aggregation": bool(args.allow_plain_aggregation),
        "allow-central-noise": bool(args.allow_central_noise), "no-budget": bool(args.no_budget),
        "max-dropouts": int(getattr(args, "max_dropouts", 0)),
        "dp-engine": str(getattr(args, "dp_engine", "auto")),
        "allow-test-model": bool(getattr(args, "allow_test_model", False)),
        "reply-after": float(getattr(args, "reply_after", 0.0)),
    }
    for key, path in (("roster-path", getattr(args, "roster", None)),
                      ("signing-key-path", getattr(args, "signing_key", None))):
        if path is not None:
            config[key] = str(path.expanduser().resolve())
    if getattr(args, "data_rows", None):
        config["data-rows"] = int(args.data_rows)
    if fingerprint:
        config["data-sha256"] = fingerprint
        config["ledger-path"] = str((args.ledger or default_ledger_path(node_key(args.data))).expanduser().resolve())
    elif args.ledger:
        config["ledger-path"] = str(args.ledger.expanduser().resolve())
    if args.max_epsilon is not None:
        config["max-epsilon"] = float(args.max_epsilon)
    if args.delta is not None:
        config["delta"] = float(args.delta)
    if args.model is not None:
        config["model-path"] = str(args.model.expanduser().resolve())
    if args.device:
        config["device"] = args.device
    return config


def node_config_arg(config: dict[str, object]) -> str:
    """``--node-config`` text: space-separated ``key=value`` with TOML-quoted strings (Flower's parser)."""
    parts = []
    for key, value in config.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, str):
            if "'" not in value:
                value = f"'{value}'"
            elif '"' not in value and "\\" not in value:
                value = f'"{value}"'
            else:
                raise ConfigError(f"node setting {key}={value!r} contains both quote kinds; rename the file")
        parts.append(f"{key}={value}")
    return " ".join(parts)


def executor_env(env: dict[str, str], threads: int) -> dict[str, str]:
    """The executor's environment: with ``threads`` > 0, torch's and the BLAS libraries' thread pools at that size
    (read once, when torch loads). Three nodes of 2 threads each on a 2-core machine trained in oversubscribed OpenMP
    threads, and a deployed round took about a quarter longer than with one thread each (benchmark deploy_overhead,
    ``--node-threads``; docs/benchmarks.md)."""
    if threads <= 0:
        return env
    return {**env, **{name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}


def _supernode_argv(args: argparse.Namespace, runtime_port: int) -> list[str]:
    # Flower's own flower-supernode, run through veil's one Flower patch: it polls every --poll-interval s, not 3 s
    argv = [sys.executable, "-m", "veil.flower.patches", "--poll-interval", str(args.poll_interval), "--",
            "--superlink", args.superlink, "--isolation", "process",
            "--host", "127.0.0.1", "--port", str(runtime_port), "--node-config", node_config_arg(_node_config(args))]
    if args.max_retries > 0:
        argv += ["--max-retries", str(args.max_retries)]
    if args.max_wait_time > 0:
        argv += ["--max-wait-time", str(args.max_wait_time)]
    if args.insecure:
        return [*argv, "--insecure"]
    return [*argv, "--root-certificates", str(args.root_cert.resolve()),
            "--auth-supernode-private-key", str(args.key.resolve())]


class _Watch:
    """Remembers the most specific refusal seen in the SuperNode's output and echoes errors to the console."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.refusal, self.rank, self.last_error = args, None, len(_REFUSALS), ""
        self.activation_refused = False  # veil.flower.sessions' retry warning: the SuperLink said 2004 at least once

    def final_refusal(self) -> str | None:
        """The refusal to report when the SuperNode ended: a refused activation outranks the reconnection give-up
        that may follow it while the node retries (a node still retrying is not stopped early on the warning)."""
        if self.activation_refused and self.rank > 1:
            self._match(_REFUSALS[1][0])
        if self.rank == len(_REFUSALS) - 1 and getattr(self.args, "insecure", False) and _speaks_tls(self.args.superlink):
            self._match(_REFUSALS[2][0])  # Flower's words for a plaintext node at a TLS port vary with timing
        return self.refusal

    def __call__(self, line: str) -> None:
        if "refused to activate this node" in line:
            self.activation_refused = True
        self._match(line)
        if "SuperNode ID" in line or "ERROR" in line:
            print(f"[supernode] {line.split(':', 1)[-1].strip()}", file=sys.stderr, flush=True)
        if "ERROR" in line or "rror" in line:
            self.last_error = line.strip()[-200:]

    def _match(self, line: str) -> None:
        for rank, (needle, what, fix) in enumerate(_REFUSALS[: self.rank]):
            if needle in line:
                fields = {"root_cert": self.args.root_cert, "key": self.args.key, "window": ACTIVATION_WINDOW,
                          "key_pub": self.args.key and self.args.key.with_suffix(".pub").name}
                self.refusal, self.rank = f"{what.format(**fields)}; {fix.format(**fields)}", rank
                break


def run(args: argparse.Namespace) -> int:
    preflight(args)  # (1) a refused start stays one line: the warning comes once the checks pass
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    if args.no_budget:
        print(NO_BUDGET_WARNING, file=sys.stderr, flush=True)
    print(f"node policy: delta {args.owner_delta:g}, ledger {_node_config(args)['ledger-path']}, secure aggregation "
          f"{'optional' if args.allow_plain_aggregation else 'required'} (drop-outs tolerated: {args.max_dropouts}, "
          f"neighbour keys {'pinned to ' + str(args.roster) if args.roster else 'not authenticated'}), "
          f"{_reply_policy(args.reply_after)}, {_budget_policy(args)}", file=sys.stderr, flush=True)
    stop_on_signals()
    node_dir = args.node_dir.expanduser().resolve()
    runtime_port = args.runtime_port or free_port()
    env = flower_env(flwr_home=node_dir / "flwr-home")
    watch = _Watch(args)
    executor: Supervised | None = None
    supernode: Supervised | None = None
    try:
        ready = threading.Event()
        executor = Supervised(  # (2)
            "executor", [sys.executable, "-m", "veil.client.executor", "--runtime-api-address",
                         f"127.0.0.1:{runtime_port}"],
            log_path=node_dir / "executor.log", env=executor_env(env, args.threads), cwd=node_dir,
            on_line=_executor_output(ready))
        _wait_ready(executor, ready)
        supernode = Supervised("supernode", _supernode_argv(args, runtime_port), log_path=node_dir / "supernode.log",
                               env=env, on_line=watch, cwd=node_dir)  # (3)
        return _watch_until_end(supernode, executor, watch, args.superlink)  # (4)
    finally:
        for proc in (executor, supernode):
            if proc is not None:
                proc.stop()


def _executor_output(ready: threading.Event) -> Callable[[str], None]:
    """The executor's line handler: each line to the node's stderr (httpx's request lines aside), and ``ready`` set
    at the executor's :data:`~veil.client.executor.READY` line."""

    def on_line(line: str) -> None:
        if READY in line:
            ready.set()
        if "httpx" not in line:
            print(line, file=sys.stderr, flush=True)

    return on_line


def _wait_ready(executor: Supervised, ready: threading.Event, timeout: float = EXECUTOR_START_SECONDS) -> None:
    """Wait until the executor has loaded the ClientApp (:func:`veil.client.executor.preload`): only then does the
    SuperNode connect, so a node is never sampled for a round it cannot answer in time."""
    deadline = time.monotonic() + timeout
    while not ready.wait(0.2):
        if executor.poll() is not None:
            executor.wait_output()
            raise NodeError(f"the node's executor stopped while loading veil (status {executor.poll()}); "
                            f"see {executor.log_path}")
        if time.monotonic() > deadline:
            raise NodeError(f"the node's executor did not load veil within {timeout:.0f} s; see {executor.log_path} "
                            "(a machine this busy misses SecAgg+ stage deadlines: free some CPU and start again)")


def _budget_policy(args: argparse.Namespace) -> str:
    """Where the ledger's q and δ come from: public numbers only, so the budget bit and refusal read no data."""
    rate = (f"the run's federation.sample_rate capped at {args.max_sample_rate:g}" if args.max_sample_rate < 1.0
            else "the run's federation.sample_rate (a DP-SGD run without one is refused; --max-sample-rate Q caps it)")
    delta = "the owner's" if args.delta is not None else "the default"
    return f"sampling rate {rate}, {delta} delta (the budget bit reads no data)"


def _reply_policy(reply_after: float) -> str:
    if reply_after > 0:
        return f"training replies held to {reply_after:g} s after each instruction"
    return ("training replies not held (their arrival time grows with the size of --data; "
            "--reply-after SECONDS hides it)")


def _speaks_tls(superlink: str, timeout: float = 5.0) -> bool:
    """Whether ``host:port`` completes a TLS handshake (no certificate check: only the protocol is asked). Used to
    name the cause when a plaintext node gave up reconnecting: gRPC reports a TLS port to a plaintext client as a
    dropped connection or as a timeout, depending on the server's load."""
    import socket
    import ssl

    host, _, port = superlink.rpartition(":")
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host.strip("[]") or None):
                return True
    except (OSError, ValueError):
        return False


def _watch_until_end(supernode: Supervised, executor: Supervised, watch: _Watch, superlink: str) -> int:
    refused_at = None
    while True:
        status = supernode.poll()
        if watch.refusal is not None and refused_at is None:
            refused_at = time.monotonic()
        if status is not None or (refused_at is not None and time.monotonic() - refused_at > 5.0):
            supernode.wait_output()
            if watch.final_refusal() is not None:
                raise NodeError(f"refused by the SuperLink at {superlink}: {watch.refusal}")
            if status == 0:
                return 0
            raise NodeError(f"the SuperNode stopped (status {status}) talking to {superlink}: "
                            f"{watch.last_error or 'no error line'}; see {supernode.log_path}")
        if executor.poll() is not None:
            executor.wait_output()
            raise NodeError(f"the node's executor stopped (status {executor.poll()}); see {executor.log_path}")
        time.sleep(0.3)
