"""A data owner's privacy floor, enforced on the node whatever the run config asks (DESIGN.md decision 12).

The owner sets, in the node's own configuration (``veil client --max-epsilon --min-noise-multiplier
--max-sample-rate``), an ε budget (checked against the on-disk ledger in :mod:`veil.client.app`), a minimum noise
multiplier σ and a maximum Poisson sampling rate q. A coordinator, or anyone who can submit a run, may ask for less
noise or larger batches; a deployed node then *clamps* (σ up to the floor, q down to the cap:
:mod:`veil.client.round_plan`), because the point where a refusal would set in depends on the owner's data (its
size, its labels) and a refusal travels in clear. :func:`check_round`'s refusal is for simulated nodes, where the
researcher is every owner, and for client-level runs, whose noise comes from the run config and the owner's cohort
alone. A run that turns DP-SGD off is refused
outright by a node whose owner set any limit: without noise the ε of a release is unbounded. The rest of the
owner's policy is checked here too (:func:`check_run`, :func:`check_delta`): the owner's δ, whether plain
aggregation or server-side noise is acceptable, and which model directory and label source a deployed node uses.

The checks raise :class:`PrivacyFloorError`, a :class:`veil.errors.PrivacyBudgetExhausted`: the node declines the
round and the server goes on without it, as for an exhausted budget.
"""

from __future__ import annotations

import math
from typing import Any

from veil.errors import PrivacyBudgetExhausted

__all__ = ["PrivacyFloorError", "check_delta", "check_round", "check_run", "has_floor", "owner_rate"]


class PrivacyFloorError(PrivacyBudgetExhausted):
    """A run or round asks for weaker privacy than the node's owner allows."""


def _limits(settings: Any) -> tuple[float, float, float]:
    """(max ε, min σ, max q) of a NodeSettings-like object; absent fields mean "no limit"."""
    return (
        float(getattr(settings, "max_epsilon", math.inf)),
        float(getattr(settings, "min_noise_multiplier", 0.0)),
        float(getattr(settings, "max_sample_rate", 1.0)),
    )


def has_floor(settings: Any) -> bool:
    """True when the owner set any privacy limit (finite ε budget, σ minimum or q cap)."""
    max_eps, min_sigma, max_q = _limits(settings)
    return math.isfinite(max_eps) or min_sigma > 0 or max_q < 1.0


def owner_rate(run_rate: float, owner_cap: float) -> float | None:
    """A deployed node's Poisson rate q: the run's ``federation.sample_rate`` (> 0) capped by the owner's
    ``--max-sample-rate`` (< 1), either alone when the other is unset; None when neither is set. The one rule both
    :func:`check_run` (is there a public rate?) and :mod:`veil.client.round_plan` (which rate?) read."""
    given = [r for r in (run_rate if run_rate > 0 else None, owner_cap if owner_cap < 1.0 else None) if r is not None]
    return min(given) if given else None


def check_round(settings: Any, *, noise_multiplier: float, sample_rate: float) -> None:
    """Refuse a DP-SGD round whose planned noise or sampling rate breaks the owner's floor.

    Parameters
    ----------
    settings
        The node's settings (``NodeSettings`` or any object with ``min_noise_multiplier`` / ``max_sample_rate``).
    noise_multiplier
        The σ this round would train with (after any calibration to a target ε).
    sample_rate
        The Poisson sampling rate q = batch size / this node's examples.

    Raises
    ------
    PrivacyFloorError
        σ below ``min-noise-multiplier`` or q above ``max-sample-rate``.
    """
    _max_eps, min_sigma, max_q = _limits(settings)
    if not noise_multiplier >= min_sigma:
        raise PrivacyFloorError(
            f"the run asks for noise multiplier {noise_multiplier:.4g}, below this node's min-noise-multiplier "
            f"{min_sigma:.4g}; round refused: ask the operator for privacy.noise_multiplier >= {min_sigma:g} "
            "(or a lower privacy.target_epsilon)"
        )
    if not sample_rate <= max_q:
        raise PrivacyFloorError(
            f"the run's batch size gives sampling rate {sample_rate:.4g} on this node, above its max-sample-rate "
            f"{max_q:.4g}; round refused: ask the operator for a smaller federation.batch_size"
        )


def check_run(settings: Any, cfg: Any) -> None:
    """Refuse a run whose configuration asks for more than the owner allowed, before any data is read.

    Every check reads only the run config and the owner's settings, never the data, so whether a node refuses
    says nothing about its records.

    Raises
    ------
    PrivacyFloorError
        DP-SGD off on a node with any limit; plain aggregation on a node that requires SecAgg+; client-level DP
        with central noise without the owner's opt-in, or distributed noise that SecAgg+ does not hide; a model
        directory or label source the owner did not give (deployed nodes never open run-config paths); on a
        deployed node, ``model.tiny`` without the owner's ``--allow-test-model``; DP-SGD (sample level) or a step
        count in epochs (``federation.local_steps=0``) with neither ``federation.sample_rate`` nor
        ``--max-sample-rate``, which would make q, hence the budget bit or the step count, the data's size; a
        ``secagg.timeout`` that would end the round before the owner's ``--reply-after`` releases the reply.
    """
    priv, secagg = cfg.privacy, cfg.secagg
    if not priv.enabled and has_floor(settings):
        _refuse("the run turns DP-SGD off (privacy.enabled=false) but this node's owner set a privacy limit; "
                "this node trains only with DP")
    if not secagg.enabled and getattr(settings, "require_secagg", True):
        _refuse("the run turns secure aggregation off (secagg=off), so the server would see this node's update; "
                "the owner allows that only with --allow-plain-aggregation")
    if priv.enabled and priv.level == "client":
        if priv.noise_placement == "central" and not getattr(settings, "allow_central_noise", False):
            _refuse("the run asks for client-level DP with the noise added by the server (noise_placement=central); "
                    "this node adds its own noise unless its owner passes --allow-central-noise")
        if priv.noise_placement == "distributed" and not secagg.enabled and getattr(settings, "min_cohort", 1) > 1:
            _refuse("client-level noise shares sized for a cohort need SecAgg+ to hide each share; "
                    "run with secagg on, or the owner sets --min-cohort 1")
    if not getattr(settings, "simulated", True):
        if cfg.model.tiny and not getattr(settings, "allow_test_model", False):
            _refuse("the run asks for model.tiny (a test model built in code); this node loads only its owner's "
                    "model (--model DIR): ask the operator for a real model, or pass --allow-test-model (tests only)")
        public_rate = owner_rate(cfg.federation.sample_rate, _limits(settings)[2]) is not None
        if priv.enabled and priv.level == "sample" and not public_rate:
            _refuse("the run sets no federation.sample_rate and this node has no --max-sample-rate, so its sampling "
                    "rate, hence when its budget runs out, would follow its data size; ask the operator for "
                    "federation.sample_rate=Q, or start the node with --max-sample-rate Q")
        if cfg.federation.local_steps == 0 and not public_rate:
            _refuse("the run counts local work in epochs (federation.local_steps=0), so this node's step count, and "
                    "its reply's latency, would follow its data size; ask the operator for federation.local_steps "
                    "> 0 or federation.sample_rate=Q, or start the node with --max-sample-rate Q (an epoch is then "
                    "1/Q steps)")
        if cfg.model.path and not cfg.model.tiny and getattr(settings, "model_path", None) is None:
            _refuse(f"the run names the model directory {cfg.model.path!r}; this node loads only its owner's model: "
                    "start it with --model DIR")
        if getattr(settings, "text_only", False) and cfg.task.name == "classification":
            _refuse("the run is a classification run but this node's owner declared a text-only file "
                    "(--label-column ''); the run config never chooses a column of the owner's file")
        hold = float(getattr(settings, "reply_after", 0.0))
        if secagg.enabled and hold > 0 and not hold < secagg.timeout:
            _refuse(f"the run's secagg.timeout={secagg.timeout:g} s would end each round before this node's reply, "
                    f"held to --reply-after {hold:g} s; ask the operator for secagg.timeout > {hold:g}, or lower "
                    "--reply-after")
        if not cfg.data.labels:
            _refuse("the run config carries no data.labels; a deployed node never derives labels from files the "
                    "run names (veil server sets data.labels from its evaluation file)")


def check_delta(settings: Any, *, run_delta: float, owner_delta: float) -> None:
    """Refuse a run that states its guarantee at a δ above the owner's (a larger δ makes any ε cheap).

    A node passes its ``delta_limit`` (the owner's ``--delta``, else 1e-5): a constant, never a δ derived from the
    data's size, so that the refusal says nothing about the data.

    Raises
    ------
    PrivacyFloorError
        ``run_delta`` > ``owner_delta``.
    """
    if not run_delta <= owner_delta:
        _refuse(f"the run asks for delta={run_delta:g}, above this node's delta={owner_delta:g}; ask the operator "
                f"for privacy.delta <= {owner_delta:g}")


def _refuse(message: str) -> None:
    raise PrivacyFloorError(f"round refused: {message}")
