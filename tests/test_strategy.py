"""DeltaFedAvg against a plain numpy computation: global += server_lr * mean(updates of clients that trained);
refusing clients (weight 0) add nothing, and owners out of budget are not sampled again."""

from __future__ import annotations

import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from veil.strategies.fedavg import DeltaFedAvg


class _Proxy(ClientProxy):
    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, *a, **k): raise NotImplementedError  # noqa: E704
    def get_parameters(self, *a, **k): raise NotImplementedError  # noqa: E704
    def fit(self, *a, **k): raise NotImplementedError  # noqa: E704
    def evaluate(self, *a, **k): raise NotImplementedError  # noqa: E704
    def reconnect(self, *a, **k): raise NotImplementedError  # noqa: E704


def _res(update: list[np.ndarray], weight: int, **metrics: object) -> FitRes:
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), weight, dict(metrics))  # type: ignore[arg-type]


def test_mean_update_is_applied_and_refusals_add_nothing() -> None:
    rng = np.random.default_rng(0)
    initial = [rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=4).astype(np.float32)]
    strategy = DeltaFedAvg(initial=initial, server_lr=0.5, clients_per_round=3, num_clients=3, join_timeout=0.1)
    updates = [[rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=4).astype(np.float32)] for _ in range(2)]
    reply = {"upload_bytes": 100, "noise_std": 0.0}
    results = [
        (_Proxy(1), _res(updates[0], 1, **reply, refused=0, can_train_next=True)),
        (_Proxy(2), _res(updates[1], 1, **reply, refused=0, can_train_next=True)),
        (_Proxy(3), _res([np.zeros_like(a) for a in initial], 0, **reply, refused=1, can_train_next=False)),
    ]
    params, metrics = strategy.aggregate_fit(1, results, [])
    expected = [g + 0.5 * (u0 + u1) / 2 for g, u0, u1 in zip(initial, *updates, strict=True)]
    for got, want in zip(parameters_to_ndarrays(params), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert metrics == {"clients": 3, "refused": 1, "contributed": 2, "upload_bytes_per_client": 100.0}
    assert strategy.exhausted == {3}

    manager = SimpleClientManager()
    for nid in (1, 2, 3):
        manager.register(_Proxy(nid))
    strategy.min_clients = 2
    chosen = {proxy.node_id for proxy, _ in strategy.configure_fit(2, params, manager)}
    assert chosen == {1, 2}
    strategy.exhausted.add(2)
    assert strategy.configure_fit(3, params, manager) == [] and "budget" in strategy.stop_reason


def test_all_refusals_leave_the_weights_alone() -> None:
    initial = [np.ones(3, dtype=np.float32)]
    strategy = DeltaFedAvg(initial=initial, clients_per_round=1, num_clients=1)
    params, _ = strategy.aggregate_fit(1, [(_Proxy(1), _res([np.zeros(3, np.float32)], 0, refused=1))], [])
    assert params is None and np.array_equal(strategy.global_arrays[0], initial[0])


def test_a_failure_reason_is_one_line_with_its_class_and_no_directories() -> None:
    from veil.strategies.fedavg import _reason

    flower = RuntimeError("(\"<class 'flwr.clientapp.client_app.ClientAppException'>:<'\\nException ClientAppException "
                          "occurred. Message: DataFileError: data file /home/ann/private/notes.csv does not exist\\\\'>')\",)")
    assert _reason(flower) == "DataFileError: data file notes.csv does not exist"


def test_round_metrics_keep_nothing_per_client(caplog) -> None:  # type: ignore[no-untyped-def]
    """Only counts and the mean upload size survive; a value outside the reply contract (an old node's loss or
    ε) is ignored, never aggregated, and logged."""
    from veil.strategies.fedavg import REPLY_METRIC_KEYS, aggregate_client_metrics

    assert REPLY_METRIC_KEYS == {"can_train_next", "refused", "upload_bytes", "noise_std"}
    replies = [(1, {"refused": 0, "can_train_next": True, "upload_bytes": 10, "noise_std": 0.5, "train_loss": 9.0}),
               (0, {"refused": 1, "can_train_next": False, "upload_bytes": 30, "noise_std": 0.0, "epsilon": 3.0})]
    with caplog.at_level("WARNING", logger="veil.strategies"):
        metrics = aggregate_client_metrics(replies)
    assert metrics == {"clients": 2, "refused": 1, "contributed": 1, "upload_bytes_per_client": 20.0}
    assert "epsilon, train_loss" in caplog.text


class _LateRegistry(SimpleClientManager):
    """Like the client manager of Flower's workflows: nodes appear only when ``num_available``/``all``/``sample``
    refresh it from the grid (here: on the third refresh); ``wait_for`` alone is never woken."""

    def __init__(self, nodes: int) -> None:
        super().__init__()
        self.pending, self.refreshes, self.waits = nodes, 0, []

    def num_available(self) -> int:
        self.refreshes += 1
        if self.refreshes == 3:
            for i in range(self.pending):
                self.register(_Proxy(str(i)))
        return super().num_available()

    def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
        if len(self.clients) < num_clients:  # a wait for nodes not yet there
            self.waits.append(timeout)
        return len(self.clients) >= num_clients  # never notified: only a refresh registers the nodes


def test_configure_fit_refreshes_the_registry_instead_of_one_long_wait() -> None:
    manager = _LateRegistry(3)
    strategy = DeltaFedAvg(initial=[np.zeros(2, dtype=np.float32)], clients_per_round=3, num_clients=3, join_timeout=300)
    chosen = strategy.configure_fit(1, ndarrays_to_parameters([np.zeros(2, dtype=np.float32)]), manager)
    assert len(chosen) == 3 and manager.refreshes >= 3
    assert manager.waits and max(manager.waits) <= 0.1, "each wait is one short poll, not the join timeout"
