"""A simulated federation of no-op clients for the federation benchmarks (issue 7): what a round costs when the
clients do no work.

The pieces are veil's own where they matter: the ClientApp carries :mod:`veil.client.secagg_guard`
(so SecAgg+ runs exactly as in veil), the server runs :class:`veil.flower.workflows.RoundLoop` with
:class:`veil.strategies.fedavg.DeltaFedAvg` and the fit workflow of :func:`veil.server.app.fit_workflow_for`
(Flower's ``SecAggPlusWorkflow`` or its default fit workflow). Only the client's ``fit`` is replaced: it returns a
fixed random update of the shape it received (values N(0, 0.01), inside SecAgg+'s clipping range), weight 1.

One simulation runs a *schedule*: round k uses ``schedule[k]`` (SecAgg+ on or off, clients sampled, how the grid
waits), so configurations are interleaved round by round within one run and one Ray cluster. Timing, without
touching Flower's internals:

- the server wraps the grid Flower hands it in :class:`TimedGrid` (a :class:`flwr.serverapp.Grid` that delegates
  to it) and records each ``send_and_receive`` exchange: start, end, messages;
- a client mod in front of veil's records, per message, when the ClientApp started and finished (wall clock,
  same host) into a JSON-lines file, so an exchange splits into dispatch (server push -> first ClientApp start),
  client work, and collection (last ClientApp end -> the server has all replies).

``TimedGrid(poll_interval=x)`` also offers the one change of polling that public APIs allow: its own
``send_and_receive`` from the public ``push_messages`` / ``pull_messages`` with a shorter wait than Flower's
(``InMemoryGrid``: 0.1 s, deployment ``GrpcGrid``/``HttpGrid``: 3 s).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.client import Client, NumPyClient
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Context
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import Grid, ServerApp

from veil.client.secagg_guard import make_secagg_guard, secagg_policy
from veil.flower.polling import DelegatingGrid
from veil.conf.schema import SecAggConfig, VeilConfig
from veil.server.app import fit_workflow_for
from veil.flower.workflows import RoundLoop, RoundOutcome
from veil.strategies.fedavg import DeltaFedAvg


@dataclasses.dataclass(frozen=True)
class Slot:
    """One round of the schedule."""

    label: str
    secagg: bool
    clients: int
    poll_interval: float | None = None  # None: the grid's own send_and_receive (Flower's polling)


@dataclasses.dataclass
class Exchange:
    round: int
    start: float  # wall clock (time.time), s
    end: float
    messages: int


@dataclasses.dataclass
class RoundRecord:
    slot: Slot
    round: int
    seconds: float  # the round as veil's RoundLoop times it (fit workflow + central evaluation)
    completed: bool
    exchanges: list[Exchange]


class TimedGrid(DelegatingGrid):
    """Delegates to Flower's grid; records every exchange; optionally polls with its own interval."""

    def __init__(self, inner: Grid) -> None:
        super().__init__(inner)
        self.poll_interval: float | None = None
        self.round = 0
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        start = time.time()
        if self.poll_interval is None:
            replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        else:
            replies = self._poll(messages, timeout, self.poll_interval)
        with self._lock:
            self.exchanges.append(Exchange(self.round, start, time.time(), len(messages)))
        return replies

    def _poll(self, messages: list[Message], timeout: float | None, interval: float) -> list[Message]:
        """``Grid.send_and_receive``'s contract from the public push/pull API, waiting ``interval`` between pulls."""
        pending = set(self.inner.push_messages(messages))
        deadline = None if timeout is None else time.time() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.time() < deadline):
            got = list(self.inner.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if pending:
                time.sleep(interval)
        return replies


class NoopClient(NumPyClient):
    """Returns a fixed random update shaped like the weights it received; no training."""

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        return [_update(tuple(p.shape)) for p in parameters], 1, {"upload_bytes": sum(4 * p.size for p in parameters)}


@functools.lru_cache(maxsize=8)
def _update(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).normal(0.0, 0.01, shape).astype(np.float32)


def _client_fn(context: Context) -> Client:
    return NoopClient().to_client()


def stage_timer(path: str) -> ClientAppCallable:
    """A mod that appends ``{"stage", "start", "end"}`` per message to ``path`` (one JSON line, wall clock)."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        start = time.time()
        reply = call_next(msg, context)
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = str(configs.get(Key.STAGE)) if configs is not None else "fit"
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"stage": stage, "start": start, "end": time.time()}) + "\n")
        return reply

    return mod  # type: ignore[return-value]


def client_app(timings: Path, secagg: SecAggConfig) -> ClientApp:
    # the schedule mixes plain and SecAgg+ rounds: these nodes allow plain aggregation
    guard = make_secagg_guard(secagg_policy(VeilConfig(secagg=secagg), require_secagg=False))
    return ClientApp(client_fn=_client_fn, mods=[stage_timer(str(timings)), guard])


class _Scheduled:
    """A fit workflow that runs round k with ``schedule[k]``'s settings."""

    def __init__(self, schedule: list[Slot], grid: TimedGrid, strategy: DeltaFedAvg, secagg: SecAggConfig) -> None:
        self.schedule, self.grid, self.strategy = schedule, grid, strategy
        self.plain = fit_workflow_for(VeilConfig(secagg=dataclasses.replace(secagg, enabled=False)))
        self.secure = fit_workflow_for(VeilConfig(secagg=dataclasses.replace(secagg, enabled=True)))
        self.round = 0

    def __call__(self, grid: Grid, context: Any) -> None:
        slot = self.schedule[self.round]
        self.round += 1
        self.grid.round, self.grid.poll_interval = self.round, slot.poll_interval
        self.strategy.clients_per_round = slot.clients  # sampled this round (the strategy reads it per round)
        self.strategy.min_clients = slot.clients
        (self.secure if slot.secagg else self.plain)(grid, context)


class _Recorder:
    def __init__(self, schedule: list[Slot], grid: TimedGrid) -> None:
        self.schedule, self.grid = schedule, grid
        self.records: list[RoundRecord] = []

    def after_round(self, outcome: RoundOutcome) -> None:
        ex = [e for e in self.grid.exchanges if e.round == outcome.round]
        self.records.append(RoundRecord(self.schedule[outcome.round - 1], outcome.round, outcome.seconds,
                                        outcome.completed, ex))


def server_app(schedule: list[Slot], *, values: int, num_nodes: int, secagg: SecAggConfig,
               out: list[RoundRecord]) -> ServerApp:
    """A ServerApp that runs ``schedule`` (one round per slot) over a global vector of ``values`` float32."""
    from flwr.server import LegacyContext, ServerConfig

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        # The engine registers its nodes while this thread already runs: wait for all of them, or the first
        # configure_fit sees only some (DeltaFedAvg reads client_manager.all() without waiting).
        deadline = time.monotonic() + 120
        while len(list(grid.get_node_ids())) < num_nodes and time.monotonic() < deadline:
            time.sleep(0.05)
        timed = TimedGrid(grid)
        strategy = DeltaFedAvg(initial=[np.zeros(values, dtype=np.float32)], clients_per_round=num_nodes,
                               num_clients=num_nodes, min_clients=1)
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=len(schedule)), strategy=strategy)
        recorder = _Recorder(schedule, timed)
        RoundLoop(_Scheduled(schedule, timed, strategy, secagg), recorder)(timed, legacy)
        out.extend(recorder.records)

    return app


def simulate(schedule: list[Slot], *, values: int, num_nodes: int, timings: Path,
             backend_config: dict[str, Any] | None = None, secagg: SecAggConfig | None = None) -> list[RoundRecord]:
    """Run one simulation of ``num_nodes`` no-op clients through ``schedule``; returns one record per round."""
    import warnings

    from flwr.simulation import run_simulation

    timings.parent.mkdir(parents=True, exist_ok=True)
    timings.write_text("", encoding="utf-8")
    out: list[RoundRecord] = []
    backend = backend_config or {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                 "init_args": {"include_dashboard": False}}
    for name in ("flwr", "ray"):  # Flower's per-stage DEBUG lines would swamp the table
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(server_app=server_app(schedule, values=values, num_nodes=num_nodes,
                                             secagg=secagg or SecAggConfig(), out=out),
                       client_app=client_app(timings, secagg or SecAggConfig()), num_supernodes=num_nodes, backend_config=backend)
    if len(out) != len(schedule):
        raise RuntimeError(f"the simulation ran {len(out)} of {len(schedule)} rounds; see the log above")
    return out


def client_spans(timings: Path) -> list[tuple[str, float, float]]:
    """(stage, start, end) of every ClientApp call recorded by :func:`stage_timer`."""
    rows = [json.loads(line) for line in timings.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(r["stage"], float(r["start"]), float(r["end"])) for r in rows]


def split_exchange(ex: Exchange, spans: list[tuple[str, float, float]]) -> tuple[float, float, float, float]:
    """(dispatch, client span, collection, summed client work) of one exchange, in seconds."""
    inside = [s for s in spans if ex.start <= s[1] and s[2] <= ex.end]
    if not inside:
        return 0.0, 0.0, ex.end - ex.start, 0.0
    first, last = min(s[1] for s in inside), max(s[2] for s in inside)
    return first - ex.start, last - first, ex.end - last, sum(s[2] - s[1] for s in inside)
