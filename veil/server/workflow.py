"""The server's round loop, composed from Flower's legacy workflow parts.

Flower's ``DefaultWorkflow`` always runs rounds 1..N and offers no hook after a round; veil needs one (metrics,
checkpoints, resume from round k, stopping cleanly). So this loop re-composes the same Flower pieces —
``start_update_client_manager_thread``, a fit workflow (``SecAggPlusWorkflow`` or Flower's default fit workflow),
the strategy's central evaluation — and calls :class:`RoundHooks` after each round. No transport or aggregation
is written here. Upstream proposal: docs/upstream/after-round-hook.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import flwr.compat.common.recorddict_compat as compat
from flwr.app import ConfigRecord
from flwr.serverapp import Grid
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

log = logging.getLogger("veil.server")

Workflow = Callable[[Grid, LegacyContext], None]


@dataclass
class RoundOutcome:
    round: int
    seconds: float
    completed: bool  # False: the round's fit did not produce an aggregate (e.g. too few clients survived)
    loss: float
    accuracy: float
    fit_metrics: dict[str, Any]
    eval_metrics: dict[str, Any] = field(default_factory=dict)  # the task's other metrics (e.g. perplexity)


class RoundHooks(Protocol):
    def after_round(self, outcome: RoundOutcome) -> None: ...


def _fit_rows(context: LegacyContext) -> int:
    return len(context.history.metrics_distributed_fit.get("clients", []))


class RoundLoop:
    """Runs rounds ``start_round..num_rounds`` with ``fit_workflow`` and central evaluation."""

    def __init__(self, fit_workflow: Workflow, hooks: RoundHooks, *, start_round: int = 1,
                 on_initial: Callable[[float, dict[str, Any]], None] | None = None) -> None:
        """``on_initial``: called with the central evaluation (loss, metrics) of the starting weights before round 1
        (not when resuming)."""
        self.fit_workflow, self.hooks, self.start_round, self.on_initial = fit_workflow, hooks, start_round, on_initial

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        if not isinstance(context, LegacyContext):
            raise TypeError(f"expected a LegacyContext, got {type(context).__name__}")
        thread, f_stop, c_done = start_update_client_manager_thread(grid, context.client_manager)
        c_done.wait()
        try:
            self._rounds(grid, context)
        finally:
            f_stop.set()
            thread.join()

    @staticmethod
    def _had_fit(context: LegacyContext, before: int) -> bool:
        return _fit_rows(context) > before

    def _rounds(self, grid: Grid, context: LegacyContext) -> None:
        strategy = context.strategy
        params = strategy.initialize_parameters(client_manager=context.client_manager)
        if params is None:
            raise ValueError("the strategy must provide the initial global weights")
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(params, keep_input=True)
        cfg = ConfigRecord()
        cfg[Key.START_TIME] = time.perf_counter()
        context.state.config_records[MAIN_CONFIGS_RECORD] = cfg
        if self.on_initial is not None and self.start_round == 1:
            res = strategy.evaluate(0, parameters=params)
            if res is not None:
                self.on_initial(float(res[0]), dict(res[1]))
        for rnd in range(self.start_round, context.config.num_rounds + 1):
            if getattr(strategy, "stop_reason", ""):
                log.warning("stopping before round %d: %s", rnd, strategy.stop_reason)
                break
            cfg[Key.CURRENT_ROUND] = rnd
            before = _fit_rows(context)
            started = time.perf_counter()
            self.fit_workflow(grid, context)
            if getattr(strategy, "stop_reason", "") and not self._had_fit(context, before):
                log.warning("stopping at round %d: %s", rnd, strategy.stop_reason)
                break
            fit_rows = context.history.metrics_distributed_fit
            completed = len(fit_rows.get("clients", [])) > before
            fit_metrics = {k: v[-1][1] for k, v in fit_rows.items()} if completed else {}
            params = compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
            res = strategy.evaluate(rnd, parameters=params)
            loss, metrics = res if res is not None else (float("nan"), {})
            outcome = RoundOutcome(
                round=rnd, seconds=time.perf_counter() - started, completed=completed, loss=float(loss),
                accuracy=float(metrics.get("accuracy", float("nan"))), fit_metrics=fit_metrics,
                eval_metrics={k: v for k, v in metrics.items() if k != "accuracy"},
            )
            self.hooks.after_round(outcome)
