"""Client-level DP (McMahan et al., "Learning Differentially Private Recurrent Language Models",
arXiv:1710.06963): each client's whole update is clipped to L2 norm S and Gaussian noise of std z·S is added to
the sum of the round's updates, so the published model is (ε, δ)-DP with respect to any one client's entire data.

Two placements of the noise:

* ``distributed`` (default with SecAgg+): each of the m clients of a round adds N(0, (z·S)²/m) to its own clipped
  update; SecAgg+ reveals only the sum, which carries N(0, (z·S)²) — no party ever sees a less noisy aggregate.
  The guarantee relies on the round's other clients adding their shares.
* ``central``: the server adds N(0, (z·S)²) to the sum (a trusted-server model; the server could skip it).

Accounting is the sampled Gaussian mechanism over rounds: q = clients per round / clients, one release per round,
through veil's accountants (Mironov et al., arXiv:1908.10530). A node's own ledger records its rounds without the
amplification by client sampling (q = 1), since a node cannot verify how the server samples.
Flower's clipping mods clip ``fit`` results as weights; veil's clients send updates, so the clip lives here.
"""

from __future__ import annotations

import math
import secrets

from typing import TYPE_CHECKING

import numpy as np

from veil.privacy.accounting import compute_epsilon
from veil.privacy.calibration import calibrate_noise_multiplier

if TYPE_CHECKING:
    from veil.conf.schema import VeilConfig


def clip_update(update: list[np.ndarray], *, clip: float) -> tuple[list[np.ndarray], float]:
    """Scale ``update`` to L2 norm at most ``clip``; returns the clipped update and the original norm."""
    if clip <= 0:
        raise ValueError(f"clip={clip} must be > 0")
    norm = math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in update))
    factor = min(1.0, clip / (norm + 1e-12))
    return [(a * factor).astype(np.float32) for a in update], norm


def add_gaussian_noise(arrays: list[np.ndarray], *, std: float, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """``arrays`` plus i.i.d. N(0, std²) per value; by default from a generator seeded by the OS's entropy."""
    if std < 0:
        raise ValueError(f"std={std} must be >= 0")
    rng = rng or np.random.default_rng(secrets.randbits(128))
    return [(a + rng.normal(0.0, std, size=a.shape)).astype(np.float32) for a in arrays]


def distributed_share_std(*, noise_multiplier: float, clip: float, clients_per_round: int) -> float:
    """Std of one client's share so that the sum over ``clients_per_round`` clients has std z·S."""
    return noise_multiplier * clip / math.sqrt(clients_per_round)


def client_level_epsilon(*, noise_multiplier: float, client_rate: float, rounds: int, delta: float,
                         accountant: str = "prv") -> float:
    """ε after ``rounds`` releases of the client-sampled Gaussian mechanism."""
    if rounds == 0:
        return 0.0
    return compute_epsilon([(noise_multiplier, client_rate, rounds)], delta=delta, accountant=accountant).epsilon


def calibrate_client_level(*, target_epsilon: float, delta: float, client_rate: float, rounds: int,
                           accountant: str = "prv") -> float:
    """z such that ε after all planned rounds is ≤ ``target_epsilon``."""
    return calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=delta, sample_rate=client_rate,
                                      steps=rounds, accountant=accountant)


def run_noise_multiplier(cfg: VeilConfig) -> float | None:
    """The run's z (None unless the run uses client-level DP): calibrated to ``privacy.target_epsilon`` when set,
    else ``privacy.noise_multiplier``. The server and every client compute the same value from the run config."""
    priv, fed = cfg.privacy, cfg.federation
    if not (priv.enabled and priv.level == "client"):
        return None
    if priv.target_epsilon > 0:
        return calibrate_client_level(target_epsilon=priv.target_epsilon, delta=priv.delta,
                                      client_rate=fed.clients_per_round / fed.num_clients, rounds=fed.rounds,
                                      accountant=priv.accountant)
    return priv.noise_multiplier
