"""Every supported family (issue 12, scope 2-3), tiny random models built from configs in code: DP-SGD's per-sample
clipped gradients equal a per-example loop (clip each example's whole gradient, average) with pad tokens, in LoRA
and full fine-tuning, hooks and ghost; DeBERTa's relative position table is refused in one line; LoRA targets
``auto`` resolve per family; the list syntax works on the command line; label-name head initialisation works for
every family."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from support.families import FAMILIES, PAD, VOCAB, tiny_config
from support.references import clipped_mean_gradient
from veil.conf.schema import ModelConfig
from veil.errors import ConfigError, ModelError
from veil.privacy.dpsgd import make_private
from veil.task.model import init_head_from_label_names, lora_target_modules, with_lora

C = 0.01  # every example is clipped: the clip factors matter
EXACT = [f for f in FAMILIES if f != "deberta-v2"]  # DeBERTa's full fine-tuning is refused (test below)


def _batch() -> dict[str, torch.Tensor]:
    """Three examples of different lengths, right-padded with PAD (attention mask 0 on pads)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    for row, length in ((0, 6), (2, 8)):
        ids[row, length:], mask[row, length:] = PAD, 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1])}


def _classifier(family: str, *, lora: bool) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config(family, num_labels=2))
    if lora:
        model = with_lora(model, ModelConfig(lora_r=2, lora_alpha=4), task_type="SEQ_CLS")
    return model


def _dp_clipped(model: nn.Module, batch: dict[str, torch.Tensor], mode: str) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    loader = DataLoader(TensorDataset(batch["input_ids"], batch["attention_mask"], batch["labels"]), batch_size=3)
    dp = make_private(module=model, optimizer=torch.optim.SGD(params, lr=0.1), loader=loader,
                      noise_multiplier=0.0, max_grad_norm=C, grad_sample_mode=mode)
    logits = dp.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    dp.mean_loss(nn.functional.cross_entropy(logits, batch["labels"], reduction="none")).backward()
    dp.optimizer.pre_step()  # clip, sum, (zero) noise, divide by the expected batch size
    return [p.grad for p in params]


# LoRA in ghost mode is checked for BERT in test_dp_exact.py; adapters add no layer type that differs by family;
# bk (book-keeping, one backward) for every family's full fine-tuning, GPT-2's Conv1D included
CASES = ([(f, False, m) for f in EXACT for m in ("hooks", "ghost", "bk")] + [(f, True, "hooks") for f in FAMILIES]
         + [("bert", True, "bk"), ("llama", True, "bk")])


@pytest.mark.parametrize(("family", "lora", "mode"), CASES, ids=lambda v: {False: "full", True: "lora"}.get(v, v))
def test_per_sample_clipping_matches_loop(family: str, lora: bool, mode: str) -> None:
    batch = _batch()
    model = _classifier(family, lora=lora)
    reference = clipped_mean_gradient(copy.deepcopy(model), batch, clip=C)
    got = _dp_clipped(model, batch, mode)
    assert len(got) == len(reference) > 0
    for g, r in zip(got, reference, strict=True):
        torch.testing.assert_close(g.double(), r.double(), atol=1e-6, rtol=1e-5)
    assert max(float(g.abs().max()) for g in got) > 1e-6, "gradients must not be trivially zero"


def test_deberta_lora_is_exact_and_full_is_refused_in_one_line() -> None:
    batch = _batch()
    lora = _classifier("deberta-v2", lora=True)
    reference = clipped_mean_gradient(copy.deepcopy(lora), batch, clip=C)
    for g, r in zip(_dp_clipped(lora, batch, "hooks"), reference, strict=True):
        torch.testing.assert_close(g.double(), r.double(), atol=1e-6, rtol=1e-5)
    with pytest.raises(ConfigError) as err:
        _dp_clipped(_classifier("deberta-v2", lora=False), batch, "hooks")
    line = str(err.value)
    assert "\n" not in line and "rel_embeddings" in line and "model.lora=true" in line


def test_ghost_refuses_tied_embeddings() -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("gpt2"))
    assert model.lm_head.weight is model.transformer.wte.weight
    loader = DataLoader(TensorDataset(torch.zeros(2, 3, dtype=torch.long)), batch_size=2)
    with pytest.raises(ConfigError, match="tied.*grad_sample_mode=hooks"):
        make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loader=loader,
                     noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost")


AUTO = {"bert": ["query", "value"], "roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
        "deberta-v2": ["query_proj", "value_proj"], "electra": ["query", "value"], "modernbert": ["Wqkv"],
        "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"]}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_targets_auto(family: str) -> None:
    model = _classifier(family, lora=True)
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(AUTO[family])
    assert lora_target_modules(model, "auto") == AUTO[family]
    assert lora_target_modules(model, "a, b") == ["a", "b"]


def test_lora_targets_unknown_module_is_one_line() -> None:
    with pytest.raises(ModelError, match="model.lora_targets=nope"):
        with_lora(_classifier("llama", lora=False), ModelConfig(lora_targets="nope"), task_type="SEQ_CLS")


def test_lora_targets_list_on_the_command_line() -> None:
    from veil.simulation import preflight

    for value, expected in (("[q_proj,v_proj]", "q_proj,v_proj"), ("'q_proj,v_proj'", "q_proj,v_proj"),
                            ("auto", "auto")):
        cfg = preflight([f"model.lora_targets={value}", "model=tiny_bert"])
        assert cfg.model.lora_targets == expected


class _Tokenizer:
    """Word ids by a fixed table (a stand-in for a real tokenizer over the tiny vocabulary)."""

    def __call__(self, texts: list[str], **_kw: object) -> dict[str, torch.Tensor]:
        rows = [[4 + (sum(map(ord, w)) % (VOCAB - 4)) for w in t.split()] for t in texts]
        width = max(map(len, rows))
        ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != PAD).long()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_label_name_head_init(family: str) -> None:
    from transformers import AutoModelForSequenceClassification

    labels = ["card_arrival", "lost_or_stolen_card", "exchange_rate"]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config(family, num_labels=3)).eval()
    init_head_from_label_names(model, _Tokenizer(), labels, scale=5.0)
    enc = _Tokenizer()([label.replace("_", " ") for label in labels])
    with torch.no_grad():
        logits = model(**enc).logits  # (K, K): each label name scored against every label
    weight = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 3][-1].weight
    torch.testing.assert_close(weight.norm(dim=1), torch.full((3,), 5.0))
    assert torch.equal(logits.argmax(dim=1), torch.arange(3)), f"{family}: label names not scored as themselves"




def test_launcher_refuses_deberta_full_fine_tuning_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               small_csv: tuple[Path, Path]) -> None:
    from veil.cli import main

    model_dir = tmp_path / "deberta"
    tiny_config("deberta-v2", num_labels=2).save_pretrained(str(model_dir))
    run_dir = tmp_path / "run"
    train, test = small_csv
    code = main(["simulate", f"model.path={model_dir}", "model.lora=false", "model.head_init=random", "data=csv",
                 f"data.train_path={train}", f"data.test_path={test}", f"hydra.run.dir={run_dir}"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "rel_embeddings" in err and "model.lora=true" in err, err
    assert not run_dir.exists()
