"""``veil audit``: an empirical lower bound on ε from one simulated federation, next to the claimed ε.

The one-run audit of Steinke, Nasr and Jagielski (NeurIPS 2023, arXiv:2305.08846). By default (``--score gradient-canary``)
its white-box form: m gradient canaries, chosen per-sample gradients that the simulated nodes' DP-SGD steps draw like
records (:mod:`veil.audit.gradient`), scored by the published model's change along each. With ``--score loss``
or ``gradient``, canary records (:mod:`veil.audit.records`): (1) make m canary
records (random words, random labels) and decide from OS entropy, independently with probability 1/2, which are
included, each in a random client's data; (2) run the federation with the included canaries planted into the
simulated clients' shards (an argument of the simulation, :class:`veil.task.shards.AuditPlan`, never the run
config; the node code sees one list of examples, so it cannot treat a canary differently); (3) score every canary,
black-box by the final published model's loss on it (lower loss: more likely trained on; ``--score loss``, what the
published model alone reveals) or white-box by each round's global update against the canary's gradient
(:mod:`veil.audit.whitebox`; ``--score gradient``); (4) guess "in" for the k highest scores, "out" for the k lowest,
abstain otherwise; (5) turn the number of right guesses into the bound of :mod:`veil.privacy.audit_bound` at
confidence 1 − β and compare it with the ε the nodes' ledgers claim (the largest over nodes). A bound above the claim
means the run leaked more than its accounting says: a bug. A bound below it proves nothing about privacy: the audit
is one weak attack.

Every score reads only what the coordinator holds (the final model; every round's aggregate), so the audit runs the
same with SecAgg+ on or off. One score per audit: the bound holds at its confidence for the score chosen before the
run; taking the larger of two bounds from one run would need a correction for the two tries. The canaries follow the
run's unit of privacy (``privacy.level``): records or gradients at sample level, whole canary clients at client
level (:mod:`veil.audit.clients`, score ``direction``, claimed ε the coordinator's client-level accountant). This
module picks the kind of canary and runs the control arm (:mod:`veil.audit.control`); it is the only one that
imports the three kinds.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from veil.audit.result import LEVEL_SCORES, SCORES, AuditResult, score_name
from veil.errors import ConfigError, VeilError

VIOLATION_EXIT = 3


def run_audit(cfg: Any, out_dir: Path, *, canaries: int, guesses: int, confidence: float = 0.95,
              score: str | None = None, client_mods: Sequence[Any] = (),
              rng: np.random.Generator | None = None) -> AuditResult:
    """Plant canaries, run one simulated federation into ``out_dir``, score, bound; writes audit.json/audit.md.

    ``guesses``: k, the canaries guessed "in" (and as many "out"), fixed before any score is seen.
    ``score``: one of :data:`LEVEL_SCORES` for the run's ``privacy.level`` (default its first), see :data:`SCORES`.
    ``client_mods`` and ``rng`` are for tests (a broken mechanism, a fixed draw); no config reaches them.
    """
    from veil.preflight import resolve_paths_and_labels

    score = score or LEVEL_SCORES[cfg.privacy.level][0]
    _check(cfg, canaries=canaries, guesses=guesses, confidence=confidence, score=score)
    cfg = resolve_paths_and_labels(cfg, out_dir)
    if cfg.privacy.level == "client":
        from veil.audit.clients import run_client_audit

        return run_client_audit(cfg, out_dir, canaries=canaries, guesses=guesses, confidence=confidence,
                                client_mods=client_mods, rng=rng)
    if score == "gradient-canary":
        from veil.audit.gradient import run_gradient_audit

        return run_gradient_audit(cfg, out_dir, canaries=canaries, guesses=guesses, confidence=confidence,
                                  client_mods=client_mods, rng=rng)
    from veil.audit.records import run_record_audit

    return run_record_audit(cfg, out_dir, canaries=canaries, guesses=guesses, confidence=confidence, score=score,
                            client_mods=client_mods, rng=rng)


def _check(cfg: Any, *, canaries: int, guesses: int, confidence: float, score: str) -> None:
    level = cfg.privacy.level
    if level == "sample" and score != "gradient-canary" and cfg.task.name != "classification":
        raise ConfigError(f"--score {score} plants labelled canary records: it needs task=classification, not "
                          f"{cfg.task.name} (or --score gradient-canary: gradient canaries fit any task)")
    if score not in LEVEL_SCORES.get(level, ()):
        raise ConfigError(f"--score={score} is invalid for privacy.level={level}: expected "
                          f"{' or '.join(LEVEL_SCORES.get(level, ()))}")
    if cfg.resume:
        raise ConfigError("veil audit runs a fresh federation; drop resume=")
    if not 0 < 2 * guesses <= canaries:
        raise ConfigError(f"--guesses={guesses} is invalid: expected 1..{canaries // 2} (half of --canaries={canaries})")
    if not 0.5 <= confidence < 1:
        raise ConfigError(f"--confidence={confidence} is invalid: expected a number in [0.5, 1), e.g. 0.95")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--canaries", type=int, default=1000,
                        help="canaries m (default 1000): records at sample level, clients at privacy.level=client")
    parser.add_argument("--guesses", type=int, default=0,
                        help="k: canaries guessed in, and as many guessed out (default m/10)")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence of the lower bound (default 0.95)")
    parser.add_argument("--score", type=score_name, choices=sorted(SCORES), default=None,
                        help="sample level: gradient-canary (default; formerly grad), white-box gradient canaries injected into the simulated "
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
    from veil.atomic import atomic_write
    from veil.preflight import preflight

    overrides = list(args.overrides)
    if any(o in ("-m", "--multirun") for o in overrides):
        raise ConfigError("veil audit runs one federation; drop -m (run one audit per setting)")
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")]
    out_dir = Path(given[-1] if given else time.strftime("outputs/audit/%Y-%m-%d/%H-%M-%S")).expanduser().resolve()
    if (out_dir / "metrics.jsonl").exists():
        raise ConfigError(f"{out_dir} already holds a run; give a new hydra.run.dir")
    cfg = preflight(overrides)
    if cfg.privacy.enabled and cfg.privacy.max_grad_norm_final:
        raise ConfigError("veil audit injects its canaries at one clipping norm; drop privacy.max_grad_norm_final "
                          "(audit the run's mechanism at a fixed privacy.max_grad_norm)")
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
            write_control(out_dir, audit, control, atomic_write)
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
