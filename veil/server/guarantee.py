"""The ε the coordinator states, from what it knows without any per-client value (DESIGN.md decision 7).

Nodes report no ε, σ, sample rate or data size (review C2, M1), so the coordinator's per-round ``epsilon_max`` is
one of these, named by its *basis* (``summary.json``'s ``epsilon_basis``; the model card words each one):

``client_level``
    Client-level DP: the coordinator's own accountant over the noise the round's contributors actually added,
    composed over rounds without amplification by client sampling (q = 1; review H3).
    See :class:`veil.privacy.client_level.ClientLevelAccountant`.
``simulated_ledgers``
    Sample level in simulation: the largest ε over the simulated owners' own ledgers
    (``<run>/nodes/node-*/privacy_ledger.json``) at the run's δ. A real coordinator never sees these figures; the
    row keeps them under ``node_*`` keys, clearly node-side.
``target``
    Sample level, ``privacy.target_epsilon > 0``: every node calibrates σ so that its ε for this run, at its owner's
    δ ≤ the run's δ, is at most the target after all the run's planned rounds (more noise only lowers it). A bound
    for the whole run, not a per-round figure. It does not hold when ``federation.rounds`` was raised on resume.
``fixed_sigma``
    Sample level, fixed σ and ``federation.local_steps > 0``: ε of ``local_steps × rounds run`` Gaussian steps at
    the run's σ, subsampled at the run's public ``federation.sample_rate`` (every deployed node's q is at most that),
    or with q = 1 (no amplification) when the run states none; valid whatever each owner's data size.
``shared_noise``
    Sample level with ``privacy.share_noise``: ε of ``rounds run`` single steps at the run's σ (its
    ``noise_multiplier``, or the σ calibrated to its target from public figures,
    :func:`veil.privacy.calibration.shared_noise_sigma`), subsampled at the run's ``federation.sample_rate``: the
    noise of each SecAgg+ sum, under the assumption that it holds the shares of at least M honest owners (each
    owner's ``--min-cohort``). Each owner's own ledger books its share alone (in simulation: ``node_*`` keys).
``see_ledgers``
    Any other sample-level case (local epochs: the step count depends on each owner's N; rounds raised on a
    resume of a calibrated run): NaN; each owner's ledger (``veil privacy report``) holds its figure.
``none``
    DP off: 0, and the model card says the model is not private.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from veil.conf.schema import VeilConfig
from veil.errors import VeilError
from veil.privacy.accounting import compute_epsilon

log = logging.getLogger("veil.server")

BASES = ("client_level", "simulated_ledgers", "target", "fixed_sigma", "shared_noise", "see_ledgers", "none")
NODES_DIR = "nodes"  # a simulation's owners live under <run dir>/nodes/node-<i>/ (veil.simulation)


def simulated_ledgers(run_dir: Path) -> list[Path]:
    """The simulated owners' ledgers of a run directory (none in a deployment's run directory)."""
    return sorted((run_dir / NODES_DIR).glob("node-*/privacy_ledger.json"))


def epsilon_basis(cfg: VeilConfig, *, simulation: bool, planned_rounds: set[int] | None = None) -> str:
    """Which of :data:`BASES` this run's ``epsilon_max`` rests on."""
    priv, fed = cfg.privacy, cfg.federation
    if not priv.enabled:
        return "none"
    if priv.level == "client":
        return "client_level"
    if priv.share_noise:
        return "shared_noise"
    if simulation:
        return "simulated_ledgers"
    if priv.target_epsilon > 0:
        return "target" if len(planned_rounds or {fed.rounds}) == 1 else "see_ledgers"
    return "fixed_sigma" if fed.local_steps > 0 else "see_ledgers"


def coordinator_epsilon(cfg: VeilConfig, *, basis: str, rounds_run: int) -> float:
    """``epsilon_max`` for the ``target``, ``fixed_sigma``, ``shared_noise``
    Sample level with ``privacy.share_noise``: ε of ``rounds run`` single steps at the run's σ (its
    ``noise_multiplier``, or the σ calibrated to its target from public figures,
    :func:`veil.privacy.calibration.shared_noise_sigma`), subsampled at the run's ``federation.sample_rate``: the
    noise of each SecAgg+ sum, under the assumption that it holds the shares of at least M honest owners (each
    owner's ``--min-cohort``). Each owner's own ledger books its share alone (in simulation: ``node_*`` keys).
``see_ledgers`` and ``none`` bases."""
    priv = cfg.privacy
    if basis == "none":
        return 0.0
    if basis == "target":
        return float(priv.target_epsilon)
    if basis == "fixed_sigma":
        steps = cfg.federation.local_steps * rounds_run
        return compute_epsilon([(priv.noise_multiplier, fixed_sigma_rate(cfg), steps)], delta=priv.delta,
                               accountant=priv.accountant).epsilon
    if basis == "shared_noise":
        from veil.privacy.calibration import shared_noise_sigma

        return compute_epsilon([(shared_noise_sigma(cfg), cfg.federation.sample_rate, rounds_run)], delta=priv.delta,
                               accountant=priv.accountant).epsilon if rounds_run else 0.0
    if basis == "see_ledgers":
        return math.nan
    raise ValueError(f"basis {basis!r} is not the coordinator's own: use the accountant or the simulated ledgers")


def fixed_sigma_rate(cfg: VeilConfig) -> float:
    """The sampling rate the ``fixed_sigma`` bound is accounted at: the run's ``federation.sample_rate``, which every
    deployed node's q is at most (an owner's ``--max-sample-rate`` only lowers it; ε grows with q), else 1."""
    rate = float(cfg.federation.sample_rate)
    return rate if 0 < rate < 1 else 1.0


def simulated_node_figures(paths: list[Path], *, delta: float, accountant: str) -> dict[str, float]:
    """Node-side figures of a simulation, read from the simulated owners' own ledgers (``node_*`` keys).

    ``node_epsilon_max``: the largest ledger ε at ``delta``; ``node_noise_multiplier_min`` and
    ``node_sample_rate_max``: the smallest σ and largest q any owner used. Empty when no ledger holds an event.
    """
    from veil.privacy.ledger import PrivacyLedger

    eps, sigmas, rates = [], [], []
    for path in paths:
        try:
            ledger = PrivacyLedger.open(path, create=False)
        except (VeilError, OSError) as err:  # a node writing its first event, or a broken file: skip it
            log.warning("simulated node ledger %s unreadable (%s); left out of node_* figures", path, err)
            continue
        if not ledger.events:
            continue
        eps.append(ledger.epsilon(delta=delta, accountant=accountant).epsilon)
        sigmas += [e.noise_multiplier for e in ledger.events]
        rates += [e.sample_rate for e in ledger.events]
    if not eps:
        return {}
    return {"node_epsilon_max": max(eps), "node_noise_multiplier_min": min(sigmas),
            "node_sample_rate_max": max(rates)}
