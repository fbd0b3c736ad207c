"""Flower's SecAgg+ server workflow, surviving a node that drops before it has shared its keys.

Why a subclass: Flower 1.41's ``SecAggPlusWorkflow.unmask_stage`` asks the survivors for the key shares of every
sampled node that did not send a masked vector (``dead = sampled - active``), including nodes that dropped out at
SETUP or SHARE_KEYS. Nobody holds shares of those nodes (they never distributed any), so Flower's client mod would
fail on a missing share and veil's node guard (:mod:`veil.client.secagg_guard`) refuses such a request as a
coordinator asking for shares it cannot legitimately need; either way the round was lost although it could finish.
Those nodes never entered the protocol's masks either: a client adds a pairwise mask only with the nodes whose
encrypted shares it received (``_collect_masked_vectors`` in ``flwr/client/mod/secure_aggregation``). So after
SHARE_KEYS this workflow forgets them: ``sampled`` becomes the nodes that shared their keys, and a later drop-out
(at COLLECT_MASKED_VECTORS, the case Flower handles) is unmasked as before. Nothing else is changed; no setting of
the workflow does this.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.server.workflow import SecAggPlusWorkflow

log = logging.getLogger("veil.server")


class DropoutTolerantSecAggPlus(SecAggPlusWorkflow):
    """:class:`flwr.server.workflow.SecAggPlusWorkflow` whose unmask stage names only nodes that shared keys."""

    def share_keys_stage(self, grid: Any, context: Any, state: Any) -> bool:
        proceed = super().share_keys_stage(grid, context, state)
        gone = state.sampled_node_ids - state.active_node_ids
        if gone:
            log.warning("SecAgg+: %d node(s) dropped out before sharing their keys; the round goes on without them",
                        len(gone))
            state.sampled_node_ids = set(state.active_node_ids)
        return proceed
