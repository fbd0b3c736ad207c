"""Robust aggregation of the clients' individual updates, for federations that run without SecAgg+:
coordinate-wise median and trimmed mean (Yin et al., arXiv:1803.01498) and Krum / multi-Krum (Blanchard et al.,
"Machine Learning with Adversaries", NeurIPS 2017).

Each needs every client's update in clear, so config validation refuses them when SecAgg+ is on (the server sees
only the sum) and with client-level DP (its noise is calibrated for the sum). The arithmetic is Flower's
(``flwr.server.strategy.aggregate``); all three commute with the shift ``update = trained - received``, so they
mean on updates what they mean on weights. Client weights are ignored: every contributing client counts once.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.common import NDArrays

from veil.conf.schema import ROBUST_STRATEGIES
from veil.flower.names import aggregate_krum, aggregate_median, aggregate_trimmed_avg

ROBUST = ROBUST_STRATEGIES  # named by the schema

Aggregator = Callable[[list[NDArrays]], NDArrays]


def make_aggregator(name: str, *, trim_fraction: float = 0.2, num_malicious: int = 1,
                    krum_keep: int = 0) -> Aggregator:
    """The robust aggregate of a list of updates (one per contributing client).

    Parameters
    ----------
    name
        ``median``, ``trimmed_mean`` or ``krum``.
    trim_fraction
        Trimmed mean: the fraction of values cut at each end of every coordinate, in [0, 0.5).
    num_malicious
        Krum: the number f of Byzantine clients tolerated; each update is scored by the squared distances to its
        n - f - 2 nearest others, and the best-scored update is taken.
    krum_keep
        Multi-Krum: average the ``krum_keep`` best-scored updates instead (0: plain Krum).
    """
    if name == "median":
        return lambda updates: aggregate_median([(u, 1) for u in updates])
    if name == "trimmed_mean":
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction={trim_fraction} must be in [0, 0.5)")
        return lambda updates: aggregate_trimmed_avg([(u, 1) for u in updates], trim_fraction)
    if name == "krum":
        if num_malicious < 0 or krum_keep < 0:
            raise ValueError(f"num_malicious={num_malicious} and krum_keep={krum_keep} must be >= 0")
        return lambda updates: aggregate_krum([(u, 1) for u in updates], num_malicious,
                                              min(krum_keep, len(updates)))
    raise ValueError(f"robust aggregator {name!r} is unknown; expected one of {', '.join(ROBUST)}")
