"""Server optimisers (FedAdam, FedYogi, FedAdagrad, FedAvgM) against steps computed by hand on small vectors and
against Flower's own strategies over several rounds (the oracle); robust aggregators (median, trimmed mean, Krum)
against hand-computed values; a FedAdam run resumed from a checkpoint equals the uninterrupted run; robust
strategies are refused with SecAgg+ on."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from veil.cli import main
from veil.conf.schema import DataConfig, StrategyConfig, VeilConfig
from veil.server.checkpoint import latest_checkpoint, save_checkpoint
from veil.strategies.factory import make_strategy
from veil.strategies.fedavg import DeltaFedAvg
from veil.strategies.robust import make_aggregator
from veil.strategies.server_opt import ServerOptimizer
from tests.test_strategy import _Proxy


def _res(update: list[float], weight: int = 1) -> FitRes:
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.asarray(update, np.float32)]), weight, {})


def _round(strategy: DeltaFedAvg, rnd: int, updates: list[list[float]]) -> list[float]:
    results = [(_Proxy(i + 1), _res(u)) for i, u in enumerate(updates)]
    strategy.aggregate_fit(rnd, results, [])
    return strategy.global_arrays[0].tolist()


def _strategy(name: str, **fields: object) -> DeltaFedAvg:
    cfg = VeilConfig(data=DataConfig(train_path="a.csv", test_path="b.csv"),
                     strategy=StrategyConfig(name=name, **fields))  # type: ignore[arg-type]
    cfg.secagg.enabled = name in ("fedavg", "fedavgm", "fedadam", "fedyogi")
    return make_strategy(cfg.validate(), initial=[np.array([1.0, -2.0], np.float32)])


# Two rounds, two clients each: mean updates d1 = (0.3, -0.2), d2 = (-0.1, 0.4).
ROUNDS = [[[0.2, -0.4], [0.4, 0.0]], [[0.0, 0.4], [-0.2, 0.4]]]
D = [(0.3, -0.2), (-0.1, 0.4)]
W0 = (1.0, -2.0)


def test_fedadam_moments_and_bias_corrected_step() -> None:
    strategy = _strategy("fedadam", server_lr=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    m, v, w = [0.0, 0.0], [0.0, 0.0], list(W0)
    for t, (updates, d) in enumerate(zip(ROUNDS, D, strict=True), start=1):
        got = _round(strategy, t, updates)
        m = [0.9 * mi + 0.1 * di for mi, di in zip(m, d, strict=True)]
        v = [0.99 * vi + 0.01 * di * di for vi, di in zip(v, d, strict=True)]
        eta = 0.1 * math.sqrt(1 - 0.99 ** (t + 1)) / (1 - 0.9 ** (t + 1))  # Flower's correction, exponent t + 1
        w = [wi + eta * mi / (math.sqrt(vi) + 1e-3) for wi, mi, vi in zip(w, m, v, strict=True)]
        np.testing.assert_allclose(got, w, rtol=1e-5)
    # step 1 by hand: m = (0.03, -0.02), sqrt(v) = (0.03, 0.02), eta_1 = 0.1 * sqrt(0.0199) / 0.19 = 0.074246
    first = _round(_strategy("fedadam", server_lr=0.1), 1, ROUNDS[0])
    np.testing.assert_allclose(first, [1.0 + 0.074246 * 0.03 / 0.031, -2.0 - 0.074246 * 0.02 / 0.021], rtol=1e-4)
    state = strategy.optimizer.state_dict()  # type: ignore[union-attr]
    assert state["steps"] == 2
    np.testing.assert_allclose(state["m_t"][0], m, rtol=1e-5)
    np.testing.assert_allclose(state["v_t"][0], v, rtol=1e-5)


def test_fedyogi_sign_update_of_the_second_moment() -> None:
    strategy = _strategy("fedyogi", server_lr=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    m, v, w = [0.0, 0.0], [0.0, 0.0], list(W0)
    for t, (updates, d) in enumerate(zip(ROUNDS, D, strict=True), start=1):
        got = _round(strategy, t, updates)
        m = [0.9 * mi + 0.1 * di for mi, di in zip(m, d, strict=True)]
        v = [vi - 0.01 * di * di * np.sign(vi - di * di) for vi, di in zip(v, d, strict=True)]
        w = [wi + 0.1 * mi / (math.sqrt(vi) + 1e-3) for wi, mi, vi in zip(w, m, v, strict=True)]
        np.testing.assert_allclose(got, w, rtol=1e-5)


def test_fedavgm_server_momentum() -> None:
    strategy = _strategy("fedavgm", server_lr=0.5, server_momentum=0.9)
    assert _round(strategy, 1, ROUNDS[0]) == pytest.approx([1.0 + 0.5 * 0.3, -2.0 - 0.5 * 0.2], rel=1e-6)
    # momentum after two rounds: 0.9 * d1 + d2 = (0.17, 0.22)
    assert _round(strategy, 2, ROUNDS[1]) == pytest.approx([1.15 + 0.5 * 0.17, -2.1 + 0.5 * 0.22], rel=1e-6)


def test_failed_round_does_not_advance_the_optimiser() -> None:
    strategy = _strategy("fedavgm", server_lr=1.0, server_momentum=0.9)
    params, _ = strategy.aggregate_fit(1, [(_Proxy(1), _res([0.0, 0.0], weight=0))], [])  # everyone refused
    assert params is None and strategy.optimizer.steps == 0  # type: ignore[union-attr]
    assert _round(strategy, 2, ROUNDS[0]) == pytest.approx([1.3, -2.2], rel=1e-6)  # a first step, no momentum yet



def _flower_oracle(name: str, *, shapes: list[tuple[int, ...]], lr: float, momentum: float = 0.0,
                   beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3):  # type: ignore[no-untyped-def]
    """The step of Flower's own strategy for a mean update Δ: handed one result holding Δ while its reference
    weights are zero, its pseudo-gradient is exactly Δ and the weights it returns are exactly the step."""
    from flwr.common import parameters_to_ndarrays
    from flwr.server.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi

    zeros = [np.zeros(s, np.float32) for s in shapes]
    common = {"initial_parameters": ndarrays_to_parameters(zeros), "fit_metrics_aggregation_fn": lambda _: {}}
    if name == "fedavgm":
        flower = FedAvgM(**common, server_learning_rate=lr, server_momentum=momentum)
    elif name == "fedadagrad":
        flower = FedAdagrad(**common, eta=lr, tau=tau)  # Flower fixes beta_1 = beta_2 = 0
    else:
        flower = (FedAdam if name == "fedadam" else FedYogi)(**common, eta=lr, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def step(server_round: int, delta: list[np.ndarray]) -> list[np.ndarray]:
        if name == "fedavgm":
            flower.initial_parameters = ndarrays_to_parameters(zeros)
        else:
            flower.current_weights = [z.copy() for z in zeros]
        params, _ = flower.aggregate_fit(server_round, [(None, FitRes(Status(Code.OK, ""),
                                                                       ndarrays_to_parameters(delta), 1, {}))], [])
        return parameters_to_ndarrays(params)

    return step


@pytest.mark.parametrize(("name", "kwargs"), [
    ("fedadam", {"lr": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
    ("fedyogi", {"lr": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-2}),
    ("fedadagrad", {"lr": 0.05, "beta_1": 0.0, "tau": 1e-3}),
    ("fedavgm", {"lr": 0.5, "momentum": 0.9}),
    ("fedavgm", {"lr": 0.7, "momentum": 0.0}),
])
def test_numpy_server_optimisers_equal_flowers_strategies_over_rounds(name: str, kwargs: dict) -> None:
    shapes = [(3, 2), (4,)]
    ours = ServerOptimizer(name, shapes=shapes, **kwargs)
    oracle = _flower_oracle(name, shapes=shapes, **kwargs)
    rng = np.random.default_rng(3)
    weights = [rng.normal(size=s).astype(np.float32) for s in shapes]
    for server_round in range(1, 6):
        delta = [rng.normal(scale=0.1, size=s).astype(np.float32) for s in shapes]
        expected = [(w.astype(np.float64) + s).astype(np.float32)
                    for w, s in zip(weights, oracle(server_round, delta), strict=True)]
        weights = ours.apply(weights, delta)
        for got, want in zip(weights, expected, strict=True):
            np.testing.assert_array_equal(got, want)
    assert ours.steps == 5

ROBUST = [
    ("median", {}, [[1.0], [5.0], [3.0]], [3.0]),
    ("median", {}, [[1.0], [5.0], [3.0], [4.0]], [3.5]),
    # 5 values, cut int(0.2 * 5) = 1 at each end: mean of 2, 3, 4
    ("trimmed_mean", {"trim_fraction": 0.2}, [[100.0], [2.0], [-50.0], [3.0], [4.0]], [3.0]),
    ("trimmed_mean", {"trim_fraction": 0.0}, [[100.0], [2.0], [-50.0], [3.0], [4.0]], [11.8]),
    # f = 1, scores over the n - f - 2 = 2 nearest (squared distances): 0: 1+4, 1: 1+1, 2: 1+2.25, 3.5: 2.25+6.25
    ("krum", {"num_malicious": 1}, [[0.0], [1.0], [2.0], [3.5], [100.0]], [1.0]),
    ("krum", {"num_malicious": 1, "krum_keep": 2}, [[0.0], [1.0], [2.0], [3.5], [100.0]], [1.5]),
]


@pytest.mark.parametrize(("name", "fields", "updates", "expected"), ROBUST)
def test_robust_aggregators_on_known_inputs(name: str, fields: dict, updates: list[list[float]],
                                            expected: list[float]) -> None:
    got = make_aggregator(name, **fields)([[np.asarray(u, np.float32)] for u in updates])
    np.testing.assert_allclose(got[0], expected, rtol=1e-6)


def test_robust_strategy_ignores_refusals_and_outliers() -> None:
    cfg = VeilConfig(data=DataConfig(train_path="a.csv", test_path="b.csv"), strategy=StrategyConfig(name="median"))
    cfg.secagg.enabled = False
    strategy = make_strategy(cfg.validate(), initial=[np.zeros(2, np.float32)])
    results = [(_Proxy(1), _res([1.0, 0.0])), (_Proxy(2), _res([5.0, 90.0])), (_Proxy(3), _res([3.0, 1.0])),
               (_Proxy(4), _res([0.0, 0.0], weight=0))]  # the refusal (weight 0) must not pull the median to 2
    strategy.aggregate_fit(1, results, [])
    np.testing.assert_allclose(strategy.global_arrays[0], [3.0, 1.0])


def _updates(rounds: int) -> list[list[list[np.ndarray]]]:
    rng = np.random.default_rng(7)
    return [[[rng.normal(scale=0.1, size=(3, 2)).astype(np.float32), rng.normal(size=4).astype(np.float32)]
             for _ in range(3)] for _ in range(rounds)]


def _run(strategy: DeltaFedAvg, rounds: range, updates: list[list[list[np.ndarray]]]) -> None:
    for rnd in rounds:
        results = [(_Proxy(i + 1), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(u), 1, {}))
                   for i, u in enumerate(updates[rnd - 1])]
        strategy.aggregate_fit(rnd, results, [])


def test_fedadam_checkpoint_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    cfg = VeilConfig(data=DataConfig(train_path="a.csv", test_path="b.csv"),
                     strategy=StrategyConfig(name="fedadam", server_lr=0.05)).validate()
    initial = [np.ones((3, 2), np.float32), np.zeros(4, np.float32)]
    updates = _updates(4)
    straight = make_strategy(cfg, initial=initial)
    _run(straight, range(1, 5), updates)

    first = make_strategy(cfg, initial=initial)
    _run(first, range(1, 3), updates)
    state = {k: v for k, v in first.state_dict().items() if k != "global_arrays"}  # as RunRecorder saves it
    save_checkpoint(tmp_path, round=2, names=["a", "b"], arrays=first.global_arrays, run_config={},
                    strategy_state=state)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None
    resumed = make_strategy(cfg, initial=initial)
    resumed.load_state_dict({"global_arrays": ckpt.arrays, **ckpt.meta["strategy"]})  # as the server resumes
    _run(resumed, range(3, 5), updates)
    for a, b in zip(resumed.global_arrays, straight.global_arrays, strict=True):
        assert np.array_equal(a, b)

    # the moments matter: resuming from the weights alone gives another result
    forgetful = make_strategy(cfg, initial=initial)
    forgetful.global_arrays = [a.copy() for a in ckpt.arrays]
    _run(forgetful, range(3, 5), updates)
    assert not all(np.array_equal(a, b) for a, b in zip(forgetful.global_arrays, straight.global_arrays, strict=True))


def test_optimiser_state_of_another_optimiser_is_refused() -> None:
    adam = ServerOptimizer("fedadam", shapes=[(2,)], lr=0.1)
    yogi = ServerOptimizer("fedyogi", shapes=[(2,)], lr=0.1)
    with pytest.raises(ValueError, match="fedadam"):
        yogi.load_state_dict(adam.state_dict())


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum"])
def test_robust_strategy_with_secagg_is_one_line(name: str, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    run_dir = tmp_path / "run"
    code = main(["simulate", f"strategy={name}", "secagg=secaggplus", f"hydra.run.dir={run_dir}"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "secagg=off" in err and f"strategy={name}" in err, err
    assert not run_dir.exists()


@pytest.mark.parametrize(("change", "needle"), [
    ({"privacy.level": "client"}, "privacy.level=sample"),
    ({"strategy.trim_fraction": 0.5}, "strategy.trim_fraction"),
    ({"strategy.beta_2": 1.0}, "strategy.beta_2"),
    ({"model.lora": False, "model.lora_variant": "ffa"}, "model.lora_variant"),
])
def test_bad_strategy_or_adapter_settings_are_refused(change: dict[str, object], needle: str) -> None:
    from veil.errors import ConfigError

    cfg = VeilConfig(data=DataConfig(train_path="a.csv", test_path="b.csv"), strategy=StrategyConfig(name="median"))
    cfg.secagg.enabled = False
    for key, value in change.items():
        group, field = key.split(".")
        setattr(getattr(cfg, group), field, value)
    with pytest.raises(ConfigError, match=needle):
        cfg.validate()
