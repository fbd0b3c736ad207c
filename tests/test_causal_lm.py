"""task=causal_lm (issue 12, scope 4): the loss counts completion tokens only and is a mean per example; DP-SGD's
per-sample clipped gradients equal a per-example loop for the decoder families (LoRA and full, pad tokens, masked
prompt tokens), computed independently here; evaluation's loss/perplexity/exact match against hand computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from support.families import DECODERS, PAD, VOCAB, tiny_config
from support.references import clipped_mean_gradient
from veil.conf.schema import ModelConfig
from veil.privacy.dpsgd import make_private
from veil.task import get_task
from veil.task.causal_lm import IGNORE, PromptExamples, tokenize_examples
from veil.task.model import with_lora

TASK = get_task("causal_lm")
C = 0.01


def _batch() -> dict[str, torch.Tensor]:
    """Three sequences: prompt tokens (label -100), completion tokens (counted), right padding (label -100)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for row, prompt, length in ((0, 3, 7), (1, 5, 10), (2, 2, 5)):
        labels[row, :prompt] = IGNORE
        ids[row, length:], mask[row, length:], labels[row, length:] = PAD, 0, IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _reference_loss(model: nn.Module, one: dict[str, torch.Tensor]) -> torch.Tensor:
    """One example, unpadded, by hand: mean of -log p(token t | tokens < t) over its counted tokens."""
    keep = int(one["attention_mask"].sum())
    ids, labels = one["input_ids"][:, :keep], one["labels"][0, :keep]
    logp = model(input_ids=ids).logits[0].log_softmax(dim=-1)  # (T, V)
    terms = [-logp[t - 1, labels[t]] for t in range(1, keep) if labels[t] != IGNORE]
    return torch.stack(terms).mean()


def _decoder(family: str, *, lora: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    return with_lora(model, ModelConfig(lora_r=2, lora_alpha=4), task_type="CAUSAL_LM") if lora else model


def test_per_example_loss_is_the_mean_over_completion_tokens() -> None:
    model, batch = _decoder("llama", lora=False), _batch()
    got = TASK.per_example_loss(model, batch)
    want = torch.stack([_reference_loss(model, {k: v[i:i + 1] for k, v in batch.items()}) for i in range(3)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_completion_labels_count_and_padding_does_not() -> None:
    model, batch = _decoder("llama", lora=False), _batch()
    base = TASK.per_example_loss(model, batch)
    pad_changed = copy.deepcopy(batch)
    pad_changed["input_ids"][0, 8] = 7  # a padding position (mask 0, label -100): neither input nor target counts
    completion_changed = copy.deepcopy(batch)
    completion_changed["labels"][0, 4] = (int(batch["labels"][0, 4]) + 1) % VOCAB
    torch.testing.assert_close(TASK.per_example_loss(model, pad_changed), base)
    changed = TASK.per_example_loss(model, completion_changed)
    assert float((changed[0] - base[0]).detach().abs()) > 1e-6 and torch.equal(changed[1:], base[1:])


def test_tokenization_masks_prompt_and_padding() -> None:
    from veil.task.model import load_tokenizer

    tok = load_tokenizer(ModelConfig(tiny=True))
    enc = tokenize_examples(tok, PromptExamples(["my card is lost", "atm ate my cash"], ["lost card", "cash"]),
                            max_length=32, chat=True, generate_max_tokens=4)
    prompt0 = tok("my card is lost", add_special_tokens=False)["input_ids"]
    completion0 = tok("lost card", add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    counted = enc["labels"][0][enc["labels"][0] != IGNORE].tolist()
    assert counted == completion0
    assert enc["input_ids"][0, : len(prompt0)].tolist() == prompt0
    assert (enc["labels"][enc["attention_mask"] == 0] == IGNORE).all()
    assert enc["target_ids"][0][enc["target_ids"][0] != IGNORE].tolist() == completion0[:-1]


# bk (book-keeping) too, except GPT-2's full fine-tuning: its LM head is tied to wte, which bk refuses (auto: hooks)
CLIP_CASES = [(f, lora, m) for m in ("hooks", "bk") for f in DECODERS for lora in (False, True)
              if not (m == "bk" and f == "gpt2" and not lora)]


@pytest.mark.parametrize(("family", "lora", "mode"), CLIP_CASES,
                         ids=lambda v: {False: "full", True: "lora"}.get(v, v) if isinstance(v, bool) else v)
def test_per_sample_clipping_matches_loop(family: str, lora: bool, mode: str) -> None:
    batch = _batch()
    model = _decoder(family, lora=lora)
    reference = clipped_mean_gradient(copy.deepcopy(model), batch, clip=C, loss=_reference_loss)
    params = [p for p in model.parameters() if p.requires_grad]
    keys = sorted(batch)
    loader = DataLoader(TensorDataset(*(batch[k] for k in keys)), batch_size=3)
    dp = make_private(module=model, optimizer=torch.optim.SGD(params, lr=0.1), loader=loader,
                      noise_multiplier=0.0, max_grad_norm=C, grad_sample_mode=mode)
    dp.mean_loss(TASK.per_example_loss(dp.module, batch)).backward()
    dp.optimizer.pre_step()
    for p, r in zip(params, reference, strict=True):
        torch.testing.assert_close(p.grad.double(), r.double(), atol=1e-6, rtol=1e-5)


def test_evaluate_loss_perplexity_exact_match() -> None:
    model = _decoder("llama", lora=False).eval()
    batch = _batch()
    with torch.no_grad():
        want = [(_reference_loss(model, {k: v[i:i + 1] for k, v in batch.items()}),
                 int((batch["labels"][i, 1:] != IGNORE).sum())) for i in range(3)]
        greedy = model.generate(input_ids=batch["input_ids"][:1, :3], max_new_tokens=2, do_sample=False,
                                pad_token_id=PAD)[0, 3:]
    loss = sum(float(l) * n for l, n in want) / sum(n for _, n in want)  # token-weighted
    data = {**batch, "gen_ids": torch.stack([batch["input_ids"][0, :3]] * 2),
            "gen_mask": torch.ones(2, 3, dtype=torch.long),
            "target_ids": torch.stack([greedy[:1], (greedy[:1] + 1) % VOCAB])}  # row 0 is what greedy gives
    data = {k: v if k.startswith(("gen", "target")) else v[:2] for k, v in data.items()}
    got = TASK.evaluate(model, data, device=torch.device("cpu"))
    loss2 = sum(float(l) * n for l, n in want[:2]) / sum(n for _, n in want[:2])
    assert math.isclose(got["loss"], loss2, rel_tol=1e-5) and math.isclose(got["perplexity"], math.exp(loss2), rel_tol=1e-5)
    assert loss > 0
    assert got["accuracy"] == pytest.approx(0.5 if greedy[1] == model.generation_config.eos_token_id else 0.0)


def test_evaluate_samples_are_each_prompts_own_greedy_generation() -> None:
    """The per-round samples: prompt and expected completion as written, and the greedy generation of that prompt
    alone (unpadded, one at a time), cut at the end token; at most ``task.eval_samples`` of them."""
    from dataclasses import replace

    from veil.conf.schema import TaskConfig, VeilConfig
    from veil.task.model import load_tokenizer

    cfg = VeilConfig(task=TaskConfig(name="causal_lm", eval_samples=2), model=ModelConfig(tiny=True, lora=False))
    model = TASK.build_model(cfg, [], seed=0).eval()
    tok = load_tokenizer(cfg.model)
    prompts, completions = ["my card is lost", "atm ate my cash", "where is my refund"], ["lost card", "cash", "refund"]
    data = tokenize_examples(tok, PromptExamples(prompts, completions), max_length=32, chat=True, generate_max_tokens=4)
    got = TASK.evaluate(model, data, device=torch.device("cpu"), cfg=cfg)["samples"]
    width = int(data["target_ids"].shape[1])
    end = {model.generation_config.eos_token_id, model.config.pad_token_id}
    want = []
    for i in range(2):
        ids = data["gen_ids"][i][data["gen_mask"][i] == 1][None]
        with torch.no_grad():
            new = model.generate(input_ids=ids, max_new_tokens=width + 1, do_sample=False,
                                 pad_token_id=model.config.pad_token_id)[0, ids.shape[1]:].tolist()
        new = new[:next((j for j, t in enumerate(new) if t in end), len(new))]
        want.append({"prompt": prompts[i], "generated": tok.decode(new, skip_special_tokens=True).strip(),
                     "expected": completions[i]})
    assert got == want
    none = TASK.evaluate(model, data, device=torch.device("cpu"), cfg=replace(cfg, task=replace(cfg.task, eval_samples=0)))
    assert "samples" not in none and "samples" not in TASK.evaluate(model, data, device=torch.device("cpu"))
