"""A node's private settings — its owner's policy: they come from the node's own configuration (Flower node
config, written by ``veil client`` from its flags), never from the run config the coordinator distributes
(DESIGN.md decisions 7 and 12). In simulation, where every node shares one machine, the data is the run's training
file split by partition id and the launcher writes each simulated owner's node config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veil.errors import ConfigError

# Node-config keys (`flower-supernode --node-config "data-path='...' max-epsilon=3"`).
DATA_PATH = "data-path"
DATA_SHA256 = "data-sha256"  # fingerprint of the data file, binds the ledger to the data (veil/privacy/ledger_home.py)
TEXT_COLUMN = "text-column"
LABEL_COLUMN = "label-column"
MAX_EPSILON = "max-epsilon"
NO_BUDGET = "no-budget"  # the owner's explicit choice to run a deployed node without an ε budget
DELTA = "delta"  # the owner's δ; absent: min(1e-5, 1/(10·N)) for this node's N
LEDGER_PATH = "ledger-path"
DEVICE = "device"
MIN_NOISE_MULTIPLIER = "min-noise-multiplier"  # the owner's privacy floor (veil/client/floor.py)
MAX_SAMPLE_RATE = "max-sample-rate"
ALLOW_PLAIN_AGGREGATION = "allow-plain-aggregation"  # answer rounds without SecAgg+ (the server sees the update)
MIN_COHORT = "min-cohort"  # client-level DP or privacy.share_noise: honest contributors counted on in each SecAgg+ sum
ALLOW_CENTRAL_NOISE = "allow-central-noise"  # client-level DP with the noise added by the (trusted) server
MAX_DROPOUTS = "max-dropouts"  # SecAgg+: neighbours that may go missing in a round (0: none; veil/client/secagg_guard.py)
ROSTER_PATH = "roster-path"  # SecAgg+: the owners' roster this node pins (veil/security/roster.py)
SIGNING_KEY_PATH = "signing-key-path"  # SecAgg+: the owner's Ed25519 key that signs this node's round keys
MODEL_PATH = "model-path"  # the only model directory this node loads (absent: the installed default model)
DATA_ROWS = "data-rows"  # rows of the data file when the node started (fixes the default δ and batch once)
DP_ENGINE = "dp-engine"  # the owner's DP engine: auto | hooks | bk (never the run's privacy.grad_sample_mode)
REPLY_AFTER = "reply-after"  # seconds after a training instruction at which the reply leaves (veil/client/reply_time.py)
ALLOW_TEST_MODEL = "allow-test-model"  # tests only: accept runs with model.tiny (a model built in code, not --model)
# Simulation only, set by the launcher for `veil audit` (veil.task.shards.AuditPlan); a deployed node refuses them
PLANTED_EXAMPLES = "planted-examples"  # a JSONL of canary records this simulated owner mixes into its partition
CANARY_CLIENTS = "canary-clients"  # the last N simulated nodes are canary clients: the file is split among the rest
PARTITION_ID = "partition-id"  # set by Flower's simulation engine
NUM_PARTITIONS = "num-partitions"

DEFAULT_DELTA = 1e-5
DELTA_ROWS = 10_000  # the most rows for which DEFAULT_DELTA <= 1/(10·N); a deployed node with more needs --delta
MAX_REPLY_AFTER = 43_200.0  # Flower drops a message after its 12 h lifetime (flwr.app.DEFAULT_TTL)


@dataclass(frozen=True)
class NodeSettings:
    """What only the data owner decides."""

    data_path: str | None  # None in simulation: the run's training file, split by partition id
    text_column: str | None
    label_column: str | None
    max_epsilon: float  # the owner's own budget; inf only with no-budget (or in simulation without one)
    ledger_path: Path
    device: str | None  # None: the run's device setting
    partition_id: int | None
    num_partitions: int | None
    min_noise_multiplier: float = 0.0  # the owner's floor: refuse rounds with less noise (0: no minimum)
    max_sample_rate: float = 1.0  # the owner's cap on the Poisson sampling rate q (1: no cap)
    delta: float | None = None  # None: min(1e-5, 1/(10·N)) once N is known (owner_delta)
    require_secagg: bool = True  # refuse rounds whose update would reach the server unmasked
    min_cohort: int = 1  # client-level DP / shared DP-SGD noise: 1 = this node's own noise alone gives z·S or σ
    allow_central_noise: bool = False
    model_path: str | None = None
    data_sha256: str | None = None
    max_dropouts: int = 0  # SecAgg+ neighbours that may be missing; 0: a drop-out costs the round, not the mask
    roster_path: str | None = None  # None: neighbours' keys are not checked (honest-but-curious coordinator)
    signing_key_path: str | None = None
    start_rows: int | None = None  # rows of the data file at node start (None: counted once by the ClientApp)
    dp_engine: str = "auto"  # the owner's DP engine on a deployed node
    text_only: bool = False  # --label-column '': a text-only file; classification runs are refused (review N7)
    allow_test_model: bool = False  # tests only: model.tiny runs accepted (otherwise refused: review N8)
    reply_after: float = 0.0  # hold each training reply this many seconds after the instruction (0: not held; N6)
    planted_examples: str | None = None  # simulation only: veil audit's canary records (veil/task/shards.py)
    canary_clients: int = 0  # simulation only: veil audit's canary clients, the last nodes, hold no data

    @property
    def simulated(self) -> bool:
        return self.data_path is None

    def owner_delta(self, examples: int) -> float:
        """δ every figure of this node is computed at: the owner's, or min(1e-5, 1/(10·N)). A deployed node passes
        the N of its file at start (``start_rows``), never a count of the examples a run's labels select."""
        if self.delta is not None:
            return self.delta
        return min(DEFAULT_DELTA, 1.0 / (10 * max(examples, 1)))

    @property
    def delta_limit(self) -> float:
        """The largest ``privacy.delta`` a run may ask of this node: the owner's δ, else 1e-5 — a constant, so
        that whether a run's δ is refused never depends on the size of the owner's file."""
        return self.delta if self.delta is not None else DEFAULT_DELTA


def node_settings(node_config: dict[str, Any], *, simulation_root: Path | None = None) -> NodeSettings:
    """Read a node's settings from its Flower node config; ConfigError names the first bad key."""
    partition = node_config.get(PARTITION_ID)
    data_path = node_config.get(DATA_PATH)
    if data_path is None and partition is None:
        raise ConfigError(f"node config has no {DATA_PATH!r}; start the node with --data PATH")
    no_budget = _flag(node_config, NO_BUDGET)
    if MAX_EPSILON not in node_config and data_path is not None and not no_budget:
        raise ConfigError("this node has no privacy budget: start it with --max-epsilon E "
                          "(or --no-budget to train without one, not recommended)")
    max_eps = float(node_config.get(MAX_EPSILON, math.inf))
    if not max_eps > 0:
        raise ConfigError(f"node config {MAX_EPSILON}={max_eps} is invalid: expected a positive number")
    min_sigma = float(node_config.get(MIN_NOISE_MULTIPLIER, 0.0))
    if not 0.0 <= min_sigma < math.inf:
        raise ConfigError(f"node config {MIN_NOISE_MULTIPLIER}={min_sigma} is invalid: expected a number >= 0")
    max_q = float(node_config.get(MAX_SAMPLE_RATE, 1.0))
    if not 0.0 < max_q <= 1.0:
        raise ConfigError(f"node config {MAX_SAMPLE_RATE}={max_q} is invalid: expected a number in (0, 1]")
    delta = None if node_config.get(DELTA) in (None, "") else float(node_config[DELTA])
    if delta is not None and not 0.0 < delta < 1.0:
        raise ConfigError(f"node config {DELTA}={delta} is invalid: expected a number in (0, 1), e.g. 1e-6")
    min_cohort = int(node_config.get(MIN_COHORT, 1))
    if min_cohort < 1:
        raise ConfigError(f"node config {MIN_COHORT}={min_cohort} is invalid: expected an integer >= 1")
    max_dropouts = int(node_config.get(MAX_DROPOUTS, 0))
    if max_dropouts < 0:
        raise ConfigError(f"node config {MAX_DROPOUTS}={max_dropouts} is invalid: expected an integer >= 0")
    roster, signing_key = _opt_str(node_config.get(ROSTER_PATH)), _opt_str(node_config.get(SIGNING_KEY_PATH))
    if (roster is None) != (signing_key is None):
        raise ConfigError("--roster and --signing-key go together: give both (the owners' roster and this owner's "
                          "key from `veil keygen`) or neither")
    engine = str(node_config.get(DP_ENGINE, "auto"))
    if engine not in ("auto", "hooks", "bk"):
        raise ConfigError(f"node config {DP_ENGINE}={engine!r} is invalid: expected auto, hooks or bk")
    reply_after = _reply_after(node_config.get(REPLY_AFTER, 0.0))
    planted, canary_clients = _opt_str(node_config.get(PLANTED_EXAMPLES)), int(node_config.get(CANARY_CLIENTS, 0))
    if data_path is not None and (planted is not None or canary_clients):
        raise ConfigError(f"node config {PLANTED_EXAMPLES} and {CANARY_CLIENTS} are for veil audit's simulated nodes "
                          "only; drop them from this node's config")
    if canary_clients < 0:
        raise ConfigError(f"node config {CANARY_CLIENTS}={canary_clients} is invalid: expected an integer >= 0")
    rows = node_config.get(DATA_ROWS)
    return NodeSettings(
        data_path=None if data_path is None else str(data_path),
        text_column=_opt_str(node_config.get(TEXT_COLUMN)),
        label_column=_opt_str(node_config.get(LABEL_COLUMN)),
        max_epsilon=max_eps,
        ledger_path=_ledger_path(node_config, partition, simulation_root),
        device=_opt_str(node_config.get(DEVICE)),
        partition_id=None if partition is None else int(partition),
        num_partitions=None if node_config.get(NUM_PARTITIONS) is None else int(node_config[NUM_PARTITIONS]),
        min_noise_multiplier=min_sigma,
        max_sample_rate=max_q,
        delta=delta,
        require_secagg=not _flag(node_config, ALLOW_PLAIN_AGGREGATION),
        min_cohort=min_cohort,
        allow_central_noise=_flag(node_config, ALLOW_CENTRAL_NOISE),
        model_path=_opt_str(node_config.get(MODEL_PATH)),
        data_sha256=_opt_str(node_config.get(DATA_SHA256)),
        max_dropouts=max_dropouts,
        roster_path=roster,
        signing_key_path=signing_key,
        start_rows=None if rows in (None, "") else int(rows),
        dp_engine=engine,
        text_only=node_config.get(LABEL_COLUMN) == "",
        allow_test_model=_flag(node_config, ALLOW_TEST_MODEL),
        reply_after=reply_after,
        planted_examples=planted,
        canary_clients=canary_clients,
    )


def _reply_after(value: Any) -> float:
    """The owner's reply hold in seconds: a finite number in [0, 12 h] (ConfigError otherwise, one line)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not 0.0 <= seconds <= MAX_REPLY_AFTER:
        raise ConfigError(f"--reply-after {value} is invalid: give the seconds after each training instruction at "
                          f"which this node replies, from 0 (not held) to {MAX_REPLY_AFTER:.0f} (Flower's message "
                          "lifetime), above the slowest round's time")
    return seconds


def _ledger_path(node_config: dict[str, Any], partition: Any, simulation_root: Path | None) -> Path:
    """The owner's ledger: given; a simulated owner's under the run; else keyed to the owner's node (its data file's
    path, :func:`veil.privacy.ledger_home.node_key`) in the per-user state directory (never relative to the working
    directory)."""
    if LEDGER_PATH in node_config:
        return Path(str(node_config[LEDGER_PATH])).expanduser()
    if partition is not None and simulation_root is not None:
        return simulation_root / f"node-{int(partition)}" / "privacy_ledger.json"
    if node_config.get(DATA_PATH) is None:
        raise ConfigError(f"node config has neither {LEDGER_PATH!r} nor {DATA_PATH!r}; start the node with veil client")
    from veil.privacy.ledger_home import default_ledger_path, node_key

    return default_ledger_path(node_key(Path(str(node_config[DATA_PATH]))))  # the node's, not the bytes' (M4)


def _flag(node_config: dict[str, Any], key: str) -> bool:
    value = node_config.get(key, False)
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def _opt_str(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)
