"""FedAvg on updates (McMahan et al., arXiv:1602.05629): clients send ``trained - received``; the server applies
``global += server_lr * mean(updates)`` to the global trainable tensors it keeps.

A thin layer over Flower's legacy ``FedAvg`` (DESIGN.md decision 2): Flower samples clients and computes the
weighted mean (with SecAgg+, the already-unmasked mean arrives in every result); this class only keeps the global
weights, applies the mean update, counts the replies (answered, refused, contributed; nothing per client) and, for
client-level DP, books the noise each round's sum carried (:class:`veil.privacy.client_level.ClientLevelAccountant`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.common import (
    FitIns,
    FitRes,
    MetricsAggregationFn,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import ClientManager
from flwr.server.strategy import FedAvg

from veil.flower.names import ClientProxy, Criterion
from veil.privacy.client_level import ClientLevelAccountant, add_gaussian_noise
from veil.strategies.robust import Aggregator
from veil.strategies.server_opt import ServerOptimizer
from veil.wire import CAN_TRAIN_NEXT, NOISE_STD, REFUSED, REPLY_KEYS, UPLOAD_BYTES, flatten, is_flat, unflatten

log = logging.getLogger("veil.strategies")

EvaluateFn = Callable[[int, NDArrays, dict[str, Scalar]], tuple[float, dict[str, Scalar]] | None]


# The reply contract (veil.wire.REPLY_KEYS, shared with the node) as a set for lookups.
REPLY_METRIC_KEYS = frozenset(REPLY_KEYS)


def aggregate_client_metrics(results: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    """Round totals of the replies: clients that answered, refused, contributed (weight > 0), mean upload bytes.

    Nothing per client is kept; keys outside :data:`REPLY_METRIC_KEYS` are ignored (and logged once per round).
    """
    if not results:
        return {}
    metrics = [m for _, m in results]
    unexpected = sorted({k for m in metrics for k in m} - REPLY_METRIC_KEYS)
    if unexpected:
        log.warning("replies carry metrics veil does not use (%s); they are ignored", ", ".join(unexpected))
    upload = [float(m[UPLOAD_BYTES]) for m in metrics if UPLOAD_BYTES in m]  # type: ignore[arg-type]
    return {
        "clients": len(metrics),
        "refused": int(sum(int(m.get(REFUSED, 0)) for m in metrics)),  # type: ignore[call-overload]
        "contributed": sum(1 for weight, _ in results if weight > 0),
        "upload_bytes_per_client": float(np.mean(upload)) if upload else 0.0,
    }


class DeltaFedAvg(FedAvg):
    """FedAvg whose clients send updates; the global trainable tensors live here."""

    def __init__(self, *, initial: NDArrays, server_lr: float = 1.0, clients_per_round: int, num_clients: int,
                 min_clients: int = 1, central_noise_std: float = 0.0, join_timeout: float = 300.0, evaluate_fn: EvaluateFn | None = None,
                 fit_metrics_aggregation_fn: MetricsAggregationFn | None = aggregate_client_metrics,
                 client_level_clip: float | None = None, aggregator: Aggregator | None = None,
                 optimizer: ServerOptimizer | None = None) -> None:
        if server_lr <= 0:
            raise ValueError(f"server_lr={server_lr} must be > 0")
        if aggregator is not None and central_noise_std > 0:
            raise ValueError("a robust aggregator cannot take client-level DP noise calibrated for the sum")
        super().__init__(
            fraction_fit=clients_per_round / num_clients, fraction_evaluate=0.0,
            min_fit_clients=clients_per_round, min_evaluate_clients=0, min_available_clients=clients_per_round,
            evaluate_fn=evaluate_fn, on_fit_config_fn=lambda rnd: {"server_round": rnd},
            accept_failures=True, fit_metrics_aggregation_fn=fit_metrics_aggregation_fn,
        )
        self.global_arrays: NDArrays = [np.array(a, dtype=np.float32, copy=True) for a in initial]
        self.server_lr = server_lr
        self.clients_per_round, self.min_clients = clients_per_round, min_clients
        self.central_noise_std = central_noise_std  # client-level DP, central placement: std z·S on the sum
        self.join_timeout = join_timeout
        self.aggregator = aggregator  # None: Flower's mean; else a robust aggregate of the individual updates
        self.optimizer = optimizer  # None: global += server_lr * mean; else FedAdam/FedYogi/FedAvgM's step
        self.num_clients = num_clients
        self.last_failures: list[str] = []
        self.exhausted: set[int] = set()  # node ids whose owners said their budget allows no further round
        self.stop_reason = ""  # set when too few clients are left to run a round
        # client-level DP: the noise each round's sum really carried, booked per round (review H3)
        self.accountant = None if client_level_clip is None else ClientLevelAccountant(clip=client_level_clip)

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(self.global_arrays)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """Sample ``clients_per_round`` nodes among those whose owners have budget left.

        Always sends the weights held here (after a resume they differ from Flower's record of round 0).
        """
        # Nodes may still be registering (simulation starts the ServerApp while they do; deployed nodes connect
        # late): wait for a round's worth before judging who is left.
        _wait_for_nodes(client_manager, min(self.num_clients, self.clients_per_round + len(self.exhausted)),
                        self.join_timeout)
        eligible = [p for p in client_manager.all().values() if p.node_id not in self.exhausted]
        wanted = min(self.clients_per_round, len(eligible))
        if wanted < self.min_clients:
            self.stop_reason = (f"only {len(eligible)} client(s) have privacy budget left, "
                                f"{self.min_clients} needed per round")
            return []
        clients = client_manager.sample(num_clients=wanted, min_num_clients=wanted,
                                        criterion=_NotIn(frozenset(self.exhausted)))
        # one vector, not one array per tensor: each array is its own object on every hop (veil.wire)
        fit_ins = FitIns(ndarrays_to_parameters([flatten(self.global_arrays)]), {"server_round": server_round})
        return [(client, fit_ins) for client in clients]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.last_failures = [_reason(f) for f in failures]
        for reason in self.last_failures:
            log.warning("round %d: a client failed: %s", server_round, reason)
        for proxy, res in results:
            if not bool(res.metrics.get(CAN_TRAIN_NEXT, True)):
                self.exhausted.add(proxy.node_id)
                log.info("round %d: node %d has no privacy budget for another round; it is not sampled again",
                         server_round, proxy.node_id)
        # A client that refuses to train (budget) answers with weight 0: it stays in the SecAgg+ round (so the
        # round's thresholds hold) and adds nothing to the mean.
        trained = [(p, r) for p, r in results if r.num_examples > 0]
        metrics = self.fit_metrics_aggregation_fn([(r.num_examples, r.metrics) for _, r in results]) if (
            results and self.fit_metrics_aggregation_fn) else {}
        if not trained:
            return None, metrics
        if self.aggregator is not None:
            mean = self.aggregator([parameters_to_ndarrays(r.parameters) for _, r in trained])
        else:
            mean_params, _ = super().aggregate_fit(server_round, trained, [])
            if mean_params is None:
                return None, metrics
            mean = parameters_to_ndarrays(mean_params)
        if self.accountant is not None:  # the sum is released from here on, whatever happens to it below
            z = self.accountant.record_round(server_round, central_std=self.central_noise_std, noise_stds=[
                float(r.metrics.get(NOISE_STD, 0.0)) for _, r in trained])  # type: ignore[arg-type]
            log.info("round %d: %d contributions, client-level noise multiplier of the sum %.4f",
                     server_round, len(trained), z)
        if self.central_noise_std > 0:  # the sum gets N(0, (z·S)²), so the mean of n updates gets std z·S/n
            mean = add_gaussian_noise(mean, std=self.central_noise_std / len(trained))
        if is_flat(mean, self.global_arrays):  # the nodes reply in the layout they received
            try:
                mean = unflatten(mean[0], self.global_arrays)
            except ValueError as err:
                raise ValueError(f"round {server_round}: {err}") from None
        if len(mean) != len(self.global_arrays):
            raise ValueError(f"round {server_round}: update has {len(mean)} tensors, the model {len(self.global_arrays)}")
        if not all(np.isfinite(u).all() for u in mean):
            log.warning("round %d: the aggregate is not finite; the round is skipped", server_round)
            return None, metrics
        if self.optimizer is not None:
            self.global_arrays = self.optimizer.apply(self.global_arrays, mean)
        else:
            self.global_arrays = [g + np.float32(self.server_lr) * u.astype(np.float32)
                                  for g, u in zip(self.global_arrays, mean, strict=True)]
        return ndarrays_to_parameters(self.global_arrays), metrics

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"global_arrays": [a.copy() for a in self.global_arrays], "server_lr": self.server_lr,
                                 "exhausted": sorted(self.exhausted)}
        if self.accountant is not None:
            state["client_level_accountant"] = self.accountant.state_dict()
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"global_arrays", "server_lr"} - set(state)
        if missing:
            raise KeyError(f"strategy state lacks {sorted(missing)}")
        arrays = [np.asarray(a, dtype=np.float32) for a in state["global_arrays"]]
        if [a.shape for a in arrays] != [a.shape for a in self.global_arrays]:
            raise ValueError("strategy state tensors do not match the model's trainable tensors")
        self.global_arrays = arrays
        self.server_lr = float(state["server_lr"])
        self.exhausted = {int(n) for n in state.get("exhausted", [])}
        if self.accountant is not None:
            if "client_level_accountant" not in state:
                raise KeyError("strategy state lacks the client-level accountant this run needs")
            self.accountant.load_state_dict(state["client_level_accountant"])
        if self.optimizer is not None:
            if "optimizer" not in state:
                raise KeyError("strategy state lacks the server optimiser's state")
            self.optimizer.load_state_dict(state["optimizer"])


def _wait_for_nodes(client_manager: ClientManager, wanted: int, timeout: float, poll: float = 0.1) -> None:
    """Wait until ``wanted`` nodes are registered, asking the grid every ``poll`` seconds.

    Flower's workflows refresh the client manager from the grid inside ``num_available``/``all``/``sample`` and
    otherwise only every 5 s (``flwr/server/compat/app_utils.py``); ``wait_for`` alone is not refreshed, so it
    slept those 5 s at the start of every run whose nodes registered a moment after the ServerApp started.
    """
    deadline = time.monotonic() + timeout
    while client_manager.num_available() < wanted and time.monotonic() < deadline:
        client_manager.wait_for(wanted, timeout=min(poll, max(deadline - time.monotonic(), 0.0)))  # type: ignore[arg-type]


class _NotIn(Criterion):
    def __init__(self, excluded: frozenset[int]) -> None:
        self.excluded = excluded

    def select(self, client: ClientProxy) -> bool:
        return client.node_id not in self.excluded


_LOCAL_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][^\s/\\'\"]+)+[/\\]([^\s/\\'\"]+)")


def _reason(failure: tuple[ClientProxy, FitRes] | BaseException) -> str:
    """One line: the client's own message when Flower carries it, never a remote traceback."""
    if isinstance(failure, BaseException):
        text = str(failure)
        marker = "Message: "
        if marker in text:  # Flower wraps a ClientApp exception as "... occurred. Message: <the error>"
            text = text[text.rindex(marker) + len(marker):]
        text = re.split(r"\\*'>", text)[0]  # Flower's reason ends "...'>" (escaped once more inside a tuple)
        text = text.strip().strip("'\"").replace("\\n", " ")
        text = _LOCAL_PATH.sub(r"\1", text)  # a node's directories are its own business: the file name is enough
        return (text.splitlines()[0] if text else type(failure).__name__)[:300]
    return f"status {failure[1].status.code.name}: {failure[1].status.message}"[:300]
