"""A node's plan for one round — σ, q, steps, δ, the divisor of each noisy sum, the engine — which
:mod:`veil.client.budget` books.

On a deployed node every figure here is a function of the run config and the owner's flags only, plus the size of
the owner's file *when the node started* (the default δ and the expected batch), never of the examples a run's label
set selects (review 2026-12-07, N1). Where the data used to set a threshold, the node clamps instead of refusing:

* q is the run's ``federation.sample_rate`` capped by the owner's ``--max-sample-rate`` (either alone when the
  other is unset; a run with neither is refused; one rule for both: :func:`veil.client.floor.owner_rate`): both are
  public numbers, so the ledger's ε, and with it whether the budget lets the node train, depends on q, σ and the
  steps alone, never on N (the expected batch is q·N instead);
* σ is the run's (or the one calibrated to its target ε, at this q, over the run's planned steps), raised to fit
  what the ledger leaves, and never below the owner's ``--min-noise-multiplier``;
* δ is the owner's ``--delta``, else 1e-5 (``veil client`` refuses to start without ``--delta`` on a file of more
  than 10,000 rows, where 1e-5 would not be below 1/(10·N)); a run may ask for a δ up to that constant;
* every noisy sum is divided by the expected batch E[B] = max(1, round(q·N)), fixed before any batch is drawn.

So refusing or training, and every reply field but the DP release, is decided before the data is read: the only
refusals left are the run config against the policy (:mod:`veil.client.floor`) and the budget, whose ledger holds
only such figures. A simulated node (the researcher is every owner) keeps the run's own rules: q = 1/⌈N/B⌉ for its
partition, the run's engine, and a refusal below the floor.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from veil.client.floor import check_round, owner_rate
from veil.client.settings import NodeSettings
from veil.client.trainer import LocalPlan, sample_rate_for, steps_for
from veil.conf.schema import DataConfig, VeilConfig
from veil.errors import VeilError

if TYPE_CHECKING:
    from veil.privacy.ledger import LedgerEvent, PrivacyLedger

log = logging.getLogger("veil.client")

@dataclass(frozen=True)
class Sampling:
    """How this node samples in a round: Poisson rate, steps, the fixed divisor (None: Opacus' N·q), δ."""

    sample_rate: float
    steps: int
    expected_batch_size: int | None
    delta: float


def start_rows(settings: NodeSettings) -> int:
    """Rows of the owner's data file when the node started (``veil client`` records them; else counted once)."""
    if settings.start_rows is not None:
        return settings.start_rows
    if settings.data_path is None:
        raise ValueError("start_rows is for deployed nodes (a data file of the owner's)")
    path = Path(settings.data_path)
    stat = path.stat()
    return _count_rows(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _count_rows(path: str, _mtime: int, _size: int) -> int:
    from veil.task.data import read_rows

    return len(read_rows(path, DataConfig(train_path=path)))


def owner_sampling(cfg: VeilConfig, settings: NodeSettings, *, rows: int) -> Sampling:
    """A deployed node's sampling: from the run config, the owner's flags and ``rows`` (the file at start)."""
    fed = cfg.federation
    q = owner_rate(fed.sample_rate, settings.max_sample_rate)
    if q is None and cfg.privacy.enabled and cfg.privacy.level == "sample":  # check_run refuses such a run first
        raise VeilError("the run sets no federation.sample_rate and this node has no --max-sample-rate")
    if q is None:  # client level or no DP: no per-record ε reads q (client level books q = 1, one step)
        q = min(1.0, fed.batch_size / max(rows, 1))
    steps = steps_for(local_epochs=fed.local_epochs, local_steps=fed.local_steps, sample_rate=q)
    return Sampling(sample_rate=q, steps=steps, expected_batch_size=max(1, round(q * rows)),
                    delta=settings.owner_delta(rows))


def shard_sampling(cfg: VeilConfig, settings: NodeSettings, *, examples: int) -> Sampling:
    """A simulated node's sampling: the run's ``federation.sample_rate`` when set (as deployed nodes do), else
    q = 1/⌈N/B⌉ for its partition's N examples (the run's own rule)."""
    fed = cfg.federation
    q = fed.sample_rate or sample_rate_for(batch_size=fed.batch_size, examples=examples)
    steps = steps_for(local_epochs=fed.local_epochs, local_steps=fed.local_steps, sample_rate=q)
    return Sampling(sample_rate=q, steps=steps, expected_batch_size=None, delta=settings.owner_delta(examples))


@functools.lru_cache(maxsize=16)
def calibrated_sigma(*, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """σ for this run: ε after all the run's planned steps on this node ≤ target (one value for the whole run)."""
    from veil.privacy.calibration import calibrate_noise_multiplier

    sigma = calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate,
                                       steps=steps, accountant=accountant)
    log.info("calibrated noise multiplier %.4f for epsilon <= %.3g over %d steps at q=%.4f",
             sigma, target_epsilon, steps, sample_rate)
    return sigma


def plan_sample_level(cfg: VeilConfig, settings: NodeSettings, sampling: Sampling, *, ledger: PrivacyLedger,
                      run_id: str, server_round: int, engine: str) -> tuple[LocalPlan, LedgerEvent]:
    """σ and the ledger event of a DP-SGD round; :class:`PrivacyBudgetExhausted` if the owner's budget says no.

    In a shared-noise run (:func:`noise_shares`) the node's own σ is the run's σ over sqrt(M), each noisy sum is
    divided by the run's ``federation.batch_size`` and the step size follows the run's σ: all public, so every
    honest node sends the same kind of step. The ledger books the node's own σ (its bound against a coordinator
    that colludes with the other owners or breaks SecAgg+)."""
    from veil.privacy.calibration import shared_noise_sigma
    from veil.privacy.ledger import LedgerEvent

    priv, q, steps, delta = cfg.privacy, sampling.sample_rate, sampling.steps, sampling.delta
    shares = noise_shares(cfg, settings)
    run_sigma: float | None = None  # shared noise: the run's public σ, which sets every node's lr
    sigma = priv.noise_multiplier
    if shares is not None:
        run_sigma = shared_noise_sigma(cfg)
        sigma = run_sigma / math.sqrt(shares)
    elif priv.target_epsilon > 0:
        sigma = calibrated_sigma(target_epsilon=priv.target_epsilon, delta=delta, sample_rate=q,
                                 steps=steps * cfg.federation.rounds, accountant=priv.accountant)
    sigma = max(sigma, sigma_for_budget(cfg, settings, ledger, sigma=sigma, q=q, steps=steps,
                                        server_round=server_round, delta=delta))
    if settings.simulated:
        check_round(settings, noise_multiplier=sigma, sample_rate=q)  # the run's own floor (floor.py)
    elif sigma < settings.min_noise_multiplier:  # clamp, never refuse: the owner's floor is a floor
        log.info("round %d: noise multiplier %.4f raised to the owner's floor %.4f", server_round, sigma,
                 settings.min_noise_multiplier)
        sigma = settings.min_noise_multiplier
    event = LedgerEvent(run_id=run_id, round=server_round, noise_multiplier=sigma, sample_rate=q, steps=steps,
                        delta=delta)
    ledger.check_budget(event, max_epsilon=settings.max_epsilon, delta=delta, accountant=priv.accountant)
    fed = cfg.federation
    lr_sigma = sigma if run_sigma is None else run_sigma
    lr = noise_scaled_lr(fed.lr, sigma=lr_sigma, ref=fed.lr_noise_ref)
    if lr != fed.lr:
        log.info("round %d: lr %.4g (federation.lr %.4g x lr_noise_ref %.4g / sigma %.4f%s)", server_round, lr, fed.lr,
                 fed.lr_noise_ref, lr_sigma, "" if run_sigma is None else ", the run's")
    if run_sigma is not None:
        log.info("round %d: shared noise: this node adds sigma %.4f = the run's %.4f / sqrt(%d), its --min-cohort",
                 server_round, sigma, run_sigma, shares)
    plan = LocalPlan(steps=steps, batch_size=fed.batch_size, lr=lr, optimizer=fed.optimizer, private=True,
                     noise_multiplier=sigma, max_grad_norm=round_clip(cfg, server_round), grad_sample_mode=engine,
                     sample_rate=q, expected_batch_size=fed.batch_size if run_sigma is not None
                     else sampling.expected_batch_size)
    return plan, event


def round_clip(cfg: VeilConfig, server_round: int) -> float:
    """C_t, the per-sample clipping bound of round ``server_round``: ``privacy.max_grad_norm``, or with
    ``privacy.max_grad_norm_final`` set, C·(C_final/C)^((t-1)/(R-1)) over the run's R = ``federation.rounds``
    (C_final after round R, e.g. on a resume with more rounds). Round number and run config only: every node of a
    round clips at the same public C_t, and σ, a multiplier of it, keeps the ledger's ε (issue 22: late in a run the
    clipped gradients are small, and the noise σ·C_t shrinks with them)."""
    priv, rounds = cfg.privacy, cfg.federation.rounds
    if not priv.max_grad_norm_final:
        return priv.max_grad_norm
    frac = min(1.0, max(0, server_round - 1) / max(1, rounds - 1))
    return float(priv.max_grad_norm * (priv.max_grad_norm_final / priv.max_grad_norm) ** frac)


def noise_shares(cfg: VeilConfig, settings: NodeSettings) -> int | None:
    """M, the number of owners whose noise this node counts on in each SecAgg+ sum (``privacy.share_noise``).

    The owner's ``--min-cohort`` (1: its own noise alone) when the run shares noise and the round's sum is one
    DP-SGD step: SecAgg+ on, one plain SGD step a round, a public ``federation.sample_rate``
    (:meth:`VeilConfig.shared_noise_faults`, the schema's own predicate); None otherwise (an ordinary DP-SGD round). In a shared run every
    node, M = 1 included, divides by the run's batch size and steps at the run's lr, so the sum stays one step.
    Run config and owner flag only, never the data. Against a coordinator that breaks SecAgg+
    or colludes with other owners the node's update carries its own σ/sqrt(M) alone, and its ledger books that;
    the owner opts in (``--min-cohort`` defaults to 1) and should pin the roster with ``--max-dropouts 0``."""
    shared = cfg.privacy.share_noise and not cfg.shared_noise_faults()
    return max(1, int(settings.min_cohort)) if shared else None


def cohort_counted_on(cfg: VeilConfig, settings: NodeSettings) -> int:
    """M, the owners whose noise shares a deployed node counts on in every sum it joins: its ``--min-cohort`` when
    its noise is a share (``privacy.share_noise``, or client-level noise placed on the nodes), else 1. The SecAgg+
    guard refuses a SETUP whose neighbourhood is smaller (:class:`veil.client.secagg_guard.SecAggPolicy`). A
    simulated node counts on nothing: the researcher is every owner and the coordinator."""
    if settings.simulated:
        return 1
    priv = cfg.privacy
    shares = noise_shares(cfg, settings)
    if shares is not None:
        return shares
    if priv.enabled and priv.level == "client" and priv.noise_placement == "distributed":
        return max(1, int(settings.min_cohort))
    return 1


def noise_scaled_lr(lr: float, *, sigma: float, ref: float) -> float:
    """The DP-SGD step size for noise multiplier ``sigma``: ``lr × min(1, ref / sigma)`` (``federation.lr_noise_ref``;
    ``ref`` 0: ``lr``). A function of σ alone, which the release's own noise scale already shows, so it reveals
    nothing more; and the noise the update carries (∝ lr·σ) stays at most lr·ref however small ε is."""
    if ref <= 0 or sigma <= ref:
        return lr
    return lr * ref / sigma


def sigma_for_budget(cfg: VeilConfig, settings: NodeSettings, ledger: PrivacyLedger, *, sigma: float, q: float,
                     steps: int, server_round: int, delta: float) -> float:
    """σ that fits the run's remaining rounds into what the owner's ledger leaves of its budget (review L2):
    ``sigma`` itself when it fits, else the calibrated larger one (else ``sigma``: the budget check refuses)."""
    budget, priv = settings.max_epsilon, cfg.privacy
    if not math.isfinite(budget) or priv.target_epsilon <= 0:
        return sigma
    remaining = max(cfg.federation.rounds - max(server_round, 1) + 1, 1) * steps
    if ledger.epsilon_if(planned_event(sigma, q, remaining, delta), delta=delta,
                         accountant=priv.accountant).epsilon <= budget:
        return sigma
    from veil.privacy.calibration import calibrate_noise_multiplier

    try:
        return calibrate_noise_multiplier(target_epsilon=budget, delta=delta, sample_rate=q, steps=remaining,
                                          accountant=priv.accountant, history=ledger.history())
    except VeilError:
        return sigma


def plan_client_level(cfg: VeilConfig, settings: NodeSettings, *, steps: int, delta: float, ledger: PrivacyLedger,
                      run_id: str, server_round: int) -> tuple[LocalPlan, LedgerEvent]:
    """Client-level DP: plain local training; the release is the clipped update plus this node's noise share.

    The share is z·S/sqrt(M) with M the owner's ``--min-cohort`` (never the run's clients_per_round). Per record,
    two clipped updates differ by up to 2S, and what leaves this node alone carries noise z·S/sqrt(M): the ledger
    books a Gaussian of multiplier z/(2·sqrt(M)) without sampling amplification (q = 1), so the per-record bound
    holds even against a coordinator that unmasks this node's update (review N4)."""
    from veil.privacy.client_level import run_noise_multiplier
    from veil.privacy.ledger import LedgerEvent

    z = run_noise_multiplier(cfg)
    if z is None:
        raise ValueError("plan_client_level is only for runs with privacy.level=client")
    per_record = z / (2.0 * math.sqrt(settings.min_cohort))
    check_round(settings, noise_multiplier=per_record, sample_rate=0.0)  # z and M: run config and policy only
    event = LedgerEvent(run_id=run_id, round=server_round, noise_multiplier=per_record, sample_rate=1.0, steps=1,
                        delta=delta)
    ledger.check_budget(event, max_epsilon=settings.max_epsilon, delta=delta, accountant=cfg.privacy.accountant)
    fed = cfg.federation
    plan = LocalPlan(steps=steps, batch_size=fed.batch_size, lr=fed.lr, optimizer=fed.optimizer, private=False,
                     noise_multiplier=z, max_grad_norm=cfg.privacy.max_grad_norm)
    return plan, event


def plain_plan(cfg: VeilConfig, steps: int) -> LocalPlan:
    """Training without DP (only on a node without any limit: :func:`veil.client.floor.check_run`)."""
    fed = cfg.federation
    return LocalPlan(steps=steps, batch_size=fed.batch_size, lr=fed.lr, optimizer=fed.optimizer, private=False,
                     noise_multiplier=0.0, max_grad_norm=cfg.privacy.max_grad_norm)


def planned_event(sigma: float, q: float, steps: int, delta: float) -> LedgerEvent:
    from veil.privacy.ledger import LedgerEvent

    return LedgerEvent(run_id="planned", round=0, noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)

