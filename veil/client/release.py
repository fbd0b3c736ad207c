"""What a node releases in a round, around the training itself: the received weights checked before any data is
read, the DP release finished (noise alone where the round had nothing usable, the client-level clip and noise
share), and the update made sendable (post-processing: no privacy cost).

Each step depends only on the run config, the owner's settings and the release itself (review 2026-12-07, N1–N3):

* :func:`received_weights` — the coordinator's weights, cut from one vector (:mod:`veil.wire`) and refused when they
  are not the model's trainable tensors, not finite, or beyond ±:data:`MAX_RECEIVED_ABS`;
* :func:`finish_release` — at client level the NaN-safe clip plus this node's noise share, never an exact zero; at
  sample level an update that is missing or not finite becomes fresh noise of the declared std
  (:func:`veil.privacy.release.noise_only_update`), never zeros;
* :func:`sendable` — non-finite values to 0 and an update beyond SecAgg+'s range scaled into it (logged), in the
  layout the weights arrived in; :func:`upload_bytes` its size on the wire.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from veil.client.settings import NodeSettings
from veil.client.trainer import LocalPlan
from veil.conf.schema import VeilConfig
from veil.errors import NodeRefusal, VeilError
from veil.privacy.release import all_finite, noise_only_update
from veil.wire import flatten, is_flat, unflatten

__all__ = ["MAX_RECEIVED_ABS", "check_received", "client_level_release", "finish_release", "is_client_level",
           "postprocess_update", "received_weights", "sendable", "upload_bytes", "zeros_like"]

log = logging.getLogger("veil.client")

# Received weights beyond this magnitude are refused before any data is touched (LoRA adapters and heads are O(1)).
# Kept at 1e4, not lowered (review 2026-12-07, N2): the engines a node runs, hooks and bk, hold ||contribution|| <= C
# for adversarial weights at this very bound (tests/test_engine_bound.py); only ghost clipping broke it (from ~1e3
# up), and a node never runs ghost. A tighter bound would add no privacy and could refuse honest runs whose weights
# grow (a head at a large model.head_init_scale, many FedAdam rounds).
MAX_RECEIVED_ABS = 1e4


def received_weights(parameters: list[np.ndarray], expected: list[np.ndarray]) -> tuple[list[np.ndarray], bool]:
    """The received weights as the model's trainable tensors, checked (:func:`check_received`), and whether they came
    as the coordinator's one vector (the reply then goes back in kind).

    Raises
    ------
    NodeRefusal
        A vector of the wrong size, or what :func:`check_received` refuses.
    """
    flat = is_flat(parameters, expected)
    if flat:
        try:
            parameters = unflatten(parameters[0], expected)
        except ValueError:
            raise NodeRefusal("the received weights do not match this node's model (size differs)") from None
    check_received(parameters, expected)
    return parameters, flat


def check_received(parameters: list[np.ndarray], expected: list[np.ndarray]) -> None:
    """Refuse weights that are not the model's trainable tensors, or not finite, or absurdly large — before any
    data is read, so that the check says nothing about the data.

    Raises
    ------
    NodeRefusal
        A count or shape mismatch, a non-finite value, or a value beyond :data:`MAX_RECEIVED_ABS`.
    """
    if len(parameters) != len(expected) or any(np.shape(a) != np.shape(b) for a, b in zip(parameters, expected)):
        raise NodeRefusal("the received weights do not match this node's model (count or shapes differ)")
    for a in parameters:
        arr = np.asarray(a)
        if arr.size and not (np.isfinite(arr).all() and float(np.abs(arr).max()) <= MAX_RECEIVED_ABS):
            raise NodeRefusal(f"the received weights hold a non-finite value or one beyond +-{MAX_RECEIVED_ABS:g}")


def is_client_level(cfg: VeilConfig) -> bool:
    """Whether the run's release is client-level DP (one clip and noise share per update)."""
    return bool(cfg.privacy.enabled and cfg.privacy.level == "client")


def finish_release(update: list[np.ndarray] | None, received: list[np.ndarray], *, plan: LocalPlan,
                   cfg: VeilConfig, settings: NodeSettings, server_round: int) -> tuple[list[np.ndarray], float]:
    """The round's DP release from the trained ``update`` (None: the round had nothing usable or failed), and the
    std of the noise share this node added (0 at sample level).

    Raises
    ------
    VeilError
        Nothing usable in a round without DP (nothing to release: the node declines).
    """
    if is_client_level(cfg):
        return client_level_release(update, received, cfg=cfg, settings=settings, z=plan.noise_multiplier)
    if update is not None and not all_finite(update):
        log.warning("round %d: the update is not finite; this round releases noise only", server_round)
        update = None
    if update is None:
        if not plan.private:
            raise VeilError("this node has no usable example for the run")
        update = noise_only_update(received, steps=plan.steps, noise_multiplier=plan.noise_multiplier,
                                   max_grad_norm=plan.max_grad_norm, optimizer=plan.optimizer, lr=plan.lr,
                                   expected_batch_size=plan.expected_batch_size or max(1, plan.batch_size))
    return update, 0.0


def client_level_release(update: list[np.ndarray] | None, received: list[np.ndarray], *, cfg: VeilConfig,
                         settings: NodeSettings, z: float) -> tuple[list[np.ndarray], float]:
    """Clip the whole update to S (NaN-safe: a non-finite update, or none, counts as zeros); with distributed noise,
    add this node's share N(0, (z·S)²/min-cohort). Returns the release and the share's std (0 with central noise,
    which only an opted-in owner accepts). The share is always added: never an exact-zero release (review N3a)."""
    from veil.privacy.client_level import add_gaussian_noise, clip_update, distributed_share_std

    clipped, norm = clip_update(zeros_like(received) if update is None else update, clip=cfg.privacy.max_grad_norm)
    if not math.isfinite(norm):
        log.warning("the local update is not finite; this round releases the noise share alone")
    if cfg.privacy.noise_placement != "distributed":
        return clipped, 0.0
    share = distributed_share_std(noise_multiplier=z, clip=cfg.privacy.max_grad_norm,
                                  clients_per_round=settings.min_cohort)
    return add_gaussian_noise(clipped, std=share), share


def postprocess_update(update: list[np.ndarray], cfg: VeilConfig) -> list[np.ndarray]:
    """Make the DP release sendable — post-processing, so no privacy cost and nothing the server can tell apart:
    non-finite values become 0, and an update beyond SecAgg+'s clipping range is scaled into it (never clipped
    value by value). Both are logged on the node."""
    out = [np.asarray(a, dtype=np.float32) for a in update]
    bad = sum(int((~np.isfinite(a)).sum()) for a in out)
    if bad:
        log.warning("the update had %d non-finite value(s); they are sent as 0", bad)
        out = [np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0) for a in out]
    if cfg.secagg.enabled:
        peak = max((float(np.abs(a).max()) for a in out if a.size), default=0.0)
        limit = cfg.secagg.clipping_range
        if peak > limit:
            factor = np.float32(limit / peak * (1 - 1e-6))
            log.warning("an update value of %.3g lies outside secagg.clipping_range=%g; the update is scaled by %.3g "
                        "to fit (raise secagg.clipping_range or lower federation.lr)", peak, limit, factor)
            out = [a * factor for a in out]
    return out


def sendable(update: list[np.ndarray], cfg: VeilConfig, *, flat: bool) -> list[np.ndarray]:
    """:func:`postprocess_update`, in the layout the weights arrived in (one vector when ``flat``)."""
    out = postprocess_update(update, cfg)
    return [flatten(out)] if flat else out


def upload_bytes(update: list[np.ndarray], cfg: VeilConfig) -> int:
    """Bytes of the update on the wire: SecAgg+ sends int64 masked values, plain aggregation float32."""
    return sum(int(a.size) for a in update) * (8 if cfg.secagg.enabled else 4)


def zeros_like(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """float32 zeros of the shapes of ``arrays`` (a refusal's update; a missing client-level update)."""
    return [np.zeros(np.shape(a), dtype=np.float32) for a in arrays]
