"""The coordinator's side of issue 10: what it records, the ε it states, and whose run it runs.

Checked against references: client-level ε against dp-accounting's PLD with the realised noise (test (j) of the
issue), the fixed-σ bound against PLD at q = 1, node-side figures against the simulated ledgers' own events, the
metrics row against the key list of the reply contract (DESIGN.md decision 7).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from support.references import pld_epsilon
from test_strategy import _Proxy
from veil.conf.runconfig import to_run_config
from veil.conf.schema import VeilConfig
from veil.errors import ConfigError
from veil.privacy.accounting import compute_epsilon
from veil.strategies.fedavg import DeltaFedAvg

DELTA = 1e-5
ROW_KEYS = {"round", "accuracy", "loss", "epsilon_max", "clients", "refused", "contributed",
            "upload_bytes_per_client", "seconds", "secagg", "completed", "weights_sha256"}
NODE_KEYS = {"node_epsilon_max", "node_noise_multiplier_min", "node_sample_rate_max"}


def _cfg(**privacy: object) -> VeilConfig:
    cfg = VeilConfig()
    cfg.data.train_path, cfg.data.test_path = "train.csv", "test.csv"
    for key, value in privacy.items():
        setattr(cfg.privacy, key, value)
    return cfg.validate()


def _reply(weight: int, *, noise_std: float, refused: int = 0) -> FitRes:
    metrics = {"can_train_next": True, "refused": refused, "upload_bytes": 40, "noise_std": noise_std}
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.full(4, 0.01, np.float32)]), weight, metrics)


def _client_level_run(contributing: int, *, rounds: int = 3, share: float) -> DeltaFedAvg:
    """``rounds`` rounds of 5 sampled clients, ``contributing`` of them with weight 1, the rest refusing (weight 0:
    SecAgg+ scales their vector, and so any noise they add, to zero)."""
    strategy = DeltaFedAvg(initial=[np.zeros(4, np.float32)], clients_per_round=5, num_clients=5,
                           client_level_clip=1.0)
    for rnd in range(1, rounds + 1):
        results = [(_Proxy(i), _reply(1 if i < contributing else 0, noise_std=share, refused=int(i >= contributing)))
                   for i in range(5)]
        strategy.aggregate_fit(rnd, results, [])
    return strategy


def test_client_level_epsilon_counts_the_realised_contributors() -> None:
    """(j) Five nodes size their share for a cohort of 5 (std z·S/sqrt(5), z = 1, S = 1): with all five contributing
    the sum carries z = 1; with 3 of 5 it carries sqrt(3/5), and ε is the larger value. Reference: PLD at q = 1."""
    share = 1.0 / math.sqrt(5)
    full = _client_level_run(5, share=share).accountant
    partial = _client_level_run(3, share=share).accountant
    assert full is not None and partial is not None
    assert [z for _, z in full.rounds] == pytest.approx([1.0] * 3, rel=1e-12)
    assert [z for _, z in partial.rounds] == pytest.approx([math.sqrt(3 / 5)] * 3, rel=1e-12)
    eps_full, eps_partial = full.epsilon(delta=DELTA), partial.epsilon(delta=DELTA)
    ref_full, ref_partial = pld_epsilon([(1.0, 1.0, 3)], DELTA), pld_epsilon([(math.sqrt(3 / 5), 1.0, 3)], DELTA)
    assert ref_full <= eps_full <= 1.03 * ref_full
    assert ref_partial <= eps_partial <= 1.03 * ref_partial
    assert eps_partial > 1.2 * eps_full  # ≈ 11.5 against ≈ 8.4 (review H3)


def test_client_level_accountant_adds_central_noise_and_survives_a_resume() -> None:
    """Central placement: the server's N(0, (zS)²) is the only noise (z_r = z); the accountant's rounds travel in
    the strategy's checkpoint state and a resumed strategy continues the same composition."""
    z, clip = 1.3, 0.5
    strategy = DeltaFedAvg(initial=[np.zeros(4, np.float32)], clients_per_round=3, num_clients=3,
                           central_noise_std=z * clip, client_level_clip=clip)
    strategy.aggregate_fit(1, [(_Proxy(i), _reply(1, noise_std=0.0)) for i in range(3)], [])
    state = strategy.state_dict()
    resumed = DeltaFedAvg(initial=[np.zeros(4, np.float32)], clients_per_round=3, num_clients=3,
                          central_noise_std=z * clip, client_level_clip=clip)
    resumed.load_state_dict(state)
    resumed.aggregate_fit(2, [(_Proxy(i), _reply(1, noise_std=0.0)) for i in range(3)], [])
    assert resumed.accountant is not None and resumed.accountant.rounds == [(1, pytest.approx(z)), (2, pytest.approx(z))]
    reference = pld_epsilon([(z, 1.0, 2)], DELTA)
    assert reference <= resumed.accountant.epsilon(delta=DELTA) <= 1.03 * reference
    with pytest.raises(KeyError, match="client-level accountant"):
        DeltaFedAvg(initial=[np.zeros(4, np.float32)], clients_per_round=3, num_clients=3,
                    client_level_clip=clip).load_state_dict({k: v for k, v in state.items()
                                                             if k != "client_level_accountant"})


def test_coordinator_epsilon_for_each_basis() -> None:
    from veil.server.guarantee import coordinator_epsilon, epsilon_basis

    fixed = _cfg(target_epsilon=0.0, noise_multiplier=1.5)
    fixed.federation.local_steps = 4
    assert epsilon_basis(fixed, simulation=False) == "fixed_sigma"
    eps = coordinator_epsilon(fixed, basis="fixed_sigma", rounds_run=3)
    reference = pld_epsilon([(1.5, 1.0, 12)], DELTA)  # 4 steps x 3 rounds, no amplification (q = 1)
    assert reference <= eps <= 1.03 * reference
    assert eps > compute_epsilon([(1.5, 0.1, 12)], delta=DELTA).epsilon, "never the amplified figure"
    fixed.federation.sample_rate = 0.1  # a public q that every node samples at or below: amplification is sound
    stated = coordinator_epsilon(fixed, basis="fixed_sigma", rounds_run=3)
    assert pld_epsilon([(1.5, 0.1, 12)], DELTA) <= stated <= 1.03 * pld_epsilon([(1.5, 0.1, 12)], DELTA) < reference

    epochs = _cfg(target_epsilon=0.0)
    epochs.federation.local_steps = 0  # steps per round = E/q: depends on each owner's N
    assert epsilon_basis(epochs, simulation=False) == "see_ledgers"
    assert math.isnan(coordinator_epsilon(epochs, basis="see_ledgers", rounds_run=3))

    target = _cfg(target_epsilon=2.5)
    assert epsilon_basis(target, simulation=False) == "target"
    assert coordinator_epsilon(target, basis="target", rounds_run=1) == 2.5
    assert epsilon_basis(target, simulation=False, planned_rounds={3, 5}) == "see_ledgers", \
        "rounds raised on resume: nodes calibrated for fewer rounds"
    assert epsilon_basis(target, simulation=True) == "simulated_ledgers"
    assert epsilon_basis(_cfg(level="client"), simulation=True) == "client_level"
    assert epsilon_basis(_cfg(enabled=False), simulation=True) == "none"


def _ledger(path: Path, events: list[tuple[float, float, int]]) -> None:
    from veil.privacy.ledger import LedgerEvent, PrivacyLedger

    ledger = PrivacyLedger.open(path)
    for i, (sigma, q, steps) in enumerate(events):
        ledger.record(LedgerEvent(run_id="1", round=i + 1, noise_multiplier=sigma, sample_rate=q, steps=steps,
                                  delta=DELTA))


def _recorder(tmp_path: Path, cfg: VeilConfig, *, simulation: bool):  # type: ignore[no-untyped-def]
    from veil.server.app import RunRecorder

    strategy = DeltaFedAvg(initial=[np.zeros(4, np.float32)], clients_per_round=2, num_clients=2)
    return RunRecorder(cfg, tmp_path / "run", strategy, ["w"], simulation=simulation)


def _outcome(rnd: int, fit: dict[str, object]):  # type: ignore[no-untyped-def]
    from veil.flower.workflows import RoundOutcome

    return RoundOutcome(round=rnd, seconds=1.0, completed=True, loss=1.0, accuracy=0.5, fit_metrics=fit)


FIT = {"clients": 2, "refused": 1, "contributed": 1, "upload_bytes_per_client": 40.0}


def test_simulation_row_adds_node_side_figures_from_the_simulated_ledgers(tmp_path: Path) -> None:
    cfg = _cfg(target_epsilon=0.0, noise_multiplier=1.0)
    nodes = tmp_path / "run" / "nodes"
    events = {0: [(1.1, 0.25, 5), (1.1, 0.25, 5)], 1: [(0.9, 0.5, 5)]}
    for node, history in events.items():
        _ledger(nodes / f"node-{node}" / "privacy_ledger.json", history)
    (nodes / "node-2").mkdir()  # a node that never trained has no ledger
    recorder = _recorder(tmp_path, cfg, simulation=True)
    recorder.after_round(_outcome(1, FIT))
    recorder.close()
    row = recorder.metrics.rows()[0]
    assert set(row) == ROW_KEYS | NODE_KEYS
    expected = max(compute_epsilon(h, delta=DELTA).epsilon for h in events.values())
    assert row["node_epsilon_max"] == pytest.approx(expected, rel=1e-9) == row["epsilon_max"]
    assert row["node_noise_multiplier_min"] == 0.9 and row["node_sample_rate_max"] == 0.5
    assert (row["clients"], row["refused"], row["contributed"]) == (2, 1, 1)


def test_deployment_row_has_no_per_client_or_node_value(tmp_path: Path) -> None:
    cfg = _cfg(target_epsilon=0.0, noise_multiplier=1.0)
    cfg.federation.local_steps = 5
    recorder = _recorder(tmp_path, cfg, simulation=False)
    # even a nodes/ folder in the run directory is not read outside simulation
    _ledger(tmp_path / "run" / "nodes" / "node-0" / "privacy_ledger.json", [(0.1, 1.0, 50)])
    for rnd in (1, 2):
        recorder.after_round(_outcome(rnd, {**FIT, "train_loss": 1.0, "examples": 60}))
    recorder.close()
    rows = recorder.metrics.rows()
    assert all(set(r) == ROW_KEYS for r in rows)
    reference = pld_epsilon([(1.0, 1.0, 10)], DELTA)
    assert reference <= rows[1]["epsilon_max"] <= 1.03 * reference and recorder.basis == "fixed_sigma"


def test_model_card_claims_only_what_holds() -> None:
    from veil.server.export import model_card

    cfg = _cfg()
    card = model_card(cfg, {"epsilon_max": 4.0, "epsilon_basis": "target", "rounds_completed": 3, "accuracy": 0.5})
    assert "never saw a single owner's update" not in card and "honest but curious" in card
    assert "ε ≤ 4 at δ = 1e-05 for this run, a bound after all 3 planned rounds" in card
    assert "largest over clients" not in card and "sample rate" not in card.lower()
    epochs = _cfg(target_epsilon=0.0)
    epochs.federation.local_steps = 0
    card = model_card(epochs, {"epsilon_max": math.nan, "epsilon_basis": "see_ledgers", "rounds_completed": 3})
    assert "| ε | see each owner's ledger (`veil privacy report`) |" in card
    client = _cfg(level="client")
    card = model_card(client, {"epsilon_max": 8.4, "epsilon_basis": "client_level", "rounds_completed": 3})
    assert "client level" in card and "q = 1" in card and "update clipping norm S" in card
    assert "per-sample clipping norm" not in card


def _operator_dir(tmp_path: Path, cfg: VeilConfig) -> Path:
    run_dir = tmp_path / "operator-run"
    run_dir.mkdir()
    cfg.output_dir = str(run_dir)
    (run_dir / "run_config.toml").write_text(tomli_w.dumps(to_run_config(cfg)))
    return run_dir


def test_server_app_runs_only_the_operators_run_config(tmp_path: Path) -> None:
    """(review M8) Under `veil server`, a submitted run config whose output_dir, resume or any other value differs
    from the one `veil server` wrote is refused, naming the field; without `veil server`, nothing changes."""
    import dataclasses

    from veil.server.operator import OPERATOR_RUN_DIR_ENV, operator_config

    own = _cfg()
    run_dir = _operator_dir(tmp_path, own)
    env = {OPERATOR_RUN_DIR_ENV: str(run_dir)}
    assert operator_config(dataclasses.replace(own), env) == own
    for field, value in (("output_dir", str(tmp_path / "elsewhere")), ("resume", str(run_dir))):
        with pytest.raises(ConfigError, match=f"{field}=.*`veil server` set"):
            operator_config(dataclasses.replace(own, **{field: value}), env)
    weaker = dataclasses.replace(own, privacy=dataclasses.replace(own.privacy, target_epsilon=50.0))
    with pytest.raises(ConfigError, match="privacy.target_epsilon=50.0"):
        operator_config(weaker, env)
    elsewhere = dataclasses.replace(own, output_dir=str(tmp_path / "elsewhere"))
    assert operator_config(elsewhere, {}) is elsewhere  # simulation, tests: the submitted config as is


def test_server_app_refuses_before_touching_any_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.common import Context, RecordDict

    from veil.server.app import make_server_app
    from veil.server.operator import OPERATOR_RUN_DIR_ENV

    run_dir = _operator_dir(tmp_path, _cfg())
    monkeypatch.setenv(OPERATOR_RUN_DIR_ENV, str(run_dir))
    target = tmp_path / "victim"
    foreign = {**to_run_config(_cfg()), "veil.output_dir": str(target)}
    context = Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config=foreign)
    with pytest.raises(ConfigError, match="output_dir"):
        make_server_app()._main(None, context)  # type: ignore[arg-type, misc]
    assert not target.exists() and sorted(p.name for p in run_dir.iterdir()) == ["run_config.toml"]


def test_veil_server_tells_the_server_app_its_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import veil.server.session as session_mod
    from veil.server.operator import OPERATOR_RUN_DIR_ENV

    seen: dict[str, str] = {}

    class _Link:
        def stop(self) -> None: ...

    def fake_start(endpoint, *, state_dir, log_dir, env):  # type: ignore[no-untyped-def]
        seen.update(env)
        return _Link()

    monkeypatch.setattr(session_mod, "start_superlink", fake_start)
    with session_mod.Session(tmp_path / "run", host="127.0.0.1", port=9, tls=None):
        pass
    assert seen[OPERATOR_RUN_DIR_ENV] == str((tmp_path / "run").resolve())


def test_client_level_row_states_the_coordinators_own_accountant(tmp_path: Path) -> None:
    from veil.server.app import RunRecorder

    cfg = _cfg(level="client", target_epsilon=0.0, noise_multiplier=1.0)
    strategy = _client_level_run(3, rounds=2, share=1.0 / math.sqrt(5))
    recorder = RunRecorder(cfg, tmp_path / "run", strategy, ["w"], simulation=True)
    recorder.after_round(_outcome(2, FIT))
    recorder.close()
    row = recorder.metrics.rows()[0]
    reference = pld_epsilon([(math.sqrt(3 / 5), 1.0, 2)], DELTA)
    assert recorder.basis == "client_level" and reference <= row["epsilon_max"] <= 1.03 * reference
