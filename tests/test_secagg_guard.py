"""The node's SecAgg+ guard against a coordinator that lies: crafted Flower messages, key by key.

A hand-driven SecAgg+ round between three nodes (each a Context and the guard, messages routed here the way Flower's
``SecAggPlusWorkflow`` routes them) gives the reference: a valid round passes the guard and its unmasked result equals
the plain mean. The attacks then replay the review's probes (privacy review H2): a plain TRAIN message, weak or
mismatched SETUP parameters, and UNMASK lists that would hand out both kinds of shares of one node. Each must be
refused with the one fixed reply, no share and no call into Flower's mod or the app.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import (Code, FitIns, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters,
                         parameters_to_ndarrays)
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_extract, parameters_mod, parameters_subtraction
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from veil.flower.secagg import MASK_GENERATOR
from veil.flower.secagg import full_key_masks as pseudo_rand_gen  # the ServerApp's generator (veil's patch)
from veil.security.roster import MASK_GENERATOR_KEY, RECORD
from veil.client.secagg_guard import REFUSAL_CODE, REFUSAL_REASON, SecAggPolicy, make_secagg_guard, secagg_policy
from veil.conf.schema import VeilConfig

NODES = (11, 22, 33)
SA = VeilConfig().secagg  # the run config's secagg.* (defaults: 3 shares, threshold 2)
POLICY = secagg_policy(VeilConfig(), require_secagg=True)
SETUP = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: SA.num_shares,
         Key.THRESHOLD: SA.reconstruction_threshold, Key.CLIPPING_RANGE: float(SA.clipping_range),
         Key.TARGET_RANGE: SA.quantization_range, Key.MOD_RANGE: SA.modulus_range, Key.MAX_WEIGHT: 1.0}


def _guard(policy: SecAggPolicy) -> Any:
    """The mod under test (one place, so the same tests can be pointed at another mod)."""
    return make_secagg_guard(policy)


def _incoming(node: int, content: RecordDict, message_type: str = MessageType.TRAIN) -> Message:
    """A message as the node receives it from the SuperLink."""
    meta = Metadata(run_id=1, message_id=f"m{time.monotonic_ns()}", src_node_id=0, dst_node_id=node,
                    reply_to_message_id="", group_id="1", created_at=time.time(), ttl=600.0,
                    message_type=message_type)
    return Message(metadata=meta, content=content)


def _fitins() -> RecordDict:
    params = ndarrays_to_parameters([np.zeros(4, dtype=np.float32)])
    return compat.fitins_to_recorddict(FitIns(params, {"server_round": 1}), keep_input=True)


class App:
    """Stands in for the ClientApp behind the mod: records calls, answers with a fixed update per node."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.updates = {nid: np.linspace(-1, 1, 4).astype(np.float32) * (k + 1) / 4 for k, nid in enumerate(NODES)}

    def __call__(self, msg: Message, context: Context) -> Message:
        node = msg.metadata.dst_node_id
        self.calls.append(node)
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([self.updates[node]]), 1, {})
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


class Round:
    """Three nodes behind the mod; ``send`` routes one stage's message to one node, like SecAggPlusWorkflow."""

    def __init__(self, policy: SecAggPolicy = POLICY, mod: Callable[..., Message] | None = None) -> None:
        self.mod = mod or _guard(policy)
        self.app = App()
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                         for n in NODES}
        self.keys: dict[int, list[bytes]] = {}
        self.ciphertexts: list[tuple[int, int, bytes]] = []
        self.masked: dict[int, list[np.ndarray]] = {}

    def send(self, node: int, configs: dict[str, Any], with_fitins: bool = False,
             extra: dict[str, Any] | None = None) -> Message:
        content = _fitins() if with_fitins else RecordDict()
        content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(configs)
        if configs.get(Key.STAGE) == Stage.SETUP:  # veil's ServerApp announces its mask generator (KeyRelay)
            content.config_records[RECORD] = ConfigRecord({MASK_GENERATOR_KEY: MASK_GENERATOR})
        for name, record in (extra or {}).items():
            content.config_records[name] = ConfigRecord(record)
        return self.mod(_incoming(node, content), self.contexts[node], self.app)

    def to_collect(self) -> None:
        """Run SETUP, SHARE_KEYS and COLLECT_MASKED_VECTORS honestly on every node."""
        for n in NODES:
            out = self.send(n, dict(SETUP)).content.config_records[RECORD_KEY_CONFIGS]
            self.keys[n] = [out[Key.PUBLIC_KEY_1], out[Key.PUBLIC_KEY_2]]
        for n in NODES:
            out = self.send(n, {Key.STAGE: Stage.SHARE_KEYS, **{str(m): self.keys[m] for m in NODES}})
            rec = out.content.config_records[RECORD_KEY_CONFIGS]
            self.ciphertexts += [(n, d, c) for d, c in zip(rec[Key.DESTINATION_LIST], rec[Key.CIPHERTEXT_LIST])]
        for n in NODES:
            mine = [(s, c) for s, d, c in self.ciphertexts if d == n]
            out = self.send(n, {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: [c for _, c in mine],
                                Key.SOURCE_LIST: [s for s, _ in mine]}, with_fitins=True)
            rec = out.content.config_records[RECORD_KEY_CONFIGS]
            self.masked[n] = [bytes_to_ndarray(b) for b in rec[Key.MASKED_PARAMETERS]]

    def unmask(self, node: int, active: list[int], dead: list[int]) -> Message:
        return self.send(node, {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active,
                                Key.DEAD_NODE_ID_LIST: dead})


def _is_refusal(reply: Message) -> bool:
    """The one refusal: an error with the fixed code and text, and no content (so no key, share or update)."""
    return (reply.has_error() and not reply.has_content() and reply.error.code == REFUSAL_CODE
            and reply.error.reason == REFUSAL_REASON)


def test_valid_round_passes_and_unmasks_to_the_plain_mean() -> None:
    rnd = Round()
    rnd.to_collect()
    assert all(len(k) == 2 and all(isinstance(b, bytes) and len(b) > 32 for b in k) for k in rnd.keys.values())
    assert sorted(rnd.app.calls) == sorted(NODES)  # the app trained exactly once per node, at COLLECT
    shares: dict[int, list[bytes]] = {n: [] for n in NODES}
    for n in NODES:
        rec = rnd.unmask(n, list(NODES), []).content.config_records[RECORD_KEY_CONFIGS]
        for owner, share in zip(rec[Key.NODE_ID_LIST], rec[Key.SHARE_LIST]):
            shares[owner].append(share)
    # The server's side (Flower's SecAggPlusWorkflow.unmask_stage, no drop-outs): remove each private mask.
    total = [sum(vs) for vs in zip(*rnd.masked.values())]
    for n in NODES:
        seed = combine_shares(shares[n])
        total = parameters_subtraction(total, pseudo_rand_gen(seed, SA.modulus_range, [a.shape for a in total]))
    weight, vectors = factor_extract(parameters_mod(total, SA.modulus_range))
    summed = dequantize(vectors, SA.clipping_range, SA.quantization_range)[0] - (len(NODES) - 1) * SA.clipping_range
    mean = summed * SA.quantization_range / weight  # Flower divides by the summed weights (1 each): the mean
    plain = sum(rnd.app.updates.values()) / len(NODES)
    np.testing.assert_allclose(mean, plain, atol=2 * SA.clipping_range / SA.quantization_range)


def test_plain_train_is_refused_without_training_when_secagg_is_required() -> None:
    app = App()
    ctx = Context(run_id=1, node_id=11, node_config={}, state=RecordDict(), run_config={})
    reply = _guard(POLICY)(_incoming(11, _fitins()), ctx, app)
    assert _is_refusal(reply)
    assert app.calls == []


def test_a_clientapp_with_the_guard_refuses_before_building_the_client() -> None:
    built: list[int] = []

    def client_fn(context: Context) -> Any:
        built.append(context.node_id)
        raise AssertionError("the client must not be built for a refused message")

    app = ClientApp(client_fn=client_fn, mods=[_guard(POLICY)])
    ctx = Context(run_id=1, node_id=11, node_config={}, state=RecordDict(), run_config={})
    assert _is_refusal(app(_incoming(11, _fitins()), ctx))
    assert built == []


def test_plain_train_passes_when_the_owner_allows_plain_aggregation() -> None:
    app = App()
    ctx = Context(run_id=1, node_id=11, node_config={}, state=RecordDict(), run_config={})
    allow = secagg_policy(VeilConfig(), require_secagg=False)
    reply = _guard(allow)(_incoming(11, _fitins()), ctx, app)
    assert app.calls == [11] and not reply.has_error()
    got = parameters_to_ndarrays(compat.recorddict_to_fitres(reply.content, keep_input=True).parameters)
    np.testing.assert_array_equal(got[0], app.updates[11])


def test_evaluate_messages_pass_through_under_require() -> None:
    seen: list[str] = []
    ctx = Context(run_id=1, node_id=11, node_config={}, state=RecordDict(), run_config={})
    msg = _incoming(11, RecordDict(), MessageType.EVALUATE)

    def app(m: Message, c: Context) -> Message:
        seen.append(m.metadata.message_type)
        return Message(RecordDict(), reply_to=m)

    reply = _guard(POLICY)(msg, ctx, app)
    assert seen == [MessageType.EVALUATE] and not reply.has_error()


@pytest.mark.parametrize(("policy_change", "setup_change"), [
    ({}, {Key.THRESHOLD: 1}),  # threshold 1: every Shamir share is the secret itself
    ({"reconstruction_threshold": 1}, {Key.THRESHOLD: 1}),  # ... even when the run config says so
    ({}, {Key.SHARE_NUMBER: 2}),
    ({"num_shares": 2, "reconstruction_threshold": 2}, {Key.SHARE_NUMBER: 2, Key.THRESHOLD: 2}),  # below the minimum
    ({"num_shares": 4}, {Key.SHARE_NUMBER: 4}),  # threshold 2 of 4: not above half
    ({}, {Key.CLIPPING_RANGE: 1e6}),
    ({}, {Key.CLIPPING_RANGE: 8}),  # an int where the run says 8.0
    ({}, {Key.TARGET_RANGE: 2**10}),
    ({}, {Key.MOD_RANGE: 2**64}),
], ids=["threshold-1", "threshold-1-in-run", "shares-2", "shares-2-in-run", "half", "clip", "clip-int",
        "target", "mod"])
def test_bad_setup_is_refused_before_flower_makes_keys(policy_change: dict[str, Any],
                                                       setup_change: dict[str, Any]) -> None:
    rnd = Round(replace(POLICY, **policy_change))
    reply = rnd.send(11, {**SETUP, **setup_change})
    assert _is_refusal(reply)
    assert not rnd.contexts[11].state.config_records  # Flower's mod never ran: no keys made, no state kept


@pytest.mark.parametrize(("active", "dead"), [
    ([11, 22, 33], [11]),  # the review's probe: this node both active and dead
    ([22, 33], [11]),  # this node listed dead
    ([11, 22], [22, 33]),  # 22 both active and dead
    ([11, 11], [22, 33]),  # a repeat passes Flower's own count check and frees both neighbours' sk1 shares
])
def test_lying_unmask_is_refused_and_releases_no_share(active: list[int], dead: list[int]) -> None:
    rnd = Round()
    rnd.to_collect()
    reply = rnd.unmask(11, active, dead)
    assert _is_refusal(reply)
    # the round's SecAgg+ state is gone: an honest-looking retry gets nothing either
    assert _is_refusal(rnd.unmask(11, [11, 22, 33], []))


@pytest.mark.parametrize(("active", "dead"), [([11, 22, 33], [11]), ([22, 33], [11]), ([11, 22], [22, 33]),
                                             ([11, 11], [22, 33])])
def test_the_same_lies_get_shares_from_flowers_mod_alone(active: list[int], dead: list[int]) -> None:
    """The reference for the test above: without the guard these requests are answered with shares."""
    rnd = Round(mod=secaggplus_mod)
    rnd.to_collect()
    rec = rnd.unmask(11, active, dead).content.config_records[RECORD_KEY_CONFIGS]
    assert rec[Key.NODE_ID_LIST] == active + dead and len(rec[Key.SHARE_LIST]) == len(active) + len(dead)


def test_every_refusal_is_the_same_reply() -> None:
    replies = [_guard(POLICY)(_incoming(11, _fitins()),
                              Context(run_id=1, node_id=11, node_config={}, state=RecordDict(), run_config={}), App())]
    replies.append(Round().send(11, {**SETUP, Key.THRESHOLD: 1}))
    rnd = Round()
    rnd.to_collect()
    replies.append(rnd.unmask(11, [11, 22, 33], [11]))
    assert all(r.has_error() and not r.has_content() for r in replies)
    assert {(r.error.code, r.error.reason) for r in replies} == {(REFUSAL_CODE, REFUSAL_REASON)}


def test_out_of_order_stage_is_refused() -> None:
    rnd = Round()
    reply = rnd.unmask(11, [11, 22, 33], [])  # no SETUP before
    assert _is_refusal(reply)


def test_policy_is_validated() -> None:
    with pytest.raises(TypeError, match="require_secagg"):
        SecAggPolicy(require_secagg=1, num_shares=3, reconstruction_threshold=2,  # type: ignore[arg-type]
                     clipping_range=8.0, quantization_range=2**22, modulus_range=2**32)
    with pytest.raises(ValueError, match="min_num_shares"):
        SecAggPolicy(min_num_shares=1, num_shares=3, reconstruction_threshold=2, clipping_range=8.0,
                     quantization_range=2**22, modulus_range=2**32)
    with pytest.raises(TypeError):
        SecAggPolicy(3, 2)  # type: ignore[misc]  # keyword-only


# --- a coordinator that shrinks the neighbourhood (issue 24, privacy review N5b) ------------------------------------

def _collect_from(rnd: Round, node: int, sources: list[int]) -> Message:
    mine = [(s, c) for s, d, c in rnd.ciphertexts if d == node and s in sources]
    return rnd.send(node, {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: [c for _, c in mine],
                           Key.SOURCE_LIST: [s for s, _ in mine]}, with_fitins=True)


def _to_share_keys(rnd: Round) -> None:
    for n in NODES:
        out = rnd.send(n, dict(SETUP)).content.config_records[RECORD_KEY_CONFIGS]
        rnd.keys[n] = [out[Key.PUBLIC_KEY_1], out[Key.PUBLIC_KEY_2]]
    for n in NODES:
        out = rnd.send(n, {Key.STAGE: Stage.SHARE_KEYS, **{str(m): rnd.keys[m] for m in NODES}})
        rec = out.content.config_records[RECORD_KEY_CONFIGS]
        rnd.ciphertexts += [(n, d, c) for d, c in zip(rec[Key.DESTINATION_LIST], rec[Key.CIPHERTEXT_LIST])]


def test_a_single_neighbour_collect_is_answered_by_flowers_mod_alone() -> None:
    """The reference for the test below (review probe P4b: 1 + 1 >= threshold 2)."""
    rnd = Round(mod=secaggplus_mod)
    _to_share_keys(rnd)
    reply = _collect_from(rnd, 11, [22])
    assert not reply.has_error() and rnd.app.calls == [11]


def test_a_single_neighbour_collect_is_refused_before_training() -> None:
    rnd = Round()
    _to_share_keys(rnd)
    assert _is_refusal(_collect_from(rnd, 11, [22]))
    assert rnd.app.calls == []  # nothing trained, nothing masked against one neighbour only


def test_a_single_neighbour_collect_passes_when_the_owner_tolerates_a_drop_out() -> None:
    rnd = Round(replace(POLICY, max_dropouts=1))
    _to_share_keys(rnd)
    assert not _collect_from(rnd, 11, [22]).has_error()


@pytest.mark.parametrize(("active", "dead"), [([11, 22], []), ([11, 22], [33])], ids=["shrunk", "one-dead"])
def test_a_shrunk_unmask_is_refused(active: list[int], dead: list[int]) -> None:
    rnd = Round()
    rnd.to_collect()
    assert _is_refusal(rnd.unmask(11, active, dead))


def test_a_shrunk_share_keys_is_refused() -> None:
    rnd = Round()
    for n in NODES:
        out = rnd.send(n, dict(SETUP)).content.config_records[RECORD_KEY_CONFIGS]
        rnd.keys[n] = [out[Key.PUBLIC_KEY_1], out[Key.PUBLIC_KEY_2]]
    assert _is_refusal(rnd.send(11, {Key.STAGE: Stage.SHARE_KEYS, **{str(m): rnd.keys[m] for m in (11, 22)}}))


@pytest.mark.parametrize("setup_change", [{Key.SAMPLE_NUMBER: 2}, {Key.SAMPLE_NUMBER: 2.0}], ids=["two", "float"])
def test_a_setup_for_fewer_nodes_than_the_minimum_is_refused(setup_change: dict[str, Any]) -> None:
    rnd = Round()
    assert _is_refusal(rnd.send(11, {**SETUP, **setup_change}))


def test_a_setup_without_veils_mask_generator_is_refused() -> None:
    """A ServerApp with Flower's 32-bit generator would leave masks that never cancel (and weak ones)."""
    rnd = Round()
    content = RecordDict()
    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(dict(SETUP))
    assert _is_refusal(rnd.mod(_incoming(11, content), rnd.contexts[11], rnd.app))
    wrong = rnd.send(22, dict(SETUP), extra={RECORD: {MASK_GENERATOR_KEY: "mt19937-xor32"}})  # replaces veil's
    assert _is_refusal(wrong)


@pytest.mark.parametrize(("min_cohort", "max_dropouts", "setup_change", "refused"), [
    (3, 0, {}, False),  # 3 shares, 3 sampled: a neighbourhood of 3 holds M = 3
    (4, 0, {}, True),  # the run's 3 shares cannot hold M = 4, however many nodes are sampled
    (4, 0, {Key.SAMPLE_NUMBER: 40}, True),
    (3, 1, {}, True),  # one tolerated drop-out leaves 2 < 3
    (2, 1, {}, False),
], ids=["fits", "shares-too-few", "many-sampled", "drop-out", "drop-out-fits"])
def test_a_shared_noise_node_refuses_a_neighbourhood_below_its_min_cohort(
        min_cohort: int, max_dropouts: int, setup_change: dict[str, Any], refused: bool) -> None:
    """A node whose noise is a 1/sqrt(M) share (shared DP-SGD noise, client-level distributed noise) counts on M
    owners in every sum that unmasks its update; such a sum holds its whole neighbourhood, so SETUP must announce
    one of at least M (less the tolerated drop-outs), else nothing leaves the node."""
    rnd = Round(replace(POLICY, min_cohort=min_cohort, max_dropouts=max_dropouts))
    reply = rnd.send(11, {**SETUP, **setup_change})
    assert _is_refusal(reply) is refused
    assert bool(rnd.contexts[11].state.config_records) is not refused  # keys made only when accepted


def test_the_policy_counts_on_the_cohort_only_where_the_noise_is_a_share(tmp_path: Any) -> None:
    from veil.client.round_plan import cohort_counted_on
    from veil.client.settings import NodeSettings
    from veil.conf.schema import FederationConfig, PrivacyConfig

    def node(min_cohort: int, *, simulated: bool = False) -> NodeSettings:
        return NodeSettings(data_path=None if simulated else str(tmp_path / "d.csv"), text_column=None,
                            label_column=None, max_epsilon=8.0, ledger_path=tmp_path / "l.json", device=None,
                            partition_id=None, num_partitions=None, min_cohort=min_cohort)

    fed = FederationConfig(num_clients=5, local_steps=1, optimizer="sgd", sample_rate=0.1)
    shared = VeilConfig(federation=fed, privacy=PrivacyConfig(share_noise=True))
    sample = VeilConfig(federation=fed)
    client = VeilConfig(federation=fed, privacy=PrivacyConfig(level="client", noise_placement="distributed",
                                                              target_epsilon=4.0))
    assert cohort_counted_on(shared, node(5)) == 5
    assert cohort_counted_on(client, node(4)) == 4
    assert cohort_counted_on(sample, node(5)) == 1, "an ordinary DP-SGD node adds its whole σ"
    assert cohort_counted_on(shared, node(5, simulated=True)) == 1, "in simulation the researcher is every owner"
