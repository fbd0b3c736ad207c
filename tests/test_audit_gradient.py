"""Gradient canaries of `veil audit --score gradient-canary` without a federation: the trainer's injected canaries and their
scores equal a hand computation (a numpy loop over examples) on a one-layer model, in each engine; the draw and its
refusal; a deployed node cannot inject them; and the audit flags a mechanism that claims ε with far too little noise."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from veil.client.settings import node_settings
from veil.client.trainer import LocalPlan, train_round
from veil.errors import ConfigError
from veil.audit.gradient import (
    CanaryInjector,
    CanaryNode,
    coordinate_scores,
    draw_gradient_canaries,
)
from veil.privacy.accounting import compute_epsilon
from veil.privacy.audit_bound import epsilon_lower_bound, guess_top_bottom
from veil.privacy.calibration import calibrate_noise_multiplier

N, D, K, C, LR, STEPS = 6, 4, 3, 0.5, 0.3, 3


class _CrossEntropy:
    """The one method of the task interface train_round uses."""

    @staticmethod
    def per_example_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")  # (B,)


def _reference(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray, coordinates: list[int], *,
               private: bool) -> np.ndarray:
    """STEPS full-batch SGD steps by hand, every record and every canary in each: per-example softmax gradients,
    clipped to C one at a time (DP), or averaged (no DP), plus C at each canary's coordinate of the flat [W, b]."""
    w, b = w.astype(np.float64).copy(), b.astype(np.float64).copy()
    for _ in range(STEPS):
        total = np.zeros(w.size + b.size)
        for xi, yi in zip(x, y, strict=True):
            z = w @ xi + b
            p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            p[yi] -= 1.0
            g = np.concatenate([np.outer(p, xi).ravel(), p])  # (K·D + K,) d loss / d [W, b]
            total += g * min(1.0, C / (np.linalg.norm(g) + 1e-6)) if private else g
        for j in coordinates:
            total[j] += C
        step = LR * total / N  # the fixed expected batch (DP), or the batch mean (no DP): N either way at q = 1
        w -= step[:w.size].reshape(w.shape)
        b -= step[w.size:]
    return np.concatenate([w.ravel(), b])


@pytest.mark.parametrize("engine", ["hooks", "ghost", "bk", "off"])
def test_scores_of_injected_canaries_equal_a_hand_computation(engine: str) -> None:
    """q = 1 (batch above the shard) and σ = 0, so every record and every canary is in each of the 3 steps and the
    update is deterministic: canaries 0, 5, 14 are this node's (in), 2 and 9 are not (out)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(N, D)).astype(np.float32), rng.integers(0, K, size=N)
    model = nn.Linear(D, K)
    w0, b0 = model.weight.detach().numpy().copy(), model.bias.detach().numpy().copy()
    inside, outside = [0, 5, 14], [2, 9]
    plan = LocalPlan(steps=STEPS, batch_size=64, lr=LR, private=engine != "off", noise_multiplier=0.0,
                     max_grad_norm=C, grad_sample_mode="hooks" if engine == "off" else engine, optimizer="sgd")
    injector = CanaryInjector(inside, clip=C)
    result = train_round(model, [w0, b0], {"x": torch.as_tensor(x), "y": torch.as_tensor(y)}, plan=plan,
                         device=torch.device("cpu"), seed=0, task=_CrossEntropy(), inject=injector)  # type: ignore[arg-type]
    assert injector.drawn == len(inside) * STEPS, "at q = 1 each canary is drawn in every step"
    final = [w0 + result.update[0], b0 + result.update[1]]
    expected = _reference(w0, b0, x, y, inside, private=engine != "off")
    assert np.concatenate([a.ravel() for a in final]) == pytest.approx(expected, abs=1e-5)
    initial_flat = np.concatenate([w0.ravel(), b0])
    scores = coordinate_scores([w0, b0], final, inside + outside)
    assert scores == pytest.approx((initial_flat - expected)[inside + outside], abs=1e-5)
    assert not np.allclose(expected, _reference(w0, b0, x, y, [], private=engine != "off"), atol=1e-3), (
        "the canaries move the model: without them the reference differs")


def test_draw_is_fresh_distinct_and_refuses_more_canaries_than_values() -> None:
    a = draw_gradient_canaries(count=500, size=2000, num_clients=3)
    b = draw_gradient_canaries(count=500, size=2000, num_clients=3)
    assert a.included != b.included, "inclusion comes from OS entropy"
    assert len(set(a.coordinates)) == 500 and max(a.coordinates) < 2000 and set(a.partition) == {0, 1, 2}
    assert 175 < sum(a.included) < 325  # Binomial(500, 1/2): 6 standard deviations either side
    assert set(a.of_node(1)) == {j for j, inc, p in zip(a.coordinates, a.included, a.partition) if inc and p == 1}
    with pytest.raises(ConfigError, match="more than the model's 100 trainable values") as err:
        draw_gradient_canaries(count=101, size=100, num_clients=1)
    assert "\n" not in str(err.value)


def test_a_deployed_node_cannot_inject_gradient_canaries(tmp_path: Path) -> None:
    """The canary node refuses a deployed node's settings, and nothing but the audit's own module builds one or hands
    the trainer an injector: the node's client (VeilClient), its executor and its CLI never do."""
    data = tmp_path / "own.csv"
    data.write_text("text,label\nhello,a\n", encoding="utf-8")
    deployed = node_settings({"data-path": str(data), "max-epsilon": 4.0})
    assert not deployed.simulated
    with pytest.raises(ConfigError, match="simulated nodes; a deployed node never"):
        CanaryNode(SimpleNamespace(), deployed, 1, inject=CanaryInjector([0], clip=1.0))  # type: ignore[arg-type]

    package = Path(__file__).resolve().parents[1] / "veil"
    users = set()
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        keywords = {k.arg for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(
            n.func, "id", getattr(n.func, "attr", "")) == "train_round" for k in n.keywords}  # train_round(inject=)
        if names & {"CanaryNode", "CanaryInjector", "GradientCanaries"} or "inject" in keywords or any(
                m.endswith("audit.gradient") for m in modules):
            users.add(path.relative_to(package).as_posix())
    assert users == {"audit/gradient.py", "audit/cli.py"}, users


def _audit_one_node(noise_multiplier: float, *, steps: int, m: int, k: int) -> float:
    """One node, q = 1 (the batch exceeds the shard), plain SGD through veil's own trainer and injector: ``m``
    gradient canaries on weights no record moves (the inputs are zero there), each included with probability 1/2;
    the audit's score, guesses (k highest "in", k lowest "out") and bound at 95%, as ``veil audit --score gradient``."""
    n, d, classes = 16, m // 10 + 1, 10
    x = torch.zeros(n, d)
    x[:, 0] = torch.randn(n)  # the records move column 0 and the bias; the canaries sit in the other columns
    y = torch.randint(0, classes, (n,))
    model = nn.Linear(d, classes)
    w0, b0 = model.weight.detach().numpy().copy(), model.bias.detach().numpy().copy()
    flat = np.arange(w0.size).reshape(w0.shape)[:, 1:].ravel()  # (classes·(d−1),) coordinates no record touches
    rng = np.random.default_rng()
    coordinates = rng.choice(flat, size=m, replace=False)
    included = rng.random(m) < 0.5
    plan = LocalPlan(steps=steps, batch_size=64, lr=0.1, private=True, noise_multiplier=noise_multiplier,
                     max_grad_norm=C, grad_sample_mode="hooks", optimizer="sgd")
    result = train_round(model, [w0, b0], {"x": x, "y": y}, plan=plan, device=torch.device("cpu"), seed=0,
                         task=_CrossEntropy(), inject=CanaryInjector(coordinates[included].tolist(), clip=C))  # type: ignore[arg-type]
    scores = coordinate_scores([w0, b0], [w0 + result.update[0], b0 + result.update[1]], coordinates.tolist())
    guesses = guess_top_bottom(scores, included, k_in=k, k_out=k)
    return epsilon_lower_bound(m=guesses.m, r=guesses.r, v=guesses.v, delta=1e-5, beta=0.05)


def test_the_audit_flags_a_mechanism_that_claims_epsilon_with_a_hundredth_of_its_noise() -> None:
    """A broken DP-SGD: σ calibrated for a claimed ε = 1 (δ = 1e-5, q = 1, 5 steps), then divided by 100 before
    it noises. The one-run bound must exceed the claim (with 100 right guesses of 100 it reaches about 3.4); the
    honest σ must not. If the injection, the score's sign or index, the guesses or the bound lost their power, the
    broken mechanism would pass unnoticed and this test fails."""
    steps, claimed = 5, 1.0
    sigma = calibrate_noise_multiplier(target_epsilon=claimed, delta=1e-5, sample_rate=1.0, steps=steps)
    assert compute_epsilon([(sigma, 1.0, steps)], delta=1e-5).epsilon <= claimed * 1.02  # the claim holds at σ

    broken = _audit_one_node(sigma / 100, steps=steps, m=400, k=50)
    honest = _audit_one_node(sigma, steps=steps, m=400, k=50)

    assert broken > claimed + 1.0, f"the audit missed σ/100: lower bound {broken:.2f} against the claimed ε {claimed}"
    assert honest <= claimed, f"the honest mechanism's bound {honest:.2f} exceeds its claim {claimed}"
