"""Aggregation on updates (deltas) and the server-side optimiser."""

from veil.strategies.fedavg import DeltaFedAvg as DeltaFedAvg

__all__ = ["DeltaFedAvg"]
