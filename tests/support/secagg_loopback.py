"""A SecAgg+ round between veil's real ServerApp workflow and real node ClientApps, in one process.

:class:`LoopbackGrid` stands in for the SuperLink: it hands each message the workflow sends to the addressed node's
``ClientApp`` (veil's guard, then Flower's ``secaggplus_mod``, then a NumPyClient with a fixed update) as a fresh
copy, the way the transport would, and returns the replies. A ``tamper`` hook plays a malicious coordinator: it may
rewrite what one node receives. ``drop`` makes nodes go silent from a stage on.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, Metadata, RecordDict
from flwr.common.constant import ErrorCode
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key as SaKey, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

from veil.client.secagg_guard import SecAggPolicy, make_secagg_guard
from veil.conf.schema import VeilConfig
from veil.flower.workflows import DropoutTolerantSecAggPlus
from veil.server.key_relay import KeyRelay

RUN_ID = 7
SA = VeilConfig().secagg
SIZE = 6
Tamper = Callable[[int, RecordDict], None]


def update_of(node: int) -> np.ndarray:
    """The fixed update node ``node`` sends (distinct per node, inside the clipping range)."""
    return np.linspace(-1.0, 1.0, SIZE).astype(np.float32) * ((node % 97) + 1) / 50


class _Fixed(NumPyClient):
    def __init__(self, node: int) -> None:
        self.node = node

    def fit(self, parameters: Any, config: Any) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        return [update_of(self.node)], 1, {}


def node_app(policy: SecAggPolicy) -> ClientApp:
    """A node's ClientApp: veil's guard around Flower's SecAgg+ mod, a client with a fixed update."""
    return ClientApp(client_fn=lambda context: _Fixed(context.node_id).to_client(), mods=[make_secagg_guard(policy)])


class LoopbackGrid:
    """Delivers the workflow's messages to in-process node apps; records every reply."""

    def __init__(self, apps: dict[int, ClientApp], *, tamper: Tamper | None = None,
                 drop: dict[str, set[int]] | None = None) -> None:
        self.apps, self.tamper, self.drop = apps, tamper, drop or {}
        self.contexts = {n: Context(run_id=RUN_ID, node_id=n, node_config={}, state=RecordDict(), run_config={})
                         for n in apps}
        self.replies: dict[str, dict[int, Message]] = {}
        self.gone: set[int] = set()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        out = []
        for msg in messages:
            node, content = msg.metadata.dst_node_id, copy.deepcopy(msg.content)
            stage = str(content.config_records[RECORD_KEY_CONFIGS][SaKey.STAGE])
            self.gone |= self.drop.get(stage, set())
            if node in self.gone:
                continue
            if self.tamper is not None:
                self.tamper(node, content)
            meta = Metadata(run_id=RUN_ID, message_id=f"m{time.monotonic_ns()}", src_node_id=0, dst_node_id=node,
                            reply_to_message_id="", group_id=msg.metadata.group_id, created_at=time.time(),
                            ttl=600.0, message_type=msg.metadata.message_type)
            incoming = Message(metadata=meta, content=content)
            try:
                reply = self.apps[node](incoming, self.contexts[node])
            except Exception as err:  # noqa: BLE001  (the SuperNode turns an app's exception into an error reply)
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=repr(err)), reply_to=incoming)
            self.replies.setdefault(stage, {})[node] = reply
            out.append(reply)
        return out


def run_round(grid: LoopbackGrid) -> np.ndarray | None:
    """One SecAgg+ round of veil's workflow over ``grid``; the global update it produced (None: no aggregate)."""
    nodes = sorted(grid.apps)
    context = Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config={})
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=len(nodes),
                      min_available_clients=len(nodes))
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=1), strategy=strategy)
    for node in nodes:
        legacy.client_manager.register(GridClientProxy(node, grid, RUN_ID))  # type: ignore[arg-type]
    start = ndarrays_to_parameters([np.zeros(SIZE, dtype=np.float32)])
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(start, keep_input=True)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: 1})
    workflow = DropoutTolerantSecAggPlus(num_shares=SA.num_shares, reconstruction_threshold=SA.reconstruction_threshold,
                                         max_weight=1.0, clipping_range=float(SA.clipping_range),
                                         quantization_range=SA.quantization_range, modulus_range=SA.modulus_range,
                                         relay=KeyRelay)
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 1  # as in the ServerApp's process
    try:
        workflow(grid, legacy)  # type: ignore[arg-type]
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    if not legacy.history.metrics_distributed_fit and not _fitted(legacy):
        return None
    got = compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
    return parameters_to_ndarrays(got)[0]


def _fitted(legacy: LegacyContext) -> bool:
    got = compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
    return bool(np.any(parameters_to_ndarrays(got)[0] != 0))


QUANTUM = 2 * SA.clipping_range / SA.quantization_range  # one quantisation step of the sum
__all__ = ["LoopbackGrid", "QUANTUM", "RUN_ID", "Stage", "node_app", "run_round", "update_of"]
