"""A typo or a bad value stops `veil simulate` before anything starts: one line naming the field, a non-zero exit,
no traceback, no run directory; the run config round-trips through Flower's flat form with types cast back."""

from __future__ import annotations

from pathlib import Path

import pytest

from veil.cli import main
from veil.conf.runconfig import from_run_config, to_run_config
from veil.conf.schema import (
    DP_SGD_LR,
    PLAIN_LR,
    SGD_LR,
    DataConfig,
    FederationConfig,
    PrivacyConfig,
    VeilConfig,
)
from veil.errors import ConfigError

BAD = [
    (["federation.rounds=-1"], "federation.rounds"),
    (["federation.rounds=abc"], "federation.rounds"),
    (["federation.num_clientz=3"], "num_clientz"),
    (["privacy=foo"], "privacy/foo"),
    (["privacy.delta=1.5"], "privacy.delta"),
    (["secagg.reconstruction_threshold=3"], "secagg.reconstruction_threshold"),
    (["federation.clients_per_round=9"], "federation.clients_per_round"),
    (["federation.partitioner=shards"], "federation.partitioner"),
    (["federation.optimizer=lamb"], "federation.optimizer"),
    (["data=csv"], "train_path"),
    (["data.train_path=/nonexistent/train.csv"], "/nonexistent/train.csv"),
]


@pytest.mark.parametrize(("overrides", "needle"), BAD)
def test_bad_value_is_one_line(overrides: list[str], needle: str, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    run_dir = tmp_path / "run"
    code = main(["simulate", *overrides, f"hydra.run.dir={run_dir}"])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and err.startswith("veil: error: ") and needle in err, err
    assert "Traceback" not in err
    assert not run_dir.exists()


def test_run_config_round_trip_casts_types() -> None:
    cfg = VeilConfig(data=DataConfig(train_path="a.csv", test_path="b.csv")).validate()
    flat = to_run_config(cfg)
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert from_run_config(flat) == cfg
    as_text = {k: str(v) for k, v in flat.items()}  # a deployment may hand everything back as strings
    assert from_run_config(as_text) == cfg
    with pytest.raises(ConfigError, match="veil.federation.rounds"):
        from_run_config({**flat, "veil.federation.rounds": "2.5"})
    with pytest.raises(ConfigError, match="federation.rounds"):
        from_run_config({**flat, "veil.federation.rounds": 0})


def test_lr_default_follows_the_client_optimizer_and_privacy_mode() -> None:
    data = DataConfig(train_path="a.csv", test_path="b.csv")
    assert VeilConfig(data=data).validate().federation.lr == DP_SGD_LR  # classification under DP-SGD
    assert VeilConfig(data=data, privacy=PrivacyConfig(enabled=False)).validate().federation.lr == PLAIN_LR
    sgd = VeilConfig(data=data, federation=FederationConfig(optimizer="sgd")).validate()
    assert (sgd.federation.optimizer, sgd.federation.lr) == ("sgd", SGD_LR)
    assert from_run_config(to_run_config(sgd)) == sgd  # the optimizer travels to the nodes in the run config
    explicit = VeilConfig(data=data, federation=FederationConfig(optimizer="sgd", lr=0.5)).validate()
    assert explicit.federation.lr == 0.5


@pytest.mark.parametrize(("shares", "threshold", "ok"), [(3, 2, True), (5, 3, True), (4, 2, False), (5, 2, False),
                                                        (7, 3, False), (7, 4, True)])
def test_secagg_threshold_above_half_the_shares(shares: int, threshold: int, ok: bool) -> None:
    """At or below num_shares/2, a coordinator that tells some neighbours 'X dropped' and the others 'X is alive'
    collects a threshold of both kinds of X's shares and unmasks X alone."""
    cfg = VeilConfig(data=DataConfig(train_path="a.csv", test_path="b.csv"))
    cfg.secagg.num_shares, cfg.secagg.reconstruction_threshold = shares, threshold
    cfg.federation.num_clients = cfg.federation.clients_per_round = 8
    if ok:
        cfg.validate()
    else:
        with pytest.raises(ConfigError, match=f"secagg.reconstruction_threshold={threshold} is invalid.*num_shares/2"):
            cfg.validate()


def test_secagg_modulus_holds_the_sum_of_the_round() -> None:
    """Each client's quantized values reach quantization_range, so clients_per_round of them reach
    clients_per_round * quantization_range; the modulus needs that with 4x headroom (the sum would wrap)."""
    cfg = VeilConfig(data=DataConfig(train_path="a.csv", test_path="b.csv"))
    cfg.secagg.quantization_range = 2**20
    cfg.federation.num_clients = cfg.federation.clients_per_round = 16  # 4 * 2**20 * 16 = 2**26
    cfg.secagg.modulus_range = 2**26
    cfg.validate()
    cfg.secagg.modulus_range = 2**25
    with pytest.raises(ConfigError, match=r"secagg.modulus_range=33554432 is invalid: expected >= .* = 67108864"):
        cfg.validate()
    cfg.federation.num_clients = cfg.federation.clients_per_round = 8  # half the summands: fits again
    cfg.validate()
