"""Closed-set accuracy for causal_lm (issue 26, scope 3): ``choice_accuracy`` against a per-candidate loop that runs
each prompt + candidate as its own sequence and sums the candidate tokens' log-probabilities by hand; the closed set
comes from ``data.choices`` or the evaluation file's repeated completions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from support.families import DECODERS, tiny_config
from veil.conf.schema import DataConfig, ModelConfig, TaskConfig, VeilConfig
from veil.errors import ConfigError
from veil.task import get_task
from veil.task.causal_lm import PromptExamples, build_causal_lm, encode_completion, encode_prompt
from veil.task import choices
from veil.task.choices import choice_scores, closed_set, packs, prefix_tree
from veil.task.model import load_tokenizer, with_lora

TASK = get_task("causal_lm")
CHOICES = ["card_lost", "fee", "pin", "atm cash"]
PROMPTS = ["my card was lost", "why a fee on transfer", "i forgot my pin", "the atm kept my cash", "card gone"]
ANSWERS = ["card_lost", "fee", "pin", "atm cash", "not a choice"]
# token ids: lengths 1 to 5, [10] a prefix of [10, 11, ...] and [10, 11] of [10, 11, 12, 3], shared prefixes
CANDIDATES = [[10], [10, 11], [10, 11, 12, 3], [10, 11, 14, 3], [10, 15, 3], [13, 14, 16, 17, 3], [20, 3], [3]]


@torch.no_grad()
def _reference_loglik(model: nn.Module, prompt: list[int], candidate: list[int]) -> float:
    """One sequence, no cache: sum over candidate tokens of log p(token | everything before it)."""
    logp = model(input_ids=torch.tensor([prompt + candidate])).logits[0].log_softmax(dim=-1)  # (T, V)
    return sum(float(logp[len(prompt) + i - 1, tok]) for i, tok in enumerate(candidate))


def _nudge_lora(model: nn.Module) -> nn.Module:
    """LoRA B starts at zero: move it so the adapters count in the reference too."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


def _tiny_llama() -> tuple[nn.Module, VeilConfig]:
    cfg = VeilConfig(model=ModelConfig(tiny=True, max_length=48, lora_r=4, lora_alpha=8, head_init="random"),
                     task=TaskConfig(name="causal_lm", chat_template=False))
    return _nudge_lora(build_causal_lm(cfg.model, seed=0)), cfg


def _tiny_lora(family: str, attention: str, **extra: object) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **extra), attn_implementation=attention)
    return _nudge_lora(with_lora(model, ModelConfig(lora_r=2, lora_alpha=4, lora_targets="auto"),
                                 task_type="CAUSAL_LM"))


def _prompt_cache(model: nn.Module, prompt: list[int]) -> object:
    return model(input_ids=torch.tensor([prompt]), use_cache=True).past_key_values


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("family", DECODERS)
def test_packed_scores_equal_a_per_candidate_loop(family: str, attention: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The candidates as one packed prefix tree after the prompt's cache (custom 4D mask, explicit positions), under
    LoRA moved off zero, equal one full sequence per candidate; so does the padded batch kept as the fallback."""
    model, prompt = _tiny_lora(family, attention), [5, 6, 7, 8, 9]
    ref = torch.tensor([_reference_loglik(model, prompt, c) for c in CANDIDATES])

    assert packs(model, _prompt_cache(model, prompt))
    torch.testing.assert_close(choice_scores(model, prompt, CANDIDATES), ref, atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(choices, "PACKED_FAMILIES", frozenset())  # the fallback, on the same model
    assert not packs(model, _prompt_cache(model, prompt))
    torch.testing.assert_close(choice_scores(model, prompt, CANDIDATES), ref, atol=1e-4, rtol=1e-4)


def test_a_sliding_window_keeps_the_padded_batch() -> None:
    """A sliding-window layer would lose its window to the custom mask: the padded batch scores such a model."""
    model, prompt = _tiny_lora("qwen2", "sdpa", use_sliding_window=True, sliding_window=3, max_window_layers=0), [5, 6, 7]
    assert not packs(model, _prompt_cache(model, prompt))
    ref = torch.tensor([_reference_loglik(model, prompt, c) for c in CANDIDATES])
    torch.testing.assert_close(choice_scores(model, prompt, CANDIDATES), ref, atol=1e-4, rtol=1e-4)


def test_the_prefix_tree_holds_each_distinct_prefix_once() -> None:
    tokens, parents, paths = prefix_tree([[1, 2, 3], [1, 2, 4], [1, 5], [6], [1, 2]])
    assert tokens == [1, 2] and parents == [-1, 0]  # inputs: every token but each candidate's last
    assert paths == [[0, 1], [0, 1], [0], [], [0]]


def test_choice_accuracy_equals_a_per_candidate_loop() -> None:
    model, cfg = _tiny_llama()
    tokenizer = load_tokenizer(cfg.model)
    data = TASK.tensors(PromptExamples(PROMPTS, ANSWERS), CHOICES, cfg, path="x", evaluation=True)

    got = TASK.evaluate(model, data, device=torch.device("cpu"))["choice_accuracy"]

    cands = [encode_completion(tokenizer, c) for c in CHOICES]  # completion tokens + end token, as trained
    hits = 0
    for prompt_text, answer in zip(PROMPTS, ANSWERS, strict=True):
        prompt = encode_prompt(tokenizer, prompt_text, chat=False)
        ref = [_reference_loglik(model, prompt, c) for c in cands]
        torch.testing.assert_close(choice_scores(model, prompt, cands), torch.tensor(ref), atol=1e-4, rtol=1e-4)
        hits += answer in CHOICES and CHOICES[max(range(len(CHOICES)), key=ref.__getitem__)] == answer
    assert got == pytest.approx(hits / len(PROMPTS))


def test_scores_on_gpt2_with_learned_positions_and_under_peft_equal_the_loop() -> None:
    """GPT-2 (learned absolute positions: the candidates must continue the prompt's positions through the cache),
    bare and wrapped by peft (LoRA B = 0: the same function)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gpt2")).eval()
    prompt, cands = [5, 6, 7, 8], [[10, 3], [11, 12, 3], [13, 3]]
    ref = torch.tensor([_reference_loglik(model, prompt, c) for c in cands])
    torch.testing.assert_close(choice_scores(model, prompt, cands), ref, atol=1e-4, rtol=1e-4)
    lora = with_lora(model, ModelConfig(lora_r=2, lora_alpha=4, lora_targets="auto"), task_type="CAUSAL_LM").eval()
    torch.testing.assert_close(choice_scores(lora, prompt, cands), ref, atol=1e-4, rtol=1e-4)  # B = 0: same model


def test_the_closed_set_is_the_given_choices_or_the_repeated_completions(tmp_path: Path) -> None:
    path = tmp_path / "test.jsonl"
    rows = [{"prompt": p, "completion": c} for p, c in zip(PROMPTS * 2, ANSWERS * 2, strict=True)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = VeilConfig(data=DataConfig(train_path=str(path), test_path=str(path)), task=TaskConfig(name="causal_lm"))

    assert TASK.labels(cfg) == sorted(set(ANSWERS))  # auto: every completion repeats
    given = VeilConfig(data=DataConfig(train_path=str(path), choices='["b", "a"]'), task=cfg.task)
    assert TASK.labels(given) == ["b", "a"]
    assert closed_set("none", lambda: ANSWERS * 2) == []
    assert closed_set("auto", lambda: ANSWERS) == []  # all distinct: free text, not a closed set
    with pytest.raises(ConfigError, match="data.choices"):
        closed_set("[1, 2]", lambda: ANSWERS)


def test_the_model_card_states_the_closed_set_accuracy_beside_the_starting_models() -> None:
    from veil.server.export import model_card

    cfg = VeilConfig(model=ModelConfig(tiny=True), task=TaskConfig(name="causal_lm"))
    summary = {"epsilon_max": 4.0, "epsilon_basis": "target", "rounds_completed": 2, "accuracy": 0.0,
               "perplexity": 9.0, "choice_accuracy": 0.4375, "before_training": {"choice_accuracy": 0.0625}}
    card = model_card(cfg, summary)
    assert "closed-set accuracy 0.4375 (starting model: 0.0625)" in card
    assert "closed-set" not in model_card(cfg, {k: v for k, v in summary.items() if k != "choice_accuracy"})
