"""Canary *records* for ``veil audit --score loss`` and ``--score gradient`` (sample level): drawn, planted, scored.

Steinke, Nasr and Jagielski (NeurIPS 2023, arXiv:2305.08846), the black-box form: (1) make m canary records (random
words, random labels) and decide from OS entropy, independently with probability 1/2, which are included, each in a
random client's data; (2) run the federation with the included canaries planted into the simulated clients' shards
(:attr:`veil.task.shards.AuditPlan.planted_examples`, an argument of the simulation that the simulated nodes learn
from their node configs, never the run config; the node code sees one list of examples, so it cannot treat a canary
differently);
(3) score every canary by the final published model's loss on it (lower loss: more likely trained on; what the
published model alone reveals) or, white-box, by each round's global update against the canary's gradient
(:mod:`veil.audit.whitebox`). Guesses and the bound: :mod:`veil.privacy.audit_bound`; the whole procedure and the
other kinds of canary: :mod:`veil.audit.cli`.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from veil.atomic import atomic_write
from veil.audit.result import SCORES, AuditResult, claimed_epsilon, write_outputs
from veil.errors import ConfigError

log = logging.getLogger("veil.audit")


@dataclass(frozen=True)
class Canaries:
    """m canary records; ``included`` (m,) and ``partition`` (m,) are decided from OS entropy."""

    texts: list[str]
    labels: list[str]
    included: np.ndarray  # (m,) bool
    partition: np.ndarray  # (m,) int: the simulated client an included canary is planted in


def make_canaries(*, count: int, labels: Sequence[str], vocabulary: Sequence[str], num_clients: int,
                  words: int = 8, rng: np.random.Generator | None = None) -> Canaries:
    """``count`` canaries of ``words`` random vocabulary words with random labels, each included with probability
    1/2. ``rng`` defaults to a generator seeded from OS entropy, never from the run's seed (the run config is
    known to the nodes; an inclusion they could recompute would be no secret)."""
    if count < 2:
        raise ConfigError(f"--canaries={count} is invalid: expected at least 2 (the paper uses about 1,000)")
    rng = rng or np.random.default_rng(secrets.randbits(128))
    pool = sorted(vocabulary)
    distinct = count * words <= len(pool)  # unique words per canary while the vocabulary lasts
    picks = rng.choice(len(pool), size=count * words, replace=not distinct).reshape(count, words)  # (m, words)
    return Canaries(
        texts=[" ".join(pool[j] for j in row) for row in picks],
        labels=[str(labels[i]) for i in rng.integers(0, len(labels), size=count)],
        included=rng.random(count) < 0.5,
        partition=rng.integers(0, num_clients, size=count),
    )


def write_planted(canaries: Canaries, path: Path) -> int:
    """The included canaries, one JSONL line each, for :func:`veil.task.shards.with_planted`; returns the count."""
    rows = [json.dumps({"partition": int(p), "text": t, "label": lab})
            for t, lab, inc, p in zip(canaries.texts, canaries.labels, canaries.included, canaries.partition, strict=True)
            if inc]
    atomic_write(path, "\n".join(rows) + "\n")
    return len(rows)


def canary_vocabulary(cfg: Any) -> list[str]:
    """Whole-word entries of the model's tokenizer vocabulary (letters only, three or more), in token-id order.

    A fast tokenizer's ``get_vocab()`` comes out of a hash map in an order that changes with every process; the
    list is put in token-id order so that it is the same in every process. (:func:`make_canaries` sorts its pool
    and draws from OS entropy anyway; a caller that takes a slice of this list, as the white-box test does, got a
    different slice in every process.)"""
    from veil.task.model import load_tokenizer

    vocab = load_tokenizer(cfg.model).get_vocab()  # type: ignore[attr-defined]
    return [w for w in sorted(vocab, key=vocab.__getitem__) if w.isascii() and w.isalpha() and len(w) >= 3]


def canary_losses(cfg: Any, labels: list[str], out_dir: Path, canaries: Canaries, *, batch: int = 256) -> np.ndarray:
    """Loss of the run's final global model on every canary, (m,)."""
    import torch

    from veil.server.app import load_global
    from veil.task.data import TextExamples, encode_labels, tokenize
    from veil.task.model import build_model, load_tokenizer, resolve_device, set_trainable, trainable_names

    device = resolve_device(cfg.device)
    model = build_model(cfg.model, labels, seed=cfg.federation.seed)
    set_trainable(model, load_global(out_dir / "global_trainable.npz", trainable_names(model)))
    model.to(device).eval()
    tok = load_tokenizer(cfg.model)
    ids = torch.as_tensor(encode_labels(TextExamples(canaries.texts, canaries.labels), labels, path="canaries"))
    out = []
    with torch.no_grad():
        for start in range(0, len(canaries.texts), batch):
            enc = tokenize(tok, canaries.texts[start:start + batch], max_length=cfg.model.max_length)
            logits = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)).logits
            out.append(torch.nn.functional.cross_entropy(logits, ids[start:start + batch].to(device), reduction="none"))
    return torch.cat(out).float().cpu().numpy()  # (m,)


def run_record_audit(cfg: Any, out_dir: Path, *, canaries: int, guesses: int, confidence: float, score: str,
                     client_mods: Sequence[Any] = (), rng: np.random.Generator | None = None) -> AuditResult:
    """The canary-record audit of :func:`veil.audit.cli.run_audit` (same arguments; ``score`` loss or gradient)."""
    from veil.privacy.audit_bound import epsilon_lower_bound, guess_top_bottom
    from veil.audit.nodes import audited_client_app
    from veil.simulation import simulate
    from veil.task.shards import AuditPlan

    labels: list[str] = json.loads(cfg.data.labels)
    drawn = make_canaries(count=canaries, labels=labels, vocabulary=canary_vocabulary(cfg),
                          num_clients=cfg.federation.num_clients, rng=rng)
    planted = out_dir / "audit" / "planted.jsonl"
    planted.parent.mkdir(parents=True, exist_ok=True)
    write_planted(drawn, planted)
    log.info("audit: %d canaries, %d planted in %d clients' data", canaries, int(drawn.included.sum()),
             cfg.federation.num_clients)
    simulate(cfg, out_dir, client_app=audited_client_app(client_mods=client_mods),
             audit=AuditPlan(planted_examples=str(planted)))
    losses = canary_losses(cfg, labels, out_dir, drawn)
    scores = -losses
    if score == "gradient":
        from veil.audit.whitebox import gradient_scores

        scores = gradient_scores(cfg, labels, out_dir, drawn.texts, drawn.labels)
    result = guess_top_bottom(scores, drawn.included, k_in=guesses, k_out=guesses)
    bound = epsilon_lower_bound(m=result.m, r=result.r, v=result.v, delta=cfg.privacy.delta, beta=1 - confidence)
    audit = AuditResult(
        claimed_epsilon=claimed_epsilon(cfg, out_dir), delta=cfg.privacy.delta, lower_bound=bound,
        confidence=confidence, canaries=canaries, included=int(drawn.included.sum()), guesses=result.r,
        correct=result.v, score=SCORES[score], privacy="sample-level DP-SGD" if cfg.privacy.enabled else "DP off",
    )
    write_outputs(out_dir, audit, [
        {"text": t, "label": lab, "included": bool(inc), "loss": float(loss), "score": float(s)}
        for t, lab, inc, loss, s in zip(drawn.texts, drawn.labels, drawn.included, losses, scores, strict=True)])
    return audit
