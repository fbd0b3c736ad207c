"""End to end through the real `veil simulate` command: DP-SGD + SecAgg+ on a tiny BERT; the exported model
reproduces the final global weights. (SecAgg+ equals the plain aggregate within the quantisation step:
tests/e2e/test_dropout_e2e.py, with a drop-out on top.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from support.helpers import TINY_SIM, data_overrides, metrics, run_veil

pytestmark = pytest.mark.slow


def test_dp_secagg_run_exports_the_global_model(small_csv: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_veil(["simulate", *TINY_SIM, *data_overrides(*small_csv), "federation.num_clients=3",
                     "federation.clients_per_round=3", "federation.rounds=2", "privacy=dp_sgd", "secagg=secaggplus",
                     f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["secagg"] is True and r["epsilon_max"] > 0 and r["clients"] == r["contributed"] == 3 for r in rows)
    assert rows[1]["epsilon_max"] > rows[0]["epsilon_max"], "epsilon composes across rounds"
    # no per-client value reaches the coordinator's records; in simulation the ε is the simulated owners' own
    assert not {"train_loss", "examples", "epsilon_mean", "noise_multiplier_max", "sample_rate_max"} & set(rows[0])
    assert all(r["epsilon_max"] == r["node_epsilon_max"] for r in rows)
    import json

    from veil.privacy.ledger import PrivacyLedger

    ledgers = sorted((run_dir / "nodes").glob("node-*/privacy_ledger.json"))
    assert len(ledgers) == 3
    spent = max(PrivacyLedger.open(p, create=False).epsilon(delta=1e-5).epsilon for p in ledgers)
    assert rows[1]["node_epsilon_max"] == pytest.approx(spent, rel=1e-9)
    assert json.loads((run_dir / "summary.json").read_text())["epsilon_basis"] == "simulated_ledgers"
    assert "final accuracy" in proc.stdout and "majority-class baseline" in proc.stdout

    from transformers import AutoModelForSequenceClassification

    from veil.conf.schema import ModelConfig
    from veil.server.app import load_global
    from veil.task.data import tokenize
    from veil.task.model import build_model, load_tokenizer, set_trainable, trainable_names

    exported = AutoModelForSequenceClassification.from_pretrained(str(run_dir / "model"), local_files_only=True)
    labels = [exported.config.id2label[i] for i in range(exported.config.num_labels)]
    cfg = ModelConfig(tiny=True, max_length=24, lora_r=4, lora_alpha=8, head_init="random")
    reference = build_model(cfg, labels, seed=0)
    set_trainable(reference, load_global(run_dir / "global_trainable.npz", trainable_names(reference)))
    batch = tokenize(load_tokenizer(cfg), ["my card was lost", "the atm kept my cash today"], max_length=24)
    exported.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(**batch).logits, reference(**batch).logits, atol=1e-5, rtol=1e-5)
    card = (run_dir / "model" / "README.md").read_text()
    assert "δ" in card and "SecAgg+" in card and "honest but curious" in card
    assert "never saw a single owner's update" not in card


def test_shared_noise_run_states_the_sum_s_epsilon_and_books_each_share(small_csv: tuple[Path, Path],
                                                                         tmp_path: Path) -> None:
    """privacy.share_noise through Flower and SecAgg+: each simulated owner (M = the round's 3) adds σ/sqrt(3) of
    the run's σ and books exactly that; the coordinator states ε of one step a round at σ and the run's q
    (reference: an independent PLD accountant); the owners' own (share-alone) ε is larger."""
    import json
    import math

    from support.references import pld_epsilon

    from veil.privacy.ledger import PrivacyLedger

    run_dir, sigma, rate = tmp_path / "run", 1.5, 0.25
    proc = run_veil(["simulate", *TINY_SIM, *data_overrides(*small_csv), "federation.num_clients=3",
                     "federation.clients_per_round=3", "federation.rounds=2", "privacy=dp_sgd", "secagg=secaggplus",
                     "privacy.share_noise=true", "privacy.target_epsilon=0", f"privacy.noise_multiplier={sigma}",
                     "federation.local_steps=1", "federation.optimizer=sgd", f"federation.sample_rate={rate}",
                     f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2] and all(r["contributed"] == 3 for r in rows)
    assert json.loads((run_dir / "summary.json").read_text())["epsilon_basis"] == "shared_noise"
    reference = pld_epsilon([(sigma, rate, 2)], 1e-5)
    assert reference <= rows[1]["epsilon_max"] <= 1.03 * reference
    ledgers = sorted((run_dir / "nodes").glob("node-*/privacy_ledger.json"))
    assert len(ledgers) == 3
    for path in ledgers:
        events = PrivacyLedger.open(path, create=False).events
        assert [(e.noise_multiplier, e.sample_rate, e.steps) for e in events] == [(sigma / math.sqrt(3), rate, 1)] * 2
    assert rows[1]["node_epsilon_max"] > rows[1]["epsilon_max"], "an owner's own share alone is the weaker bound"
