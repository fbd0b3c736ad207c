"""Client-level DP (McMahan et al., "Learning Differentially Private Recurrent Language Models",
arXiv:1710.06963): each client's whole update is clipped to L2 norm S and Gaussian noise of std z·S is added to
the sum of the round's updates, so the published model is (ε, δ)-DP with respect to any one client's entire data.

Two placements of the noise:

* ``distributed`` (default with SecAgg+): each of the m clients of a round adds N(0, (z·S)²/m) to its own clipped
  update; SecAgg+ reveals only the sum, which carries N(0, (z·S)²) — no party ever sees a less noisy aggregate.
  The guarantee relies on the round's other clients adding their shares.
* ``central``: the server adds N(0, (z·S)²) to the sum (a trusted-server model; the server could skip it).

Accounting on the server (:class:`ClientLevelAccountant`, review H3): one Gaussian release per round whose noise
multiplier is what the round's sum really carried, z_r = sqrt(Σ σ_i² + σ_central²) / S over the clients that
*contributed* (a refusing client sends weight 0, so SecAgg+ scales its vector, noise share included, to zero; a
dropped client adds nothing), composed over rounds *without* amplification by client sampling (q = 1): the
coordinator knows who took part, so sampling hides nothing from it, and Flower's fixed-size sampling is not the
Poisson sampling the subsampled accountants assume. Composition through veil's accountants (PRV, Gopi et al.
arXiv:2106.02848; RDP, Mironov et al. arXiv:1908.10530). A node's own ledger records its rounds without
amplification too, since a node cannot verify how the server samples.
Flower's clipping mods clip ``fit`` results as weights; veil's clients send updates, so the clip lives here.
"""

from __future__ import annotations

import math
import secrets

from typing import TYPE_CHECKING

import numpy as np

from veil.privacy.accounting import compute_epsilon
from veil.privacy.calibration import calibrate_noise_multiplier
from veil.privacy.release import nan_safe_norm

if TYPE_CHECKING:
    from veil.conf.schema import VeilConfig


def clip_update(update: list[np.ndarray], *, clip: float) -> tuple[list[np.ndarray], float]:
    """Scale ``update`` to L2 norm at most ``clip``; returns the clipped update and the original norm.

    NaN-safe (review N3c): an update with a non-finite value has norm ``inf`` and is clipped to zeros (factor 0),
    never passed through unclipped (``min(1, clip / nan)`` would be 1)."""
    if clip <= 0:
        raise ValueError(f"clip={clip} must be > 0")
    norm = nan_safe_norm(update)
    if not math.isfinite(norm):
        return [np.zeros(np.shape(a), dtype=np.float32) for a in update], norm
    factor = min(1.0, clip / (norm + 1e-12))
    return [(np.asarray(a, dtype=np.float64) * factor).astype(np.float32) for a in update], norm


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
                                      client_rate=1.0, rounds=fed.rounds,  # q = 1: as the server accounts
                                      accountant=priv.accountant)
    return priv.noise_multiplier


def round_noise_multiplier(noise_stds: list[float], *, clip: float, central_std: float = 0.0) -> float:
    """z_r of one round: the std of the noise the round's sum carried, in units of the clip S.

    ``noise_stds`` are the shares of the clients that contributed (weight > 0); ``central_std`` the server's own.
    Independent Gaussians add in variance. Summed in sorted order so equal rounds give bit-equal z_r (merged by
    the accountant).
    """
    if clip <= 0:
        raise ValueError(f"clip={clip} must be > 0")
    variances = sorted(float(s) ** 2 for s in [*noise_stds, central_std])
    if any(not math.isfinite(v) for v in variances):
        raise ValueError(f"noise stds must be finite, got {noise_stds!r} and central {central_std!r}")
    return math.sqrt(math.fsum(variances)) / clip


class ClientLevelAccountant:
    """The coordinator's client-level ledger: one z_r per round that released a sum, composed with q = 1.

    Kept in the strategy's checkpoint state (:meth:`state_dict`), so a resumed run continues the composition.
    """

    MECHANISM = "client-level gaussian, realised contributors, q=1"

    def __init__(self, *, clip: float) -> None:
        if clip <= 0:
            raise ValueError(f"clip={clip} must be > 0")
        self.clip = float(clip)
        self.rounds: list[tuple[int, float]] = []  # (server round, z_r)

    def record_round(self, server_round: int, *, noise_stds: list[float], central_std: float = 0.0) -> float:
        """Book round ``server_round``'s release; returns its z_r."""
        z = round_noise_multiplier(noise_stds, clip=self.clip, central_std=central_std)
        self.rounds.append((int(server_round), z))
        return z

    def epsilon(self, *, delta: float, accountant: str = "prv") -> float:
        """ε of every booked round as one composition (0 before the first; inf if a round had no noise)."""
        return compute_epsilon([(z, 1.0, 1) for _, z in self.rounds], delta=delta, accountant=accountant).epsilon

    def state_dict(self) -> dict[str, object]:
        return {"mechanism": self.MECHANISM, "clip": self.clip, "rounds": [[r, z] for r, z in self.rounds]}

    def load_state_dict(self, state: dict[str, object]) -> None:
        if set(state) != {"mechanism", "clip", "rounds"} or state["mechanism"] != self.MECHANISM:
            raise ValueError(f"not a client-level accountant state: keys {sorted(state)}")
        if float(state["clip"]) != self.clip:  # type: ignore[arg-type]
            raise ValueError(f"accountant state has clip {state['clip']}, this run {self.clip}")
        self.rounds = [(int(r), float(z)) for r, z in state["rounds"]]  # type: ignore[union-attr]
