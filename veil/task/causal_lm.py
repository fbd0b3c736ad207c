"""Causal language modelling (instruction tuning) under DP-SGD.

Data: rows with ``data.prompt_column`` and ``data.completion_column`` (loss on the completion tokens only; the
prompt goes through the tokenizer's chat template when it has one and ``task.chat_template`` is on), or rows with
only ``data.text_column`` (loss on every token). CSV, TSV or JSONL, read by :mod:`veil.task.data`.

The per-example loss is the mean cross-entropy over that example's counted tokens (completion tokens plus the end
token), so DP-SGD's per-sample clipping bounds each *example*'s contribution by C whatever its length; prompt and
padding tokens carry label -100 and never contribute. The server evaluates the token-weighted held-out loss, its
perplexity, when every completion is short (``task.generate_max_tokens``) the exact-match accuracy of greedy
generation, and, when the completions form a closed set (``data.choices``), the log-likelihood choice among them
(``choice_accuracy``, :mod:`veil.task.choices`).

Over 300 lines: one task behind the task interface (encoding, per-example loss, perplexity, generation, the closed-
set choice wiring); the choice scoring itself is :mod:`veil.task.choices`. A split would put the data encoding in
its own module.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from veil.conf.schema import DataConfig, ModelConfig, VeilConfig
from veil.errors import DataFileError, ModelError
from veil.task.choices import choice_accuracy, choice_tensors, closed_set
from veil.task.data import read_rows
from veil.task.model import export_model, load_tokenizer, model_dir, pad_token_for, with_lora

IGNORE = -100  # label of a token that is not counted (prompt, padding)


@dataclass(frozen=True)
class PromptExamples:
    """Prompts and completions in file order; a text-only file has empty prompts (every token counted)."""

    prompts: list[str]
    completions: list[str]

    def __len__(self) -> int:
        return len(self.completions)

    def subset(self, idx: np.ndarray) -> PromptExamples:
        return PromptExamples([self.prompts[i] for i in idx], [self.completions[i] for i in idx])


def read_prompts(path: str, data: DataConfig) -> PromptExamples:
    """Prompt/completion rows, or text rows, of one data file."""
    rows = read_rows(path, data)
    if not rows:
        raise DataFileError(f"data file {path} has no examples; give a file with at least one row of data")
    columns = set(rows[0])
    if {data.prompt_column, data.completion_column} <= columns:
        prompts = [data.prompt_prefix + r.get(data.prompt_column, "").strip() for r in rows]
        completions = [r.get(data.completion_column, "").strip() for r in rows]
    elif data.text_column in columns:
        prompts, completions = [""] * len(rows), [r.get(data.text_column, "").strip() for r in rows]
    else:
        raise DataFileError(
            f"data file {path} has neither {data.prompt_column!r}+{data.completion_column!r} nor {data.text_column!r} "
            f"columns (columns: {', '.join(sorted(columns))}); set data.prompt_column/data.completion_column or "
            "data.text_column"
        )
    for i, completion in enumerate(completions, start=1):
        if not completion:
            raise DataFileError(f"data file {path} row {i} has an empty completion/text; fill it or drop the row")
    return PromptExamples(prompts, completions)


def _ids(out: object) -> list[int]:
    ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out  # type: ignore[index]
    return [int(i) for i in ids]


def _end_id(tokenizer: object) -> int | None:
    for attr in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return None


def encode_prompt(tokenizer: object, prompt: str, *, chat: bool) -> list[int]:
    """The prompt's token ids, ending where the model's answer starts (chat template: the assistant turn)."""
    if not prompt:
        bos = getattr(tokenizer, "bos_token_id", None)
        return [int(bos)] if bos is not None else []
    if chat and getattr(tokenizer, "chat_template", None):
        return _ids(tokenizer.apply_chat_template(  # type: ignore[attr-defined]
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True))
    bos = getattr(tokenizer, "bos_token_id", None)
    return ([int(bos)] if bos is not None else []) + _ids(tokenizer(prompt + "\n", add_special_tokens=False))  # type: ignore[operator]


def encode_completion(tokenizer: object, completion: str) -> list[int]:
    end = _end_id(tokenizer)
    return _ids(tokenizer(completion, add_special_tokens=False)) + ([end] if end is not None else [])  # type: ignore[operator]


def _pad(rows: list[list[int]], value: int, *, left: bool = False, width: int = 0) -> torch.Tensor:
    width = max(1, width, max(map(len, rows)))
    return torch.tensor([[value] * (width - len(r)) + r if left else r + [value] * (width - len(r)) for r in rows])


def tokenize_examples(tokenizer: object, examples: PromptExamples, *, max_length: int, chat: bool,
                      generate_max_tokens: int = 0, fixed_length: bool = False) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask``/``labels`` (N, T), right-padded, labels -100 on prompt and pad tokens; T is
    the longest sequence, or with ``fixed_length`` ``max_length`` itself (a deployed node: review 2026-12-07, N6).

    With ``generate_max_tokens`` > 0 and every completion that short, also ``gen_ids``/``gen_mask`` (N, P): the
    prompts left-padded for batched greedy generation, ``target_ids`` (N, L): the completions (-100 padded), and
    ``prompt_text_ids`` (N, Q): the prompts' own tokens without chat template (-100 padded), to show samples.
    """
    pad = int(getattr(tokenizer, "pad_token_id", None) or 0)
    seqs, labels, prompts, targets = [], [], [], []
    for prompt, completion in zip(examples.prompts, examples.completions, strict=True):
        p, c = encode_prompt(tokenizer, prompt, chat=chat), encode_completion(tokenizer, completion)
        c = c[:max_length]
        p = p[max(0, len(p) - (max_length - len(c))):] if max_length > len(c) else []  # keep the prompt's end
        seqs.append(p + c)
        labels.append([IGNORE] * len(p) + c)
        prompts.append(p)
        targets.append(c[:-1] if _end_id(tokenizer) is not None else c)
    width = max_length if fixed_length else 0
    ids = _pad(seqs, pad, width=width)
    out = {"input_ids": ids, "attention_mask": _pad([[1] * len(s) for s in seqs], 0, width=width),
           "labels": _pad(labels, IGNORE, width=width)}
    if generate_max_tokens > 0 and all(examples.prompts) and max(map(len, targets)) <= generate_max_tokens:
        out["gen_ids"], out["gen_mask"] = _pad(prompts, pad, left=True), _pad([[1] * len(p) for p in prompts], 0, left=True)
        out["target_ids"] = _pad(targets, IGNORE)
        out["prompt_text_ids"] = _pad([_ids(tokenizer(p, add_special_tokens=False))  # type: ignore[operator]
                                       for p in examples.prompts], IGNORE)
    return out


def token_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example sums of next-token cross-entropy over counted tokens, and the counts; both (B,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    targets = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
    nll = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE,
                                      reduction="none")  # (B, T-1), 0 where ignored
    counted = (targets != IGNORE).to(nll.dtype)
    return (nll * counted).sum(dim=1), counted.sum(dim=1)


class CausalLMTask:
    """See :class:`veil.task.base.Task`."""

    name = "causal_lm"
    pipeline_tag = "text-generation"

    def labels(self, cfg: VeilConfig) -> list[str]:
        """The closed set of completions (``data.choices``), fixed once at launch; empty when there is none."""
        path = cfg.data.test_path or cfg.data.train_path
        return closed_set(cfg.data.choices, lambda: read_prompts(path, cfg.data).completions)

    def read(self, path: str, cfg: VeilConfig, data: DataConfig | None = None) -> PromptExamples:
        return read_prompts(path, data or cfg.data)

    def node_data(self, data: DataConfig, *, text_column: str | None, label_column: str | None) -> DataConfig:
        """A node names its file's columns with ``--text-column`` (the prompt, or the only column of a text-only
        file) and ``--label-column`` (the completion): one file of queries and intents serves both tasks."""
        return dataclasses.replace(data, prompt_column=text_column or data.prompt_column,
                                   completion_column=label_column or data.completion_column,
                                   text_column=text_column or data.text_column)

    def partition_names(self, examples: PromptExamples, labels: list[str]) -> list[str]:  # type: ignore[override]
        return sorted(set(examples.completions))

    def partition_ids(self, examples: PromptExamples, labels: list[str], *, path: str) -> np.ndarray:  # type: ignore[override]
        """The completion's index among the distinct completions (short answers such as intents skew by it)."""
        index = {name: i for i, name in enumerate(sorted(set(examples.completions)))}
        return np.array([index[c] for c in examples.completions], dtype=np.int64)

    def tensors(self, examples: PromptExamples, labels: list[str], cfg: VeilConfig, *,  # type: ignore[override]
                path: str, evaluation: bool = False, fixed_length: bool = False) -> dict[str, torch.Tensor]:
        tokenizer = load_tokenizer(cfg.model)
        out = tokenize_examples(tokenizer, examples, max_length=cfg.model.max_length, chat=cfg.task.chat_template,
                                generate_max_tokens=cfg.task.generate_max_tokens if evaluation else 0,
                                fixed_length=fixed_length)
        if evaluation and labels and all(examples.prompts):  # a closed set: choice_accuracy each round
            prompts = [encode_prompt(tokenizer, p, chat=cfg.task.chat_template) for p in examples.prompts]
            out.update(choice_tensors(prompts, examples.completions, labels,
                                      lambda c: encode_completion(tokenizer, c), max_length=cfg.model.max_length))
        return out

    def build_model(self, cfg: VeilConfig, labels: list[str], *, seed: int, dropout: float | None = None) -> nn.Module:
        return build_causal_lm(cfg.model, seed=seed)

    def per_example_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        total, count = token_losses(model, batch)
        return total / count.clamp(min=1)  # (B,): mean over each example's own counted tokens

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: dict[str, torch.Tensor], *, device: torch.device,
                 cfg: VeilConfig | None = None, batch_size: int = 32) -> dict[str, Any]:
        """Token-weighted loss, perplexity, greedy exact match; with ``cfg``, ``samples``: the greedy generations
        for the first ``cfg.task.eval_samples`` held-out prompts (the coordinator's own data, not a node's)."""
        model.eval()
        n = int(data["input_ids"].shape[0])
        nll, tokens, correct, generated = 0.0, 0.0, 0, []
        for start in range(0, n, batch_size):
            batch = {k: v[start:start + batch_size].to(device) for k, v in data.items() if not k.startswith("choice_")}
            total, count = token_losses(model, batch)
            nll, tokens = nll + float(total.sum()), tokens + float(count.sum())
            if "gen_ids" in batch:
                rows = greedy_completions(model, batch)
                correct, generated = correct + _hits(rows, batch["target_ids"]), generated + rows
        loss = nll / max(tokens, 1.0)
        out: dict[str, Any] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                               "accuracy": correct / max(n, 1) if "gen_ids" in data else float("nan")}
        if "choice_ids" in data:
            out["choice_accuracy"] = choice_accuracy(model, data)
        if cfg is not None and cfg.task.eval_samples > 0 and generated:
            out["samples"] = sample_generations(load_tokenizer(cfg.model), data, generated[:cfg.task.eval_samples])
        return out

    def export(self, model: nn.Module, cfg: VeilConfig, out_dir: Path) -> Path:
        return export_model(model, load_tokenizer(cfg.model), out_dir)

    def baseline(self, cfg: VeilConfig) -> float:
        return float("nan")

    def check_tokenizer(self, tokenizer: object, config: dict[str, Any], path: Path) -> None:
        """An end-of-sequence token is needed: without one a completion has no end to learn (one line)."""
        if _end_id(tokenizer) is not None:
            return
        eos = config.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if isinstance(eos, int):
            token = tokenizer.convert_ids_to_tokens(eos)  # type: ignore[attr-defined]
            raise ModelError(f"model directory {path}: the tokenizer has no eos_token although config.json's "
                             f"eos_token_id is {eos}; set \"eos_token\": {json.dumps(token)} in tokenizer_config.json")
        raise ModelError(f"model directory {path}: neither the tokenizer nor config.json names an end-of-sequence "
                         "token (eos_token_id is null), so a fine-tuned model could never learn where a completion "
                         "ends; set \"eos_token\" in tokenizer_config.json to a token of the vocabulary and "
                         "eos_token_id in config.json to its id")

    def check_files(self, cfg: VeilConfig) -> None:
        for path in (cfg.data.train_path, cfg.data.test_path):
            if path:  # no test file: the split's test rows come from the training file
                read_prompts(path, cfg.data)


def greedy_completions(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Each prompt's greedy generation from ``gen_ids`` (at most one token past the longest target), cut before
    the first end or pad token; a row equal to its ``target_ids`` (without -100) is an exact match."""
    width = int(batch["target_ids"].shape[1])
    config = getattr(model, "config", None)
    pad = getattr(config, "pad_token_id", None)
    out = model.generate(input_ids=batch["gen_ids"], attention_mask=batch["gen_mask"], max_new_tokens=width + 1,
                         do_sample=False, pad_token_id=pad)  # type: ignore[operator]
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ends = set(eos if isinstance(eos, list) else [eos]) | {pad}
    rows = []
    for row in out[:, batch["gen_ids"].shape[1]:].tolist():  # (B, <= L+1) new tokens
        stop = next((i for i, t in enumerate(row) if t in ends), None)
        rows.append(row[:stop] if stop is not None else row + [IGNORE])  # no end within L+1 tokens: never a match
    return rows


def exact_matches(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """How many greedy generations from ``gen_ids`` are exactly ``target_ids`` and then stop."""
    return _hits(greedy_completions(model, batch), batch["target_ids"])


def _hits(rows: list[list[int]], targets: torch.Tensor) -> int:
    return sum(r == [t for t in want if t != IGNORE] for r, want in zip(rows, targets.tolist(), strict=True))


def sample_generations(tokenizer: object, data: dict[str, torch.Tensor], rows: list[list[int]]) -> list[dict[str, str]]:
    """``{"prompt", "generated", "expected"}`` text of the first ``len(rows)`` evaluation examples."""
    def text(ids: list[int]) -> str:
        return str(tokenizer.decode([t for t in ids if t >= 0], skip_special_tokens=True)).strip()  # type: ignore[attr-defined]

    return [{"prompt": text(data["prompt_text_ids"][i].tolist()), "generated": text(row),
             "expected": text(data["target_ids"][i].tolist())} for i, row in enumerate(rows)]


def build_causal_lm(cfg: ModelConfig, *, seed: int) -> nn.Module:
    """``AutoModelForCausalLM`` from ``model.path`` (or a tiny Llama for tests), with LoRA when ``model.lora``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(seed)
    if cfg.tiny:
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,  # type: ignore[arg-type]
                             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=_end_id(tokenizer),  # type: ignore[attr-defined]
                             bos_token_id=getattr(tokenizer, "bos_token_id", None), tie_word_embeddings=True)
        model: nn.Module = LlamaForCausalLM(config)
        model.generation_config.eos_token_id = _end_id(tokenizer)
    else:
        path = model_dir(cfg)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot load a causal LM from {path} ({str(err).splitlines()[0]}); task=causal_lm needs "
                             "a decoder such as GPT-2, Llama or Qwen2 in model.path") from err
    pad_token_for(tokenizer, model)
    _stop_at_end(model, _end_id(tokenizer))
    if cfg.lora:
        return with_lora(model, cfg, task_type="CAUSAL_LM", seed=seed)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def _stop_at_end(model: nn.Module, end: int | None) -> None:
    """Generation stops at the token training puts after every completion (the tokenizer's end), and at the
    generation config's own end tokens: a directory whose two disagree otherwise never stops where it learned to."""
    generation = getattr(model, "generation_config", None)
    if generation is None or end is None:
        return
    eos = generation.eos_token_id
    ends = [] if eos is None else list(eos) if isinstance(eos, list) else [eos]
    if end not in ends:
        generation.eos_token_id = ends + [end] if ends else end


TASK = CausalLMTask()
