"""Server optimisers on the round's mean update: FedAdam, FedYogi and FedAdagrad (Reddi et al., "Adaptive
Federated Optimization", arXiv:2003.00295) and FedAvgM, server momentum (Hsu et al., arXiv:1909.06335).

veil's clients send updates and the server keeps the global weights (:class:`~veil.strategies.fedavg.DeltaFedAvg`);
an optimiser here turns the mean update Δ of a round (with SecAgg+, the unmasked sum divided by the number of
contributing clients) into a step and returns ``global + step``. They work on the sum alone, so they combine with
SecAgg+ and with client-level DP (a step is post-processing of the noised mean).

The rules are plain numpy, written as Flower 1.41 writes them (``flwr.server.strategy.FedAdam``, ``FedYogi``,
``FedAdagrad``, ``FedAvgM``), which stay the test oracle (tests/test_server_strategies.py checks the steps equal
theirs over several rounds) but are not used at run time. With t = the steps taken before this one + 1 (Flower's
``server_round``), moments starting at zero in Δ's dtype (float32 on the wire):

- FedAdam: m ← β₁m + (1−β₁)Δ, v ← β₂v + (1−β₂)Δ², step η·√(1−β₂^(t+1))/(1−β₁^(t+1)) · m/(√v + τ) (Flower's bias
  correction, exponent t + 1);
- FedYogi: m as Adam, v ← v − (1−β₂)Δ²·sign(v − Δ²), step η·m/(√v + τ) (no bias correction);
- FedAdagrad: m as Adam, v ← v + Δ², step η·m/(√v + τ) (Flower fixes β₁ = 0: m = Δ);
- FedAvgM: m ← βm + (−Δ) (m = −Δ at the first step), step −lr·m; no momentum vector when β = 0.

A round that produced no aggregate does not advance the moments or t; both are checkpointed (``state_dict``), so a
resumed run continues the same sequence.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.common import NDArrays

from veil.conf.schema import SERVER_OPTIMIZERS

OPTIMIZERS = SERVER_OPTIMIZERS  # named by the schema
_STATE_KEYS = {"fedavgm": ("momentum_vector",), "fedadam": ("m_t", "v_t"), "fedyogi": ("m_t", "v_t"),
               "fedadagrad": ("m_t", "v_t")}


class ServerOptimizer:
    """``global + step(Δ)`` with the FedAdam, FedYogi, FedAdagrad or FedAvgM update rule.

    Parameters
    ----------
    name
        ``fedavgm``, ``fedadam``, ``fedyogi`` or ``fedadagrad``.
    shapes
        The shapes of the global trainable tensors (the moments have the same).
    lr
        FedAvgM's server learning rate; FedAdam/FedYogi/FedAdagrad's η.
    momentum
        FedAvgM's server momentum β (0: no momentum).
    beta_1, beta_2, tau
        FedAdam/FedYogi: first and second moment decay, and the adaptivity τ added to √v; FedAdagrad uses τ and
        β₁ (Flower's FedAdagrad: 0).
    """

    def __init__(self, name: str, *, shapes: list[tuple[int, ...]], lr: float, momentum: float = 0.0,
                 beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3) -> None:
        if name not in OPTIMIZERS:
            raise ValueError(f"server optimiser {name!r} is unknown; expected one of {', '.join(OPTIMIZERS)}")
        if not lr > 0:
            raise ValueError(f"lr={lr} must be > 0")
        self.name, self.lr, self.momentum = name, lr, momentum
        self.beta_1, self.beta_2, self.tau = beta_1, beta_2, tau
        self.steps = 0  # optimiser steps applied so far (rounds that produced an aggregate)
        self._shapes = [tuple(s) for s in shapes]
        self._state: dict[str, NDArrays] = {key: [] for key in _STATE_KEYS[name]}  # []: not started

    def apply(self, global_arrays: NDArrays, update: NDArrays) -> NDArrays:
        """One step: the new global tensors (float32) for the mean update ``update``."""
        delta = [np.asarray(u) for u in update]
        step = self._fedavgm(delta) if self.name == "fedavgm" else self._adaptive(delta, self.steps + 1)
        self.steps += 1
        return [(g.astype(np.float64) + s).astype(np.float32) for g, s in zip(global_arrays, step, strict=True)]

    def _fedavgm(self, delta: NDArrays) -> NDArrays:
        gradient = [-d for d in delta]  # an update is the opposite of a gradient
        if self.momentum > 0.0:
            m = self._state["momentum_vector"]
            gradient = [self.momentum * x + g for x, g in zip(m, gradient, strict=True)] if m else gradient
            self._state["momentum_vector"] = gradient
        return [-self.lr * g for g in gradient]

    def _adaptive(self, delta: NDArrays, t: int) -> NDArrays:
        b1, b2 = self.beta_1, self.beta_2
        m = self._state["m_t"] or [np.zeros_like(d) for d in delta]
        v = self._state["v_t"] or [np.zeros_like(d) for d in delta]
        m = [b1 * x + (1 - b1) * d for x, d in zip(m, delta, strict=True)]
        if self.name == "fedadam":
            v = [b2 * x + (1 - b2) * (d * d) for x, d in zip(v, delta, strict=True)]
            eta = self.lr * np.sqrt(1 - np.power(b2, t + 1.0)) / (1 - np.power(b1, t + 1.0))
        elif self.name == "fedyogi":
            v = [x - (1.0 - b2) * (d * d) * np.sign(x - d * d) for x, d in zip(v, delta, strict=True)]
            eta = self.lr
        else:  # fedadagrad
            v = [x + d * d for x, d in zip(v, delta, strict=True)]
            eta = self.lr
        self._state["m_t"], self._state["v_t"] = m, v
        return [eta * x / (np.sqrt(y) + self.tau) for x, y in zip(m, v, strict=True)]

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"name": self.name, "steps": self.steps}
        for key, arrays in self._state.items():
            state[key] = [np.asarray(a, dtype=np.float32).copy() for a in arrays]
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
            if arrays and [a.shape for a in arrays] != self._shapes:
                raise ValueError(f"optimiser state {key} does not match the model's trainable tensors")
            restored[key] = arrays
        self._state = restored  # []: the moment starts at the next step
        self.steps = int(state["steps"])
