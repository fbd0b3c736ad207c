"""The ClientApp of an audited simulation: veil's own node, with the audit's canaries and the tests' mods.

:func:`veil.simulation.simulate` takes a ClientApp factory (:class:`veil.simulation.ClientAppFactory`) and knows
nothing of canaries; the audit hands it :func:`audited_client_app`. The canaries' draw reaches the simulated nodes
only through this Python closure, never through the run config the ordinary nodes read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol


class CanaryNodes(Protocol):
    """Canaries that replace or wrap the simulated nodes' client (:class:`veil.audit.clients.CanaryClients`,
    :class:`veil.audit.gradient.GradientCanaries`)."""

    def client_fn(self, ordinary: Any, defaults: Mapping[str, Any], *, simulation_root: Path,
                  simulated_nodes: Mapping[int, Mapping[str, Any]]) -> Any: ...


def audited_client_app(*, canaries: CanaryNodes | None = None, client_mods: Sequence[Any] = ()) -> Any:
    """A ClientApp factory for :func:`veil.simulation.simulate`: veil's ClientApp, with ``canaries``' nodes behind
    the same SecAgg+ guard, and ``client_mods`` (tests only: a deliberately broken mechanism) inside the guard, so
    they see the update before it is masked. With neither, veil's ClientApp unchanged."""

    def factory(defaults: Mapping[str, Any], *, simulation_root: Path,
                simulated_nodes: Mapping[int, Mapping[str, Any]]) -> Any:
        from flwr.clientapp import ClientApp

        from veil.client.app import make_client_app, make_client_fn, make_secagg_mod

        if not client_mods and canaries is None:
            return make_client_app(defaults, simulation_root=simulation_root, simulated_nodes=simulated_nodes)
        client_fn = make_client_fn(defaults, simulation_root=simulation_root, simulated_nodes=simulated_nodes)
        if canaries is not None:
            client_fn = canaries.client_fn(client_fn, defaults, simulation_root=simulation_root,
                                           simulated_nodes=simulated_nodes)
        guard = make_secagg_mod(defaults, simulation_root=simulation_root, simulated_nodes=simulated_nodes)
        return ClientApp(client_fn=client_fn, mods=[guard, *client_mods])

    return factory
