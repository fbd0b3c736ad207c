"""SecAgg+'s internals that veil uses on both sides: the protocol's record keys, and its mask generator replaced.

**The record keys** (``flwr.common.secure_aggregation.secaggplus_constants``, not re-exported by Flower's public
API): the name of the config record a SecAgg+ message carries, the stage and parameter keys in it, and the record in
which ``secaggplus_mod`` keeps a node's protocol state. veil's node guard (:mod:`veil.client.secagg_guard`), its
roster check and its server workflow read them from here.

**The mask generator** (``flwr/common/secure_aggregation/secaggplus_utils.py``, ``pseudo_rand_gen``): every mask
(a node's private mask from its 32-byte seed, each pairwise mask from a 32-byte ECDH-derived key) comes from
``np.random.RandomState(seed32)`` where ``seed32`` XOR-folds the key's 4-byte words into one 32-bit integer. A
coordinator who holds a node's masked vector and can remove all but one mask (privacy review N5) needs ~2^32
generator runs to find the last one. :func:`full_strength_masks` rebinds the name in the three modules that hold it
(the utils module, the node's ``secaggplus_mod`` module and the ServerApp's ``secaggplus_workflow`` module, both of
which import it by name) to :func:`full_key_masks`: ChaCha20 keyed with SHA-256 of the *whole* key, so finding a
mask costs a 256-bit key search. Node and ServerApp must use the same generator or the masks do not cancel: veil's
workflow announces :data:`MASK_GENERATOR` in its SETUP message and a node refuses a SETUP without it
(:mod:`veil.client.secagg_guard`). The patch refuses any Flower version outside :data:`veil.flower.TESTED` (one
line). Upstream proposal: docs/upstream/mask-seed-strength.md.
"""

from __future__ import annotations

import hashlib
import importlib

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage

from veil.flower import FlowerVersionError, Reach, check_version

__all__ = ["MASK_GENERATOR", "RECORD_KEY_CONFIGS", "RECORD_KEY_STATE", "REACHES", "Key", "Stage", "full_key_masks",
           "full_strength_masks"]

MASK_GENERATOR = "chacha20-sha256/1"  # what a node checks the ServerApp announces (both sides must agree)
_CONSTANTS = "flwr.common.secure_aggregation.secaggplus_constants"
_MASK_UTILS = "flwr.common.secure_aggregation.secaggplus_utils"
_MASK_CALLERS = (_MASK_UTILS, "flwr.client.mod.secure_aggregation.secaggplus_mod",
                 "flwr.server.workflow.secure_aggregation.secaggplus_workflow")
_MASK_DOMAIN = b"veil secagg+ mask " + MASK_GENERATOR.encode() + b"\x00"

REACHES = (
    *(Reach(_CONSTANTS, name) for name in ("RECORD_KEY_CONFIGS", "RECORD_KEY_STATE", "Key", "Stage")),
    *(Reach(_CONSTANTS, f"Key.{name}") for name in ("STAGE", "SHARE_NUMBER", "THRESHOLD", "CLIPPING_RANGE",
                                                     "TARGET_RANGE", "MOD_RANGE", "SAMPLE_NUMBER", "SOURCE_LIST",
                                                     "ACTIVE_NODE_ID_LIST", "DEAD_NODE_ID_LIST", "PUBLIC_KEY_1",
                                                     "PUBLIC_KEY_2")),
    *(Reach(_CONSTANTS, f"Stage.{name}") for name in ("SETUP", "SHARE_KEYS", "COLLECT_MASKED_VECTORS", "UNMASK")),
    *(Reach(module, "pseudo_rand_gen", ("seed", "num_range", "dimensions_list")) for module in _MASK_CALLERS),
)


def full_key_masks(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Masks in ``[0, num_range)`` (a power of 2) for arrays of the given shapes, from every bit of ``seed``.

    The stream is ChaCha20 (RFC 8439; ``cryptography``) under the key SHA-256(domain || seed), nonce and counter 0;
    each value is one little-endian 64-bit word of the stream reduced mod ``num_range`` (exactly uniform, as
    ``num_range`` divides 2^64). Arrays take consecutive words in order; a 0-d shape takes one word. Same seed, same
    masks on the node and in the ServerApp; the signature is Flower's ``pseudo_rand_gen``'s.
    """
    if not isinstance(seed, bytes) or len(seed) < 16:
        raise ValueError(f"a SecAgg+ mask seed must be at least 16 bytes, got {seed!r:.40}")
    if num_range < 2 or num_range & (num_range - 1) or num_range > 2**62:
        raise ValueError(f"num_range={num_range} is invalid: expected a power of 2 in [2, 2**62]")
    sizes = [int(np.prod(dim, dtype=np.int64)) for dim in dimensions_list]
    key = hashlib.sha256(_MASK_DOMAIN + seed).digest()
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(8 * sum(sizes)))
    words = np.frombuffer(stream, dtype="<u8") & np.uint64(num_range - 1)
    values = words.astype(np.int64)
    out, start = [], 0
    for dim, size in zip(dimensions_list, sizes):
        out.append(values[start:start + size].reshape(dim))
        start += size
    return out


full_key_masks.veil_full_key_masks = True  # type: ignore[attr-defined]


def full_strength_masks() -> None:
    """Make every SecAgg+ mask of this process come from :func:`full_key_masks` (idempotent; module docstring).

    Call it in every process that masks or unmasks: the node's (veil's guard does, on each message) and the
    ServerApp's (:class:`veil.flower.workflows.DropoutTolerantSecAggPlus` does). Raises :class:`FlowerVersionError`,
    one line, on an untested Flower or when a module no longer holds Flower's generator under that name."""
    version = check_version("SecAgg+ mask patch")
    modules = [importlib.import_module(name) for name in _MASK_CALLERS]
    flower_gens = {id(g): g for g in (getattr(m, "pseudo_rand_gen", None) for m in modules) if g is not full_key_masks}
    for gen in flower_gens.values():
        code = getattr(gen, "__code__", None)
        if len(flower_gens) > 1 or code is None or code.co_varnames[:3] != ("seed", "num_range", "dimensions_list"):
            raise FlowerVersionError(f"flwr {version} no longer calls one pseudo_rand_gen in "
                                     f"{', '.join(_MASK_CALLERS)}; veil's SecAgg+ mask patch does not fit it")
    for module in modules:
        module.pseudo_rand_gen = full_key_masks  # type: ignore[attr-defined]
