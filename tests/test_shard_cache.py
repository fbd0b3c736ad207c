"""A simulation worker reads and splits the training file once; every client's shard is unchanged by that.

Reference: the uncached path (read the file, split it, take the client's examples, tokenize them alone with
``padding="longest"``), computed here from veil.task.data's functions, for every client and in a shuffled order.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

from veil.client.settings import NodeSettings
from veil.conf.schema import DataConfig, FederationConfig, ModelConfig, VeilConfig
from veil.task import get_task, shards
from veil.task.data import TextExamples, encode_labels, read_examples, tokenize
from veil.task import model as task_model
from veil.task.model import load_tokenizer


def _cfg(train: Path, test: Path, *, partitioner: str, clients: int) -> VeilConfig:
    data = DataConfig(train_path=str(train), test_path=str(test), text_column="text", label_column="label")
    model = ModelConfig(name="tiny_bert", path="", tiny=True, max_length=8)  # 8 < longest text: truncation too
    fed = FederationConfig(num_clients=clients, partitioner=partitioner, alpha=0.5, min_partition_size=2, seed=3)
    return VeilConfig(data=data, model=model, federation=fed)


def _settings(partition: int, clients: int, *, planted_examples: str | None = None,
              canary_clients: int = 0) -> NodeSettings:
    return NodeSettings(data_path=None, text_column=None, label_column=None, max_epsilon=float("inf"),
                        ledger_path=Path("unused"), device=None, partition_id=partition, num_partitions=clients,
                        planted_examples=planted_examples, canary_clients=canary_clients)


def _fresh_shard(cfg: VeilConfig, labels: list[str], partition: int) -> dict[str, torch.Tensor]:
    """The uncached reference: this client's examples read, split and tokenized on their own."""
    examples = read_examples(cfg.data.train_path, cfg.data)
    _ids, parts = shards.simulated_partitions(get_task("classification"), examples, labels,
                                              dataclasses.asdict(cfg.federation), path=cfg.data.train_path)
    idx = parts[partition]
    mine = TextExamples([examples.texts[i] for i in idx], [examples.labels[i] for i in idx])
    fresh = task_model._tokenizer_at.__wrapped__(str(task_model.default_model_dir()))  # not the process' cached one
    enc = tokenize(fresh, mine.texts, max_length=cfg.model.max_length)
    enc["labels"] = torch.as_tensor(encode_labels(mine, labels, path=cfg.data.train_path))
    return enc


def _uneven_csv(tmp_path: Path) -> tuple[Path, Path]:
    """Texts of very different lengths, so shards pad to different widths and some texts are truncated."""
    rng = random.Random(0)
    words = ["card", "lost", "atm", "cash", "fee", "transfer", "pin", "code", "why", "my"]
    rows = ["text,label"] + [f"{' '.join(rng.choices(words, k=rng.randint(1, 12)))},{lab}"
                             for lab in ("a", "b", "c", "d") for _ in range(12)]
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text("\n".join(rows) + "\n", encoding="utf-8")
    test.write_text("text,label\ncard lost,a\natm cash,b\nfee,c\npin code,d\n", encoding="utf-8")
    return train, test


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_every_cached_shard_equals_a_fresh_one(tmp_path: Path, partitioner: str) -> None:
    clients = 6
    cfg = _cfg(*_uneven_csv(tmp_path), partitioner=partitioner, clients=clients)
    labels = shards.resolve_labels(cfg.data)
    shards._shard_cached.cache_clear()
    shards._training_partitions.cache_clear()
    order = list(range(clients)) * 2
    random.Random(1).shuffle(order)  # the order a worker meets its clients must not matter

    got = {p: shards.client_shard(cfg, _settings(p, clients)) for p in order}

    for p in range(clients):
        want = _fresh_shard(cfg, labels, p)
        assert set(got[p]) == set(want) == {"input_ids", "attention_mask", "labels"}
        for key in want:
            assert got[p][key].dtype == want[key].dtype, key
            assert torch.equal(got[p][key], want[key]), f"client {p}: {key} differs from a fresh tokenization"
    assert shards._training_partitions.cache_info().misses == 1, "the file is read and split once per process"


def test_a_worker_computes_only_the_partitions_it_is_sampled_for(tmp_path: Path) -> None:
    clients = 6
    cfg = _cfg(*_uneven_csv(tmp_path), partitioner="dirichlet", clients=clients)
    shards._shard_cached.cache_clear()
    shards._training_partitions.cache_clear()

    for p in (4, 1, 4):
        shards.client_shard(cfg, _settings(p, clients))

    (_examples, parts), = [shards._training_partitions(shards._key(cfg), json.dumps(
        dataclasses.asdict(cfg.data), sort_keys=True), 0)]
    assert shards._training_partitions.cache_info().misses == 1
    assert parts.loaded == 3, "client 0 (the partitioner's one-off draw and check) and the two sampled clients"


def test_an_audited_shard_is_never_a_plain_runs_cached_one(tmp_path: Path) -> None:
    """Same run config, same partition: the audit's plan (node config, not run config) is part of the cache key."""
    clients = 6
    cfg = _cfg(*_uneven_csv(tmp_path), partitioner="iid", clients=clients)
    labels = shards.resolve_labels(cfg.data)
    planted = tmp_path / "planted.jsonl"
    planted.write_text("".join(json.dumps({"partition": 1, "text": f"canary {i}", "label": "a"}) + "\n"
                               for i in range(3)), encoding="utf-8")
    shards._shard_cached.cache_clear()
    shards._training_partitions.cache_clear()

    plain = shards.client_shard(cfg, _settings(1, clients))
    with_canaries = shards.client_shard(cfg, _settings(1, clients, planted_examples=str(planted)))
    beside_canary_clients = shards.client_shard(cfg, _settings(1, clients, canary_clients=2))
    plain_again = shards.client_shard(cfg, _settings(1, clients))

    assert plain_again is plain
    assert with_canaries["labels"].shape[0] == plain["labels"].shape[0] + 3, "the three canaries planted in partition 1"
    split_among_four = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, num_clients=4))
    want = _fresh_shard(split_among_four, labels, 1)  # reference: 2 canary clients of 6 leave 4 owners
    assert all(torch.equal(beside_canary_clients[k], want[k]) for k in want)
    assert beside_canary_clients["labels"].shape[0] != plain["labels"].shape[0]


def test_the_tokenizer_is_loaded_once_per_process_and_encodes_like_a_fresh_one() -> None:
    cfg = ModelConfig(name="tiny_bert", path="", tiny=True, max_length=8)
    fresh = task_model._tokenizer_at.__wrapped__(str(task_model.default_model_dir()))
    texts = ["my card was lost at the atm", "why is there a fee", "pin"]

    first, second = load_tokenizer(cfg), load_tokenizer(cfg)

    assert first is second, "one tokenizer per process and model directory"
    for tok, batch, length in ((first, texts, 8), (second, texts[:1], 4), (first, texts, 8)):  # no state carried over
        got, want = tokenize(tok, batch, max_length=length), tokenize(fresh, batch, max_length=length)
        assert all(torch.equal(got[k], want[k]) for k in want)
