"""The run's strategy from its configuration: :class:`DeltaFedAvg` composed with a robust aggregator
(``median``, ``trimmed_mean``, ``krum``; SecAgg+ off only) or a server optimiser (``fedavgm``, ``fedadam``,
``fedyogi``, ``fedadagrad``), or neither (``fedavg``)."""

from __future__ import annotations

from flwr.common import NDArrays

from veil.conf.schema import VeilConfig
from veil.strategies.fedavg import DeltaFedAvg, EvaluateFn
from veil.strategies.robust import ROBUST, make_aggregator
from veil.strategies.server_opt import OPTIMIZERS, ServerOptimizer


def make_strategy(cfg: VeilConfig, *, initial: NDArrays, central_noise_std: float = 0.0,
                  evaluate_fn: EvaluateFn | None = None) -> DeltaFedAvg:
    """The server's strategy for ``cfg`` (validated), holding ``initial`` as the global trainable tensors."""
    st, fed = cfg.strategy, cfg.federation
    optimizer = ServerOptimizer(st.name, shapes=[tuple(a.shape) for a in initial], lr=st.server_lr,
                                momentum=st.server_momentum, beta_1=st.beta_1, beta_2=st.beta_2,
                                tau=st.tau) if st.name in OPTIMIZERS else None
    aggregator = make_aggregator(st.name, trim_fraction=st.trim_fraction, num_malicious=st.num_malicious,
                                 krum_keep=st.krum_keep) if st.name in ROBUST else None
    return DeltaFedAvg(
        initial=initial, server_lr=st.server_lr, clients_per_round=fed.clients_per_round,
        num_clients=fed.num_clients, min_clients=cfg.secagg.num_shares if cfg.secagg.enabled else 1,
        central_noise_std=central_noise_std, evaluate_fn=evaluate_fn, aggregator=aggregator, optimizer=optimizer,
        client_level_clip=cfg.privacy.max_grad_norm if cfg.privacy.enabled and cfg.privacy.level == "client" else None,
    )
