"""`veil audit` end to end on a tiny BERT: DP off gives a positive lower bound, DP on is consistent with its
claim, and a deliberately broken mechanism (noise scaled down, the configured σ booked) is flagged as a
VIOLATION with a non-zero exit. The audit design for CI size: 128 canaries, 16 guessed in and 16 out, 2 clients,
3 rounds (6 for the broken mechanism) of 40 full-batch local steps (batch_size above every shard: q = 1) so
that a canary is in every step.
A claim of ε = 0.1 is refuted by 22 right guesses out of 32; without noise the runs measured here got 26-31 with the
loss score and 24-27 with the record-gradient score (both read from each of three runs). The first two tests use the
default score, gradient canaries (`--score gradient-canary`, issue 26): on this LoRA/AdamW configuration its control arm passed
the > 0.2 check (one run); its own design, the numbers it reaches and its hand-checked test are in
tests/test_audit_gradient.py and docs/benchmarks.md."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from support.helpers import ONE_ACTOR, data_overrides, run_veil
from veil.privacy.audit_bound import epsilon_lower_bound, guess_top_bottom

pytestmark = pytest.mark.slow

AUDIT = ["--canaries", "128", "--guesses", "16"]
# The "consistent" runs: a 95% lower bound exceeds a true claim in up to 5% of runs by construction (at ε = 0.1 and 32
# guesses it needs 22 right, which a coin-flip score reaches in 2.5% of runs: a test that fails CI by chance). At
# 99.9% it needs 26 (0.03%); a mechanism that leaks like DP off (26-31 right) still fails it.
CONSISTENT = ["--confidence", "0.999"]
# The broken mechanism's audit: with the noise gone, what limits the white-box score is the other records' updates.
# At 128 canaries, 16+16 guesses and a claim of 0.1 the bound needs 22 of 32 right, 1.3 standard errors below its
# rate (one full-suite run fell short). At 256 canaries, 40+40 guesses and a claim of 0.01 it needs 49 of 80. Over
# 3 rounds it got 52-59 in eight runs of 2026-12-01, but 50-60 in ten of 2026-12-07, with the audit's settings in the
# run config and as an AuditPlan alike (mean 55, sd 3; the four beside another test file got 50, 51, 53 and 55), and
# 47 or fewer once in a loaded CI run (bound 0.0), while the loss score of such runs refuted the claim by far (48-58
# of 64 at 32+32, need 40): the mechanism ran, the white-box score lacked power. Over 6 rounds (BROKEN_RUN, five runs of 2026-12-07, on 2 cores shared with other work) it got 57-66 of 80
# (mean 61, sd 4: ~3 sd of margin) and the loss score 74-78 of 80; each round after the first adds a few seconds.
# The noise stays 1e5x too small.
BROKEN_AUDIT = ["--canaries", "256", "--guesses", "40", "--control", "off"]  # the control runs in the consistent test
BROKEN_CLAIM = 0.01
RUN = ["model=tiny_bert", "federation.batch_size=128", "federation.lr=0.05", "federation.partitioner=iid",
       "federation.local_steps=40", "federation.num_clients=2", "federation.clients_per_round=2",
       "federation.rounds=3", "secagg=off", ONE_ACTOR]
BROKEN_RUN = [*(o for o in RUN if not o.startswith("federation.rounds=")), "federation.rounds=6"]


def _audit_json(run_dir: Path) -> dict[str, object]:
    return json.loads((run_dir / "audit.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def dp_on(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One DP audit with its control arm (the same canaries and attack, DP off, in ``on/control``): the run both
    tests below read (a run of its own for DP off would repeat the control arm). Returns (its directory, stdout)."""
    from support.helpers import write_small_csv

    root = tmp_path_factory.mktemp("audit")
    run_dir = root / "on"
    proc = run_veil(["audit", *AUDIT, *CONSISTENT, *RUN, *data_overrides(*write_small_csv(root)), "privacy=dp_sgd",
                     "privacy.target_epsilon=0.1", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc.stdout


def test_dp_off_gives_a_positive_bound(dp_on: tuple[Path, str]) -> None:
    """The control arm is ``veil audit privacy=none``'s own run (:func:`veil.audit.control.control_config`), with
    every artefact of an audit."""
    run_dir, stdout = dp_on
    doc = _audit_json(run_dir / "control")
    assert doc["lower_bound"] > 0.2 and doc["claimed_epsilon"] is None and doc["verdict"] == "consistent"
    assert doc["guesses"] == 32 and doc["canaries"] == 128
    assert _audit_json(run_dir)["control"]["lower_bound"] == doc["lower_bound"]
    assert f"without DP this attack finds epsilon >= {doc['lower_bound']:.3f}" in stdout
    assert (run_dir / "control" / "audit.md").is_file() and (run_dir / "control" / "model").is_dir()


def test_dp_on_is_consistent_with_its_claim(dp_on: tuple[Path, str]) -> None:
    run_dir, stdout = dp_on
    doc = _audit_json(run_dir)
    assert 0 < doc["claimed_epsilon"] <= 0.1 + 1e-6  # the ledgers' ε, calibrated to the target
    assert doc["confidence"] == 0.999
    assert doc["lower_bound"] <= doc["claimed_epsilon"] and doc["verdict"] == "consistent"
    control = doc["control"]  # the same attack and canaries without DP: the power test_dp_off measures
    assert control["lower_bound"] > 0.2 and control["claimed_epsilon"] is None, control
    assert "empirical lower bound" in stdout and "verdict consistent" in stdout
    assert (run_dir / "audit.md").is_file() and (run_dir / "model").is_dir()


def test_broken_mechanism_is_flagged(small_csv: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Same run as DP on, but every client's noise is 100,000x smaller than the σ its ledger books. The audit uses
    the white-box score; the black-box (loss) guesses on the same run, from audit/canaries.jsonl, refute the claim
    too."""
    from support.audit_hooks import broken_noise

    from veil.cli import main
    from veil.audit import cli as audit

    monkeypatch.setattr(audit, "run_audit", functools.partial(audit.run_audit, client_mods=[broken_noise]))
    run_dir = tmp_path / "broken"
    code = main(["audit", *BROKEN_AUDIT, "--score", "gradient", *BROKEN_RUN, *data_overrides(*small_csv),
                 "privacy=dp_sgd", f"privacy.target_epsilon={BROKEN_CLAIM}", f"hydra.run.dir={run_dir}"])
    out = capsys.readouterr()
    doc = _audit_json(run_dir)
    rows = [json.loads(line) for line in (run_dir / "audit" / "canaries.jsonl").read_text(encoding="utf-8").splitlines()]
    by_loss = guess_top_bottom(-np.array([r["loss"] for r in rows]), np.array([r["included"] for r in rows]),
                               k_in=40, k_out=40)
    loss_bound = epsilon_lower_bound(m=by_loss.m, r=by_loss.r, v=by_loss.v, delta=doc["delta"])
    # both scores in every failure message: a loss score far above chance says the mechanism ran (and the white-box
    # score fell short); both near chance say the broken noise or the canaries never reached the nodes
    seen = f"white-box {doc['correct']}/{doc['guesses']} right, loss {by_loss.v}/{by_loss.r} (bound {loss_bound:.3f})"
    assert 0 < doc["claimed_epsilon"] <= BROKEN_CLAIM + 1e-6, "the ledgers book the configured σ"
    assert doc["lower_bound"] > doc["claimed_epsilon"] and doc["verdict"] == "VIOLATION", (seen, doc)
    assert code == audit.VIOLATION_EXIT and "verdict VIOLATION" in out.out and "exceeds the claimed epsilon" in out.err
    assert doc["score"] == audit.SCORES["gradient"]
    assert loss_bound > doc["claimed_epsilon"], seen



# Client level (privacy.level=client): 40 canary clients beside 3 owners, one round in which every client takes part;
# 10 guessed in and 10 out. 20 right guesses refute ε < 1.82, 19 refute ε < 1.29 (δ = 1e-5, 95%); without noise or
# with the broken noise every guess was right in every run measured here (5 each). With the noise of ε = 1 (z = 3.81)
# the guesses are close to chance: 11, 16 and 11 right of 20 in three runs; the ideal attack on the Gaussian mechanism
# at this z gets 58% right and 19 or more in 0.03% of runs (200,000 simulated draws). In-process (veil.cli.main), as a
# subprocess would add its imports to each of these three runs.
CLIENT_AUDIT = ["--canaries", "40", "--guesses", "10"]
CLIENT_RUN = ["model=tiny_bert", "federation.batch_size=64", "federation.partitioner=iid", "federation.local_steps=1",
              "federation.num_clients=3", "federation.rounds=1", ONE_ACTOR]


def _client_audit(small_csv: tuple[Path, Path], run_dir: Path, *overrides: str) -> tuple[int, dict[str, object]]:
    from veil.cli import main

    code = main(["audit", *CLIENT_AUDIT, "--control", "off", *CLIENT_RUN, *data_overrides(*small_csv), *overrides,
                 f"hydra.run.dir={run_dir}"])
    return code, _audit_json(run_dir)


def test_client_level_without_dp_gives_a_positive_bound(small_csv: tuple[Path, Path], tmp_path: Path) -> None:
    code, doc = _client_audit(small_csv, tmp_path / "off", "privacy=none", "privacy.level=client", "secagg=off")
    assert code == 0 and doc["lower_bound"] > 1.0 and doc["claimed_epsilon"] is None, doc
    assert doc["verdict"] == "consistent" and doc["unit"] == "client" and doc["canaries"] == 40 and doc["guesses"] == 20
    summary = json.loads((tmp_path / "off" / "summary.json").read_text(encoding="utf-8"))
    assert summary["clients"] == summary["contributed"] == 43, "every canary client is a node of the round"


def test_client_level_dp_is_consistent_with_its_claim(small_csv: tuple[Path, Path], tmp_path: Path) -> None:
    """The coordinator adds the noise (central placement, SecAgg+ off: shorter than the broken run below, which has
    distributed shares under SecAgg+): the bound stays below the coordinator's client-level ε."""
    code, doc = _client_audit(small_csv, tmp_path / "on", "privacy=client_dp", "privacy.target_epsilon=1",
                              "privacy.noise_placement=central", "secagg=off")
    summary = json.loads((tmp_path / "on" / "summary.json").read_text(encoding="utf-8"))
    assert summary["epsilon_basis"] == "client_level" and doc["claimed_epsilon"] == summary["epsilon_max"]
    assert 0.9 < doc["claimed_epsilon"] <= 1.0 + 1e-6, doc
    assert code == 0 and doc["lower_bound"] <= doc["claimed_epsilon"] and doc["verdict"] == "consistent", doc


def test_broken_client_level_noise_is_flagged(small_csv: tuple[Path, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The run above with SecAgg+ on, but every node's noise share is 100,000x smaller than the share it reports,
    which the coordinator's accountant books: the canary nodes mask their updates like the owners, and the audit,
    reading only the published model, says VIOLATION."""
    from support.audit_hooks import broken_client_noise

    from veil.audit import cli as audit

    monkeypatch.setattr(audit, "run_audit", functools.partial(audit.run_audit, client_mods=[broken_client_noise]))
    code, doc = _client_audit(small_csv, tmp_path / "broken", "privacy=client_dp", "privacy.target_epsilon=1")
    out = capsys.readouterr()
    summary = json.loads((tmp_path / "broken" / "summary.json").read_text(encoding="utf-8"))
    assert summary["secagg"] and summary["contributed"] == 43, "all 43 nodes' updates went through SecAgg+"
    assert 0.9 < doc["claimed_epsilon"] <= 1.0 + 1e-6, "the accountant books the configured noise"
    assert doc["lower_bound"] > doc["claimed_epsilon"] and doc["verdict"] == "VIOLATION", doc
    assert code == audit.VIOLATION_EXIT and "verdict VIOLATION" in out.out and "exceeds the claimed epsilon" in out.err
