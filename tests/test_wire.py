"""veil.wire: the weights travel as one float32 vector. The vector is the tensors raveled in order, cut back into
the same tensors; a node refuses a vector of the wrong size before reading data and replies in the layout it got;
the coordinator sends one vector and applies flat replies exactly as per-tensor ones."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import parameters_to_ndarrays

from test_strategy import _Proxy, _res
from veil.strategies.fedavg import DeltaFedAvg
from veil.wire import flatten, is_flat, unflatten


def _tensors(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=4).astype(np.float32),
            rng.normal(size=(2, 1, 3)).astype(np.float32)]


def test_flatten_is_the_raveled_tensors_and_unflatten_inverts_it() -> None:
    tensors = _tensors()
    vector = flatten(tensors)
    assert vector.dtype == np.float32 and vector.shape == (16,)
    np.testing.assert_array_equal(vector, np.concatenate([t.reshape(-1) for t in tensors]))
    back = unflatten(vector, tensors)
    assert [b.shape for b in back] == [t.shape for t in tensors]
    for b, t in zip(back, tensors, strict=True):
        np.testing.assert_array_equal(b, t)
    assert flatten([]).shape == (0,)


def test_unflatten_refuses_a_vector_of_the_wrong_size_or_rank() -> None:
    tensors = _tensors()
    for bad in (np.zeros(15, np.float32), np.zeros(17, np.float32), np.zeros((4, 4), np.float32)):
        with pytest.raises(ValueError, match="16 values"):
            unflatten(bad, tensors)


def test_is_flat_tells_one_vector_from_the_tensors() -> None:
    tensors = _tensors()
    assert is_flat([flatten(tensors)], tensors)
    assert not is_flat(tensors, tensors)
    assert not is_flat([np.zeros(4, np.float32)], [np.zeros(4, np.float32)]), "a one-vector model is its own layout"
    assert is_flat([np.zeros(6, np.float32)], [np.zeros((3, 2), np.float32)])
    assert not is_flat([np.zeros((6, 1), np.float32)], tensors)


def test_the_coordinator_sends_one_vector_and_applies_flat_replies_as_tensors() -> None:
    initial = _tensors(0)
    updates = [_tensors(1), _tensors(2)]
    results = {}
    for layout in ("tensors", "flat"):
        strategy = DeltaFedAvg(initial=[t.copy() for t in initial], server_lr=0.5, clients_per_round=2,
                               num_clients=2, join_timeout=0.1)
        replies = [u if layout == "tensors" else [flatten(u)] for u in updates]
        params, _ = strategy.aggregate_fit(1, [(_Proxy(i), _res(r, 1, upload_bytes=1, noise_std=0.0, refused=0,
                                                                 can_train_next=True))
                                                for i, r in enumerate(replies, start=1)], [])
        results[layout] = parameters_to_ndarrays(params)
        sent = strategy.configure_fit(2, params, _manager(2))
        assert len(sent) == 2
        for _proxy, ins in sent:
            (vector,) = parameters_to_ndarrays(ins.parameters)
            np.testing.assert_array_equal(vector, flatten(strategy.global_arrays))
    expected = [g + 0.5 * (a + b) / 2 for g, a, b in zip(initial, *updates, strict=True)]
    for layout, got in results.items():
        assert [g.shape for g in got] == [e.shape for e in expected], layout
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7)


def test_a_flat_reply_of_the_wrong_size_is_an_error_not_a_silent_reshape() -> None:
    strategy = DeltaFedAvg(initial=_tensors(), clients_per_round=1, num_clients=1, join_timeout=0.1)
    with pytest.raises(ValueError, match="does not hold the model's 16 values"):
        strategy.aggregate_fit(1, [(_Proxy(1), _res([np.zeros(15, np.float32)], 1, upload_bytes=1, noise_std=0.0,
                                                    refused=0, can_train_next=True))], [])


def _manager(nodes: int):  # type: ignore[no-untyped-def]
    from flwr.server.client_manager import SimpleClientManager

    manager = SimpleClientManager()
    for nid in range(1, nodes + 1):
        manager.register(_Proxy(nid))
    return manager


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum"])
def test_robust_aggregators_give_the_same_weights_on_flat_replies(name: str) -> None:
    """Median and trimmed mean are coordinate-wise and Krum scores updates by distances over all values, so one
    vector per client gives the same global weights as the tensors (SecAgg+ off: each reply is in clear)."""
    from veil.strategies.robust import make_aggregator

    initial = _tensors(0)
    updates = [_tensors(seed) for seed in range(1, 6)]
    got = {}
    for layout in ("tensors", "flat"):
        strategy = DeltaFedAvg(initial=[t.copy() for t in initial], clients_per_round=5, num_clients=5,
                               join_timeout=0.1, aggregator=make_aggregator(name, num_malicious=1))
        replies = [u if layout == "tensors" else [flatten(u)] for u in updates]
        params, _ = strategy.aggregate_fit(1, [(_Proxy(i), _res(r, 1, upload_bytes=1, noise_std=0.0, refused=0,
                                                                 can_train_next=True))
                                                for i, r in enumerate(replies, start=1)], [])
        got[layout] = parameters_to_ndarrays(params)
    assert [g.shape for g in got["flat"]] == [t.shape for t in initial]
    for a, b in zip(got["tensors"], got["flat"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not all(np.allclose(a, t) for a, t in zip(got["flat"], initial, strict=True)), "the weights moved"


def test_the_node_and_the_coordinator_share_one_reply_contract(caplog: pytest.LogCaptureFixture) -> None:
    """The keys a node's reply carries are the keys the coordinator aggregates, from the one table in veil.wire;
    a reply with exactly those keys is aggregated without a warning."""
    from veil import wire
    from veil.client import app as node_app
    from veil.strategies import fedavg

    assert node_app.REPLY_KEYS is wire.REPLY_KEYS
    assert fedavg.REPLY_METRIC_KEYS == set(wire.REPLY_KEYS)
    assert wire.REPLY_KEYS == ("can_train_next", "refused", "upload_bytes", "noise_std")  # docs/privacy.md's table
    reply = {"can_train_next": True, "refused": 0, "upload_bytes": 8, "noise_std": 0.5}
    assert set(reply) == set(wire.REPLY_KEYS)
    with caplog.at_level("WARNING", logger="veil.strategies"):
        fedavg.aggregate_client_metrics([(1, reply)])
    assert caplog.text == ""
