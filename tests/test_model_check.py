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
