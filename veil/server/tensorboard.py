"""TensorBoard event files of a run: one scalar per metric per round, under ``<run dir>/tensorboard``.

Written with ``tensorboardX`` (a small writer without TensorFlow); ``tensorboard --logdir outputs`` or
``--logdir multirun/DATE/TIME`` then shows every run of a sweep side by side. Values are the ones of the
``metrics.jsonl`` row (the record of truth); this file only mirrors them.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger("veil.server")

# metrics.jsonl key -> TensorBoard tag (grouped by the part before the slash)
SCALARS: dict[str, str] = {
    "accuracy": "eval/accuracy",
    "loss": "eval/loss",
    "perplexity": "eval/perplexity",  # task=causal_lm
    "choice_accuracy": "eval/choice_accuracy",  # task=causal_lm with a closed set of completions
    "epsilon_max": "privacy/epsilon_max",
    "upload_bytes_per_client": "cost/upload_bytes_per_client",
    "seconds": "cost/seconds",
    "clients": "federation/clients",
    "refused": "federation/refused",
    "contributed": "federation/contributed",
    # simulation only: what the simulated owners' own ledgers say (a real coordinator never sees these)
    "node_epsilon_max": "simulated_nodes/epsilon_max",
    "node_noise_multiplier_min": "simulated_nodes/noise_multiplier_min",
    "node_sample_rate_max": "simulated_nodes/sample_rate_max",
}


class TensorBoardHook:
    """Mirrors each round's metrics row into an event file; flushed every round so a crash loses nothing."""

    def __init__(self, log_dir: Path) -> None:
        from tensorboardX import SummaryWriter

        self.log_dir = log_dir
        self._writer: Any = SummaryWriter(logdir=str(log_dir), flush_secs=10)

    def write(self, row: dict[str, Any]) -> None:
        step = int(row["round"])
        for key, tag in SCALARS.items():
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._writer.add_scalar(tag, float(value), global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
