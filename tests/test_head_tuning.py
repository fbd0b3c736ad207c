"""model.tuning=head and pooling that follows the model (issue 22): a frozen encoder never changes and never travels,
head-only DP clipping equals a per-example loop, cached features equal the model's own, mean pooling equals a hand
computation, the label-name head goes through the chosen pooling, and the exported model gives veil's logits."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from support.references import clipped_mean_gradient
from veil.client.trainer import LocalPlan, train_round
from veil.conf.schema import DataConfig, FederationConfig, ModelConfig, VeilConfig
from veil.privacy.dpsgd import make_private
from veil.task import get_task
from veil.task.data import TextExamples, tokenize
from veil.task.model import (
    build_model, default_model_dir, export_model, get_trainable, load_tokenizer, trainable_names,
)
from veil.task.features import sentence_features
from veil.task.pooling import PooledClassifier, load_classifier, pool, resolve_pooling, sentence_transformers_pooling

TEXTS = ["hi", "my card has not arrived yet, what should i do about it", "fee?", "where is my money transfer now",
         "i lost my card", "exchange rate please"]
LABELS = ["card_arrival", "lost_or_stolen_card", "exchange_rate"]
TARGETS = [0, 0, 2, 1, 1, 2]
HEAD = ModelConfig(tiny=True, tuning="head", pooling="mean")


def _enc(max_length: int = 24) -> dict[str, torch.Tensor]:
    return tokenize(load_tokenizer(HEAD), TEXTS, max_length=max_length)


def test_mean_pooling_matches_a_hand_computation_with_padding() -> None:
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    want = torch.stack([hidden[0, :3].mean(0), hidden[1].mean(0), hidden[2, 0]])
    assert torch.allclose(pool(hidden, mask, "mean"), want, atol=1e-6)
    assert torch.equal(pool(hidden, mask, "cls"), hidden[:, 0])
    assert torch.equal(pool(hidden, mask, "last"), torch.stack([hidden[0, 2], hidden[1, 4], hidden[2, 0]]))
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])  # left padding: the last token still
    assert torch.equal(pool(hidden, left, "last"), torch.stack([hidden[0, 4], hidden[1, 4], hidden[2, 4]]))
    assert torch.equal(pool(hidden, mask, "max")[0], hidden[0, :3].max(0).values)


def test_the_packaged_minilm_declares_mean_pooling_and_normalisation() -> None:
    declared = sentence_transformers_pooling(default_model_dir())
    assert declared is not None and (declared.mode, declared.normalize) == ("mean", True)
    assert resolve_pooling("auto", default_model_dir()) == declared
    assert resolve_pooling("cls", default_model_dir()).normalize is False  # normalisation belongs to its pooling
    assert resolve_pooling("auto", None).mode == "pooler"  # a model built in code keeps its own classifier


def test_auto_pooling_of_plain_directories(tmp_path: Path) -> None:
    encoder, decoder = tmp_path / "enc", tmp_path / "dec"
    for path, arch in ((encoder, "BertForMaskedLM"), (decoder, "LlamaForCausalLM")):
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"architectures": [arch]}), encoding="utf-8")
    assert resolve_pooling("auto", encoder).mode == "pooler"  # trained end to end: the family's own classifier
    assert resolve_pooling("auto", encoder, tuning="head").mode == "mean"  # frozen: features computed once
    assert resolve_pooling("auto", decoder, tuning="head").mode == "last"
    assert resolve_pooling("cls", decoder, tuning="head").mode == "cls"  # an explicit choice is kept


def test_frozen_encoder_never_changes_and_never_travels() -> None:
    model = build_model(HEAD, LABELS, seed=0)
    assert isinstance(model, PooledClassifier)
    assert trainable_names(model) == ["head.weight", "head.bias"]
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    cfg = VeilConfig(model=HEAD, data=DataConfig(train_path="x.csv", labels=json.dumps(LABELS)),
                     federation=FederationConfig(seed=0)).validate()
    data = get_task("classification").tensors(TextExamples(TEXTS, [LABELS[t] for t in TARGETS]), LABELS, cfg,
                                              path="x.csv")
    assert sorted(data) == ["features", "labels"]  # the tokens are not what trains: the features are
    received = get_trainable(model)
    plan = LocalPlan(steps=4, batch_size=3, lr=0.5, private=True, noise_multiplier=1.0, max_grad_norm=1.0)
    result = train_round(model, received, data, plan=plan, device=torch.device("cpu"), seed=0,
                         task=get_task("classification"))
    assert [u.shape for u in result.update] == [(3, 32), (3,)]  # head only on the wire
    assert any(float(np.abs(u).max()) > 0 for u in result.update)
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_cached_features_equal_the_models_own_and_give_the_same_logits() -> None:
    model = build_model(HEAD, LABELS, seed=0).eval()
    enc = _enc()
    assert (enc["attention_mask"] == 0).any(), "the batch must contain pad tokens"
    cached = sentence_features(HEAD, enc, seed=0, device=torch.device("cpu"))
    with torch.no_grad():
        fresh = model.embed(enc["input_ids"], enc["attention_mask"])
        assert torch.allclose(cached, fresh, atol=1e-6)
        through_tokens = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        assert torch.allclose(model(features=cached).logits, through_tokens, atol=1e-5)


@pytest.mark.parametrize("mode", ["hooks", "bk", "ghost"])
def test_head_only_per_sample_clipping_matches_a_loop(mode: str) -> None:
    model = build_model(HEAD, LABELS, seed=0)
    features = sentence_features(HEAD, _enc(), seed=0, device=torch.device("cpu")) * 7.0  # large: every one clips
    labels = torch.tensor(TARGETS)
    clip = 0.05

    def one_loss(m: nn.Module, one: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(m(features=one["features"]).logits, one["labels"])

    reference = clipped_mean_gradient(copy.deepcopy(model), {"features": features, "labels": labels}, clip=clip,
                                      loss=one_loss)
    params = [p for p in model.parameters() if p.requires_grad]
    loader = DataLoader(TensorDataset(features, labels), batch_size=len(TEXTS))
    dp = make_private(module=model, optimizer=torch.optim.SGD(params, lr=0.1), loader=loader, noise_multiplier=0.0,
                      max_grad_norm=clip, grad_sample_mode=mode)
    per_example = nn.functional.cross_entropy(dp.module(features=features).logits, labels, reduction="none")
    dp.mean_loss(per_example).backward()
    dp.optimizer.pre_step()  # clip, accumulate, add (zero) noise, scale by the expected batch size
    assert len(params) == len(reference) == 2
    for got, want in zip((p.grad for p in params), reference, strict=True):
        assert got is not None and torch.allclose(got, want, atol=1e-6), (got - want).abs().max()


def test_label_name_head_goes_through_the_chosen_pooling() -> None:
    model = build_model(HEAD, LABELS, seed=0).eval()
    names = [label.replace("_", " ") for label in LABELS]
    enc = tokenize(load_tokenizer(HEAD), names, max_length=32)
    with torch.no_grad():
        prototypes = pool(model.encoder(**enc).last_hidden_state, enc["attention_mask"], "mean")  # (K, H)
    centred = prototypes - prototypes.mean(dim=0, keepdim=True)
    want = nn.functional.normalize(centred, dim=-1) * HEAD.head_init_scale
    assert torch.allclose(model.head.weight, want, atol=1e-5)
    cls = build_model(ModelConfig(tiny=True, tuning="head", pooling="cls"), LABELS, seed=0)
    assert not torch.allclose(cls.head.weight, want, atol=1e-3)  # another pooling, another prototype


def test_feature_map_centres_on_the_label_names_and_scales_by_hand() -> None:
    mapped = ModelConfig(tiny=True, tuning="head", pooling="mean", feature_center="label_names", feature_scale=3.0)
    model = build_model(mapped, LABELS, seed=0).eval()
    names = [label.replace("_", " ") for label in LABELS]
    enc = tokenize(load_tokenizer(HEAD), names, max_length=32)
    with torch.no_grad():
        prototypes = pool(model.encoder(**enc).last_hidden_state, enc["attention_mask"], "mean")  # (K, H)
        center = prototypes.mean(dim=0)
        radius = (prototypes - center).norm(dim=-1).mean()
        text = _enc()
        feats = model.embed(text["input_ids"], text["attention_mask"])
        got = model(features=feats).logits
    want = (3.0 / radius) * (feats - center) @ model.head.weight.T + model.head.bias
    assert torch.allclose(got, want, atol=1e-5)
    # the map is not a parameter: it never trains and never travels; the label-name head is unchanged by it
    assert trainable_names(model) == ["head.weight", "head.bias"]
    plain = build_model(HEAD, LABELS, seed=0)
    assert torch.allclose(model.head.weight, plain.head.weight, atol=1e-5)
    pooler = build_model(ModelConfig(tiny=True, tuning="head", pooling="auto", feature_scale=2.0), LABELS, seed=0)
    assert not isinstance(pooler, PooledClassifier)  # the family's own classifier: no pooled embedding to map


@pytest.mark.parametrize("feature_map", [{}, {"feature_center": "label_names", "feature_scale": 3.0}])
def test_exported_classifier_gives_veils_evaluation_logits(tmp_path: Path, feature_map: dict[str, object]) -> None:
    model = build_model(ModelConfig(tiny=True, tuning="lora", pooling="mean", **feature_map), LABELS, seed=0)
    with torch.no_grad():  # move the adapters and the head away from their start, so the merge matters
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    model.eval()
    enc = _enc(max_length=32)
    data = {**enc, "labels": torch.tensor(TARGETS)}
    with torch.no_grad():
        veil_logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    metrics = get_task("classification").evaluate(model, data, device=torch.device("cpu"))
    assert metrics["accuracy"] == pytest.approx(float((veil_logits.argmax(-1) == data["labels"]).float().mean()))
    out = export_model(model, load_tokenizer(HEAD), tmp_path / "model", max_length=32)
    loaded = load_classifier(out)
    got = loaded.logits(TEXTS)
    assert torch.allclose(got.float(), veil_logits, atol=1e-4), (got - veil_logits).abs().max()
    assert loaded.predict(TEXTS) == [LABELS[i] for i in veil_logits.argmax(-1).tolist()]
    assert not (tmp_path / "model.tmp").exists()


def test_simulated_features_are_computed_once_per_run_and_read_back_equal(tmp_path: Path) -> None:
    from veil.task.shards import _simulated_features

    cfg = VeilConfig(model=HEAD, data=DataConfig(train_path="x.csv", labels=json.dumps(LABELS)),
                     output_dir=str(tmp_path)).validate()
    fresh = {"features": sentence_features(HEAD, _enc(), seed=0, device=torch.device("cpu")),
             "labels": torch.tensor(TARGETS)}
    assert _simulated_features(cfg, 3, lambda: fresh) is fresh
    assert (tmp_path / "features" / "partition-3.pt").is_file()

    def never() -> dict[str, torch.Tensor]:
        raise AssertionError("recomputed although the run's cache holds them")

    again = _simulated_features(cfg, 3, never)  # another worker, or the launcher's per-bank report
    assert sorted(again) == ["features", "labels"]
    assert torch.equal(again["features"], fresh["features"]) and torch.equal(again["labels"], fresh["labels"])
    tokens = VeilConfig(model=ModelConfig(tiny=True, tuning="lora"), output_dir=str(tmp_path),
                        data=DataConfig(train_path="x.csv", labels=json.dumps(LABELS))).validate()
    assert _simulated_features(tokens, 4, lambda: fresh) is fresh
    assert not (tmp_path / "features" / "partition-4.pt").exists()  # tokens are not cached on disk
