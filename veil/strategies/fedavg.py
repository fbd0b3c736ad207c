"""FedAvg on updates (McMahan et al., arXiv:1602.05629): clients send ``trained - received``; the server applies
``global += server_lr * mean(updates)`` to the global trainable tensors it keeps.

A thin layer over Flower's legacy ``FedAvg`` (DESIGN.md decision 2): Flower samples clients and computes the
weighted mean (with SecAgg+, the already-unmasked mean arrives in every result); this class only keeps the global
weights, applies the mean update, and aggregates the clients' scalar metrics.
"""

from __future__ import annotations

import logging
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
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

log = logging.getLogger("veil.strategies")

EvaluateFn = Callable[[int, NDArrays, dict[str, Scalar]], tuple[float, dict[str, Scalar]] | None]


def aggregate_client_metrics(results: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    """Aggregates only (DESIGN.md decision 7): max/mean ε, mean loss, total examples, mean upload bytes."""
    if not results:
        return {}
    metrics = [m for _, m in results]

    def values(key: str) -> list[float]:
        return [float(m[key]) for m in metrics if key in m]  # type: ignore[arg-type]

    eps, loss, up = values("epsilon"), values("train_loss"), values("upload_bytes")
    return {
        "clients": len(metrics),
        "epsilon_max": max(eps) if eps else 0.0,
        "epsilon_mean": float(np.mean(eps)) if eps else 0.0,
        "train_loss": float(np.nanmean(loss)) if loss else float("nan"),
        "examples": int(sum(values("num_examples"))),
        "upload_bytes_per_client": float(np.mean(up)) if up else 0.0,
        "noise_multiplier_max": max(values("noise_multiplier"), default=0.0),
        "sample_rate_max": max(values("sample_rate"), default=0.0),
    }


class DeltaFedAvg(FedAvg):
    """FedAvg whose clients send updates; the global trainable tensors live here."""

    def __init__(self, *, initial: NDArrays, server_lr: float = 1.0, clients_per_round: int, num_clients: int,
                 evaluate_fn: EvaluateFn | None = None,
                 fit_metrics_aggregation_fn: MetricsAggregationFn | None = aggregate_client_metrics) -> None:
        if server_lr <= 0:
            raise ValueError(f"server_lr={server_lr} must be > 0")
        super().__init__(
            fraction_fit=clients_per_round / num_clients, fraction_evaluate=0.0,
            min_fit_clients=clients_per_round, min_evaluate_clients=0, min_available_clients=clients_per_round,
            evaluate_fn=evaluate_fn, on_fit_config_fn=lambda rnd: {"server_round": rnd},
            accept_failures=True, fit_metrics_aggregation_fn=fit_metrics_aggregation_fn,
        )
        self.global_arrays: NDArrays = [np.array(a, dtype=np.float32, copy=True) for a in initial]
        self.server_lr = server_lr
        self.last_failures: list[str] = []

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(self.global_arrays)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        # Always send the weights held here (after a resume they differ from Flower's record of round 0).
        return super().configure_fit(server_round, ndarrays_to_parameters(self.global_arrays), client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.last_failures = [_reason(f) for f in failures]
        for reason in self.last_failures:
            log.warning("round %d: a client failed: %s", server_round, reason)
        if not results:
            return None, {}
        mean_params, metrics = super().aggregate_fit(server_round, results, [])
        if mean_params is None:
            return None, metrics
        mean = parameters_to_ndarrays(mean_params)
        if len(mean) != len(self.global_arrays):
            raise ValueError(f"round {server_round}: update has {len(mean)} tensors, the model {len(self.global_arrays)}")
        self.global_arrays = [g + np.float32(self.server_lr) * u.astype(np.float32) for g, u in zip(self.global_arrays, mean, strict=True)]
        return ndarrays_to_parameters(self.global_arrays), metrics

    def state_dict(self) -> dict[str, Any]:
        return {"global_arrays": [a.copy() for a in self.global_arrays], "server_lr": self.server_lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"global_arrays", "server_lr"} - set(state)
        if missing:
            raise KeyError(f"strategy state lacks {sorted(missing)}")
        arrays = [np.asarray(a, dtype=np.float32) for a in state["global_arrays"]]
        if [a.shape for a in arrays] != [a.shape for a in self.global_arrays]:
            raise ValueError("strategy state tensors do not match the model's trainable tensors")
        self.global_arrays = arrays


def _reason(failure: tuple[ClientProxy, FitRes] | BaseException) -> str:
    """One line: the client's own message when Flower carries it, never a remote traceback."""
    if isinstance(failure, BaseException):
        text = str(failure)
        marker = "Message: "
        if marker in text:  # Flower wraps a ClientApp exception as "... occurred. Message: <the error>"
            text = text[text.rindex(marker) + len(marker):]
        text = text.strip().strip("'\"").replace("\\n", " ")
        return (text.splitlines()[0] if text else type(failure).__name__)[:300]
    return f"status {failure[1].status.code.name}: {failure[1].status.message}"[:300]
