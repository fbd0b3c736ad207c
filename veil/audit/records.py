"""``veil audit``: an empirical lower bound on ε from one simulated federation, next to the claimed ε.

The one-run audit of Steinke, Nasr and Jagielski (NeurIPS 2023, arXiv:2305.08846). By default (``--score grad``)
its white-box form: m gradient canaries, chosen per-sample gradients that the simulated nodes' DP-SGD steps draw like
records (:mod:`veil.audit.gradient`), scored by the published model's change along each. With ``--score loss``
or ``gradient``, canary records: (1) make m canary
records (random words, random labels) and decide from OS entropy, independently with probability 1/2, which are
included, each in a random client's data; (2) run the federation with the included canaries planted into the
simulated clients' shards (``federation.planted_examples``; the node code sees one list of examples, so it cannot
treat a canary differently); (3) score every canary, black-box by the final published model's loss on it (lower
loss: more likely trained on; ``--score loss``, what the published model alone reveals) or white-box by each round's
global update against the canary's gradient (:mod:`veil.audit.whitebox`; ``--score gradient``); (4) guess
"in" for the k highest scores, "out" for the k lowest, abstain otherwise; (5) turn the
number of right guesses into the bound of :mod:`veil.privacy.audit_bound` at confidence 1 − β and compare it with
the ε the nodes' ledgers claim (the largest over nodes). A bound above the claim means the run leaked more than
its accounting says: a bug. A bound below it proves nothing about privacy: the audit is one weak attack.

Every score reads only what the coordinator holds (the final model; every round's aggregate), so the audit runs the
same with SecAgg+ on or off. One score per audit: the bound holds at its confidence for the score chosen before the
run; taking the larger of two bounds from one run would need a correction for the two tries. The canaries follow the
run's unit of privacy (``privacy.level``): records at sample level (this module), whole canary clients at client
level (:mod:`veil.audit.clients`, score ``direction``, claimed ε the coordinator's client-level accountant).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from veil.atomic import atomic_write
from veil.errors import ConfigError, VeilError

log = logging.getLogger("veil.audit")

_REFERENCE = "Steinke, Nasr, Jagielski, Privacy Auditing with One (1) Training Run, NeurIPS 2023 (arXiv:2305.08846)"
SCORES = {"grad": "white-box, gradient canaries: the published model's change at each canary's coordinate, the sum "
                  "over rounds of the aggregate updates (higher: guessed in)",
          "loss": "black-box: the final model's loss on each canary (lower: guessed in)",
          "gradient": "white-box: each round's global update against the canary's gradient direction (higher: guessed in)",
          "direction": "white-box, canary clients: the published model's change against each canary client's "
                       "direction (higher: guessed in)"}
LEVEL_SCORES = {"sample": ("grad", "loss", "gradient"), "client": ("direction",)}  # the scores of each unit of privacy
VIOLATION_EXIT = 3


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
    _write_atomic(path, "\n".join(rows) + "\n")
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


def claimed_epsilon(cfg: Any, out_dir: Path) -> float:
    """The ε the simulated nodes' ledgers book for this run at the run's δ (the largest over nodes); ∞ without DP."""
    from veil.client.settings import PARTITION_ID, node_settings
    from veil.privacy.ledger import PrivacyLedger

    if not cfg.privacy.enabled:
        return math.inf
    worst = 0.0
    for partition in range(cfg.federation.num_clients):
        path = node_settings({PARTITION_ID: partition}, simulation_root=out_dir / "nodes").ledger_path
        if path.exists():
            ledger = PrivacyLedger.open(path, create=False)
            worst = max(worst, ledger.epsilon(delta=cfg.privacy.delta, accountant=cfg.privacy.accountant).epsilon)
    return worst


@dataclass(frozen=True)
class AuditResult:
    claimed_epsilon: float
    delta: float
    lower_bound: float
    confidence: float
    canaries: int
    included: int
    guesses: int
    correct: int
    score: str
    privacy: str
    unit: str = "record"  # what a canary is: a record (sample level) or a client (client level)

    @property
    def verdict(self) -> str:
        return "consistent" if self.lower_bound <= self.claimed_epsilon else "VIOLATION"

    def to_json(self) -> dict[str, Any]:
        doc = {**dataclasses.asdict(self), "verdict": self.verdict, "reference": _REFERENCE}
        doc["claimed_epsilon"] = None if math.isinf(self.claimed_epsilon) else self.claimed_epsilon  # JSON has no ∞
        return doc

    def lines(self) -> list[str]:
        claimed = ("∞ (DP off)" if math.isinf(self.claimed_epsilon)
                   else f"{self.claimed_epsilon:.3f} (delta {self.delta:g}, {self.privacy})")
        return [
            f"claimed epsilon {claimed}",
            f"empirical lower bound {self.lower_bound:.3f} at {self.confidence:.0%} confidence",
            f"canary {self.unit}s {self.canaries} ({self.included} included), guesses {self.guesses}, "
            f"right {self.correct}",
            f"score {self.score}",
            f"verdict {self.verdict}",
        ]


def run_audit(cfg: Any, out_dir: Path, *, canaries: int, guesses: int, confidence: float = 0.95,
              score: str | None = None, client_mods: Sequence[Any] = (),
              rng: np.random.Generator | None = None) -> AuditResult:
    """Plant canaries, run one simulated federation into ``out_dir``, score, bound; writes audit.json/audit.md.

    ``guesses``: k, the canaries guessed "in" (and as many "out"), fixed before any score is seen.
    ``score``: one of :data:`LEVEL_SCORES` for the run's ``privacy.level`` (default its first), see :data:`SCORES`.
    ``client_mods`` and ``rng`` are for tests (a broken mechanism, a fixed draw); no config reaches them.
    """
    from veil.privacy.audit_bound import epsilon_lower_bound, guess_top_bottom
    from veil.simulation import resolve_paths_and_labels, simulate

    score = score or LEVEL_SCORES[cfg.privacy.level][0]
    _check(cfg, canaries=canaries, guesses=guesses, confidence=confidence, score=score)
    cfg = resolve_paths_and_labels(cfg, out_dir)
    if cfg.privacy.level == "client":
        from veil.audit.clients import run_client_audit

        return run_client_audit(cfg, out_dir, canaries=canaries, guesses=guesses, confidence=confidence,
                                client_mods=client_mods, rng=rng)
    if score == "grad":
        from veil.audit.gradient import run_gradient_audit

        return run_gradient_audit(cfg, out_dir, canaries=canaries, guesses=guesses, confidence=confidence,
                                  client_mods=client_mods, rng=rng)
    labels: list[str] = json.loads(cfg.data.labels)
    drawn = make_canaries(count=canaries, labels=labels, vocabulary=canary_vocabulary(cfg),
                          num_clients=cfg.federation.num_clients, rng=rng)
    planted = out_dir / "audit" / "planted.jsonl"
    planted.parent.mkdir(parents=True, exist_ok=True)
    write_planted(drawn, planted)
    run_cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, planted_examples=str(planted)))
    log.info("audit: %d canaries, %d planted in %d clients' data", canaries, int(drawn.included.sum()),
             cfg.federation.num_clients)
    simulate(run_cfg, out_dir, client_mods=client_mods)
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


def _check(cfg: Any, *, canaries: int, guesses: int, confidence: float, score: str) -> None:
    level = cfg.privacy.level
    if level == "sample" and score != "grad" and cfg.task.name != "classification":
        raise ConfigError(f"--score {score} plants labelled canary records: it needs task=classification, not "
                          f"{cfg.task.name} (or --score grad: gradient canaries fit any task)")
    if score not in LEVEL_SCORES.get(level, ()):
        raise ConfigError(f"--score={score} is invalid for privacy.level={level}: expected "
                          f"{' or '.join(LEVEL_SCORES.get(level, ()))}")
    if cfg.federation.planted_examples or cfg.federation.canary_clients:
        raise ConfigError("federation.planted_examples and federation.canary_clients are written by veil audit; "
                          "drop them from the overrides")
    if cfg.resume:
        raise ConfigError("veil audit runs a fresh federation; drop resume=")
    if not 0 < 2 * guesses <= canaries:
        raise ConfigError(f"--guesses={guesses} is invalid: expected 1..{canaries // 2} (half of --canaries={canaries})")
    if not 0.5 <= confidence < 1:
        raise ConfigError(f"--confidence={confidence} is invalid: expected a number in [0.5, 1), e.g. 0.95")


def write_outputs(out_dir: Path, audit: AuditResult, rows: list[dict[str, Any]]) -> None:
    """audit.json, audit.md, and ``rows`` (one per canary: its truth and score) as audit/canaries.jsonl."""
    (out_dir / "audit").mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / "audit" / "canaries.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    claimed = "∞ (no DP)" if math.isinf(audit.claimed_epsilon) else f"{audit.claimed_epsilon:.3f}"
    md = ["# Privacy audit (one run)", "", "| | |", "|---|---|",
          f"| claimed ε (δ = {audit.delta:g}) | {claimed} ({audit.privacy}) |",
          f"| empirical lower bound on ε | {audit.lower_bound:.3f} at {audit.confidence:.0%} confidence |",
          f"| canary {audit.unit}s (included) | {audit.canaries} ({audit.included}) |",
          f"| guesses (right) | {audit.guesses} ({audit.correct}) |",
          f"| score | {audit.score} |", f"| verdict | **{audit.verdict}** |", "",
          "A lower bound from one attack: above the claimed ε it shows a bug; below it, it proves nothing about",
          "privacy (docs/privacy.md, \"The empirical audit\").", "", f"Method: {_REFERENCE}.", ""]
    _write_atomic(out_dir / "audit.md", "\n".join(md))
    _write_atomic(out_dir / "audit.json", json.dumps(audit.to_json(), indent=2) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    atomic_write(path, text)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--canaries", type=int, default=1000,
                        help="canaries m (default 1000): records at sample level, clients at privacy.level=client")
    parser.add_argument("--guesses", type=int, default=0,
                        help="k: canaries guessed in, and as many guessed out (default m/10)")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence of the lower bound (default 0.95)")
    parser.add_argument("--score", choices=sorted(SCORES), default=None,
                        help="sample level: grad (default), white-box gradient canaries injected into the simulated "
                             "nodes' DP-SGD steps; loss, canary records scored by the final model's loss (black-box: "
                             "what the published model alone reveals); gradient, canary records scored by every "
                             "round's update against their gradient; client level: direction (the default and only "
                             "one), the published model's change against each canary client's direction")
    parser.add_argument("--control", choices=("on", "off"), default="on",
                        help="on (default): also run the same audit without DP (same canaries) and report both "
                             "bounds, warning when the attack has no power; off: the DP run alone")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="the run's `veil simulate` overrides, e.g. model=tiny_bert privacy.target_epsilon=8")


def run(args: argparse.Namespace) -> int:
    from veil.simulation import preflight

    overrides = list(args.overrides)
    if any(o in ("-m", "--multirun") for o in overrides):
        raise ConfigError("veil audit runs one federation; drop -m (run one audit per setting)")
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")]
    out_dir = Path(given[-1] if given else time.strftime("outputs/audit/%Y-%m-%d/%H-%M-%S")).expanduser().resolve()
    if (out_dir / "metrics.jsonl").exists():
        raise ConfigError(f"{out_dir} already holds a run; give a new hydra.run.dir")
    cfg = preflight(overrides)
    guesses = args.guesses or max(1, args.canaries // 10)
    seed = secrets.randbits(64)  # one draw of canaries for both arms, from OS entropy
    control = None
    try:
        audit = run_audit(cfg, out_dir, canaries=args.canaries, guesses=guesses, confidence=args.confidence,
                          score=args.score, rng=np.random.default_rng(seed))
        if args.control == "on" and cfg.privacy.enabled:
            from veil.audit.control import control_config, write_control

            control = run_audit(control_config(cfg), out_dir / "control", canaries=args.canaries, guesses=guesses,
                                confidence=args.confidence, score=args.score, rng=np.random.default_rng(seed))
            write_control(out_dir, audit, control, _write_atomic)
    except VeilError:
        if not (out_dir / "metrics.jsonl").exists():
            import shutil

            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    for line in audit.lines():
        print(line)
    if control is not None:
        from veil.audit.control import power_warning, side_by_side

        print(side_by_side(audit, control))
        warning = power_warning(control)
        if warning:
            print(warning, file=sys.stderr, flush=True)
    print(f"written to {out_dir / 'audit.json'} and {out_dir / 'audit.md'}", flush=True)
    if audit.verdict != "consistent":
        print(f"veil: error: the empirical lower bound {audit.lower_bound:.3f} exceeds the claimed epsilon "
              f"{audit.claimed_epsilon:.3f}: the run leaks more than its accounting says; report this as a bug",
              file=sys.stderr)
        return VIOLATION_EXIT
    return 0
