"""The server's round loop and its SecAgg+ fit workflow, composed from Flower's legacy workflow parts.

**The round loop** (:class:`RoundLoop`). Flower's ``DefaultWorkflow`` always runs rounds 1..N and offers no hook
after a round; veil needs one (metrics, checkpoints, resume from round k, stopping cleanly). So this loop
re-composes the same Flower pieces, ``start_update_client_manager_thread``, a fit workflow
(:class:`DropoutTolerantSecAggPlus` or Flower's ``default_fit_workflow``, :data:`plain_fit_workflow` here), the
strategy's central evaluation, and calls :class:`RoundHooks` after each round. No transport or aggregation is
written here. Upstream proposal: docs/upstream/after-round-hook.md.

**SecAgg+ surviving a node that drops before it has shared its keys** (:class:`DropoutTolerantSecAggPlus`). Flower
1.41's ``SecAggPlusWorkflow.unmask_stage`` asks the survivors for the key shares of every sampled node that did not
send a masked vector (``dead = sampled - active``), including nodes that dropped out at SETUP or SHARE_KEYS. Nobody
holds shares of those nodes (they never distributed any), so Flower's client mod would fail on a missing share and
veil's node guard (:mod:`veil.client.secagg_guard`) refuses such a request as a coordinator asking for shares it
cannot legitimately need; either way the round was lost although it could finish. Those nodes never entered the
protocol's masks either: a client adds a pairwise mask only with the nodes whose encrypted shares it received
(``_collect_masked_vectors`` in ``flwr/client/mod/secure_aggregation``). So after SHARE_KEYS this workflow forgets
them: ``sampled`` becomes the nodes that shared their keys, and a later drop-out (at COLLECT_MASKED_VECTORS, the
case Flower handles) is unmasked as before. Nothing else is changed; no setting of the workflow does this. Upstream
proposal: docs/upstream/secagg-dropout.md.

For nodes that do not trust the coordinator (issue 24) every round runs with the full-strength mask generator
(:func:`veil.flower.secagg.full_strength_masks`, the same patch the nodes apply), and the stages talk through the
grid that ``relay`` wraps around Flower's (:class:`veil.server.key_relay.KeyRelay`: it announces the generator in
SETUP and relays the owners' signatures, veil's own records beside Flower's).

Both check the Flower version when they run (:func:`veil.flower.check_version`); :data:`REACHES` lists the legacy
parts they use.
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
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import default_fit_workflow

from veil.flower import Reach, check_version
from veil.flower.secagg import full_strength_masks

__all__ = ["REACHES", "DropoutTolerantSecAggPlus", "RoundHooks", "RoundLoop", "RoundOutcome",
           "Workflow", "plain_fit_workflow"]

log = logging.getLogger("veil.server")

Workflow = Callable[[Grid, LegacyContext], None]
plain_fit_workflow: Workflow = default_fit_workflow  # Flower's fit workflow without SecAgg+

REACHES = (
    Reach("flwr.compat.common.recorddict_compat", "parameters_to_arrayrecord", ("parameters", "keep_input")),
    Reach("flwr.compat.common.recorddict_compat", "arrayrecord_to_parameters", ("record", "keep_input")),
    Reach("flwr.server.compat.app_utils", "start_update_client_manager_thread", ("grid", "client_manager")),
    Reach("flwr.server.compat.legacy_context", "LegacyContext"),
    *(Reach("flwr.server.workflow.constant", name) for name in ("MAIN_CONFIGS_RECORD", "MAIN_PARAMS_RECORD",
                                                                 "Key.START_TIME", "Key.CURRENT_ROUND")),
    Reach("flwr.server.workflow.default_workflows", "default_fit_workflow", ("grid", "context")),
    Reach("flwr.server.workflow", "SecAggPlusWorkflow.share_keys_stage", ("self", "grid", "context", "state")),
    Reach("flwr.server.workflow", "SecAggPlusWorkflow.__call__", ("self", "grid", "context")),
)


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
        check_version("round loop")
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
                log.warning("stopping before round %d: %s", rnd, getattr(strategy, "stop_reason"))
                break
            cfg[Key.CURRENT_ROUND] = rnd
            before = _fit_rows(context)
            started = time.perf_counter()
            self.fit_workflow(grid, context)
            if getattr(strategy, "stop_reason", "") and not self._had_fit(context, before):
                log.warning("stopping at round %d: %s", rnd, getattr(strategy, "stop_reason"))
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


class DropoutTolerantSecAggPlus(SecAggPlusWorkflow):
    """:class:`flwr.server.workflow.SecAggPlusWorkflow` whose unmask stage names only nodes that shared keys, with
    full-strength masks, talking through ``relay(grid)`` (module docstring). ``relay`` is required: veil's nodes
    refuse a SETUP that does not announce the mask generator."""

    def __init__(self, *args: Any, relay: Callable[[Any], Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.relay = relay

    def __call__(self, grid: Any, context: Any) -> None:
        check_version("SecAgg+ drop-out workflow")
        full_strength_masks()
        super().__call__(self.relay(grid), context)

    def share_keys_stage(self, grid: Any, context: Any, state: Any) -> bool:
        proceed = super().share_keys_stage(grid, context, state)
        gone = state.sampled_node_ids - state.active_node_ids
        if gone:
            log.warning("SecAgg+: %d node(s) dropped out before sharing their keys; the round goes on without them",
                        len(gone))
            state.sampled_node_ids = set(state.active_node_ids)
        return proceed
