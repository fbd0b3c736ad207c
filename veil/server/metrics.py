"""Per-round records: one JSON line per round in ``metrics.jsonl`` and one console line."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from veil.atomic import atomic_write

log = logging.getLogger("veil.server")


class MetricsLog:
    """Appends one JSON object per round to ``<run dir>/metrics.jsonl`` (flushed and fsynced)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, row: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean, sort_keys=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def truncate_after(self, round: int) -> None:
        """Drop rows of rounds after ``round`` (a round in flight when the server died), atomically."""
        keep = [r for r in self.rows() if int(r["round"]) <= round]
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]


def console_line(row: dict[str, Any], rounds: int) -> str:
    """``round 2/3 | acc 0.4120 | loss 2.9810 | eps max 1.23 | up 401.2 kB/client | 41.2 s | clients 5 (1 refused)``

    ``eps max`` is the coordinator's ε figure (veil.server.guarantee); ``n/a`` when only each owner's ledger knows.
    """
    eps = row.get("epsilon_max")
    eps_text = f"{eps:.3f}" if isinstance(eps, (int, float)) and math.isfinite(eps) else "n/a (see the nodes' ledgers)"
    refused = int(row.get("refused") or 0)
    return (
        f"round {row['round']}/{rounds} | acc {row['accuracy']:.4f} | loss {row['loss']:.4f} | "
        + (f"ppl {row['perplexity']:.2f} | " if "perplexity" in row else "")
        + (f"choice {row['choice_accuracy']:.4f} | " if "choice_accuracy" in row else "")
        + f"eps max {eps_text} | up {row['upload_bytes_per_client'] / 1e3:.1f} kB/client | "
        f"{row['seconds']:.1f} s | clients {row['clients']}" + (f" ({refused} refused)" if refused else "")
        + (" | secagg" if row.get("secagg") else "")
    )


_BASIS_NOTE = {  # veil.server.guarantee bases
    "simulated_ledgers": "largest over the simulated owners' ledgers",
    "target": "bound after all planned rounds",
    "fixed_sigma": "bound at the run's sampling rate (q = 1 when it states none)",
    "client_level": "client level, realised contributors, q=1",
    "shared_noise": "the sum's shared noise, at least M honest owners a round; own ledgers hold each owner's bound",
}


def summary_epsilon(summary: dict[str, Any], *, delta: float) -> str:
    """The final line's privacy part: ``epsilon 3.955 (delta 1e-05; largest over the simulated owners' ledgers)``."""
    basis, eps = summary.get("epsilon_basis", ""), summary.get("epsilon_max")
    if basis == "none":
        return "no DP"
    if not isinstance(eps, (int, float)) or not math.isfinite(eps):
        return "epsilon: see each node's ledger (veil privacy report)"
    note = _BASIS_NOTE.get(basis, "")
    return f"epsilon {eps:.3f} (delta {delta:g}{'; ' + note if note else ''})"
