"""``veil privacy report``: what a node's privacy ledger has spent, for its data owner.

Reads the ledger (never creates or changes it), composes every recorded release with the PRV accountant
(Gopi, Lee, Wutschitz arXiv:2106.02848) or RDP (Mironov arXiv:1702.07476; Mironov, Talwar, Zhang
arXiv:1908.10530), and prints ε, δ, the accountant actually used, the remaining budget, and the history, as a
table or as one JSON object (``--json``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

from veil.errors import ConfigError, LedgerError
from veil.privacy.accounting import ACCOUNTANTS, EpsilonResult
from veil.privacy.ledger import LedgerEvent, PrivacyLedger

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``report`` sub-command to the ``veil privacy`` parser."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    report = sub.add_parser("report", help="show the ε a node's ledger has spent and its history")
    report.add_argument("--ledger", required=True, metavar="PATH", help="the node's privacy ledger (JSON file)")
    report.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    report.add_argument("--delta", type=float, default=None, metavar="D",
                        help="δ to account at (default: the smallest δ recorded in the ledger, the most "
                             "conservative; give the owner's own δ)")
    report.add_argument("--max-epsilon", type=float, default=None, metavar="E",
                        help="the owner's ε budget, to show what remains")
    report.add_argument("--accountant", choices=ACCOUNTANTS, default="prv", help="accountant (default: prv)")


def _delta(events: tuple[LedgerEvent, ...], given: float | None, path: str) -> float:
    if given is not None:
        if not 0 < given < 1:
            raise ConfigError(f"--delta must be in (0, 1), got {given!r}")
        return given
    if not events:
        raise LedgerError(f"privacy ledger {path} records no events, so it holds no delta; pass --delta D")
    return min(e.delta for e in events)  # ε grows as δ shrinks: the smallest recorded δ is the conservative one


def _number(x: float) -> float | str:
    """JSON has no inf: write it as the string "inf"."""
    return x if math.isfinite(x) else str(x)


def _summary(ledger: PrivacyLedger, result: EpsilonResult, max_epsilon: float | None) -> dict[str, Any]:
    remaining = None if max_epsilon is None else max(max_epsilon - result.epsilon, 0.0)
    return {
        "ledger": str(ledger.path),
        "epsilon": _number(result.epsilon),
        "delta": result.delta,
        "accountant": result.accountant,
        "max_epsilon": max_epsilon,
        "remaining_epsilon": remaining,
        "total_steps": sum(e.steps for e in ledger.events),
        "events": [
            {"run_id": e.run_id, "round": e.round, "noise_multiplier": e.noise_multiplier,
             "sample_rate": e.sample_rate, "steps": e.steps, "delta": e.delta, "timestamp": e.timestamp}
            for e in ledger.events
        ],
    }


def _table(summary: dict[str, Any]) -> str:
    lines = [
        f"ledger      {summary['ledger']}",
        f"epsilon     {summary['epsilon']:.4f}" if isinstance(summary["epsilon"], float)
        else f"epsilon     {summary['epsilon']}",
        f"delta       {summary['delta']:g}",
        f"accountant  {summary['accountant']}",
    ]
    if summary["max_epsilon"] is not None:
        lines.append(f"budget      {summary['max_epsilon']:g} (remaining {summary['remaining_epsilon']:.4f})")
    lines.append(f"releases    {len(summary['events'])} ({summary['total_steps']} steps)")
    if summary["events"]:
        header = f"{'time (UTC)':<20} {'run_id':<16} {'round':>5} {'sigma':>9} {'q':>9} {'steps':>7} {'delta':>8}"
        lines += ["", header, "-" * len(header)]
        for e in summary["events"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["timestamp"]))
            lines.append(f"{when:<20} {e['run_id'][:16]:<16} {e['round']:>5} {e['noise_multiplier']:>9.4g} "
                         f"{e['sample_rate']:>9.4g} {e['steps']:>7} {e['delta']:>8.2g}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the report; 0 on success. A missing or unreadable ledger raises :class:`LedgerError`."""
    ledger = PrivacyLedger.open(args.ledger, create=False)
    if args.max_epsilon is not None and not args.max_epsilon > 0:
        raise ConfigError(f"--max-epsilon must be > 0, got {args.max_epsilon!r}")
    delta = _delta(ledger.events, args.delta, str(ledger.path))
    result = ledger.epsilon(delta=delta, accountant=args.accountant)
    summary = _summary(ledger, result, args.max_epsilon)
    if args.json:
        print(json.dumps(summary))
    else:
        print(_table(summary))
    sys.stdout.flush()
    return 0
