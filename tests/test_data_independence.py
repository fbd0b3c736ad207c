"""A malicious coordinator places a refusal threshold between c and c+1 rows of an owner's data (review 2026-12-07,
N1): through the sample-rate cap (19/20 rows), the σ floor (40/41), the default δ (10,000/10,001) or a label's
presence (0/1). Reference: two owners whose files differ by one row. For every run config of a small crafted corpus
they must refuse or train alike, reply with the same non-random parts (weight, every metric, the update's shapes)
and book the same ledger events; only the DP release's values may differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from veil.client import app as client_app
from veil.client.app import VeilClient
from veil.client.reply_time import ReplyTimer
from veil.client.settings import NodeSettings
from veil.conf.schema import DataConfig, ModelConfig, VeilConfig
from veil.privacy.ledger import PrivacyLedger
from veil.task.model import build_model, get_trainable

LABELS = ["card", "cash", "fee", "pin"]
# the deployed owner of docs/deployment.md, as the review configured it
OWNER = dict(max_epsilon=8.0, min_noise_multiplier=0.7, max_sample_rate=0.05)
HOLD = 60.0  # the owner's --reply-after where a test holds replies (fake seconds: above any row count read below)


def _write(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("\n".join(["text,label", *(f"{t},{lab}" for t, lab in rows)]) + "\n", encoding="utf-8")
    return path


def _pair(root: Path, name: str, base: list[tuple[str, str]], extra: tuple[str, str]) -> tuple[Path, Path]:
    """Two owners' files: ``base``, and ``base`` with one row more."""
    return _write(root / f"{name}-a.csv", base), _write(root / f"{name}-b.csv", [*base, extra])


def _cfg(*, labels: list[str] = LABELS, batch_size: int = 8, **privacy: Any) -> VeilConfig:
    cfg = VeilConfig(model=ModelConfig(name="tiny", tiny=True, max_length=16),
                     data=DataConfig(train_path="unused.csv", test_path="unused.csv", label_column="label",
                                     labels=json.dumps(labels)))
    cfg.federation.batch_size, cfg.federation.local_steps, cfg.federation.rounds = batch_size, 1, 3
    cfg.privacy.target_epsilon, cfg.privacy.noise_multiplier = 0.0, 1.0
    for key, value in privacy.items():
        setattr(cfg.privacy, key, value)
    return cfg.validate()


# The corpus: each config is one of the review's attacks (or a variant), aimed at the pairs below.
CORPUS = {
    "q_cap_batch_1": _cfg(batch_size=1),  # 19 rows: q = 1/19 > 0.05 refused, 20: q = 0.05 trained (P1 A)
    "sigma_floor_target": _cfg(batch_size=1, target_epsilon=3.047878, accountant="rdp"),  # 40 / 41 (P1 D)
    "sigma_below_floor": _cfg(batch_size=64, noise_multiplier=0.3),
    "labels_card_only": _cfg(labels=["card", "zz_none"]),  # N' = the count of one label
    "labels_pin_only": _cfg(labels=["pin", "zz_none"]),  # presence of one label (P1 B)
    "ghost_asked": _cfg(grad_sample_mode="ghost"),  # the run's engine is never used on a deployed node
    "local_epochs": _cfg(batch_size=4),
}
CORPUS["local_epochs"].federation.local_steps, CORPUS["local_epochs"].federation.local_epochs = 0, 1


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("pairs")
    others = [(f"the atm kept my cash {i}", "cash") for i in range(3)]
    return {
        "19/20 card": _pair(root, "cap", [(f"my card was lost {i}", "card") for i in range(19)] + others,
                            ("my card was lost 19", "card")),
        "40/41 card": _pair(root, "floor", [(f"my card was lost {i}", "card") for i in range(40)] + others,
                            ("my card was lost 40", "card")),
        "0/1 pin": _pair(root, "pin", [(f"my card was lost {i}", "card") for i in range(20)] + others,
                         ("i forgot my pin code", "pin")),
    }


def _settings(data: Path, ledger: Path, **policy: Any) -> NodeSettings:
    return NodeSettings(**{**dict(data_path=str(data), text_column=None, label_column=None, ledger_path=ledger,
                                  device="cpu", partition_id=None, num_partitions=None, allow_test_model=True),
                              **OWNER, **policy})


def _weights(cfg: VeilConfig) -> list[np.ndarray]:
    return get_trainable(build_model(cfg.model, json.loads(cfg.data.labels), seed=cfg.federation.seed))


class _RowClock:
    """A fake clock for the reply's arrival: it moves one second per row the node reads from its file (the work that
    grows with N) and while the node sleeps; never the wall clock."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 0.0
        real = client_app.client_shard

        def shard(cfg: Any, settings: Any) -> Any:
            self.now += Path(settings.data_path).read_text(encoding="utf-8").count("\n") - 1
            return real(cfg, settings)

        monkeypatch.setattr(client_app, "client_shard", shard)

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _visible(cfg: VeilConfig, settings: NodeSettings, rounds: int,
             clock: _RowClock | None = None) -> list[Any]:
    """What the coordinator sees of ``rounds`` rounds, random values reduced to shapes, and what the ledger booked;
    with a ``clock``, also when each reply left (seconds after its instruction, on that fake clock)."""
    timer = ReplyTimer(clock=clock, sleep=clock.sleep) if clock is not None else None
    client, weights, seen = VeilClient(cfg, settings, run_id=11, timer=timer), _weights(cfg), []
    for rnd in range(1, rounds + 1):
        started = clock() if clock is not None else 0.0
        update, weight, metrics = client.fit(weights, {"server_round": rnd})
        assert all(np.isfinite(u).all() for u in update)
        if weight:
            assert any(u.any() for u in update), "a contribution is never exact zeros"
        left = clock() - started if clock is not None else None
        seen.append((weight, dict(metrics), [(u.shape, u.dtype) for u in update], left))
    events = list(PrivacyLedger.open(settings.ledger_path, create=False).events) if settings.ledger_path.exists() else []
    return [*seen, [e.triple for e in events]]


@pytest.mark.parametrize("config", sorted(CORPUS))
def test_owners_one_row_apart_look_alike_to_every_crafted_run(config: str, pairs: dict[str, tuple[Path, Path]],
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also when the reply arrives: both owners hold replies with --reply-after; their (fake) work differs by the
    one row read, their replies leave at the same time."""
    cfg, clock = CORPUS[config], _RowClock(monkeypatch)
    for pair, (a, b) in pairs.items():
        held = dict(reply_after=HOLD)
        seen_a = _visible(cfg, _settings(a, tmp_path / f"{pair[:5]}-a.json".replace("/", "_"), **held), 2, clock)
        seen_b = _visible(cfg, _settings(b, tmp_path / f"{pair[:5]}-b.json".replace("/", "_"), **held), 2, clock)
        assert seen_a == seen_b, f"{config} on {pair}: one row changes what the coordinator sees"
        assert [s[3] for s in seen_a[:2]] == [HOLD, HOLD], "the replies left before --reply-after"
        assert seen_a[0][0] == 1, f"{config} on {pair}: the owner's limits clamp, they do not refuse"


def test_a_small_budget_runs_out_in_the_same_round_whatever_the_data_size(pairs: dict[str, tuple[Path, Path]],
                                                                           tmp_path: Path) -> None:
    cfg = _cfg(batch_size=1)
    for pair, (a, b) in pairs.items():
        tight = dict(max_epsilon=0.4)  # enough for one round or two at q = 0.05, not for three
        seen_a = _visible(cfg, _settings(a, tmp_path / f"t{len(pair)}a.json", **tight), rounds=3)
        seen_b = _visible(cfg, _settings(b, tmp_path / f"t{len(pair)}b.json", **tight), rounds=3)
        assert seen_a == seen_b, pair
        assert [s[0] for s in seen_a[:3]] != [1, 1, 1], "the budget must bind in this test"


def test_the_default_delta_edge_does_not_move_a_refusal(tmp_path: Path) -> None:
    """Default δ = min(1e-5, 1/(10·N)): a run δ of 1/(10·10000.5) fell between 10,000 rows (trained) and 10,001
    (refused). The refusal limit is now the constant 1e-5; δ itself is fixed from the file at start."""
    base = [(f"my card was lost {i}", "card") for i in range(10_000)]
    a, b = _pair(tmp_path, "delta", base, ("my card was lost 10000", "card"))
    cfg = _cfg(labels=["card", "zz_none"], delta=1 / (10 * 10_000.5))
    policy = dict(max_sample_rate=0.001)
    seen_a = _visible(cfg, _settings(a, tmp_path / "da.json", **policy), rounds=1)
    seen_b = _visible(cfg, _settings(b, tmp_path / "db.json", **policy), rounds=1)
    assert seen_a[:-1] == seen_b[:-1] and seen_a[0][0] == 1
    over = _cfg(labels=["card", "zz_none"], delta=2e-5)
    assert _visible(over, _settings(a, tmp_path / "oa.json", **policy), rounds=1)[0][0] == 0, "above 1e-5: refused"


def test_the_delta_is_fixed_at_start_not_by_the_labels_a_run_selects(tmp_path: Path) -> None:
    rows = [(f"my card was lost {i}", "card") for i in range(30)] + [(f"cash {i}", "cash") for i in range(70)]
    data = _write(tmp_path / "d.csv", rows)
    for labels in (["card", "zz_none"], LABELS):
        settings = _settings(data, tmp_path / f"{len(labels)}.json", start_rows=200_000)
        _visible(_cfg(labels=labels), settings, rounds=1)
        (event,) = PrivacyLedger.open(settings.ledger_path, create=False).events
        assert event.delta == pytest.approx(1 / (10 * 200_000)) and event.sample_rate == 0.05


def test_an_owner_without_rate_or_delta_flags_runs_out_of_budget_in_the_same_round(
        pairs: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    """The owner gave neither --max-sample-rate nor --delta (the defaults). q used to be B/N and δ min(1e-5, 1/(10·N)),
    so when the budget ran out followed N. Now q is the run's public ``federation.sample_rate`` and δ the constant
    1e-5: owners one row apart refuse, train and book alike, round after round, until the budget binds."""
    cfg = _cfg(batch_size=1)
    cfg.federation.sample_rate = 0.05
    bare = dict(max_sample_rate=1.0, min_noise_multiplier=0.0, max_epsilon=1.2)  # one round (ε 1.04), not three
    for pair, (a, b) in pairs.items():
        seen_a = _visible(cfg, _settings(a, tmp_path / f"bare{len(pair)}a.json", **bare), rounds=3)
        seen_b = _visible(cfg, _settings(b, tmp_path / f"bare{len(pair)}b.json", **bare), rounds=3)
        assert seen_a == seen_b, pair
        assert [s[0] for s in seen_a[:3]] != [1, 1, 1], "the budget must bind in this test"
        assert {e[1] for e in seen_a[-1]} == {0.05}, "q is the run's, whatever N"


def test_a_dp_run_without_a_public_rate_is_refused_alike(pairs: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    cfg = _cfg(batch_size=1)  # no federation.sample_rate, and the owner gives no --max-sample-rate
    bare = dict(max_sample_rate=1.0, min_noise_multiplier=0.0)
    for pair, (a, b) in pairs.items():
        seen_a = _visible(cfg, _settings(a, tmp_path / f"none{len(pair)}a.json", **bare), rounds=1)
        seen_b = _visible(cfg, _settings(b, tmp_path / f"none{len(pair)}b.json", **bare), rounds=1)
        assert seen_a == seen_b and seen_a[0][0] == 0 and seen_a[-1] == [], (pair, seen_a)


@pytest.mark.parametrize(("run_rate", "cap", "q"), [(0.0, 1.0, None), (0.1, 1.0, 0.1), (0.0, 0.05, 0.05),
                                                    (0.1, 0.05, 0.05), (0.02, 0.05, 0.02)])
def test_the_refusal_and_the_rate_read_one_rule(tmp_path: Path, run_rate: float, cap: float, q: float | None) -> None:
    """The node refuses a sample-level DP run exactly when it would have no public rate, and trains at that rate:
    the run's federation.sample_rate capped by the owner's --max-sample-rate, either alone (hand-computed ``q``)."""
    import dataclasses

    from veil.client.floor import PrivacyFloorError, check_run, owner_rate
    from veil.client.round_plan import owner_sampling

    cfg = _cfg(batch_size=1)
    cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, sample_rate=run_rate))
    settings = _settings(tmp_path / "unused.csv", tmp_path / "ledger.json", max_sample_rate=cap,
                         require_secagg=False)
    assert owner_rate(run_rate, cap) == q
    if q is None:
        with pytest.raises(PrivacyFloorError, match="no federation.sample_rate"):
            check_run(settings, cfg)
    else:
        check_run(settings, cfg)
        assert owner_sampling(cfg, settings, rows=1000).sample_rate == q
