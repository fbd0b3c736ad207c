"""The model pre-flight (issue 26, scope 4): the cases veil handles rather than refuses, checked against references.
(The refused cases are in the bad-input corpus, tests/bad_inputs/cases.yaml, area `model`.)

- A tokenizer with an end token but no pad token: batches are padded with the end token, the completion's own end
  token is counted, and padding never is (labels built by hand here).
- A generation config whose end token differs from the tokenizer's: generation stops at the tokenizer's end token
  (the one training put after every completion) as well as at the config's.
- A well-formed directory passes the pre-flight.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bad_inputs.corpus import _model_dir
from veil.privacy.ledger import PrivacyLedger
from veil.conf.schema import ModelConfig, TaskConfig, VeilConfig
from veil.errors import ModelError
from veil.task.causal_lm import IGNORE, PromptExamples, build_causal_lm, tokenize_examples
from veil.task.model import load_tokenizer
from veil.task.model_check import check_model_files


def _cfg(path: Path, task: str = "causal_lm") -> VeilConfig:
    return VeilConfig(model=ModelConfig(path=str(path), tiny=False, max_length=16, lora_r=2, lora_alpha=4,
                                        head_init="random"), task=TaskConfig(name=task))


def test_a_tokenizer_without_pad_pads_with_its_end_token_and_never_counts_padding(tmp_path: Path) -> None:
    _model_dir(tmp_path / "m", tokenizer={"eos_token": "</s>"})  # "</s>" is id 1; no pad token
    cfg = _cfg(tmp_path / "m")

    check_model_files(cfg)  # handled, not refused
    tokenizer = load_tokenizer(cfg.model)
    out = tokenize_examples(tokenizer, PromptExamples(["", ""], ["my card was lost", "fee"]), max_length=16,
                            chat=False)

    # by hand: words are ids my=3 card=4 was=5 lost=6 fee=9; every completion ends with </s> (1); pad = </s>
    assert tokenizer.pad_token_id == 1  # type: ignore[attr-defined]
    assert out["input_ids"].tolist() == [[3, 4, 5, 6, 1], [9, 1, 1, 1, 1]]
    assert out["labels"].tolist() == [[3, 4, 5, 6, 1], [9, 1, IGNORE, IGNORE, IGNORE]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_generation_stops_at_the_tokenizers_end_token_when_the_config_names_another(tmp_path: Path) -> None:
    _model_dir(tmp_path / "m", tokenizer={"eos_token": "</s>", "pad_token": "[PAD]"}, config={"eos_token_id": 10})
    cfg = _cfg(tmp_path / "m")

    check_model_files(cfg)
    model = build_causal_lm(cfg.model, seed=0)

    assert sorted(model.generation_config.eos_token_id) == [1, 10]  # the config's own, and the tokenizer's </s>


def test_a_well_formed_directory_passes(tmp_path: Path) -> None:
    _model_dir(tmp_path / "m", tokenizer={"eos_token": "</s>", "pad_token": "[PAD]"}, config={"eos_token_id": 1})
    check_model_files(_cfg(tmp_path / "m"))
    model = build_causal_lm(_cfg(tmp_path / "m").model, seed=0)
    assert model.generation_config.eos_token_id == 1  # unchanged when the two agree


@pytest.mark.parametrize("special", ["pad_token", "unk_token"])
def test_any_special_token_outside_the_vocabulary_is_refused(tmp_path: Path, special: str) -> None:
    _model_dir(tmp_path / "m", tokenizer={"eos_token": "</s>", special: "<new>"})  # "<new>" is added as id 13
    with pytest.raises(ModelError, match=f"{special} '<new>' has id 13, outside the model's vocabulary"):
        check_model_files(_cfg(tmp_path / "m"))


def test_a_deployed_node_refuses_a_model_it_cannot_train_in_one_line_before_reading_data(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The owner's --model has no pad token (the corpus' bert_no_pad): the node's first round is a plain refusal,
    logged in one line that names the problem and the fix; the data file is never read and nothing is booked."""
    import json

    import numpy as np

    import veil.task.shards
    from veil.client.app import REPLY_KEYS, VeilClient
    from veil.client.settings import NodeSettings
    from veil.conf.schema import DataConfig

    _model_dir(tmp_path / "owner_model", family="bert", config={"pad_token_id": None})
    data = tmp_path / "own.csv"
    data.write_text("text,label\nmy card was lost,card\nwhy a fee,fee\n", encoding="utf-8")
    monkeypatch.setattr(veil.task.shards, "read_examples", lambda *a, **k: pytest.fail("the data was read"))
    cfg = VeilConfig(model=ModelConfig(path="/the/coordinators/choice", tiny=False, max_length=16, tuning="head",
                                       head_init="random"),
                     data=DataConfig(train_path="unused.csv", test_path="unused.csv", label_column="label",
                                     labels=json.dumps(["card", "fee"]))).validate()
    cfg.federation.sample_rate = 0.5  # a deployed DP-SGD run states its public q
    settings = NodeSettings(data_path=str(data), text_column=None, label_column=None, max_epsilon=50.0,
                            ledger_path=tmp_path / "ledger.json", device="cpu", partition_id=None,
                            num_partitions=None, model_path=str(tmp_path / "owner_model"))

    update, weight, reply = VeilClient(cfg, settings, run_id=1).fit([np.zeros(3, np.float32)], {"server_round": 1})

    assert weight == 0 and reply["refused"] == 1 and set(reply) == set(REPLY_KEYS) and not update[0].any()
    said = [r.getMessage() for r in caplog.records if "cannot train" in r.getMessage()]
    assert len(said) == 1 and "\n" not in said[0], said
    assert "neither a pad token nor an end-of-sequence token" in said[0] and "pad_token" in said[0]
    assert str(tmp_path / "owner_model") in said[0]
    # nothing booked: a refusal that says can_train_next=False only records, in the ledger, that this run stopped
    ledger = tmp_path / "ledger.json"
    assert not ledger.exists() or len(PrivacyLedger.open(ledger, create=False).events) == 0
