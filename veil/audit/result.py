"""What one audit finds and writes: the result, the scores it may use, the ε the run claims, audit.json/audit.md.

Shared by the three kinds of canary (:mod:`veil.audit.records`, :mod:`veil.audit.gradient`,
:mod:`veil.audit.clients`); it imports none of them, so the audit has no import circle.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veil.atomic import atomic_write

REFERENCE = "Steinke, Nasr, Jagielski, Privacy Auditing with One (1) Training Run, NeurIPS 2023 (arXiv:2305.08846)"
SCORES = {"gradient-canary": "white-box, gradient canaries: the published model's change at each canary's coordinate, the sum "
                  "over rounds of the aggregate updates (higher: guessed in)",
          "loss": "black-box: the final model's loss on each canary (lower: guessed in)",
          "gradient": "white-box: each round's global update against the canary's gradient direction (higher: guessed in)",
          "direction": "white-box, canary clients: the published model's change against each canary client's "
                       "direction (higher: guessed in)"}
# Earlier spellings the CLI still accepts: "grad" named the gradient-canary score on main from 9582a77 (2026-12-07,
# never in a release; benchmark records and issue 26 use it), one letter-run away from the unrelated "gradient"
OLD_SPELLINGS = {"grad": "gradient-canary"}
LEVEL_SCORES = {"sample": ("gradient-canary", "loss", "gradient"), "client": ("direction",)}  # the scores of each unit of privacy


def score_name(value: str) -> str:
    """``--score``'s value in its current spelling (argparse ``type``: the choices are then checked)."""
    return OLD_SPELLINGS.get(value, value)


@dataclass(frozen=True)
class AuditResult:
    claimed_epsilon: float
    delta: float
    lower_bound: float
    confidence: float
    canaries: int
    included: int
    guesses: int
    correct: int
    score: str
    privacy: str
    unit: str = "record"  # what a canary is: a record (sample level) or a client (client level)

    @property
    def verdict(self) -> str:
        return "consistent" if self.lower_bound <= self.claimed_epsilon else "VIOLATION"

    def to_json(self) -> dict[str, Any]:
        doc = {**dataclasses.asdict(self), "verdict": self.verdict, "reference": REFERENCE}
        doc["claimed_epsilon"] = None if math.isinf(self.claimed_epsilon) else self.claimed_epsilon  # JSON has no ∞
        return doc

    def lines(self) -> list[str]:
        claimed = ("∞ (DP off)" if math.isinf(self.claimed_epsilon)
                   else f"{self.claimed_epsilon:.3f} (delta {self.delta:g}, {self.privacy})")
        return [
            f"claimed epsilon {claimed}",
            f"empirical lower bound {self.lower_bound:.3f} at {self.confidence:.0%} confidence",
            f"canary {self.unit}s {self.canaries} ({self.included} included), guesses {self.guesses}, "
            f"right {self.correct}",
            f"score {self.score}",
            f"verdict {self.verdict}",
        ]


def claimed_epsilon(cfg: Any, out_dir: Path) -> float:
    """The ε the simulated nodes' ledgers book for this run at the run's δ (the largest over nodes); ∞ without DP."""
    from veil.client.settings import PARTITION_ID, node_settings
    from veil.privacy.ledger import PrivacyLedger

    if not cfg.privacy.enabled:
        return math.inf
    worst = 0.0
    for partition in range(cfg.federation.num_clients):
        path = node_settings({PARTITION_ID: partition}, simulation_root=out_dir / "nodes").ledger_path
        if path.exists():
            ledger = PrivacyLedger.open(path, create=False)
            worst = max(worst, ledger.epsilon(delta=cfg.privacy.delta, accountant=cfg.privacy.accountant).epsilon)
    return worst


def write_outputs(out_dir: Path, audit: AuditResult, rows: list[dict[str, Any]]) -> None:
    """audit.json, audit.md, and ``rows`` (one per canary: its truth and score) as audit/canaries.jsonl."""
    (out_dir / "audit").mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "audit" / "canaries.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    claimed = "∞ (no DP)" if math.isinf(audit.claimed_epsilon) else f"{audit.claimed_epsilon:.3f}"
    md = ["# Privacy audit (one run)", "", "| | |", "|---|---|",
          f"| claimed ε (δ = {audit.delta:g}) | {claimed} ({audit.privacy}) |",
          f"| empirical lower bound on ε | {audit.lower_bound:.3f} at {audit.confidence:.0%} confidence |",
          f"| canary {audit.unit}s (included) | {audit.canaries} ({audit.included}) |",
          f"| guesses (right) | {audit.guesses} ({audit.correct}) |",
          f"| score | {audit.score} |", f"| verdict | **{audit.verdict}** |", "",
          "A lower bound from one attack: above the claimed ε it shows a bug; below it, it proves nothing about",
          "privacy (docs/privacy.md, \"The empirical audit\").", "", f"Method: {REFERENCE}.", ""]
    atomic_write(out_dir / "audit.md", "\n".join(md))
    atomic_write(out_dir / "audit.json", json.dumps(audit.to_json(), indent=2) + "\n")
