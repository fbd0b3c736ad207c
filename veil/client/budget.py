"""The owner's budget for one round: the plan (σ, q, steps, δ, engine), the booking in the owner's ledger before
training, the check for one more round after it, and the run's stop mark.

The figures themselves come from :mod:`veil.client.round_plan` (functions of the run config, the owner's flags and the
file's size at start: review 2026-12-07, N1); this module holds the ledger's side of a round, in the order the node
uses it: :func:`check_not_stopped` (before anything), :func:`plan_round`, :func:`book` (BEFORE training: whatever
happens next, the release is counted), :func:`close_round` (ε so far, and whether an identical round still fits the
owner's ``--max-epsilon``), :func:`keep_stopped` (a node that said it cannot train again refuses the rest of that run
on its own, across restarts: review N10).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from veil.client.round_plan import Sampling, plain_plan, plan_client_level, plan_sample_level
from veil.client.settings import NodeSettings
from veil.client.trainer import LocalPlan
from veil.conf.schema import VeilConfig
from veil.errors import LedgerError, PrivacyBudgetExhausted
from veil.privacy.modes import resolve_owner_engine

if TYPE_CHECKING:
    from torch import nn

    from veil.privacy.ledger import LedgerEvent, PrivacyLedger

__all__ = ["RoundBudget", "book", "check_not_stopped", "close_round", "keep_stopped", "mark_stopped", "plan_round"]

log = logging.getLogger("veil.client")


@dataclass(frozen=True)
class RoundBudget:
    """One round's plan and, with DP on, the ledger event it books and the owner's ledger."""

    plan: LocalPlan
    sampling: Sampling
    event: LedgerEvent | None = None
    ledger: PrivacyLedger | None = None


def plan_round(cfg: VeilConfig, settings: NodeSettings, sampling: Sampling, *, run_id: str, server_round: int,
               template: nn.Module) -> RoundBudget:
    """The round's plan: σ calibrated, fitted to what the owner's ledger leaves and clamped to the owner's floor, at
    the owner's DP engine (``--dp-engine``; the run's ``privacy.grad_sample_mode`` only in simulation)."""
    if not cfg.privacy.enabled:  # allowed only on a node without any limit (check_run)
        return RoundBudget(plan=plain_plan(cfg, sampling.steps), sampling=sampling)
    from veil.privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger.open(settings.ledger_path)
    if cfg.privacy.level == "client":
        plan, event = plan_client_level(cfg, settings, steps=sampling.steps, delta=sampling.delta, ledger=ledger,
                                        run_id=run_id, server_round=server_round)
    else:
        engine = (cfg.privacy.grad_sample_mode if settings.simulated
                  else resolve_owner_engine(settings.dp_engine, template))  # the owner's engine, never the run's
        plan, event = plan_sample_level(cfg, settings, sampling, ledger=ledger, run_id=run_id,
                                        server_round=server_round, engine=engine)
    return RoundBudget(plan=plan, sampling=sampling, event=event, ledger=ledger)


def book(budget: RoundBudget) -> None:
    """Record the round in the owner's ledger (atomically), before any training."""
    if budget.ledger is not None and budget.event is not None:
        budget.ledger.record(budget.event)


def close_round(budget: RoundBudget, cfg: VeilConfig, settings: NodeSettings) -> tuple[bool, float]:
    """(whether one more identical round fits the owner's ``--max-epsilon``, the ledger's ε so far) at the round's δ;
    (True, 0.0) without DP."""
    if budget.ledger is None or budget.event is None:
        return True, 0.0
    delta, accountant = budget.sampling.delta, cfg.privacy.accountant
    epsilon = budget.ledger.epsilon(delta=delta, accountant=accountant).epsilon
    following = dataclasses.replace(budget.event, round=budget.event.round + 1)
    return budget.ledger.epsilon_if(following, delta=delta, accountant=accountant).epsilon <= settings.max_epsilon, \
        epsilon


def check_not_stopped(settings: NodeSettings, run_id: str) -> None:
    """Refuse every round of a run after this node said ``can_train_next=False`` in it (review N10), also after a
    restart: the stop is kept in the owner's ledger (:meth:`veil.privacy.ledger.PrivacyLedger.stop_run`)."""
    from veil.privacy.ledger import PrivacyLedger

    path = Path(settings.ledger_path)
    if path.exists() and PrivacyLedger.open(path, create=False).stopped(run_id):
        raise PrivacyBudgetExhausted(f"this node told run {run_id} that it cannot train another round; it refuses "
                                     "the rest of the run (a new run may ask again)")


def mark_stopped(settings: NodeSettings, run_id: str) -> None:
    """Persist, in the owner's ledger, that this node answered ``can_train_next=False`` in run ``run_id``."""
    from veil.privacy.ledger import PrivacyLedger

    PrivacyLedger.open(settings.ledger_path).stop_run(run_id)


def keep_stopped(settings: NodeSettings, run_id: str, server_round: int) -> None:
    """:func:`mark_stopped`, for a reply with ``can_train_next=False``. A ledger that cannot be written is logged;
    the reply is unchanged (it already says the node will not train again)."""
    try:
        mark_stopped(settings, run_id)
    except LedgerError as err:
        log.error("round %d: could not keep run %s's stop in the ledger (%s); a restarted node would forget it",
                  server_round, run_id, err)
