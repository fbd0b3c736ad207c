"""Reply latency must not tell the coordinator an owner's longest record or its data size (review 2026-12-07, N6).

The review timed a node: its shard was padded to the longest text (one 120-token record among 40 short ones more
than doubled a round's time), and with ``federation.local_steps=0`` the step count was E·⌈N/B⌉. What sets a
round's work is the shape of the tensors each step sees and the number of steps. Reference: two owners whose files
differ only in one record's length, or only in N. Driving the real ``VeilClient.fit`` (no timing assertion), they
must train on tensors of the same per-example shape (``model.max_length``) for the same number of steps, or refuse
alike. Simulation keeps padding to the longest text (its speed is the researcher's, not an owner's secret).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from veil.client import app as client_app
from veil.client.settings import NodeSettings
from veil.conf.schema import DataConfig, ModelConfig, TaskConfig, VeilConfig
from veil.task import get_task
from veil.task.causal_lm import PromptExamples
from veil.task.model import build_model, get_trainable

LABELS = ["card", "cash", "fee", "pin"]
MAX_LENGTH = 24
LONG = " ".join(f"word{i}" for i in range(60))  # far beyond MAX_LENGTH tokens: truncated, but the longest record


def _write(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("\n".join(["text,label", *(f"{t},{lab}" for t, lab in rows)]) + "\n", encoding="utf-8")
    return path


def _short(n: int) -> list[tuple[str, str]]:
    return [(f"my card {i}", LABELS[i % 4]) for i in range(n)]


def _cfg(*, local_steps: int = 2, local_epochs: int = 1) -> VeilConfig:
    cfg = VeilConfig(model=ModelConfig(name="tiny", tiny=True, max_length=MAX_LENGTH),
                     data=DataConfig(train_path="unused.csv", test_path="unused.csv", label_column="label",
                                     labels=json.dumps(LABELS)))
    cfg.federation.batch_size, cfg.federation.rounds = 4, 2
    cfg.federation.local_steps, cfg.federation.local_epochs = local_steps, local_epochs
    cfg.privacy.target_epsilon, cfg.privacy.noise_multiplier = 0.0, 1.0
    return cfg.validate()


def _settings(data: Path, ledger: Path, **policy: Any) -> NodeSettings:
    return NodeSettings(**{**dict(data_path=str(data), text_column=None, label_column=None, max_epsilon=50.0,
                                  ledger_path=ledger, device="cpu", partition_id=None, num_partitions=None,
                                  allow_test_model=True), **policy})


def _round_work(cfg: VeilConfig, settings: NodeSettings, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ...]:
    """What sets one round's time on the node: the per-example shape of every tensor trained on and the steps the
    trainer ran (None when the node refused), with the reply's weight."""
    seen: list[tuple[Any, ...]] = []
    real = client_app.train_round

    def spy(template: Any, received: Any, shard: dict[str, Any], **kwargs: Any) -> Any:
        result = real(template, received, shard, **kwargs)
        seen.append((tuple(sorted((k, tuple(v.shape[1:])) for k, v in shard.items())), kwargs["plan"].steps,
                     result.steps))
        return result

    monkeypatch.setattr(client_app, "train_round", spy)
    weights = get_trainable(build_model(cfg.model, LABELS, seed=cfg.federation.seed))
    _update, weight, _metrics = client_app.VeilClient(cfg, settings, run_id=5).fit(weights, {"server_round": 1})
    return weight, (seen[0] if seen else None)


def test_one_long_record_changes_no_tensor_shape_on_a_deployed_node(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    short = _write(tmp_path / "short.csv", _short(20))
    long = _write(tmp_path / "long.csv", [*_short(19), (LONG, "card")])
    cfg = _cfg()
    cfg.federation.sample_rate = 0.2  # a deployed DP-SGD run states its public q
    work_short = _round_work(cfg, _settings(short, tmp_path / "a.json"), monkeypatch)
    work_long = _round_work(cfg, _settings(long, tmp_path / "b.json"), monkeypatch)
    assert work_short == work_long, "the longest record changes what a step computes on"
    weight, (shapes, _planned, _ran) = work_short
    assert weight == 1 and dict(shapes)["input_ids"] == (MAX_LENGTH,)


@pytest.mark.parametrize("cap", [0.05, 1.0])
def test_the_data_size_never_sets_the_step_count_in_epochs_mode(cap: float, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """With a --max-sample-rate an epoch is 1/q steps whatever N; without one, epochs mode is refused alike."""
    small = _write(tmp_path / "small.csv", _short(12))
    large = _write(tmp_path / "large.csv", _short(48))
    cfg = _cfg(local_steps=0, local_epochs=1)
    work_small = _round_work(cfg, _settings(small, tmp_path / "s.json", max_sample_rate=cap), monkeypatch)
    work_large = _round_work(cfg, _settings(large, tmp_path / "l.json", max_sample_rate=cap), monkeypatch)
    assert work_small == work_large, "N sets the number of local steps"
    if cap < 1.0:
        weight, (_shapes, planned, ran) = work_small
        assert weight == 1 and planned == ran == round(1 / cap)
    else:
        assert work_small == (0, None), "refused before any data is read"


def test_the_run_s_public_rate_sets_the_epoch_s_steps_whatever_the_data_size(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """federation.sample_rate (public, in the run config) fixes q, so an epoch is 1/q steps on every node; an owner's
    --max-sample-rate below it caps q, and the step count follows the cap, not N."""
    small = _write(tmp_path / "small.csv", _short(12))
    large = _write(tmp_path / "large.csv", _short(48))
    cfg = _cfg(local_steps=0, local_epochs=1)
    cfg.federation.sample_rate = 0.25
    for cap, steps in ((1.0, 4), (0.125, 8)):
        work = [_round_work(cfg, _settings(f, tmp_path / f"{f.stem}-{cap}.json", max_sample_rate=cap), monkeypatch)
                for f in (small, large)]
        assert work[0] == work[1], "N sets the number of local steps"
        weight, (_shapes, planned, ran) = work[0]
        assert weight == 1 and planned == ran == steps, (cap, work[0])


def test_a_causal_lm_node_pads_every_sequence_to_max_length() -> None:
    task = get_task("causal_lm")
    cfg = VeilConfig(task=TaskConfig(name="causal_lm"), model=ModelConfig(tiny=True, lora=False, max_length=20))
    short = PromptExamples(["hi"], ["yes"])
    long = PromptExamples(["hi", LONG], ["yes", "no"])
    shapes = [{k: tuple(v.shape[1:]) for k, v in task.tensors(ex, [], cfg, path="x", fixed_length=True).items()}
              for ex in (short, long)]
    assert shapes[0] == shapes[1] == {"input_ids": (20,), "attention_mask": (20,), "labels": (20,)}
    plain = task.tensors(short, [], cfg, path="x")  # simulation: the longest sequence, as before
    assert plain["input_ids"].shape[1] < 20
    padded = task.tensors(short, [], cfg, path="x", fixed_length=True)
    width = plain["input_ids"].shape[1]  # the padding adds only ignored, masked tokens
    assert np.array_equal(padded["input_ids"][:, :width], plain["input_ids"])
    assert not padded["attention_mask"][:, width:].any() and (padded["labels"][:, width:] == -100).all()


# ---- the reply's arrival time: held to the owner's --reply-after (no wall clock: an injected clock and sleep) ----

HOLD = 30.0  # the owner's --reply-after in these tests (fake seconds)


class FakeClock:
    """A clock that moves only when work is simulated (``advance``) or the node sleeps."""

    def __init__(self) -> None:
        self.now, self.slept = 100.0, []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0, "a negative sleep"
        self.slept.append(seconds)
        self.now += seconds


def _timed_reply(cfg: VeilConfig, settings: NodeSettings, monkeypatch: pytest.MonkeyPatch,
                 *, per_row: float = 0.05, per_example: float = 0.1) -> tuple[float, float, int]:
    """Drive the real ``VeilClient.fit`` with work whose (fake) duration grows with the data, as on a real node:
    reading the file costs ``per_row`` per row, each training step ``per_example`` per example in the shard.
    Returns (when the work ended, when the reply left, the reply's weight), both after the instruction."""
    clock = FakeClock()
    real_shard, real_train = client_app.client_shard, client_app.train_round

    def shard(cfg_: Any, settings_: Any) -> Any:
        clock.advance(per_row * (Path(settings_.data_path).read_text(encoding="utf-8").count("\n") - 1))
        return real_shard(cfg_, settings_)

    def train(template: Any, received: Any, shard_: dict[str, Any], **kwargs: Any) -> Any:
        result = real_train(template, received, shard_, **kwargs)
        clock.advance(per_example * len(shard_["input_ids"]) * kwargs["plan"].steps)
        return result

    monkeypatch.setattr(client_app, "client_shard", shard)
    monkeypatch.setattr(client_app, "train_round", train)
    timer = client_app.ReplyTimer(clock=clock, sleep=clock.sleep)
    weights = get_trainable(build_model(cfg.model, LABELS, seed=cfg.federation.seed))
    start = clock()
    _update, weight, _metrics = client_app.VeilClient(cfg, settings, run_id=5, timer=timer).fit(
        weights, {"server_round": 1})
    slept = sum(clock.slept)
    return clock() - slept - start, clock() - start, weight


def _owners(tmp_path: Path) -> dict[str, Path]:
    return {"12 rows": _write(tmp_path / "small.csv", _short(12)),
            "48 rows": _write(tmp_path / "large.csv", _short(48)),
            "no usable row": _write(tmp_path / "none.csv", [(f"my card {i}", "other") for i in range(30)])}


@pytest.mark.parametrize("local_steps", [2, 0], ids=["local_steps", "epochs"])
def test_owners_of_different_sizes_reply_at_the_same_time(local_steps: int, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Reference: without the hold, the reply leaves when the work ends, which grows with N; with it, every owner
    (and a noise-only round, and a refusal) replies exactly ``--reply-after`` after the instruction."""
    cfg = _cfg(local_steps=local_steps, local_epochs=1)
    policy = dict(max_sample_rate=0.25, reply_after=HOLD)
    times = {name: _timed_reply(cfg, _settings(path, tmp_path / f"{name}.json", **policy), monkeypatch)
             for name, path in _owners(tmp_path).items()}
    times["refused"] = _timed_reply(cfg, _settings(_owners(tmp_path)["48 rows"], tmp_path / "r.json",
                                                   **{**policy, "max_epsilon": 1e-3}), monkeypatch)
    work = {name: w for name, (w, _left, _weight) in times.items()}
    assert len(set(work.values())) == len(work), f"the fake work does not depend on the data: {work}"
    assert max(work.values()) < HOLD
    assert {name: left for name, (_w, left, _weight) in times.items()} == pytest.approx(dict.fromkeys(times, HOLD))
    assert [weight for _w, _left, weight in times.values()] == [1, 1, 1, 0]  # trained, trained, noise, refused

    unheld = _timed_reply(cfg, _settings(_owners(tmp_path)["48 rows"], tmp_path / "u.json", max_sample_rate=0.25),
                          monkeypatch)
    assert unheld[1] == unheld[0] == pytest.approx(work["48 rows"]), "without --reply-after the reply leaves when the work ends"


def test_a_round_that_overruns_replies_at_the_next_multiple_and_warns_once(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    cfg = _cfg()
    settings = _settings(_owners(tmp_path)["48 rows"], tmp_path / "o.json", max_sample_rate=0.25, reply_after=5.0)
    with caplog.at_level("WARNING", logger="veil.client"):
        work, left, weight = _timed_reply(cfg, settings, monkeypatch, per_row=0.05, per_example=0.1)
    assert work == pytest.approx(12.0)  # 48 rows read (2.4 s), then 2 steps over a shard of 48 (9.6 s)
    assert left == pytest.approx(15.0) and weight == 1, "the update is still sent, at the next multiple of the hold"
    warnings = [r.getMessage() for r in caplog.records if "--reply-after" in r.getMessage()]
    assert len(warnings) == 1 and "raise --reply-after" in warnings[0], caplog.text


def test_release_offset_against_a_hand_computation() -> None:
    from veil.client.reply_time import release_offset

    cases = [(0.0, 10.0, 10.0), (9.99, 10.0, 10.0), (10.0, 10.0, 10.0), (10.01, 10.0, 20.0), (25.0, 10.0, 30.0),
             (3.5, 0.0, 3.5)]
    assert [release_offset(elapsed, hold=hold) for elapsed, hold, _ in cases] == [want for *_, want in cases]


@pytest.mark.parametrize("value", [-5, "nan", "inf", 50_000, "soon"])
def test_a_bad_reply_after_is_one_line_naming_the_flag(value: Any) -> None:
    from veil.client.settings import node_settings
    from veil.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        node_settings({"data-path": "x.csv", "max-epsilon": 8.0, "ledger-path": "l.json", "reply-after": value})
    assert "\n" not in str(err.value) and str(err.value).startswith(f"--reply-after {value} is invalid")


def test_a_run_whose_secagg_timeout_would_drop_the_held_reply_is_refused_unbooked(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch
                                                                                  ) -> None:
    """Decided from the run config and the owner's flag only, before the round is booked."""
    cfg = _cfg()
    cfg.secagg.timeout = HOLD
    ledger = tmp_path / "t.json"
    _work, left, weight = _timed_reply(cfg, _settings(_owners(tmp_path)["12 rows"], ledger, max_sample_rate=0.25,
                                                      reply_after=HOLD), monkeypatch)
    assert weight == 0 and left == HOLD
    from veil.privacy.ledger import PrivacyLedger

    assert not ledger.exists() or not PrivacyLedger.open(ledger, create=False).events, "a refused round was booked"


def test_the_start_line_says_where_q_and_delta_come_from() -> None:
    import argparse

    from veil.client.node import _budget_policy

    owner = _budget_policy(argparse.Namespace(max_sample_rate=0.05, delta=1e-6))
    assert "capped at 0.05" in owner and "the owner's delta" in owner and "reads no data" in owner
    bare = _budget_policy(argparse.Namespace(max_sample_rate=1.0, delta=None))
    assert "federation.sample_rate" in bare and "--max-sample-rate" in bare and "the default delta" in bare
