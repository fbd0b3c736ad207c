"""How model weights travel between the coordinator and the nodes: all trainable tensors in ONE float32 vector.

Why: Flower 1.41 sends a message's ``ArrayRecord`` as one object per array (and its chunks), and a deployed hop
moves each object in its own HTTP request (TLS, node authentication, a SQL session in the SuperLink), pushed and
pulled two at a time. A SecAgg+ fit exchange crosses ServerApp -> SuperLink -> SuperNode -> executor and back, so
a LoRA model's 10 (tiny BERT) to 26 (MiniLM-L6) tensors cost about a third of a deployed round for 2,180 values
(benchmark deploy_overhead, docs/benchmarks.md). One vector per message is one array object whatever the
model; the arithmetic on it (the mean, SecAgg+'s per-value quantisation and masks, robust aggregators, which are
coordinate-wise or use distances over all values) is the same as on the tensors.

The coordinator sends ``[flatten(global)]``; a node unflattens it against its own model's trainable tensors
(:func:`unflatten`, which refuses a vector of the wrong size before any data is read) and replies in the layout it
received, so a node also accepts the per-tensor list. Hand-written: Flower has no option to pack a record's arrays.

The reply contract lives here too, for both sides: :data:`REPLY_KEYS` is everything a node's reply carries
besides the update and its weight; the node sends exactly these keys and the coordinator aggregates only these.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["CAN_TRAIN_NEXT", "NOISE_STD", "REFUSED", "REPLY_KEYS", "UPLOAD_BYTES", "flatten", "is_flat",
           "reply_metrics", "unflatten"]

# Everything a node's reply carries besides the update and its weight (1: contribution, 0: refusal); none of it
# depends on the owner's data beyond one bit per round (DESIGN.md decision 7, docs/privacy.md "What leaves a node").
CAN_TRAIN_NEXT = "can_train_next"  # bool: the owner's budget allows one more identical round
REFUSED = "refused"  # int 0/1
UPLOAD_BYTES = "upload_bytes"  # int: the update's size on the wire
NOISE_STD = "noise_std"  # float: std of this node's client-level noise share (0.0 at sample level)
REPLY_KEYS = (CAN_TRAIN_NEXT, REFUSED, UPLOAD_BYTES, NOISE_STD)


def reply_metrics(*, can_train_next: bool, refused: bool, upload_bytes: int,
                  noise_std: float) -> dict[str, bool | int | float]:
    """A node's reply fields: exactly :data:`REPLY_KEYS`, each as the type the coordinator reads."""
    return {CAN_TRAIN_NEXT: bool(can_train_next), REFUSED: int(refused), UPLOAD_BYTES: int(upload_bytes),
            NOISE_STD: float(noise_std)}


def flatten(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """All of ``arrays`` raveled, in order, as one float32 vector."""
    if not arrays:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in arrays])


def is_flat(received: Sequence[np.ndarray], like: Sequence[np.ndarray]) -> bool:
    """Whether ``received`` is one vector standing for the tensors ``like`` (rather than the tensors themselves)."""
    if len(received) != 1 or np.ndim(received[0]) != 1:
        return False
    return len(like) != 1 or np.shape(like[0]) != np.shape(received[0])


def unflatten(vector: np.ndarray, like: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``vector`` cut into tensors of the shapes and dtypes of ``like``.

    Raises
    ------
    ValueError
        ``vector`` is not 1-D or does not hold exactly as many values as ``like``.
    """
    vector = np.asarray(vector)
    sizes = [int(np.size(a)) for a in like]
    if vector.ndim != 1 or vector.size != sum(sizes):
        raise ValueError(f"a weight vector of shape {vector.shape} does not hold the model's {sum(sizes)} values")
    out, start = [], 0
    for a, n in zip(like, sizes, strict=True):
        out.append(vector[start:start + n].reshape(np.shape(a)).astype(np.asarray(a).dtype, copy=False))
        start += n
    return out
