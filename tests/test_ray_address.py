"""`veil simulate federation.ray_address=...` joins an existing Ray cluster through Flower's backend config."""

from __future__ import annotations

import os

import pytest

from veil.conf.schema import FederationConfig
from veil.simulation import ray_init_args


def test_default_starts_a_private_ray_on_this_machines_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert FederationConfig().ray_address == ""
    assert ray_init_args("") == {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}


def test_an_address_joins_the_cluster_without_sizing_it() -> None:
    # ray.init refuses num_cpus/num_gpus when it connects to an existing cluster: the cluster has its own size
    assert ray_init_args("auto") == {"address": "auto"}
    assert ray_init_args("10.0.0.5:6379") == {"address": "10.0.0.5:6379"}


def test_ray_s_own_variable_joins_a_cluster_unless_the_run_names_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6380")
    assert ray_init_args("") == {"address": "127.0.0.1:6380"}
    assert ray_init_args("10.0.0.5:6379") == {"address": "10.0.0.5:6379"}, "federation.ray_address wins"
