"""The coordinator as an adversary of a node: crafted run configs and weights against the real ``VeilClient``.

Each test writes one attack from the privacy review (shared/reviews/privacy-review-2026-11-30.md) and asserts what
crosses the node's boundary: the reply's keys and values, the ledger, the files the node opens.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from veil.client import app as client_app
from veil.client.app import REPLY_KEYS, VeilClient
from veil.client.release import postprocess_update
from veil.client.settings import NodeSettings
from veil.conf.schema import DataConfig, ModelConfig, VeilConfig
from veil.privacy.accounting import compute_epsilon
from veil.privacy.ledger import PrivacyLedger
from veil.task.model import build_model, get_trainable

LABELS = ["card", "cash", "fee", "pin"]
WORDS = {"card": "my card was lost", "cash": "the atm kept my cash", "fee": "why a fee on transfer",
         "pin": "i forgot my pin code"}
TARGET = "zebra quokka narwhal"  # the record the coordinator wants to learn about


def _write(path: Path, rows: list[tuple[str, str]]) -> Path:
    lines = ["text,label"] + [f"{text},{label}" for text, label in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _rows(per_label: int, *, offset: int = 0) -> list[tuple[str, str]]:
    return [(f"{text} {i + offset}", label) for label, text in WORDS.items() for i in range(per_label)]


def _cfg(**privacy: Any) -> VeilConfig:
    cfg = VeilConfig(model=ModelConfig(name="tiny", tiny=True, max_length=16),
                     data=DataConfig(train_path="unused.csv", test_path="unused.csv", label_column="label",
                                     labels=json.dumps(LABELS)))
    cfg.federation.batch_size, cfg.federation.local_steps, cfg.federation.rounds = 8, 2, 3
    cfg.federation.sample_rate = 0.2  # public q (issue 23): deployed DP-SGD runs carry it
    cfg.privacy.target_epsilon, cfg.privacy.noise_multiplier = 0.0, 1.0
    for key, value in privacy.items():
        setattr(cfg.privacy, key, value)
    return cfg.validate()


def _settings(data: Path, tmp_path: Path, **policy: Any) -> NodeSettings:
    base: dict[str, Any] = dict(data_path=str(data), text_column=None, label_column=None, max_epsilon=50.0,
                                ledger_path=tmp_path / f"ledger-{data.stem}.json", device="cpu", partition_id=None,
                                num_partitions=None, allow_test_model=True)  # model.tiny: a test node
    return NodeSettings(**{**base, **policy})


def _weights(cfg: VeilConfig) -> list[np.ndarray]:
    return get_trainable(build_model(cfg.model, LABELS, seed=cfg.federation.seed))


def _events(settings: NodeSettings) -> list[Any]:
    return _events_at(settings.ledger_path)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("node")
    return {
        "big": _write(root / "big.csv", _rows(10)),
        "small": _write(root / "small.csv", _rows(3, offset=50)),
        "with_target": _write(root / "with_target.csv", [*_rows(4), (TARGET, "card")]),
        "without_target": _write(root / "without_target.csv", _rows(4)),
        "extra_label": _write(root / "extra_label.csv", [*_rows(4), ("close my account now", "closing")]),
    }


# (a) ------------------------------------------------------------------------------------------------------------
def test_replies_carry_only_fixed_keys_whose_values_do_not_depend_on_the_data(files: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    cfg = _cfg()
    weights = _weights(cfg)
    replies = {}
    for name in ("big", "small"):  # 40 vs 12 examples, different texts
        client = VeilClient(cfg, _settings(files[name], tmp_path), run_id=7)
        update, weight, metrics = client.fit(weights, {"server_round": 1})
        assert weight == 1 and all(np.isfinite(u).all() for u in update)
        replies[name] = metrics
    assert set(replies["big"]) == set(REPLY_KEYS)
    assert replies["big"] == replies["small"], "no reply value may depend on the owner's data"
    poor = VeilClient(cfg, _settings(files["big"], tmp_path / "poor", max_epsilon=1e-3), run_id=7)
    zeros, weight, refused = poor.fit(weights, {"server_round": 1})
    assert weight == 0 and set(refused) == set(REPLY_KEYS) and refused["refused"] == 1
    assert all(not z.any() for z in zeros)
    for forbidden in ("train_loss", "num_examples", "epsilon", "steps", "sample_rate", "noise_multiplier"):
        assert forbidden not in replies["big"] and forbidden not in refused


# (b) ------------------------------------------------------------------------------------------------------------
def test_a_large_delta_asked_by_the_run_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    cfg = _cfg(delta=0.5, noise_multiplier=0.5)
    settings = _settings(files["big"], tmp_path, max_epsilon=4.0)
    # at the run's δ the round would pass the owner's budget: the attack the node must stop
    q, steps = 8 / 40, 2 * cfg.federation.rounds
    assert compute_epsilon([(0.5, q, steps)], delta=0.5).epsilon < 4.0 < compute_epsilon([(0.5, q, steps)], delta=1e-5).epsilon
    _update, weight, metrics = VeilClient(cfg, settings, run_id=1).fit(_weights(cfg), {"server_round": 1})
    assert weight == 0 and metrics["refused"] == 1
    assert _events(settings) == [], "nothing was released, nothing is booked"


def test_the_owner_delta_defaults_to_at_most_one_over_ten_n() -> None:
    settings = NodeSettings(data_path="x", text_column=None, label_column=None, max_epsilon=1.0,
                            ledger_path=Path("l.json"), device=None, partition_id=None, num_partitions=None)
    assert settings.owner_delta(40) == 1e-5 and settings.owner_delta(1_000_000) == pytest.approx(1e-7)


# (c) ------------------------------------------------------------------------------------------------------------
def test_client_level_central_noise_needs_the_owner_opt_in(files: dict[str, Path], tmp_path: Path) -> None:
    cfg = _cfg(level="client", noise_placement="central", max_grad_norm=1e9, noise_multiplier=50.0)
    settings = _settings(files["big"], tmp_path)
    update, weight, metrics = VeilClient(cfg, settings, run_id=1).fit(_weights(cfg), {"server_round": 1})
    assert weight == 0 and metrics["refused"] == 1 and all(not u.any() for u in update)
    assert _events(settings) == []


@pytest.mark.parametrize("clients_per_round", [5, 10_000])
def test_client_level_noise_share_comes_from_the_owner_cohort_not_the_run(
        files: dict[str, Path], tmp_path: Path, clients_per_round: int) -> None:
    cfg = _cfg(level="client", noise_placement="distributed", max_grad_norm=1e3, noise_multiplier=2.0)
    cfg.federation.num_clients = cfg.federation.clients_per_round = clients_per_round
    cfg.secagg.clipping_range = 1e5  # room for the noise, so the release is not scaled into the range
    cfg.secagg.modulus_range = 2**40  # room for the sum of 10,000 quantized updates (schema rule)
    settings = _settings(files["big"], tmp_path / str(clients_per_round), min_cohort=4)
    update, weight, metrics = VeilClient(cfg, settings, run_id=1).fit(_weights(cfg), {"server_round": 1})
    share = 2.0 * 1e3 / np.sqrt(4)  # z·S/sqrt(min-cohort), whatever the run's clients_per_round
    assert weight == 1 and metrics["noise_std"] == pytest.approx(share)
    values = np.concatenate([u.ravel() for u in update])
    # the clipped update has norm <= S = 1e3 over many coordinates, so the spread is the node's own noise
    assert np.std(values) == pytest.approx(share, rel=0.05)
    (event,) = _events(settings)
    # per record: sensitivity 2S, and what leaves this node alone carries z·S/sqrt(M) (review N4): z/(2·sqrt(M))
    assert event.noise_multiplier == pytest.approx(2.0 / (2 * np.sqrt(4)))


# (d) ------------------------------------------------------------------------------------------------------------
def test_plain_aggregation_is_refused_unless_the_owner_allows_it(files: dict[str, Path], tmp_path: Path) -> None:
    cfg = _cfg()
    cfg.secagg.enabled = False
    strict = _settings(files["big"], tmp_path / "strict")
    _u, weight, metrics = VeilClient(cfg, strict, run_id=1).fit(_weights(cfg), {"server_round": 1})
    assert weight == 0 and metrics["refused"] == 1 and _events(strict) == []
    lenient = _settings(files["big"], tmp_path / "lenient", require_secagg=False)
    _u, weight, _m = VeilClient(cfg, lenient, run_id=1).fit(_weights(cfg), {"server_round": 1})
    assert weight == 1 and len(_events(lenient)) == 1


# (f) ------------------------------------------------------------------------------------------------------------
class _OverflowOnTarget(nn.Module):
    """Stands in for weights crafted so that only texts holding a target token overflow: the logits of exactly
    those rows become inf, as a float32 overflow would make them."""

    def __init__(self, inner: nn.Module, token: int) -> None:
        super().__init__()
        self.inner, self.token = inner, token

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
        hit = (input_ids == self.token).any(dim=1)  # (B,)
        out.logits = torch.where(hit[:, None], torch.full_like(out.logits, float("inf")), out.logits)
        return out


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_an_overflow_on_one_text_changes_nothing_the_coordinator_sees(
        files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    from veil.task.model import load_tokenizer

    cfg = _cfg(grad_sample_mode=mode)
    cfg.federation.batch_size, cfg.federation.local_steps = 17, 4  # q = 1: the target is in every batch
    token = load_tokenizer(cfg.model)(TARGET)["input_ids"][1]
    original = client_app.train_round

    def crafted_train_round(template: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return original(_OverflowOnTarget(template, token), *args, **kwargs)

    monkeypatch.setattr(client_app, "train_round", crafted_train_round)
    monkeypatch.setattr("veil.client.trainer.set_trainable",
                        lambda model, arrays: _set_inner(model, arrays))
    monkeypatch.setattr("veil.client.trainer.get_trainable", lambda model: get_trainable(model.inner))
    replies = {}
    for name in ("with_target", "without_target"):
        settings = _settings(files[name], tmp_path)
        update, weight, metrics = VeilClient(cfg, settings, run_id=3).fit(_weights(cfg), {"server_round": 1})
        assert weight == 1 and all(np.isfinite(u).all() for u in update), f"{name}: a normal, finite release"
        assert len(_events(settings)) == 1, f"{name}: the round is booked"
        replies[name] = (weight, metrics)
    assert replies["with_target"] == replies["without_target"]


def _set_inner(model: nn.Module, arrays: list[np.ndarray]) -> None:
    from veil.task.model import set_trainable

    set_trainable(model.inner, arrays)


def test_non_finite_per_sample_gradients_are_zeroed_before_clipping() -> None:
    from veil.privacy.hooks import zero_nonfinite_samples

    layer = nn.Linear(3, 2)
    layer.weight.grad_sample = torch.tensor([[[1.0, 2, 3], [4, 5, 6]], [[float("nan"), 0, 0], [0, 0, 0]]])
    layer.bias.grad_sample = torch.tensor([[1.0, 1.0], [2.0, float("inf")]])
    assert zero_nonfinite_samples(layer) == 1
    assert torch.equal(layer.weight.grad_sample[0], torch.tensor([[1.0, 2, 3], [4, 5, 6]])), "others untouched"
    assert not layer.weight.grad_sample[1].any() and not layer.bias.grad_sample[1].any()


def test_an_update_outside_the_secagg_range_is_scaled_not_refused() -> None:
    cfg = _cfg()
    out = postprocess_update([np.array([0.0, -16.0, 4.0], np.float32), np.array([np.nan], np.float32)], cfg)
    assert float(np.abs(out[0]).max()) <= cfg.secagg.clipping_range
    np.testing.assert_allclose(out[0] / out[0][1], np.array([0.0, -16.0, 4.0]) / -16.0, rtol=1e-6)  # direction kept
    assert out[1][0] == 0.0


# (g) ------------------------------------------------------------------------------------------------------------
def test_the_same_seed_twice_gives_different_poisson_batches() -> None:
    from veil.privacy.dpsgd import make_private

    data = TensorDataset(torch.arange(64)[:, None].float(), torch.zeros(64, dtype=torch.long))

    def draws() -> list[list[int]]:
        torch.manual_seed(123)  # the run's seed, known to the coordinator
        model = nn.Linear(1, 2)
        dp = make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                          loader=DataLoader(data, batch_size=8), noise_multiplier=1.0, max_grad_norm=1.0)
        return [sorted(int(x) for x in batch[0].ravel()) for batch, _ in zip(dp.loader, range(6))]

    assert draws() != draws()


# (h) ------------------------------------------------------------------------------------------------------------
def test_a_label_outside_the_run_set_sends_no_error(files: dict[str, Path], tmp_path: Path) -> None:
    cfg = _cfg()
    settings = _settings(files["extra_label"], tmp_path)
    _update, weight, metrics = VeilClient(cfg, settings, run_id=1).fit(_weights(cfg), {"server_round": 1})
    assert weight == 1 and metrics["refused"] == 0, "the unknown label is skipped on the node, not reported"
    assert len(_events(settings)) == 1


# (i) ------------------------------------------------------------------------------------------------------------
def test_a_deployed_node_never_opens_a_path_from_the_run_config(files: dict[str, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import veil.task.data
    import veil.task.shards

    opened: list[str] = []
    real = veil.task.data.read_examples

    def spy(path: Any, cfg: Any) -> Any:
        opened.append(str(path))
        return real(path, cfg)

    monkeypatch.setattr(veil.task.shards, "read_examples", spy)
    secret = tmp_path / "someone_elses_private.csv"
    _write(secret, _rows(3))
    cfg = _cfg()
    cfg.data = dataclasses.replace(cfg.data, labels="", train_path=str(secret), test_path=str(secret))
    settings = _settings(files["big"], tmp_path)
    _update, weight, _m = VeilClient(cfg, settings, run_id=1).fit(_weights(_cfg()), {"server_round": 1})
    assert weight == 0 and str(secret) not in opened
    model_run = _cfg()
    model_run.model = dataclasses.replace(model_run.model, tiny=False, path=str(tmp_path / "a_model_dir"))
    _update, weight, _m = VeilClient(model_run, settings, run_id=1).fit(_weights(_cfg()), {"server_round": 1})
    assert weight == 0 and str(tmp_path / "a_model_dir") not in opened and _events(settings) == []


# received weights ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, 1e9])
def test_received_weights_are_checked_before_the_data_is_read(files: dict[str, Path], tmp_path: Path,
                                                              bad: float) -> None:
    cfg = _cfg()
    weights = _weights(cfg)
    weights[0] = weights[0].copy()
    weights[0].flat[0] = bad
    settings = _settings(files["big"], tmp_path)
    _update, weight, metrics = VeilClient(cfg, settings, run_id=1).fit(weights, {"server_round": 1})
    assert weight == 0 and metrics["refused"] == 1 and _events(settings) == []


def test_one_vector_of_weights_is_cut_to_the_model_and_answered_in_kind(files: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    """The coordinator's one-vector layout (veil.wire): the right size trains and the reply is one vector of the
    model's size; a wrong size, or a non-finite value inside it, is refused before the data is read."""
    from veil.wire import flatten

    cfg = _cfg()
    vector = flatten(_weights(cfg))
    settings = _settings(files["big"], tmp_path)
    update, weight, metrics = VeilClient(cfg, settings, run_id=1).fit([vector], {"server_round": 1})
    assert weight == 1 and metrics["refused"] == 0 and len(_events(settings)) == 1
    assert len(update) == 1 and update[0].shape == vector.shape and np.isfinite(update[0]).all()
    assert float(np.abs(update[0]).max()) > 0
    poisoned = vector.copy()
    poisoned[-1] = np.nan
    for bad in (vector[:-1], np.concatenate([vector, vector[:1]]), poisoned):
        fresh = _settings(files["big"], tmp_path / f"bad-{bad.size}-{np.isnan(bad).any()}")
        zeros, weight, metrics = VeilClient(cfg, fresh, run_id=1).fit([bad], {"server_round": 1})
        assert weight == 0 and metrics["refused"] == 1 and _events(fresh) == []
        assert len(zeros) == 1 and zeros[0].shape == bad.shape and not zeros[0].any()


# (k) ------------------------------------------------------------------------------------------------------------
def test_ghost_clipping_survives_an_empty_poisson_batch() -> None:
    from veil.privacy.dpsgd import make_private

    torch.manual_seed(0)
    model = build_model(ModelConfig(tiny=True, max_length=8), LABELS, seed=0, dropout=0.0)
    ids = torch.randint(5, 100, (16, 8))
    loader = DataLoader(TensorDataset(ids, torch.ones_like(ids), torch.zeros(16, dtype=torch.long)), batch_size=4)
    params = [p for p in model.parameters() if p.requires_grad]
    dp = make_private(module=model, optimizer=torch.optim.SGD(params, lr=1.0), loader=loader, noise_multiplier=1.0,
                      max_grad_norm=1.0, grad_sample_mode="ghost")
    before = [p.detach().clone() for p in params]
    dp.optimizer.zero_grad(set_to_none=True)
    dp.noise_only_step()
    moved = [not torch.equal(b, p.detach()) for b, p in zip(before, params)]
    assert all(moved), "an empty batch still releases (pure) noise"
    assert all(torch.isfinite(p).all() for p in params)


# budget ---------------------------------------------------------------------------------------------------------
def test_the_round_is_booked_before_training(files: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg()
    settings = _settings(files["big"], tmp_path)

    def crash(*_a: Any, **_k: Any) -> Any:
        assert len(_events(settings)) == 1, "booked before training starts"
        raise RuntimeError("the machine lost power")

    monkeypatch.setattr(client_app, "train_round", crash)
    update, weight, metrics = VeilClient(cfg, settings, run_id=1).fit(_weights(cfg), {"server_round": 1})
    assert len(_events(settings)) == 1
    # a failure during training is no oracle either (it may depend on the data): the round was booked, so it
    # releases noise alone with the reply of any trained round; the cause goes to the owner's log
    assert weight == 1 and metrics["refused"] == 0
    assert all(np.isfinite(a).all() for a in update) and any(a.any() for a in update), "noise, never zeros"


def test_calibration_fits_the_run_into_what_the_ledger_leaves(files: dict[str, Path], tmp_path: Path) -> None:
    cfg = _cfg(target_epsilon=3.0)
    # history alone ε ≈ 0.93; history + this run at the target-calibrated σ ≈ 3.10 > 3.0: σ must grow
    settings = _settings(files["big"], tmp_path, max_epsilon=3.0)
    from veil.privacy.ledger import LedgerEvent

    ledger = PrivacyLedger.open(settings.ledger_path)
    ledger.record(LedgerEvent(run_id="earlier", round=1, noise_multiplier=3.0, sample_rate=0.2, steps=10, delta=1e-5))
    client = VeilClient(cfg, settings, run_id=2)
    for rnd in (1, 2, 3):
        _u, weight, _m = client.fit(_weights(cfg), {"server_round": rnd})
        assert weight == 1, f"round {rnd}: more noise instead of a refusal"
    spent = compute_epsilon([e.triple for e in _events(settings)], delta=1e-5).epsilon
    assert 2.5 < spent <= 3.0
    sigmas = {e.noise_multiplier for e in _events(settings) if e.run_id == "2"}
    assert min(sigmas) > client_app._calibrated_sigma(target_epsilon=3.0, delta=1e-5, sample_rate=0.2, steps=6,
                                                       accountant="prv")


# (a) through the whole node: the real ClientApp (guard + Flower's SecAgg+ mod + VeilClient), every stage ------------
def test_every_message_a_node_sends_in_a_secagg_round_is_data_independent(files: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    """Three deployed-style nodes (own files of 40, 12 and 16 examples; the third over its budget, so it refuses)
    run one SecAgg+ round driven stage by stage as Flower's workflow drives it (tests/test_secagg_guard.py's
    ``Round``). Reference: what each node sends at each stage, with the random parts (keys, ciphertexts, shares,
    the masked vector) reduced to their sizes, is the same for every node, trained or refused."""
    from flwr.app import ConfigRecord
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
    from flwr.compat.common import recorddict_compat as compat
    from test_secagg_guard import NODES, Round, _incoming

    from veil.client.app import make_client_app
    from veil.conf.runconfig import to_run_config

    cfg = _cfg()
    flat = to_run_config(cfg)
    node_app = make_client_app()
    configs = {NODES[0]: (files["big"], 50.0), NODES[1]: (files["small"], 50.0), NODES[2]: (files["with_target"], 1e-3)}
    rnd = Round(mod=lambda msg, context, _app: node_app(msg, context))
    for node, (data, budget) in configs.items():
        rnd.contexts[node] = dataclasses.replace(rnd.contexts[node], run_config=flat, node_config={
            "data-path": str(data), "max-epsilon": budget, "ledger-path": str(tmp_path / f"{node}.json"),
            "device": "cpu", "allow-test-model": True})
    weights = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(_weights(cfg)), {"server_round": 1}),
                                          keep_input=True)
    sent: dict[int, list[Any]] = {n: [] for n in NODES}
    original_send = rnd.send

    def send(node: int, stage_configs: dict[str, Any], with_fitins: bool = False) -> Any:
        if with_fitins:  # the real model's trainable weights, as DeltaFedAvg sends them
            content = compat.fitins_to_recorddict(compat.recorddict_to_fitins(weights, keep_input=True),
                                                  keep_input=True)
            content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(stage_configs)
            reply = rnd.mod(_incoming(node, content), rnd.contexts[node], rnd.app)
        else:
            reply = original_send(node, stage_configs)
        sent[node].append(_shape_of(reply))
        return reply

    rnd.send = send  # type: ignore[method-assign]
    rnd.to_collect()
    for n in NODES:
        rnd.unmask(n, list(NODES), [])
    assert not any(m[0] == "error" for m in sent[NODES[0]]), sent[NODES[0]]
    assert sent[NODES[0]] == sent[NODES[1]], "a trained node's messages depend on its data"
    # a refusal differs only in the documented bits (docs/privacy.md, "What leaves a node"): weight, refused,
    # can_train_next; the update is zeros, masked like any other
    assert [_without_refusal_bits(m) for m in sent[NODES[2]]] == [_without_refusal_bits(m) for m in sent[NODES[0]]]
    collect = dict(sent[NODES[0]][2][3])
    assert {k.split(".")[-1] for k in collect if k.startswith("fitres.metrics.")} == set(REPLY_KEYS)
    assert collect["fitres.metrics.refused"] == 0 and dict(sent[NODES[2]][2][3])["fitres.metrics.refused"] == 1
    assert len(_events_at(tmp_path / f"{NODES[2]}.json")) == 0 and len(_events_at(tmp_path / f"{NODES[0]}.json")) == 1


def _without_refusal_bits(shape: tuple[Any, ...]) -> tuple[Any, ...]:
    if shape[0] != "ok":
        return shape
    bits = ("fitres.metrics.refused", "fitres.metrics.can_train_next")
    configs = tuple((k, None if k in bits else v) for k, v in shape[3])
    return (shape[0], shape[1], tuple((k, None) for k, _ in shape[2]), configs, shape[4])


def _events_at(path: Path) -> list[Any]:
    return list(PrivacyLedger.open(path, create=False).events) if path.exists() else []


def _shape_of(reply: Any) -> tuple[Any, ...]:
    """A reply with its random or masked parts reduced to sizes; everything else kept as sent."""
    if reply.has_error():
        return ("error", reply.error.code, reply.error.reason)
    content = reply.content
    metrics = tuple(sorted(k for rec in content.metric_records.values() for k in rec))
    values = tuple(sorted((k, v) for rec in content.metric_records.values() for k, v in rec.items()
                          if k != "can_train_next"))
    configs = {}
    for name, rec in content.config_records.items():
        for key, value in rec.items():
            if isinstance(value, (bytes, list)):
                configs[f"{name}.{key}"] = ("sizes", tuple(len(v) if isinstance(v, bytes) else 0 for v in value)
                                            if isinstance(value, list) else len(value))
            else:
                configs[f"{name}.{key}"] = value
    arrays = tuple(sorted(content.array_records))
    return ("ok", metrics, values, tuple(sorted(configs.items(), key=lambda kv: kv[0])), arrays)


# (N7) ----------------------------------------------------------------------------------------------------------
def test_a_text_only_node_refuses_classification_whatever_column_the_run_names(files: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    from veil.client.settings import node_settings

    settings = node_settings({"data-path": str(files["big"]), "label-column": "", "max-epsilon": 50.0,
                              "ledger-path": str(tmp_path / "t.json"), "device": "cpu",
                              "allow-test-model": True})
    assert settings.text_only
    cfg = _cfg()  # data.label_column=label: a column of the owner's file the owner never named
    _u, weight, metrics = VeilClient(cfg, settings, run_id=1).fit(_weights(cfg), {"server_round": 1})
    assert weight == 0 and metrics["refused"] == 1 and _events(settings) == []


def test_a_ledger_that_cannot_be_written_declines_unbooked_and_asks_to_be_asked_again(
        files: dict[str, Path], tmp_path: Path) -> None:
    """A full disk or read-only ledger path (issue 27): the node declines without training, and its reply says the
    budget allows the next round, so the coordinator samples it again; once it can write, it trains."""
    cfg = _cfg(noise_multiplier=1.0)
    settings = _settings(files["big"], tmp_path)
    lock = settings.ledger_path.with_name(settings.ledger_path.name + ".lock")
    lock.mkdir(parents=True)  # the lock cannot be opened for writing, even by root: as on a read-only path
    update, weight, metrics = VeilClient(cfg, settings, run_id=1).fit(_weights(cfg), {"server_round": 1})
    assert weight == 0 and metrics["refused"] == 1 and metrics["can_train_next"] is True
    assert all(not u.any() for u in update) and _events(settings) == []
    lock.rmdir()
    _update, weight, metrics = VeilClient(cfg, settings, run_id=1).fit(_weights(cfg), {"server_round": 2})
    assert weight == 1 and metrics["refused"] == 0 and [e.round for e in _events(settings)] == [2]


# (N8) ----------------------------------------------------------------------------------------------------------
def test_model_tiny_never_replaces_the_owners_model_on_a_deployed_node(files: dict[str, Path], tmp_path: Path) -> None:
    """A run saying model.tiny made a deployed node train a model built in code instead of its owner's --model
    (review N8). It is refused now, before any data is read, the same way for every owner."""
    cfg = _cfg()
    replies = []
    for name, model_path in (("big", None), ("small", str(tmp_path / "owners-model"))):
        settings = _settings(files[name], tmp_path, allow_test_model=False, model_path=model_path)
        assert client_app.owner_model(cfg, settings).path == (model_path or "") and not settings.allow_test_model
        update, weight, metrics = VeilClient(cfg, settings, run_id=1).fit(_weights(cfg), {"server_round": 1})
        replies.append((weight, metrics, [u.any() for u in update]))
        assert _events(settings) == [], "nothing trained, nothing booked"
    assert replies[0] == replies[1] and replies[0][0] == 0 and replies[0][1]["refused"] == 1


# (N10) ---------------------------------------------------------------------------------------------------------
def test_a_restarted_node_keeps_refusing_a_run_it_told_it_cannot_train(files: dict[str, Path], tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """After a reply with can_train_next=False the node refuses the rest of that run on its own (review N10), also
    after a restart, even when the budget would then allow the round: the stop is kept in the owner's ledger."""
    cfg = _cfg(noise_multiplier=1.0)  # q = 8/40, 2 steps a round: eps 2.94 after one round, 3.63 after two
    tight = _settings(files["big"], tmp_path, max_epsilon=3.3)
    _u, weight, metrics = VeilClient(cfg, tight, run_id=7).fit(_weights(cfg), {"server_round": 1})
    assert weight == 1 and metrics["can_train_next"] is False
    assert PrivacyLedger.open(tight.ledger_path, create=False).stopped("7"), "the ledger reader sees the stop"
    from veil.client import round_plan

    monkeypatch.setattr(round_plan, "_STOPPED", set(), raising=False)  # a fresh process: no memory of the run
    roomy = dataclasses.replace(tight, max_epsilon=50.0)  # restarted with a budget that would allow round 2
    _u, weight, metrics = VeilClient(cfg, roomy, run_id=7).fit(_weights(cfg), {"server_round": 2})
    assert weight == 0 and metrics["refused"] == 1 and [e.round for e in _events(roomy)] == [1]
    _u, weight, _m = VeilClient(cfg, roomy, run_id=8).fit(_weights(cfg), {"server_round": 1})
    assert weight == 1, "another run may ask again"
