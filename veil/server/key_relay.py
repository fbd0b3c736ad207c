"""The grid a SecAgg+ round talks through on the server: Flower's, plus veil's own record for nodes that do not trust
the coordinator (issue 24).

On SETUP it announces the mask generator the ServerApp uses (:data:`veil.flower.secagg.MASK_GENERATOR`; a node
refuses a SETUP without it, :mod:`veil.client.secagg_guard`); on SHARE_KEYS it relays each node's owner signature
from its SETUP reply to its neighbours (a record beside Flower's, which Flower's stages neither read nor drop). The
relay is a courtesy: the nodes check the signatures (:mod:`veil.client.secagg_roster`); a coordinator that does not
relay them only gets refusals. :class:`veil.flower.workflows.DropoutTolerantSecAggPlus` runs its stages through it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from veil.flower.secagg import MASK_GENERATOR, RECORD_KEY_CONFIGS, Key, Stage
from veil.security.roster import MASK_GENERATOR_KEY, OWNER_KEY, RECORD, SIGNATURE_KEY


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
