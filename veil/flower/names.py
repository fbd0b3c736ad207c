"""Private Flower names veil uses as they are: types of the legacy strategy interface and of client mods, robust
aggregation rules, an error code, and Flower's FAB builder. Nothing is patched or overridden here; each name is
re-exported so that it is imported from Flower in one place, listed in :data:`REACHES` and checked against a new
Flower release by tests/test_flower_wing.py. The rest of veil imports these from here, never from Flower's private
modules (the same test checks that). No upstream proposal: these are stable in practice, just not re-exported by
Flower's public packages (docs/upstream/README.md says so).

The FAB builder is imported when called: ``flwr.cli`` loads Flower's whole command-line stack.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion
from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg

from veil.flower import Reach

__all__ = ["REACHES", "ClientAppCallable", "ClientProxy", "Criterion", "ErrorCode", "Mod", "aggregate_krum",
           "aggregate_median", "aggregate_trimmed_avg", "build_fab_from_files"]

_AGGREGATE = "flwr.server.strategy.aggregate"

REACHES = (
    Reach("flwr.clientapp.typing", "ClientAppCallable"),
    Reach("flwr.clientapp.typing", "Mod"),
    Reach("flwr.common.constant", "ErrorCode"),
    Reach("flwr.server.client_proxy", "ClientProxy"),
    Reach("flwr.server.criterion", "Criterion.select", ("self", "client")),
    Reach(_AGGREGATE, "aggregate_krum", ("results", "num_malicious", "to_keep")),
    Reach(_AGGREGATE, "aggregate_median", ("results",)),
    Reach(_AGGREGATE, "aggregate_trimmed_avg", ("results", "proportiontocut")),
    Reach("flwr.cli.build", "build_fab_from_files", ("files",)),
)


def build_fab_from_files(files: Mapping[str, bytes | Path]) -> tuple[bytes, Any]:
    """Flower's ``flwr.cli.build.build_fab_from_files``: the FAB bytes ``flwr run`` builds, and their metadata."""
    from flwr.cli.build import build_fab_from_files as flower_build

    return flower_build(files)
