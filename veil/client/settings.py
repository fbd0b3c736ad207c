"""A node's private settings: they come from the node's own configuration (Flower node config), never from the
run config the coordinator distributes (DESIGN.md decision 7). In simulation, where every node shares one
machine, the data is the run's training file split by partition id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veil.errors import ConfigError

# Node-config keys (`flower-supernode --node-config "data-path='...' max-epsilon=3"`).
DATA_PATH = "data-path"
TEXT_COLUMN = "text-column"
LABEL_COLUMN = "label-column"
MAX_EPSILON = "max-epsilon"
LEDGER_PATH = "ledger-path"
DEVICE = "device"
MIN_NOISE_MULTIPLIER = "min-noise-multiplier"  # the owner's privacy floor (veil/client/floor.py)
MAX_SAMPLE_RATE = "max-sample-rate"
PARTITION_ID = "partition-id"  # set by Flower's simulation engine
NUM_PARTITIONS = "num-partitions"


@dataclass(frozen=True)
class NodeSettings:
    """What only the data owner decides."""

    data_path: str | None  # None in simulation: the run's training file, split by partition id
    text_column: str | None
    label_column: str | None
    max_epsilon: float  # the owner's own budget; inf when not set
    ledger_path: Path
    device: str | None  # None: the run's device setting
    partition_id: int | None
    num_partitions: int | None
    min_noise_multiplier: float = 0.0  # the owner's floor: refuse rounds with less noise (0: no minimum)
    max_sample_rate: float = 1.0  # the owner's cap on the Poisson sampling rate q (1: no cap)

    @property
    def simulated(self) -> bool:
        return self.data_path is None


def node_settings(node_config: dict[str, Any], *, simulation_root: Path | None = None) -> NodeSettings:
    """Read a node's settings from its Flower node config."""
    partition = node_config.get(PARTITION_ID)
    data_path = node_config.get(DATA_PATH)
    if data_path is None and partition is None:
        raise ConfigError(f"node config has no {DATA_PATH!r}; start the node with --data PATH")
    max_eps = float(node_config.get(MAX_EPSILON, math.inf))
    if not max_eps > 0:
        raise ConfigError(f"node config {MAX_EPSILON}={max_eps} is invalid: expected a positive number")
    min_sigma = float(node_config.get(MIN_NOISE_MULTIPLIER, 0.0))
    if not 0.0 <= min_sigma < math.inf:
        raise ConfigError(f"node config {MIN_NOISE_MULTIPLIER}={min_sigma} is invalid: expected a number >= 0")
    max_q = float(node_config.get(MAX_SAMPLE_RATE, 1.0))
    if not 0.0 < max_q <= 1.0:
        raise ConfigError(f"node config {MAX_SAMPLE_RATE}={max_q} is invalid: expected a number in (0, 1]")
    if LEDGER_PATH in node_config:
        ledger = Path(str(node_config[LEDGER_PATH])).expanduser()
    elif partition is not None and simulation_root is not None:
        ledger = simulation_root / f"node-{int(partition)}" / "privacy_ledger.json"
    else:
        ledger = Path("veil-node") / "privacy_ledger.json"  # under the node's working directory
    return NodeSettings(
        data_path=None if data_path is None else str(data_path),
        text_column=_opt_str(node_config.get(TEXT_COLUMN)),
        label_column=_opt_str(node_config.get(LABEL_COLUMN)),
        max_epsilon=max_eps,
        ledger_path=ledger,
        device=_opt_str(node_config.get(DEVICE)),
        partition_id=None if partition is None else int(partition),
        num_partitions=None if node_config.get(NUM_PARTITIONS) is None else int(node_config[NUM_PARTITIONS]),
        min_noise_multiplier=min_sigma,
        max_sample_rate=max_q,
    )


def _opt_str(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)
