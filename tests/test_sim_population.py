"""What a simulated population costs does not grow with its size where it need not (issue 14): the simulated owners'
node configs are one shared policy plus budgets, and read exactly like the one-dict-per-node table they replace.

Reference: the former construction (a dict per partition id, written out here), compared key by key.
"""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from veil.conf.schema import VeilConfig
from veil.errors import ConfigError
from veil.simulation import simulated_node_configs


def _cfg(num_clients: int, spec: str, *, secagg: bool = True) -> VeilConfig:
    cfg = VeilConfig()
    cfg.federation.num_clients, cfg.federation.clients_per_round = num_clients, min(10, num_clients)
    cfg.federation.node_max_epsilon = spec
    cfg.secagg.enabled = secagg
    return cfg


def _one_dict_per_node(cfg: VeilConfig) -> dict[int, dict[str, Any]]:
    """The reference: every node's config written out, as simulation.py built it before."""
    fed, priv = cfg.federation, cfg.privacy
    policy = {"delta": float(priv.delta), "allow-plain-aggregation": not cfg.secagg.enabled,
              "allow-central-noise": priv.noise_placement == "central",
              "min-cohort": int(fed.clients_per_round or fed.num_clients),
              "max-dropouts": int(cfg.secagg.num_shares - cfg.secagg.reconstruction_threshold)}  # issue 24
    nodes = {i: dict(policy) for i in range(fed.num_clients)}
    spec = fed.node_max_epsilon.strip()
    if spec and ":" not in spec:
        for i in nodes:
            nodes[i]["max-epsilon"] = float(spec)
    elif spec:
        for item in spec.split(","):
            i, eps = item.split(":")
            nodes.setdefault(int(i), dict(policy))["max-epsilon"] = float(eps)
    return nodes


@pytest.mark.parametrize("spec", ["", "2.5", "0:1.0,3:4.5", "1:2.0,9:7.0"])  # 9: a budget for an id outside 0..4
@pytest.mark.parametrize("secagg", [True, False])
def test_node_configs_read_like_one_dict_per_node(spec: str, secagg: bool) -> None:
    cfg = _cfg(5, spec, secagg=secagg)
    want = _one_dict_per_node(cfg)

    got = simulated_node_configs(cfg)

    assert len(got) == len(want) and list(got) == sorted(want)
    for node in want:
        assert got[node] == want[node], f"node {node}"
        assert got.get(node) == want[node]
    assert got.get(5 if 5 not in want else 99) is None
    got[0]["delta"] = -1.0  # a caller editing its copy changes nobody else's config
    assert got[0] == want[0]


def test_node_configs_do_not_grow_with_the_population() -> None:
    small, large = (len(pickle.dumps(simulated_node_configs(_cfg(n, "3.0")))) for n in (100, 10_000))
    reference = len(pickle.dumps(_one_dict_per_node(_cfg(10_000, "3.0"))))
    assert large - small < 8, "the table pickled into every Ray worker's ClientApp must not grow with the population"
    assert reference > 100 * large  # what one dict per node weighed
    assert simulated_node_configs(_cfg(10_000, "3.0"))[9_999]["max-epsilon"] == 3.0


def test_a_malformed_budget_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="federation.node_max_epsilon"):
        simulated_node_configs(_cfg(3, "0:a"))


def test_a_remembered_prv_epsilon_equals_a_fresh_one() -> None:
    """Clients with equal ledgers share one PRV computation per process; the answer is the uncached one's."""
    from veil.privacy import accounting

    history = [(1.1, 0.25, 6), (0.9, 0.5, 2)]
    accounting._prv_epsilon_cached.cache_clear()
    fresh = accounting._prv_epsilon(accounting._coalesce(history), 1e-5,
                                    accounting._rdp_epsilon(accounting._coalesce(history), 1e-5))

    first = accounting.compute_epsilon(history, delta=1e-5, accountant="prv")
    again = accounting.compute_epsilon([tuple(e) for e in history], delta=1e-5, accountant="prv")
    other = accounting.compute_epsilon([(1.1, 0.25, 7), (0.9, 0.5, 2)], delta=1e-5, accountant="prv")

    assert fresh[0] is not None and first.accountant == "prv"
    assert first.epsilon == again.epsilon == fresh[0]
    assert accounting._prv_epsilon_cached.cache_info().hits == 1, "the second client's equal history is remembered"
    assert other.epsilon > first.epsilon, "one more step is a new history, not a cache hit"
