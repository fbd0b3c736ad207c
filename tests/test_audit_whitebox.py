"""The white-box score of `veil audit --score gradient` without a federation: hand-checked values on a one-layer
model trained by plain SGD, the run's checkpoints read back as the sequence of global weights, and the score on the
tiny BERT ranking the canaries that three rounds of training really used first."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from support.helpers import data_overrides
from veil.preflight import preflight, resolve_paths_and_labels
from veil.errors import ConfigError
from veil.audit.records import canary_vocabulary
from veil.privacy.audit_bound import guess_top_bottom
from veil.audit.whitebox import alignment_scores, gradient_scores, round_weights
from veil.server.checkpoint import save_checkpoint
from veil.task import get_task
from veil.task.data import TextExamples
from veil.task.model import get_trainable, load_tokenizer, trainable_names


def _half_squared_error(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return 0.5 * (model(batch["x"]).squeeze(-1) - batch["y"]) ** 2  # (B,)


def _sgd_step(model: nn.Module, batch: dict[str, torch.Tensor], lr: float) -> list[np.ndarray]:
    """One step of plain SGD on the batch's mean loss; returns the new weights."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    optimizer.zero_grad()
    _half_squared_error(model, batch).mean().backward()
    optimizer.step()
    return [model.weight.detach().numpy().copy()]


def test_scores_match_a_hand_computation_and_rank_the_trained_canary_first() -> None:
    """w ∈ R^3 (one linear layer, no bias), loss_i = ½(w·x_i − 1)², canaries x_i = e_i, w_0 = 0, lr 0.5.

    Round 1 trains on canary 0: g_0(w_0) = −e_0, so w_1 = 0.5 e_0 and s = (0.5, 0, 0).
    Round 2 trains on canaries 0 and 2: g_0(w_1) = −0.5 e_0, g_2(w_1) = −e_2, w_2 = w_1 + 0.25 (0.5 e_0 + e_2)
    = 0.625 e_0 + 0.25 e_2; w_1 − w_2 = −0.125 e_0 − 0.25 e_2 against the unit directions −e_0, −e_1, −e_2 adds
    (0.125, 0, 0.25): s = (0.625, 0, 0.25). Canary 1, never trained on, scores 0.
    """
    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    canaries = {"x": torch.eye(3), "y": torch.ones(3)}
    weights = [[model.weight.detach().numpy().copy()]]
    weights.append(_sgd_step(model, {"x": canaries["x"][[0]], "y": canaries["y"][[0]]}, lr=0.5))
    assert np.allclose(weights[1][0], [[0.5, 0, 0]])
    weights.append(_sgd_step(model, {"x": canaries["x"][[0, 2]], "y": canaries["y"][[0, 2]]}, lr=0.5))
    assert np.allclose(weights[2][0], [[0.625, 0, 0.25]])

    one_round = alignment_scores(nn.Linear(3, 1, bias=False), _half_squared_error, canaries, weights[:2])
    assert one_round == pytest.approx([0.5, 0.0, 0.0], abs=1e-12)
    scores = alignment_scores(nn.Linear(3, 1, bias=False), _half_squared_error, canaries, weights)
    assert scores == pytest.approx([0.625, 0.0, 0.25], abs=1e-12)
    assert np.argsort(-scores).tolist() == [0, 2, 1]


def test_scores_do_not_depend_on_the_gradient_scale() -> None:
    """Only the direction of each canary's gradient counts (so clipping, a rescaling, changes nothing)."""
    rng = np.random.default_rng(0)
    model = nn.Linear(4, 1, bias=False)
    canaries = {"x": torch.as_tensor(rng.normal(size=(5, 4)), dtype=torch.float32), "y": torch.ones(5)}
    weights = [[rng.normal(size=(1, 4)).astype(np.float32)] for _ in range(3)]

    def tenfold(m: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return 10.0 * _half_squared_error(m, b)

    assert alignment_scores(model, tenfold, canaries, weights) == pytest.approx(
        alignment_scores(model, _half_squared_error, canaries, weights), rel=1e-5)


def test_round_weights_reads_every_round_and_refuses_a_gap(tmp_path: Path) -> None:
    initial = [np.zeros((2, 2), np.float32)]
    for rnd in (1, 2):
        save_checkpoint(tmp_path, round=rnd, names=["w"], arrays=[np.full((2, 2), rnd, np.float32)], run_config={},
                        strategy_state={})
    got = list(round_weights(tmp_path, initial, ["w"]))
    assert [float(w[0][0, 0]) for w in got] == [0.0, 1.0, 2.0]
    with pytest.raises(ConfigError, match="round 1"):
        list(round_weights(tmp_path, initial, ["other"]))
    (tmp_path / "checkpoints" / "round-0001.npz").unlink()
    with pytest.raises(ConfigError, match="unbroken"):
        list(round_weights(tmp_path, initial, ["w"]))
    with pytest.raises(ConfigError, match="no round checkpoints"):
        list(round_weights(tmp_path / "empty", initial, ["w"]))


def test_canary_vocabulary_is_in_token_id_order(small_csv: tuple[Path, Path], tmp_path: Path) -> None:
    """The list must not depend on the process: a fast tokenizer's ``get_vocab()`` iterates a hash map in an order
    that changes with every process, and a slice of it (the white-box test below takes one) was a new draw each time."""
    cfg = resolve_paths_and_labels(preflight(["model=tiny_bert", *data_overrides(*small_csv)]), tmp_path)
    vocab = load_tokenizer(cfg.model).get_vocab()
    words = canary_vocabulary(cfg)
    expected = [w for w, _ in sorted(vocab.items(), key=lambda item: item[1])
                if w.isascii() and w.isalpha() and len(w) >= 3]
    assert len(words) > 1000
    assert words == expected


def test_tiny_bert_rounds_rank_their_own_canaries_first(small_csv: tuple[Path, Path], tmp_path: Path) -> None:
    """Three rounds of AdamW steps on half of 16 random-word canaries (random labels), saved as the run's
    checkpoints: the audit's white-box score (model rebuilt at the run's seed as w_0, weights read back) guesses the
    top 4 "in" and the bottom 4 "out" with at most one mistake. The draw is fixed (canary_vocabulary is in token-id order); draws 0-19 gave 8 of 8 right
    in 15, 7 in 4 and 6 in 1 (draw 7), and this one (draw 1) gives 8."""
    cfg = resolve_paths_and_labels(preflight(["model=tiny_bert", *data_overrides(*small_csv), "secagg=off",
                                              "privacy=none"]), tmp_path)
    labels = json.loads(cfg.data.labels)
    task = get_task(cfg.task.name)
    rng = np.random.default_rng(1)
    words = [w for w in canary_vocabulary(cfg) if len(w) > 5][:2000]
    texts = [" ".join(rng.choice(words, size=8)) for _ in range(16)]
    canary_labels = [labels[i] for i in rng.integers(0, len(labels), size=16)]
    included = np.zeros(16, bool)
    included[rng.choice(16, size=8, replace=False)] = True
    model = task.build_model(cfg, labels, seed=cfg.federation.seed).eval()
    data = task.tensors(TextExamples(texts, canary_labels), labels, cfg, path="canaries")
    trained = {k: t[torch.as_tensor(included)] for k, t in data.items()}
    for rnd in (1, 2, 3):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.0)
        for _ in range(10):
            optimizer.zero_grad()
            task.per_example_loss(model, trained).mean().backward()
            optimizer.step()
        save_checkpoint(tmp_path, round=rnd, names=trainable_names(model), arrays=get_trainable(model),
                        run_config={}, strategy_state={})
    scores = gradient_scores(cfg, labels, tmp_path, texts, canary_labels)
    guesses = guess_top_bottom(scores, included, k_in=4, k_out=4)
    assert guesses.v >= 7, (scores, included)
