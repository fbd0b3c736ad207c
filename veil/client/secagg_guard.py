"""The node's SecAgg+ guard: veil's own mod around Flower's ``secaggplus_mod``, enforcing the owner's policy.

Flower 1.41's node side of SecAgg+ (Bell et al. 2020, arXiv:2009.09039) trusts the coordinator: a plain TRAIN
message is answered with the node's individual update; the SETUP stage accepts any share count and threshold
(threshold 1 makes each Shamir share the secret itself); the UNMASK stage returns a pairwise-mask-seed share for
every id listed active and a secret-key share for every id listed dead, without checking that the lists are
disjoint, free of repeats, or leave the node itself out of "dead" (LIBRARY_NOTES.md; privacy review H2). Any of
these lets a coordinator alone unmask one node's update.

This module wraps the unmodified ``secaggplus_mod`` (no fork, no patch) and looks at each TRAIN message *before*
Flower's mod runs: a message that breaks the owner's policy is answered with :func:`refusal_reply` and never reaches
Flower's mod or the app, so no key, share or update leaves the node, and the node's SecAgg+ state for the round is
dropped so that nothing from it can be asked for later. The checks read only the message, the node's SecAgg+ state
and the owner's policy, never the data, and every refusal has the same reply (one fixed error code and text); the
node's own log names the reason.

Against a malicious coordinator (issue 24, privacy review N5) the guard also: (1) makes every mask of this process
come from the whole key (:func:`veil.flower.secagg.full_strength_masks`) and refuses a SETUP whose ServerApp does
not announce the same generator; (2) refuses a SHARE_KEYS, COLLECT or UNMASK whose neighbourhood is smaller than
the one SETUP announced by more than the owner's ``max_dropouts`` (default 0: no node is ever unmasked against
fewer neighbours than planned, so a coordinator cannot withhold ciphertexts to isolate it, and with no node "dead"
no node's secret-key shares are ever released); (3) with a roster (:mod:`veil.security.roster`), signs this node's
round keys with the owner's key and accepts SHARE_KEYS only when every neighbour's keys are signed by a distinct
roster member (no substituted keys, no Sybil neighbours), and a SETUP only for a cohort the roster can fill.

What it does not do: a consistency round over the active set (Bell et al., section 4). With ``max_dropouts`` 0 no
node is ever reported dead, so the lists cannot disagree; with K > 0 a coordinator that tells different nodes
different, each locally consistent, active/dead lists is not detectable by one node alone; the threshold rule
(threshold > share_num / 2, no repeated ids) closes that for the default 3-share neighbourhood but not in general.
Which roster members become a node's neighbours is still the coordinator's choice.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeGuard

from flwr.app import ConfigRecord, Context, Error, Message, MessageType
from flwr.client.mod import secaggplus_mod

from veil.client.secagg_roster import roster_refusal, setup_roster_refusal, sign_setup_reply
from veil.flower.names import ClientAppCallable, ErrorCode, Mod
from veil.flower.secagg import MASK_GENERATOR, RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage, full_strength_masks
from veil.security.roster import MASK_GENERATOR_KEY, RECORD

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from veil.conf.schema import VeilConfig
    from veil.security.roster import Roster

log = logging.getLogger("veil.client")

#: Flower's code for "a mod's precondition failed"; one code and one text for every refusal, whatever the reason.
REFUSAL_CODE = ErrorCode.MOD_FAILED_PRECONDITION
REFUSAL_REASON = "refused by the node's aggregation policy (veil); the node's log names the reason"


@dataclass(frozen=True, kw_only=True)
class SecAggPolicy:
    """What this node accepts in a round.

    Parameters
    ----------
    require_secagg : bool
        The owner's choice: refuse plain (non-SecAgg+) TRAIN messages. False only with the owner's
        ``--allow-plain-aggregation``.
    min_num_shares : int
        The owner's minimum SecAgg+ neighbourhood size (share_num).
    num_shares, reconstruction_threshold, clipping_range, quantization_range, modulus_range
        The run's SecAgg+ settings from its run config (``secagg.*``); a SETUP message must carry exactly these.
    max_dropouts : int
        The owner's ``--max-dropouts``: how many of the neighbours SETUP announced may be missing at SHARE_KEYS,
        COLLECT and UNMASK (0: none; a drop-out then costs the round, never this node's privacy).
    roster, signing_key
        The owner's pinned roster and signing key (``--roster``, ``--signing-key``); both or neither.
    min_cohort : int
        M when this node's noise is a share that counts on M owners' shares in every sum (the owner's
        ``--min-cohort`` under ``privacy.share_noise`` or client-level distributed noise; 1 otherwise): SETUP must
        announce a neighbourhood (this node included, less ``max_dropouts``) of at least M. A sum that unmasks this
        node's update cancels its pairwise masks only with every neighbour's update in it, so with a pinned roster
        and ``max_dropouts`` 0 each such sum holds at least M distinct roster members' updates (:func:`_setup_refusal`).
    """

    require_secagg: bool = True
    min_num_shares: int = 3  # a 2-node neighbourhood is the pair itself: the sum reveals the other's update
    num_shares: int
    reconstruction_threshold: int
    clipping_range: float
    quantization_range: int
    modulus_range: int
    max_dropouts: int = 0
    roster: Roster | None = None
    signing_key: Ed25519PrivateKey | None = field(default=None, repr=False, compare=False)
    min_cohort: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.require_secagg, bool):
            raise TypeError(f"require_secagg must be a bool, got {self.require_secagg!r}")
        if isinstance(self.max_dropouts, bool) or not isinstance(self.max_dropouts, int):
            raise TypeError(f"max_dropouts must be an int, got {self.max_dropouts!r}")
        if self.max_dropouts < 0:
            raise ValueError(f"max_dropouts={self.max_dropouts} is invalid: expected an integer >= 0")
        if (self.roster is None) != (self.signing_key is None):
            raise ValueError("roster and signing_key go together: a node that checks its neighbours' signatures "
                             "must sign its own keys")
        for name in ("min_num_shares", "num_shares", "reconstruction_threshold", "quantization_range",
                     "modulus_range", "min_cohort"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"{name}={value} is invalid: expected a positive integer")
        if self.min_num_shares < 2:
            raise ValueError(f"min_num_shares={self.min_num_shares} is invalid: expected >= 2")
        if isinstance(self.clipping_range, bool) or not isinstance(self.clipping_range, (int, float)):
            raise TypeError(f"clipping_range must be a float, got {self.clipping_range!r}")
        if not self.clipping_range > 0:
            raise ValueError(f"clipping_range={self.clipping_range} is invalid: expected > 0")


PolicySource = Callable[[Context], SecAggPolicy]


def secagg_policy(cfg: VeilConfig, *, require_secagg: bool, min_num_shares: int = 3, max_dropouts: int = 0,
                  roster: Roster | None = None, signing_key: Ed25519PrivateKey | None = None,
                  min_cohort: int = 1) -> SecAggPolicy:
    """The policy for a run: the owner's choices plus the run's ``secagg.*`` settings."""
    sa = cfg.secagg
    return SecAggPolicy(require_secagg=require_secagg, min_num_shares=min_num_shares, num_shares=sa.num_shares,
                        reconstruction_threshold=sa.reconstruction_threshold, clipping_range=float(sa.clipping_range),
                        quantization_range=sa.quantization_range, modulus_range=sa.modulus_range,
                        max_dropouts=max_dropouts, roster=roster, signing_key=signing_key, min_cohort=min_cohort)


def quiet_worker() -> None:
    """Keep a node's console to veil's lines: Flower's per-stage SecAgg+ debug lines and library deprecation
    notices say nothing a data owner can act on."""
    logging.getLogger("flwr").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")


def refusal_reply(msg: Message) -> Message:
    """The one reply a refusing node sends: an error with a fixed code and text, no content."""
    return Message(Error(code=REFUSAL_CODE, reason=REFUSAL_REASON), reply_to=msg)


def make_secagg_guard(policy: SecAggPolicy | PolicySource) -> Mod:
    """A ClientApp mod: Flower's ``secaggplus_mod`` behind the owner's checks (see the module docstring).

    Parameters
    ----------
    policy : SecAggPolicy or callable
        The policy, or a function of the message's ``Context`` returning it (the run config arrives with the
        context, so a ClientApp built before the run reads the run's ``secagg.*`` there).
    """
    policy_for: PolicySource = (lambda _context: policy) if isinstance(policy, SecAggPolicy) else policy

    def secagg_guard(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        quiet_worker()
        if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
            return call_next(msg, context)
        full_strength_masks()  # this process's masks come from the whole key (the ServerApp's too: SETUP check)
        owner = policy_for(context)
        if RECORD_KEY_CONFIGS not in msg.content.config_records:
            if not owner.require_secagg:
                return call_next(msg, context)
            return _refuse(msg, context, "a plain TRAIN message (no SecAgg+): this node requires SecAgg+ "
                                         "(the owner may pass --allow-plain-aggregation)")
        reason = secagg_refusal(msg, context, owner)
        if reason is not None:
            return _refuse(msg, context, reason)
        stage = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)  # Flower's mod pops it
        reply = secaggplus_mod(msg, context, call_next)
        if stage == Stage.SETUP and owner.signing_key is not None and not reply.has_error():
            sign_setup_reply(reply, owner.signing_key, msg.metadata)
        return reply

    return secagg_guard


def secagg_refusal(msg: Message, context: Context, policy: SecAggPolicy) -> str | None:
    """Why this SecAgg+ message must be refused, or None. Reads the message, the node's SecAgg+ state and the
    policy only."""
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    state = context.state.config_records.get(RECORD_KEY_STATE, ConfigRecord({}))
    stage = configs.get(Key.STAGE)
    current = state.get("current_stage", Stage.UNMASK)
    stages = Stage.all()
    if not isinstance(stage, str) or stage not in stages:
        return f"unknown SecAgg+ stage {stage!r}"
    if stage != Stage.SETUP and current in stages and stage != stages[(stages.index(current) + 1) % len(stages)]:
        return f"SecAgg+ stage {stage!r} out of order after {current!r}"
    if stage == Stage.SETUP:
        announced = msg.content.config_records.get(RECORD, ConfigRecord({})).get(MASK_GENERATOR_KEY)
        if announced != MASK_GENERATOR:
            return (f"SecAgg+ setup announces mask generator {announced!r}, not this node's {MASK_GENERATOR!r} "
                    "(the masks would not cancel; the ServerApp needs veil's full-strength mask patch)")
        return _setup_refusal(configs, policy) or setup_roster_refusal(configs, policy.roster, policy.max_dropouts)
    planned = _neighbourhood(state)
    least = planned - policy.max_dropouts
    if stage == Stage.SHARE_KEYS:
        listed = [k for k in configs if k != Key.STAGE]
        if not least <= len(listed) <= planned:
            return (f"SecAgg+ share-keys lists {len(listed)} neighbourhood keys; setup announced {planned} and this "
                    f"node tolerates {policy.max_dropouts} drop-out(s)")
        return None if policy.roster is None else roster_refusal(msg, state, policy.roster, policy.signing_key)
    if stage == Stage.COLLECT_MASKED_VECTORS:
        sources = configs.get(Key.SOURCE_LIST)
        if not _int_list(sources) or len(set(sources)) != len(sources):
            return "SecAgg+ collect lists no sources, or repeats one"
        if len(sources) < least - 1:
            return (f"SecAgg+ collect brings shares from {len(sources)} neighbour(s); setup announced {planned - 1} "
                    f"and this node tolerates {policy.max_dropouts} drop-out(s)")
        return None
    own = {msg.metadata.dst_node_id, state.get("nid", msg.metadata.dst_node_id)}
    return _unmask_refusal(configs, state, own, least=least)


def _neighbourhood(state: ConfigRecord) -> int:
    """The neighbourhood size SETUP announced (this node included): min(sample_num, share_num)."""
    sample_num, share_num = state.get("sample_num", 0), state.get("share_num", 0)
    return min(sample_num, share_num) if isinstance(sample_num, int) and isinstance(share_num, int) else 0


def _setup_refusal(configs: ConfigRecord, policy: SecAggPolicy) -> str | None:
    expected: dict[str, int | float] = {
        Key.SHARE_NUMBER: policy.num_shares, Key.THRESHOLD: policy.reconstruction_threshold,
        Key.CLIPPING_RANGE: policy.clipping_range, Key.TARGET_RANGE: policy.quantization_range,
        Key.MOD_RANGE: policy.modulus_range,
    }
    for key, want in expected.items():
        got = configs.get(key)
        if type(got) is not type(want) or got != want:  # noqa: E721  (bool is an int; 8 is not 8.0 to Flower)
            return f"SecAgg+ setup {key}={got!r} differs from the run config's {want!r}"
    share_num, threshold = policy.num_shares, policy.reconstruction_threshold  # equal to the message's (above)
    if share_num < policy.min_num_shares:
        return f"SecAgg+ setup share_num={share_num} is below this node's minimum {policy.min_num_shares}"
    sample_num = configs.get(Key.SAMPLE_NUMBER)
    if type(sample_num) is not int or sample_num < policy.min_num_shares:  # noqa: E721
        return f"SecAgg+ setup sample_num={sample_num!r} is below this node's minimum {policy.min_num_shares}"

    if not share_num / 2 < threshold <= share_num:
        return (f"SecAgg+ setup threshold={threshold} is not in (share_num/2, share_num] = ({share_num / 2:g}, "
                f"{share_num}]: a coordinator could collect both kinds of shares of one node")
    least = min(sample_num, share_num) - policy.max_dropouts
    if least < policy.min_cohort:  # shared noise: a smaller sum would carry less than the run's σ
        return (f"SecAgg+ setup's neighbourhood of {min(sample_num, share_num)} node(s) (less {policy.max_dropouts} "
                f"tolerated drop-out(s)) is below this node's --min-cohort {policy.min_cohort}: its noise share "
                "counts on that many owners in every sum (the run needs secagg.num_shares >= the owners' --min-cohort)")
    return None


def _unmask_refusal(configs: ConfigRecord, state: ConfigRecord, own: set[object], *, least: int) -> str | None:
    active, dead = configs.get(Key.ACTIVE_NODE_ID_LIST), configs.get(Key.DEAD_NODE_ID_LIST)
    if not _int_list(active) or not _int_list(dead):
        return "SecAgg+ unmask lists are not lists of node ids"
    if own & set(dead):
        return "SecAgg+ unmask lists this node as dead"
    if not own & set(active):
        return "SecAgg+ unmask does not list this node as active"
    if set(active) & set(dead):
        return "SecAgg+ unmask lists a node both active and dead"
    if len(set(active)) != len(active) or len(set(dead)) != len(dead):
        return "SecAgg+ unmask repeats a node id"
    threshold = state.get("threshold", 0)
    if isinstance(threshold, int) and len(active) < threshold:
        return f"SecAgg+ unmask lists {len(active)} active nodes, below the threshold {threshold}"
    if len(active) < least:
        return (f"SecAgg+ unmask lists {len(active)} active nodes; this node's neighbourhood may not shrink below "
                f"{least}")
    holders = set(_list(state.get("rd_seed_share_dict:K")))
    if not set(active) <= holders or not set(dead) <= holders:
        return "SecAgg+ unmask names a node this node holds no share of"
    return None


def _int_list(value: object) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(type(v) is int for v in value)  # noqa: E721


def _list(value: object) -> list[object]:
    return list(value) if isinstance(value, list) else []


def _refuse(msg: Message, context: Context, reason: str) -> Message:
    """Log the reason on the node, drop this round's SecAgg+ state (no share can be asked for later), reply."""
    log.warning("refusing a TRAIN message from the coordinator: %s", reason)
    context.state.config_records.pop(RECORD_KEY_STATE, None)
    return refusal_reply(msg)
