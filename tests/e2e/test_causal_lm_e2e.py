"""`veil simulate task=causal_lm` end to end (issue 12): a tiny Llama built in code, 3 clients x 2 rounds, DP-SGD +
SecAgg+; metrics rows carry perplexity; the exported model loads with AutoModelForCausalLM offline, gives the same
logits as the final global weights, and generates."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from support.helpers import ONE_ACTOR, metrics, run_veil

pytestmark = pytest.mark.slow

WORDS = {"card": "my card was lost", "cash": "the atm kept my cash", "fee": "why a fee on transfer",
         "pin": "i forgot my pin code"}


def _jsonl(path: Path, per_label: int, tag: str) -> Path:
    rows = [{"prompt": f"{text} {tag}{i}", "completion": label} for label, text in WORDS.items() for i in range(per_label)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_causal_lm_dp_secagg_run_exports_a_generating_model(tmp_path: Path) -> None:
    train, test = _jsonl(tmp_path / "train.jsonl", 15, ""), _jsonl(tmp_path / "test.jsonl", 3, "again ")
    run_dir = tmp_path / "run"
    proc = run_veil(["simulate", "task=causal_lm", "model=tiny_llama", "data=csv", f"data.train_path={train}",
                     f"data.test_path={test}", "federation.num_clients=3", "federation.clients_per_round=3",
                     "federation.rounds=2", "federation.batch_size=8", "federation.local_steps=2",
                     "federation.partitioner=iid", "privacy=dp_sgd", "secagg=secaggplus", ONE_ACTOR, f"hydra.run.dir={run_dir}"],
                    timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["secagg"] and r["epsilon_max"] > 0 and r["clients"] == 3 for r in rows)
    assert all(math.isclose(r["perplexity"], math.exp(r["loss"]), rel_tol=1e-6) for r in rows)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows), "completions are short: exact match is computed"
    assert "perplexity" in proc.stdout
    for r in rows:  # the first eval_samples (3) held-out prompts, as written, with the global model's generation
        assert [s["expected"] for s in r["samples"]] == [json.loads(line)["completion"]
                                                         for line in test.read_text().splitlines()[:3]]
        assert all(s["prompt"].endswith(f"again {i}") for i, s in enumerate(r["samples"]))
    summary = json.loads((run_dir / "summary.json").read_text())
    before = summary["before_training"]  # task.evaluate_before: the starting model (LoRA B = 0: the base model)
    assert math.isclose(before["perplexity"], math.exp(before["loss"]), rel_tol=1e-6) and len(before["samples"]) == 3
    assert "before training" in proc.stdout + proc.stderr

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from veil.conf.schema import ModelConfig
    from veil.server.app import load_global
    from veil.task.causal_lm import build_causal_lm
    from veil.task.model import set_trainable, trainable_names

    exported = AutoModelForCausalLM.from_pretrained(str(run_dir / "model"), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "model"), local_files_only=True)
    reference = build_causal_lm(ModelConfig(tiny=True, max_length=48, lora_r=4, lora_alpha=8, head_init="random"), seed=0)
    set_trainable(reference, load_global(run_dir / "global_trainable.npz", trainable_names(reference)))
    reference.eval()
    from veil.task import get_task
    from veil.task.causal_lm import PromptExamples, tokenize_examples

    start = build_causal_lm(ModelConfig(tiny=True, max_length=48, lora_r=4, lora_alpha=8, head_init="random"), seed=0)
    pairs = [json.loads(line) for line in test.read_text().splitlines()]
    held_out = tokenize_examples(tokenizer, PromptExamples([p["prompt"] for p in pairs], [p["completion"] for p in pairs]),
                                 max_length=48, chat=True)
    want = get_task("causal_lm").evaluate(start, held_out, device=torch.device("cpu"))["loss"]
    assert math.isclose(before["loss"], want, rel_tol=1e-5), (before["loss"], want)
    enc = tokenizer(["my card was lost", "why a fee"], return_tensors="pt", padding=True)
    ids = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(exported(**ids).logits, reference(**ids).logits, atol=1e-5, rtol=1e-5)
        out = exported.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1], "the exported model generates"
    card = (run_dir / "model" / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "δ" in card


def test_causal_lm_run_on_a_local_gpt2_directory(tmp_path: Path) -> None:
    """Any local decoder directory, here a 2-layer GPT-2 (learned positions, Conv1D, tied LM head) saved with
    MiniLM's tokenizer: LoRA targets found automatically, one DP + SecAgg+ round, and the exported model gives the
    global weights' logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from veil.conf.schema import ModelConfig
    from veil.server.app import load_global
    from veil.task.causal_lm import build_causal_lm
    from veil.task.model import default_model_dir, set_trainable, trainable_names

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir()), local_files_only=True)
    gpt2_dir = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                               bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                               pad_token_id=tokenizer.pad_token_id)).save_pretrained(gpt2_dir)
    tokenizer.save_pretrained(gpt2_dir)
    train, test = _jsonl(tmp_path / "train.jsonl", 10, ""), _jsonl(tmp_path / "test.jsonl", 2, "again ")
    run_dir = tmp_path / "run"
    proc = run_veil(["simulate", "task=causal_lm", "model=tiny_llama", "model.tiny=false", f"model.path={gpt2_dir}",
                     "data=csv", f"data.train_path={train}", f"data.test_path={test}", "federation.num_clients=3",
                     "federation.rounds=1", "federation.batch_size=8", "federation.local_steps=2",
                     "federation.partitioner=iid", "privacy=dp_sgd", "secagg=secaggplus", ONE_ACTOR, f"hydra.run.dir={run_dir}"],
                    timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = metrics(run_dir)
    assert row["clients"] == 3 and row["epsilon_max"] > 0 and math.isclose(row["perplexity"], math.exp(row["loss"]),
                                                                           rel_tol=1e-6)
    reference = build_causal_lm(ModelConfig(tiny=False, path=str(gpt2_dir), max_length=48, lora_r=4, lora_alpha=8,
                                            head_init="random"), seed=0)
    names = trainable_names(reference)
    assert any("c_attn" in n for n in names), "lora_targets=auto picks GPT-2's attention projection"
    set_trainable(reference, load_global(run_dir / "global_trainable.npz", names))
    exported = AutoModelForCausalLM.from_pretrained(str(run_dir / "model"), local_files_only=True).eval()
    enc = tokenizer(["my card was lost", "why a fee"], return_tensors="pt", padding=True)
    ids = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(exported(**ids).logits, reference.eval()(**ids).logits, atol=1e-5, rtol=1e-5)
