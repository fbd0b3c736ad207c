"""Closed-set accuracy for generative runs: the log-likelihood choice among known completions (issue 26, scope 3).

When every completion comes from a set the coordinator knows (``data.choices``, or the distinct completions of its
evaluation file when some repeat), greedy exact match undersells what a model learned: a small model rarely spells
an intent name token for token, yet it may rank the right one first. The standard measure for such a set (as in
multiple-choice evaluation of language models, e.g. Brown et al., arXiv:2005.14165 §2.4) scores each candidate by
the log-likelihood the model gives its tokens after the prompt, and counts the argmax: ``choice_accuracy``.

A candidate's tokens are what training counts for a completion (:func:`veil.task.causal_lm.encode_completion`: the
completion and the end token), so "card" and "card_lost" differ by where the model wants to stop. The prompt runs
once per example; its key/value cache is repeated over the candidates.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from veil.errors import ConfigError

__all__ = ["MAX_CHOICES", "choice_accuracy", "choice_scores", "closed_set", "parse_choices"]

MAX_CHOICES = 500  # more distinct completions than this are free text, not a closed set (and cost K per example)
IGNORE = -100


def parse_choices(value: str) -> list[str] | None:
    """``data.choices``: ``auto`` (None: from the evaluation file), ``none`` ([]), or a JSON list of strings."""
    text = value.strip()
    if text in ("", "auto"):
        return None
    if text == "none":
        return []
    try:
        names = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"data.choices is not auto, none or a JSON list of strings ({err.msg}); "
                          "give e.g. data.choices='[\"yes\",\"no\"]'") from err
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) and n.strip() for n in names):
        raise ConfigError("data.choices must be a JSON list of at least two non-empty strings; or auto, or none")
    return [n.strip() for n in names]


def closed_set(choices: str, completions: Callable[[], list[str]]) -> list[str]:
    """The run's candidate completions: ``data.choices`` as given, else the sorted distinct ``completions()`` when
    they form a closed set (some completion repeats, at most :data:`MAX_CHOICES`), else none."""
    given = parse_choices(choices)
    if given is not None:
        return given
    seen = completions()
    distinct = sorted(set(seen))
    return distinct if 2 <= len(distinct) <= MAX_CHOICES and len(distinct) < len(seen) else []


@torch.no_grad()
def choice_scores(model: nn.Module, prompt: list[int], candidates: list[list[int]]) -> torch.Tensor:
    """Log-likelihood of each candidate's tokens after ``prompt``: sum_t log p(c_t | prompt, c_<t); (K,).

    The prompt runs once; its cache is repeated K times and the candidates (right-padded: padding comes after every
    counted token, so causal attention keeps it out of them) run as one batch.
    """
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
    first = out.logits[0, -1].float().log_softmax(dim=-1)  # (V,): the candidates' first token
    k, width = len(candidates), max(map(len, candidates))
    ids = torch.tensor([c + [c[-1]] * (width - len(c)) for c in candidates], device=device)  # (K, L)
    counted = torch.tensor([[1.0] * len(c) + [0.0] * (width - len(c)) for c in candidates], device=device)
    cache = out.past_key_values
    scores = first[ids[:, 0]]  # (K,)
    if width == 1:
        return scores.cpu()
    if cache is not None and hasattr(cache, "batch_repeat_interleave"):
        cache.batch_repeat_interleave(k)
        mask = torch.ones(k, len(prompt) + width - 1, dtype=torch.long, device=device)
        logits = model(input_ids=ids[:, :-1], attention_mask=mask, past_key_values=cache).logits  # (K, L-1, V)
    else:  # no reusable cache: the whole sequence per candidate
        full = torch.cat([torch.tensor([prompt], device=device).expand(k, -1), ids[:, :-1]], dim=1)
        logits = model(input_ids=full).logits[:, len(prompt):]  # (K, L-1, V)
    logp = logits.float().log_softmax(dim=-1).gather(2, ids[:, 1:, None])[..., 0]  # (K, L-1)
    return (scores + (logp * counted[:, 1:]).sum(dim=1)).cpu()


def choice_accuracy(model: nn.Module, data: dict[str, torch.Tensor]) -> float:
    """Share of examples whose own completion (``choice_target``) scores highest among ``choice_ids``' candidates.

    ``data``: ``choice_prompt`` (N, P) the prompts' token ids (-100 padded), ``choice_ids`` (N, K, L) the candidates
    (-100 padded; the same K for every row), ``choice_target`` (N,) the index of each example's completion among
    them (-1: not among them, never a hit).
    """
    was_training = model.training
    model.eval()
    candidates = [[t for t in row if t != IGNORE] for row in data["choice_ids"][0].tolist()]
    hits = 0
    for prompt_row, target in zip(data["choice_prompt"].tolist(), data["choice_target"].tolist(), strict=True):
        prompt = [t for t in prompt_row if t != IGNORE]
        hits += int(target >= 0 and int(choice_scores(model, prompt, candidates).argmax()) == target)
    model.train(was_training)
    return hits / max(len(data["choice_target"]), 1)


def choice_tensors(prompts: list[list[int]], completions: list[str], choices: list[str],
                   encode: Callable[[str], list[int]], *, max_length: int) -> dict[str, Any]:
    """``choice_prompt`` (N, P), ``choice_ids`` (N, K, L) and ``choice_target`` (N,) (see :func:`choice_accuracy`);
    each prompt keeps its end so that prompt and longest candidate fit ``max_length``."""
    cands = [encode(c)[:max_length] for c in choices]
    width = max(map(len, cands))
    room = max(1, max_length - width)
    cut = [p[-room:] if p else p for p in prompts]
    index = {c: i for i, c in enumerate(choices)}
    pad = max(1, max(map(len, cut)))
    grid = torch.tensor([c + [IGNORE] * (width - len(c)) for c in cands])  # (K, L)
    return {"choice_prompt": torch.tensor([p + [IGNORE] * (pad - len(p)) for p in cut]),
            "choice_ids": grid.unsqueeze(0).expand(len(prompts), -1, -1).contiguous(),
            "choice_target": torch.tensor([index.get(c, -1) for c in completions])}
