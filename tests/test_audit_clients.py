"""The client-level audit of `veil audit` without a federation: the score against a hand computation and through the
real strategy's aggregation, the canary update and its draw, the audited run's population, and a canary node's fit
(the ordinary node path with the canary update in place of training)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from support.helpers import data_overrides
from veil.preflight import preflight, resolve_paths_and_labels
from veil.errors import ConfigError
from veil.privacy.audit_bound import guess_top_bottom
from veil.audit.clients import (
    CanaryClient,
    canary_direction,
    canary_run_config,
    canary_update,
    direction_scores,
    draw_canary_clients,
)


def test_score_matches_a_hand_computation() -> None:
    """w_0 = (0, 0 | 0), w_R = (1, 2 | 3): the change is (1, 2, 3); against e_0, e_2 and (0.6, 0.8, 0) it scores
    1, 3 and 0.6 + 1.6 = 2.2."""
    initial = [np.zeros(2, np.float32), np.zeros(1, np.float32)]
    final = [np.array([1.0, 2.0], np.float32), np.array([3.0], np.float32)]
    directions = [np.array([1.0, 0, 0]), np.array([0, 0, 1.0]), np.array([0.6, 0.8, 0])]
    assert direction_scores(initial, final, directions) == pytest.approx([1.0, 3.0, 2.2], abs=1e-12)


def test_canary_update_is_the_seeded_direction_at_the_clip_norm() -> None:
    shapes = [(4, 3), (5,)]
    sent = canary_update(7, shapes, clip=0.5, included=True)
    assert [a.shape for a in sent] == shapes and all(a.dtype == np.float32 for a in sent)
    flat = np.concatenate([a.ravel() for a in sent]).astype(np.float64)
    assert np.linalg.norm(flat) == pytest.approx(0.5, rel=1e-6)
    np.testing.assert_allclose(flat, 0.5 * canary_direction(7, 17), rtol=1e-6)
    assert not np.allclose(flat, 0.5 * canary_direction(8, 17)), "another seed, another direction"
    assert all(not a.any() for a in canary_update(7, shapes, clip=0.5, included=False)), "out: a zero update"


def test_included_canaries_rank_first_through_the_strategys_aggregation() -> None:
    """One round of the real DeltaFedAvg over 3 owners (random updates clipped to S) and 12 canary clients, with the
    sum's Gaussian noise added as the central placement does: by hand, an included canary moves w along u_i by
    server_lr·S/n (n = 15), an excluded one by nothing; the rest is the owners' and the noise's projection. Without
    noise the 3 highest and 3 lowest scores are all right guesses; at z = 20 they are no better than chance."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from test_strategy import _Proxy

    from veil.privacy.client_level import clip_update
    from veil.strategies.fedavg import DeltaFedAvg

    shapes, clip, lr = [(40, 20), (30,)], 0.5, 1.0
    initial = [np.zeros(s, np.float32) for s in shapes]
    rng = np.random.default_rng(3)
    drawn = draw_canary_clients(count=12, first_partition=3, rng=rng)
    owners = [clip_update([rng.normal(size=s).astype(np.float32) for s in shapes], clip=clip)[0] for _ in range(3)]
    canaries = [canary_update(s, shapes, clip=clip, included=inc) for s, inc in zip(drawn.seeds, drawn.included,
                                                                                    strict=True)]
    updates = owners + canaries
    directions = [canary_direction(s, 830) for s in drawn.seeds]

    def one_round(noise_std: float) -> np.ndarray:
        strategy = DeltaFedAvg(initial=initial, clients_per_round=15, num_clients=15, server_lr=lr,
                               central_noise_std=noise_std, client_level_clip=clip)
        results = [(_Proxy(i), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(u), 1, {}))
                   for i, u in enumerate(updates)]
        params, _ = strategy.aggregate_fit(1, results, [])
        return direction_scores(initial, parameters_to_ndarrays(params), directions)

    scores = one_round(0.0)
    others = np.concatenate([np.concatenate([a.ravel() for a in u]) for u in updates[:3]]).reshape(3, -1).sum(0)
    for i, (inc, u) in enumerate(zip(drawn.included, directions, strict=True)):
        crosstalk = sum(clip * float(u @ v) for j, v in enumerate(directions) if j != i and drawn.included[j])
        by_hand = lr * ((clip if inc else 0.0) + crosstalk + float(others @ u)) / 15
        assert scores[i] == pytest.approx(by_hand, rel=1e-4, abs=1e-7)
    included = np.array(drawn.included)
    assert guess_top_bottom(scores, included, k_in=3, k_out=3).v == 6
    noisy = [guess_top_bottom(one_round(20 * clip), included, k_in=3, k_out=3).v for _ in range(20)]
    assert 2.0 <= np.mean(noisy) <= 4.0, noisy  # chance: 3 of 6; a clear signal would give about 6


def test_draw_is_fresh_and_half_included() -> None:
    a = draw_canary_clients(count=400, first_partition=5)
    b = draw_canary_clients(count=400, first_partition=5)
    assert a.included != b.included and a.seeds != b.seeds, "drawn from OS entropy, not the run's seed"
    assert 140 < sum(a.included) < 260 and len(set(a.seeds)) == 400 and len(a) == 400
    with pytest.raises(ConfigError, match="--canaries=1"):
        draw_canary_clients(count=1, first_partition=5)


def _cfg(small_csv: tuple[Path, Path], tmp_path: Path, *extra: str) -> object:
    return resolve_paths_and_labels(preflight(["model=tiny_bert", *data_overrides(*small_csv), "privacy=client_dp",
                                               *extra]), tmp_path)


def test_audited_run_adds_the_canary_clients_to_the_population(small_csv: tuple[Path, Path], tmp_path: Path) -> None:
    from veil.task import get_task
    from veil.task.shards import simulated_partitions
    from veil.task.split import training_examples

    cfg = _cfg(small_csv, tmp_path, "federation.num_clients=4")
    run = canary_run_config(cfg, 60)
    assert (run.federation.num_clients, run.federation.clients_per_round) == (64, 64)
    assert run.secagg.modulus_range >= 4 * run.secagg.quantization_range * 64 == 2**30
    sampled = canary_run_config(_cfg(small_csv, tmp_path, "federation.num_clients=4", "federation.clients_per_round=3",
                                     "secagg=off"), 4)
    assert (sampled.federation.num_clients, sampled.federation.clients_per_round) == (8, 6), "the owners' rate, 3/4"
    big = canary_run_config(cfg, 1000)
    assert big.secagg.modulus_range == 2**34, "raised so that the sum of 1,004 quantized updates cannot wrap"
    task, labels = get_task(run.task.name), json.loads(run.data.labels)
    _, parts = simulated_partitions(task, training_examples(run), labels, dataclasses.asdict(run.federation),
                                    path=run.data.train_path, canary_clients=60)
    assert len(parts) == 4 and sum(len(p) for p in parts) == 60, "the data are split among the 4 owners only"


@pytest.mark.parametrize("key", ["canary_clients", "planted_examples"])
def test_the_canary_settings_are_no_run_config_keys(small_csv: tuple[Path, Path], tmp_path: Path, key: str) -> None:
    """`veil simulate federation.canary_clients=2` fails as any unknown key does: the audit's settings are
    arguments of the simulation (AuditPlan), not run-config keys."""
    unknown = f"Could not override 'federation.{key}'.*Key '{key}' not in 'FederationConfig'"
    with pytest.raises(ConfigError, match=unknown):
        _cfg(small_csv, tmp_path, f"federation.{key}=2")


def test_simulate_refuses_canary_clients_without_the_audit(small_csv: tuple[Path, Path], tmp_path: Path) -> None:
    from veil.simulation import simulate
    from veil.task.shards import AuditPlan

    cfg = _cfg(small_csv, tmp_path, "federation.num_clients=4")
    with pytest.raises(ValueError, match="needs the audit's ClientApp factory"):
        simulate(cfg, tmp_path / "run", audit=AuditPlan(canary_clients=2))
    with pytest.raises(ValueError, match="fewer than federation.num_clients=4"):
        simulate(cfg, tmp_path / "run", client_app=lambda *a, **k: None, audit=AuditPlan(canary_clients=4))
    assert not (tmp_path / "run").exists()


def test_the_canary_settings_reach_the_simulated_nodes_only_through_their_node_configs(
        small_csv: tuple[Path, Path], tmp_path: Path) -> None:
    from veil.client.settings import node_settings
    from veil.simulation import simulated_node_configs
    from veil.task.shards import AuditPlan

    cfg = _cfg(small_csv, tmp_path, "federation.num_clients=4")
    plan = AuditPlan(planted_examples=str(tmp_path / "planted.jsonl"), canary_clients=2)
    audited, plain = simulated_node_configs(cfg, plan), simulated_node_configs(cfg)
    for node in range(4):
        settings = node_settings({"partition-id": node, **audited[node]}, simulation_root=tmp_path)
        unaudited = node_settings({"partition-id": node, **plain[node]}, simulation_root=tmp_path)
        assert AuditPlan.of(settings) == plan and AuditPlan.of(unaudited) == AuditPlan()
    assert {"planted-examples", "canary-clients"}.isdisjoint(plain[0]), "a plain run's node configs are unchanged"
    with pytest.raises(ConfigError, match="veil audit's simulated nodes only"):  # a deployed owner's node
        node_settings({"data-path": str(small_csv[0]), "max-epsilon": 1.0, "canary-clients": 2})


@pytest.mark.parametrize("included", [True, False])
def test_canary_node_runs_the_ordinary_release(small_csv: tuple[Path, Path], tmp_path: Path, included: bool) -> None:
    """A canary node built by the simulation's client_fn: policy checks, the ledger booked, the client-level noise
    share added to S·u (or to zero), the same reply keys as any node; an owner's partition gets the plain client."""
    from flwr.common import Context, RecordDict

    from veil.client.app import REPLY_KEYS, VeilClient, make_client_fn
    from veil.conf.runconfig import to_run_config
    from veil.audit.clients import CanaryClients
    from veil.privacy.ledger import PrivacyLedger
    from veil.simulation import simulated_node_configs
    from veil.task import get_task
    from veil.task.model import get_trainable
    from veil.task.shards import AuditPlan

    run = canary_run_config(_cfg(small_csv, tmp_path, "federation.num_clients=3"), 2)
    flat, nodes, root = to_run_config(run), simulated_node_configs(run, AuditPlan(canary_clients=2)), tmp_path / "nodes"
    canaries = CanaryClients(first_partition=3, seeds=(11, 12), included=(included, True))
    client_fn = canaries.client_fn(make_client_fn(flat, simulation_root=root, simulated_nodes=nodes), flat,
                                   simulation_root=root, simulated_nodes=nodes)

    def node(partition: int) -> object:
        context = Context(run_id=1, node_id=partition, node_config={"partition-id": partition, "num-partitions": 5},
                          state=RecordDict(), run_config={})
        return client_fn(context).numpy_client  # type: ignore[attr-defined]

    owner, canary = node(0), node(3)
    assert type(owner) is VeilClient and isinstance(canary, CanaryClient)
    received = get_trainable(get_task(run.task.name).build_model(run, json.loads(run.data.labels), seed=0))
    update, weight, reply = canary.fit(received, {"server_round": 1})
    share = 1.0 * 0.5 / math.sqrt(5)  # z·S/sqrt(cohort): client_dp's z = 1, S = 0.5, 5 clients per round
    assert weight == 1 and set(reply) == set(REPLY_KEYS) and reply["noise_std"] == pytest.approx(share)
    sent = np.concatenate([a.ravel() for a in update]).astype(np.float64)
    expected = 0.5 * canary_direction(11, sent.size) if included else np.zeros(sent.size)
    assert np.std(sent - expected) == pytest.approx(share, rel=0.1) and abs(np.mean(sent - expected)) < 0.05
    ledger = PrivacyLedger.open(root / "node-3" / "privacy_ledger.json", create=False)
    # booked like any client-level node: what leaves it alone, z/(2·sqrt(cohort)) per record (review N4)
    assert [e.noise_multiplier for e in ledger.events] == pytest.approx([1.0 / (2 * math.sqrt(5))])


def test_report_shows_the_client_level_audit(tmp_path: Path) -> None:
    from test_report import fake_run

    from veil.audit.result import SCORES, AuditResult
    from veil.report import find_runs, load_run, write_report

    fake_run(tmp_path / "a", eps=0.98, clients=43)
    audit = AuditResult(claimed_epsilon=0.983, delta=1e-5, lower_bound=1.821, confidence=0.95, canaries=40,
                        included=24, guesses=20, correct=20, score=SCORES["direction"], privacy="p", unit="client")
    (tmp_path / "a" / "audit.json").write_text(json.dumps(audit.to_json()))
    write_report([load_run(p) for p in find_runs([tmp_path])], tmp_path / "report")
    row = next(line for line in (tmp_path / "report" / "report.md").read_text().splitlines() if "VIOLATION" in line)
    assert "0.983" in row and "1.821" in row and "| white-box, canary clients |" in row and "20 (20)" in row
