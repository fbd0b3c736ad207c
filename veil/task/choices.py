"""Closed-set accuracy for generative runs: the log-likelihood choice among known completions (issue 26, scope 3).

When every completion comes from a set the coordinator knows (``data.choices``, or the distinct completions of its
evaluation file when some repeat), greedy exact match undersells what a model learned: a small model rarely spells
an intent name token for token, yet it may rank the right one first. The standard measure for such a set (as in
multiple-choice evaluation of language models, e.g. Brown et al., arXiv:2005.14165 §2.4) scores each candidate by
the log-likelihood the model gives its tokens after the prompt, and counts the argmax: ``choice_accuracy``.

A candidate's tokens are what training counts for a completion (:func:`veil.task.causal_lm.encode_completion`: the
completion and the end token), so "card" and "card_lost" differ by where the model wants to stop. The prompt runs
once per example; the candidates then run after its key/value cache as one packed prefix tree (each shared prefix,
such as "card", once) where the model family allows a custom attention mask (:func:`packs`), else as one padded
batch over the cache repeated K times.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from veil.errors import ConfigError

__all__ = ["MAX_CHOICES", "choice_accuracy", "choice_scores", "closed_set", "packs", "parse_choices", "prefix_tree"]

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


PACKED_FAMILIES = frozenset({"gpt2", "llama", "qwen2"})  # model_type values whose packed scores the tests check


@torch.no_grad()
def choice_scores(model: nn.Module, prompt: list[int], candidates: list[list[int]]) -> torch.Tensor:
    """Log-likelihood of each candidate's tokens after ``prompt``: sum_t log p(c_t | prompt, c_<t); (K,).

    The prompt runs once. Where :func:`packs` allows, the candidates then run as ONE sequence after the prompt's
    cache, each distinct prefix once (:func:`_packed_rest`: 382 positions for the 77 BANKING77 intent names on
    SmolLM2's tokenizer, where a padded batch holds 1,309); elsewhere the cache is repeated K times and the
    candidates run as one right-padded batch (:func:`_padded_rest`). Both give the same scores up to float rounding.
    """
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
    first = out.logits[0, -1].float().log_softmax(dim=-1)  # (V,): the candidates' first token
    scores = first[torch.tensor([c[0] for c in candidates], device=device)]  # (K,)
    if max(map(len, candidates)) == 1:
        return scores.cpu()
    rest = _packed_rest if packs(model, out.past_key_values) else _padded_rest
    return (scores + rest(model, prompt, candidates, out.past_key_values)).cpu()


def packs(model: nn.Module, cache: object) -> bool:
    """Whether the candidates may run as one packed sequence with a custom mask after the prompt's ``cache``.

    That needs a model that takes a ready 4D additive attention mask as given and places every token by explicit
    ``position_ids``. In transformers 5 the Llama, Qwen2 and GPT-2 models build their masks through
    ``masking_utils``, which returns a 4D mask unchanged, and read positions (rotary or learned) from
    ``position_ids``; the eager and SDPA attention kernels add such a mask. Other families are not assumed to
    (ALiBi biases, positions derived from a 2D mask, ...: the scores would be silently wrong), flash and flex
    attention take no dense mask, and a sliding-window layer would lose its window to the custom mask: all of
    those keep the padded batch.
    """
    from transformers.cache_utils import Cache

    config = getattr(model, "config", None)
    return (isinstance(cache, Cache) and getattr(config, "model_type", None) in PACKED_FAMILIES
            and getattr(config, "_attn_implementation", None) in ("eager", "sdpa")
            and all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or ()))


def prefix_tree(candidates: list[list[int]]) -> tuple[list[int], list[int], list[list[int]]]:
    """The candidates' inputs (every token but each one's last) as a prefix tree, each distinct prefix one node.

    Returns ``tokens`` and ``parents`` (-1: a root, right after the prompt) of the nodes, parents before children,
    and each candidate's ``path``: its node for each of its inputs, in order (empty for a one-token candidate).
    """
    index: dict[tuple[int, int], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    paths = []
    for cand in candidates:
        path: list[int] = []
        for token in cand[:-1]:
            key = (path[-1] if path else -1, token)
            if key not in index:
                index[key] = len(tokens)
                tokens.append(token)
                parents.append(key[0])
            path.append(index[key])
        paths.append(path)
    return tokens, parents, paths


def _packed_rest(model: nn.Module, prompt: list[int], candidates: list[list[int]], cache: Any) -> torch.Tensor:
    """sum_{t>=1} log p(c_t | prompt, c_<t) of each candidate, (K,), from one pass over the prefix tree's N nodes
    after the prompt's cache: a node sees the whole prompt, its ancestors and itself; it sits at position
    len(prompt) + its depth, as that token would in the candidate's own sequence."""
    device = next(model.parameters()).device
    tokens, parents, paths = prefix_tree(candidates)
    n, p = len(tokens), len(prompt)
    sees = torch.zeros(n, n, dtype=torch.bool)
    depth = [0] * n
    for i, parent in enumerate(parents):
        if parent >= 0:
            sees[i] = sees[parent]
            depth[i] = depth[parent] + 1
        sees[i, i] = True
    allowed = torch.cat([torch.ones(n, p, dtype=torch.bool), sees], dim=1)  # (N, P + N)
    dtype = model.get_input_embeddings().weight.dtype  # type: ignore[operator]
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    positions = torch.tensor([[p + d for d in depth]], device=device)
    logits = model(input_ids=torch.tensor([tokens], device=device), attention_mask=mask[None, None].to(device),
                   position_ids=positions, past_key_values=cache).logits[0]  # (N, V)
    logp = logits.float().log_softmax(dim=-1)
    rows = torch.tensor([node for path in paths for node in path], device=device, dtype=torch.long)
    nexts = torch.tensor([tok for cand in candidates for tok in cand[1:]], device=device, dtype=torch.long)
    owner = torch.tensor([k for k, c in enumerate(candidates) for _ in c[1:]], device=device, dtype=torch.long)
    return torch.zeros(len(candidates), device=device).index_add_(0, owner, logp[rows, nexts])


def _padded_rest(model: nn.Module, prompt: list[int], candidates: list[list[int]], cache: Any) -> torch.Tensor:
    """As :func:`_packed_rest`, from the prompt's cache repeated K times and the candidates as one right-padded
    batch (K, L) (padding comes after every counted token, so causal attention keeps it out of them); without a
    reusable cache, the whole sequence per candidate."""
    device = next(model.parameters()).device
    k, width = len(candidates), max(map(len, candidates))
    ids = torch.tensor([c + [c[-1]] * (width - len(c)) for c in candidates], device=device)  # (K, L)
    counted = torch.tensor([[1.0] * len(c) + [0.0] * (width - len(c)) for c in candidates], device=device)
    if cache is not None and hasattr(cache, "batch_repeat_interleave"):
        cache.batch_repeat_interleave(k)
        mask = torch.ones(k, len(prompt) + width - 1, dtype=torch.long, device=device)
        logits = model(input_ids=ids[:, :-1], attention_mask=mask, past_key_values=cache).logits  # (K, L-1, V)
    else:  # no reusable cache: the whole sequence per candidate
        full = torch.cat([torch.tensor([prompt], device=device).expand(k, -1), ids[:, :-1]], dim=1)
        logits = model(input_ids=full).logits[:, len(prompt):]  # (K, L-1, V)
    logp = logits.float().log_softmax(dim=-1).gather(2, ids[:, 1:, None])[..., 0]  # (K, L-1)
    return (logp * counted[:, 1:]).sum(dim=1)


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
