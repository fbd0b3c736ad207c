"""Aggregation on updates (deltas), robust aggregators and the server-side optimisers."""

from veil.strategies.fedavg import DeltaFedAvg as DeltaFedAvg
from veil.strategies.robust import make_aggregator as make_aggregator
from veil.strategies.server_opt import ServerOptimizer as ServerOptimizer

__all__ = ["DeltaFedAvg", "ServerOptimizer", "make_aggregator"]
