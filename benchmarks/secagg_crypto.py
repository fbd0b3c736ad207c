"""What issue 24 adds to a SecAgg+ round, per node and per server, measured side by side in one process: Flower's
32-bit-seeded mask generator (``np.random.RandomState``) against veil's ChaCha20 one
(:func:`veil.flower.secagg.full_key_masks`), and the owner signature (Ed25519 sign of one statement, verify of each
neighbour's) that roster pinning adds.

A node draws 1 private + (neighbours) pairwise masks per round; the server draws one private mask per active node
(plus pairwise masks of dropped nodes). So the per-round mask cost is (1 + neighbours) x the "per mask" column on a
node and clients_per_round x it on the server.

    python -m benchmarks.secagg_crypto                       # 75k and 1M values; records to benchmarks/results/
    python -m benchmarks.secagg_crypto --quick --no-record   # 1k values (tests)
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flwr  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from benchmarks.common import add_output_args, machine_info, now, pick_device, report  # noqa: E402
from veil.flower.secagg import full_key_masks  # noqa: E402
from veil.security.roster import key_statement, raw_public, verify_statement  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def flowers_generator():  # type: ignore[no-untyped-def]
    """Flower's own ``pseudo_rand_gen``, loaded from the installed file (untouched by veil's patch)."""
    path = Path(flwr.__file__).parent / "common" / "secure_aggregation" / "secaggplus_utils.py"
    spec = importlib.util.spec_from_file_location("flower_utils_copy", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.pseudo_rand_gen


def median_seconds(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[75_000, 1_000_000])
    ap.add_argument("--repeats", type=int, default=15)
    add_output_args(ap, quick="1k values, 3 repeats", root=ROOT)
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = [1_000], 3
    started, info = now(), machine_info(pick_device())
    flower, seed = flowers_generator(), bytes(range(32))
    rows = []
    for size in args.sizes:
        shapes = [(size,)]
        old = median_seconds(lambda: flower(seed, 2**32, shapes), args.repeats)
        new = median_seconds(lambda: full_key_masks(seed, 2**32, shapes), args.repeats)
        rows.append([f"{size:,}", f"{old * 1e3:.1f}", f"{new * 1e3:.1f}", f"{new / old:.2f}x",
                     f"{(new - old) * 3e3:+.1f}"])
    key = Ed25519PrivateKey.generate()
    statement = key_statement(run_id=1, round_id="1", node_id=7, pk1=b"p" * 178, pk2=b"q" * 178)
    signature = key.sign(statement)
    sign = median_seconds(lambda: key.sign(statement), args.repeats * 20)
    verify = median_seconds(lambda: verify_statement(raw_public(key), signature, statement), args.repeats * 20)
    notes = [f"Ed25519 per round and node: one signature {sign * 1e6:.0f} us, one verification per neighbour "
             f"{verify * 1e6:.0f} us (2 neighbours at num_shares=3: {(sign + 2 * verify) * 1e3:.2f} ms)",
             "node mask work per round = 3 masks at num_shares=3 (1 private + 2 pairwise): last column",
             f"flwr {flwr.__version__}"]
    report("secagg_crypto", args, argv, info,
           settings=f"- settings: one process, mask generators over one array of the given size, modulus 2^32, "
                    f"median of {args.repeats}",
           headers=["values", "Flower RandomState ms", "veil ChaCha20 ms", "x Flower", "added ms per node-round"],
           rows=rows, notes=notes, elapsed=now() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
