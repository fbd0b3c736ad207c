"""Server optimisers on the round's mean update: FedAdam and FedYogi (Reddi et al., "Adaptive Federated
Optimization", arXiv:2003.00295) and FedAvgM, server momentum (Hsu et al., arXiv:1909.06335).

veil's clients send updates and the server keeps the global weights (:class:`~veil.strategies.fedavg.DeltaFedAvg`);
an optimiser here turns the mean update Δ of a round (with SecAgg+, the unmasked sum divided by the number of
contributing clients) into a step and returns ``global + step``. They work on the sum alone, so they combine with
SecAgg+ and with client-level DP (a step is post-processing of the noised mean).

The update rules are Flower's own (``flwr.server.strategy.FedAdam``, ``FedYogi``, ``FedAvgM``), used by
composition rather than re-derived: each round the Flower strategy is handed a single result holding Δ while its
reference weights are zero, so its pseudo-gradient is exactly Δ and the weights it returns are exactly the step.
Flower counts steps by ``server_round``; veil passes the number of steps taken (a round that produced no aggregate
does not advance the moments), and checkpoints that count with the moments, so a resumed run continues the same
sequence. As written in Flower 1.41: FedAdam corrects its bias with η·√(1−β₂^(t+1))/(1−β₁^(t+1)) at step t;
FedYogi has no bias correction; both start their moments at zero; FedAvgM keeps m ← β·m + (−Δ) and steps −lr·m.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.common import Code, FitRes, NDArrays, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAdam, FedAvgM, FedYogi

OPTIMIZERS = ("fedavgm", "fedadam", "fedyogi")
_STATE_KEYS = {"fedavgm": ("momentum_vector",), "fedadam": ("m_t", "v_t"), "fedyogi": ("m_t", "v_t")}


def _no_metrics(_: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    return {}


class ServerOptimizer:
    """``global + step(Δ)`` with Flower's FedAdam, FedYogi or FedAvgM update rule.

    Parameters
    ----------
    name
        ``fedavgm``, ``fedadam`` or ``fedyogi``.
    shapes
        The shapes of the global trainable tensors (the moments have the same).
    lr
        FedAvgM's server learning rate; FedAdam/FedYogi's η.
    momentum
        FedAvgM's server momentum β (0: no momentum).
    beta_1, beta_2, tau
        FedAdam/FedYogi: first and second moment decay, and the adaptivity τ added to √v.
    """

    def __init__(self, name: str, *, shapes: list[tuple[int, ...]], lr: float, momentum: float = 0.0,
                 beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3) -> None:
        if name not in OPTIMIZERS:
            raise ValueError(f"server optimiser {name!r} is unknown; expected one of {', '.join(OPTIMIZERS)}")
        if not lr > 0:
            raise ValueError(f"lr={lr} must be > 0")
        self.name = name
        self.steps = 0  # optimiser steps applied so far (rounds that produced an aggregate)
        self._zeros = [np.zeros(s, dtype=np.float32) for s in shapes]
        zero_params = ndarrays_to_parameters(self._zeros)
        common: dict[str, Any] = {"initial_parameters": zero_params, "fit_metrics_aggregation_fn": _no_metrics,
                                  "fraction_evaluate": 0.0, "min_evaluate_clients": 0}
        self._flower: FedAdam | FedYogi | FedAvgM
        if name == "fedavgm":
            self._flower = FedAvgM(**common, server_learning_rate=lr, server_momentum=momentum)
        else:
            kind = FedAdam if name == "fedadam" else FedYogi
            self._flower = kind(**common, eta=lr, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def apply(self, global_arrays: NDArrays, update: NDArrays) -> NDArrays:
        """One step: the new global tensors (float32) for the mean update ``update``."""
        self._set_reference(ndarrays_to_parameters(self._zeros))
        result = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.asarray(u) for u in update]), 1, {})
        params, _ = self._flower.aggregate_fit(self.steps + 1, [(None, result)], [])  # type: ignore[list-item]
        if params is None:
            raise RuntimeError(f"{self.name}: Flower's strategy produced no step")
        step = parameters_to_ndarrays(params)
        self.steps += 1
        return [(g.astype(np.float64) + s).astype(np.float32) for g, s in zip(global_arrays, step, strict=True)]

    def _set_reference(self, zero_params: Parameters) -> None:
        if isinstance(self._flower, FedAvgM):
            self._flower.initial_parameters = zero_params
        else:
            self._flower.current_weights = parameters_to_ndarrays(zero_params)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"name": self.name, "steps": self.steps}
        for key in _STATE_KEYS[self.name]:
            state[key] = [np.asarray(a, dtype=np.float32).copy() for a in (getattr(self._flower, key) or [])]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore moments and step count; refuses a state of another optimiser or other shapes."""
        if state.get("name") != self.name:
            raise ValueError(f"optimiser state is for {state.get('name')!r}, this run uses {self.name!r}")
        missing = {"steps", *_STATE_KEYS[self.name]} - set(state)
        if missing:
            raise KeyError(f"optimiser state lacks {sorted(missing)}")
        restored: dict[str, NDArrays] = {}
        for key in _STATE_KEYS[self.name]:
            arrays = [np.asarray(a, dtype=np.float32) for a in state[key]]
            if arrays and [a.shape for a in arrays] != [z.shape for z in self._zeros]:
                raise ValueError(f"optimiser state {key} does not match the model's trainable tensors")
            restored[key] = arrays
        for key, arrays in restored.items():
            setattr(self._flower, key, arrays or None)  # None: Flower starts the moment at its first step
        self.steps = int(state["steps"])
