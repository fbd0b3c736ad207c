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
the workflow does this. Upstream proposal: docs/upstream/secagg-dropout.md.

Two more things for nodes that do not trust the coordinator (issue 24): every round runs with the full-strength
mask generator (:func:`veil.flower_patches.full_strength_masks`, the same patch the nodes apply) and announces it in
the SETUP message, and the grid the stages talk through (:class:`KeyRelay`) relays each node's owner signature from
its SETUP reply to its neighbours in SHARE_KEYS (veil's own record beside Flower's, which Flower's stages neither
read nor drop). The relay is a courtesy: the nodes check the signatures (:mod:`veil.client.secagg_roster`); a
coordinator that does not relay them only gets refusals.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.workflow import SecAggPlusWorkflow

from veil.flower_patches import MASK_GENERATOR, full_strength_masks
from veil.security.roster import MASK_GENERATOR_KEY, OWNER_KEY, RECORD, SIGNATURE_KEY

log = logging.getLogger("veil.server")


class KeyRelay:
    """A grid for one SecAgg+ round: Flower's grid, plus veil's record on SETUP (the mask generator) and on
    SHARE_KEYS (each neighbour's owner key and signature, from its SETUP reply). Everything else is delegated."""

    def __init__(self, grid: Any) -> None:
        self.grid, self.signatures = grid, {}  # node id -> [owner public key, signature]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *args: Any, **kwargs: Any) -> Iterable[Message]:
        messages = list(messages)
        stages = {m.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE) for m in messages
                  if RECORD_KEY_CONFIGS in m.content.config_records}
        if stages & {Stage.SETUP, Stage.SHARE_KEYS}:
            messages = [self._with_record(msg, Stage.SETUP in stages) for msg in messages]
        replies = list(self.grid.send_and_receive(messages, *args, **kwargs))
        if Stage.SETUP in stages:
            for reply in replies:
                signed = None if reply.has_error() else reply.content.config_records.get(RECORD)
                if signed is not None and isinstance(signed.get(OWNER_KEY), bytes):
                    self.signatures[str(reply.metadata.src_node_id)] = [signed[OWNER_KEY],
                                                                        signed.get(SIGNATURE_KEY, b"")]
        return replies

    def _with_record(self, msg: Message, setup: bool) -> Message:
        """A fresh message with Flower's records and veil's (Flower's SETUP messages share one content object)."""
        records = {name: ConfigRecord(dict(rec)) for name, rec in msg.content.config_records.items()}
        if setup:
            records[RECORD] = ConfigRecord({MASK_GENERATOR_KEY: MASK_GENERATOR})
        else:
            listed = records[RECORD_KEY_CONFIGS].keys()
            records[RECORD] = ConfigRecord({nid: self.signatures[nid] for nid in listed if nid in self.signatures})
        return Message(content=RecordDict(records), dst_node_id=msg.metadata.dst_node_id,
                       message_type=msg.metadata.message_type, group_id=msg.metadata.group_id)


class DropoutTolerantSecAggPlus(SecAggPlusWorkflow):
    """:class:`flwr.server.workflow.SecAggPlusWorkflow` whose unmask stage names only nodes that shared keys, with
    full-strength masks and owner signatures relayed (module docstring)."""

    def __call__(self, grid: Any, context: Any) -> None:
        full_strength_masks()
        super().__call__(KeyRelay(grid), context)

    def share_keys_stage(self, grid: Any, context: Any, state: Any) -> bool:
        proceed = super().share_keys_stage(grid, context, state)
        gone = state.sampled_node_ids - state.active_node_ids
        if gone:
            log.warning("SecAgg+: %d node(s) dropped out before sharing their keys; the round goes on without them",
                        len(gone))
            state.sampled_node_ids = set(state.active_node_ids)
        return proceed
