"""The owner's DP engine against crafted weights (review 2026-12-07, N2), and the divisor of every noisy sum.

* A deployed node runs the owner's ``--dp-engine`` (auto | hooks | bk), never the run's ``privacy.grad_sample_mode``:
  Opacus' ghost clipping let one example contribute 53-62 C under LoRA weights crafted inside the acceptance bound.
  Reference: the clip bound itself, ``||contribution|| <= C (1 + 1e-6)``, for one example, σ = 0, plain SGD at lr 1,
  under random weights of growing scale and adversarial ones at the acceptance bound (±``MAX_RECEIVED_ABS``).
* Every engine divides the noisy sum by a fixed expected batch size, never by the batch actually drawn (arXiv
  2605.15648). Reference: a per-example loop's clipped sum divided by the fixed E[B], batch after batch of other sizes.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from veil.client.app import VeilClient
from veil.client.release import MAX_RECEIVED_ABS
from veil.conf.schema import DataConfig, ModelConfig, VeilConfig
from veil.privacy.dpsgd import make_private
from veil.privacy.hooks import zero_nonfinite_samples
from veil.privacy.modes import OWNER_ENGINES, resolve_owner_engine
from veil.task import get_task
from veil.task.data import TextExamples
from veil.task.model import build_model, get_trainable

LABELS = ["card", "cash", "fee", "pin"]
CLIP = 1.0


def _cfg(*, lora: bool) -> VeilConfig:
    cfg = VeilConfig(model=ModelConfig(name="tiny", tiny=True, max_length=16, lora=lora),
                     data=DataConfig(train_path="x.csv", test_path="x.csv", label_column="label",
                                     labels=json.dumps(LABELS)))
    return cfg.validate()


def _contribution(engine: str, cfg: VeilConfig, weights: list[np.ndarray], text: str) -> float:
    """‖what one example adds to the noisy sum‖: the optimizer's gradient (σ = 0) times the fixed E[B] = 1, read
    before it meets the float32 weights (whose rounding at |w| ~ 1e4 is ~1e-3 per value: not the mechanism's)."""
    from veil.task.model import set_trainable

    task = get_task("classification")
    model = build_model(cfg.model, LABELS, seed=0, dropout=0.0)
    set_trainable(model, weights)
    model.train()
    shard = task.tensors(TextExamples([text], ["card"]), LABELS, cfg, path="x.csv")
    keys = sorted(shard)
    params = [p for p in model.parameters() if p.requires_grad]
    dp = make_private(module=model, optimizer=torch.optim.SGD(params, lr=1.0),
                      loader=DataLoader(TensorDataset(*(shard[k] for k in keys)), batch_size=1), noise_multiplier=0.0,
                      max_grad_norm=CLIP, grad_sample_mode=engine, sample_rate=1.0, expected_batch_size=1)
    batch = dict(zip(keys, next(iter(dp.loader)), strict=True))
    assert batch["labels"].shape[0] == 1, "q = 1: the one example is in the batch"
    dp.optimizer.zero_grad(set_to_none=True)
    dp.mean_loss(task.per_example_loss(dp.module, batch)).backward()
    if engine == "hooks":
        zero_nonfinite_samples(dp.module)
    dp.optimizer.step()
    return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)))


def _crafted(base: list[np.ndarray], rng: np.random.Generator, *, scale: float, adversarial: bool) -> list[np.ndarray]:
    out = []
    for a in base:
        if adversarial:  # every value at the acceptance bound, signs at random
            out.append((np.sign(rng.standard_normal(a.shape)) * MAX_RECEIVED_ABS).astype(np.float32))
        else:
            out.append(np.clip(rng.standard_normal(a.shape) * scale, -MAX_RECEIVED_ABS, MAX_RECEIVED_ABS)
                       .astype(np.float32))
    return out


@pytest.mark.parametrize("lora", [True, False])
def test_every_engine_a_node_accepts_holds_the_clip_bound_under_crafted_weights(lora: bool) -> None:
    cfg = _cfg(lora=lora)
    base = get_trainable(build_model(cfg.model, LABELS, seed=0))
    engines = sorted({resolve_owner_engine(e, build_model(cfg.model, LABELS, seed=0)) for e in OWNER_ENGINES}
                     | {"hooks", "bk"})
    rng = np.random.default_rng(1)
    texts = ["my card was lost", "zebra quokka narwhal", "why a fee on transfer"]
    worst = {}
    for engine in engines:
        norms = []
        for scale in (1.0, 300.0, 3_000.0, MAX_RECEIVED_ABS):
            for text in texts:
                norms.append(_contribution(engine, cfg, _crafted(base, rng, scale=scale, adversarial=False), text))
        for text in texts:
            norms.append(_contribution(engine, cfg, _crafted(base, rng, scale=0, adversarial=True), text))
        worst[engine] = max(norms)
        assert all(np.isfinite(norms)), engine
    assert all(w <= CLIP * (1 + 1e-6) for w in worst.values()), worst


def test_auto_never_picks_ghost_on_a_node() -> None:
    full = build_model(ModelConfig(tiny=True, max_length=8, lora=False), LABELS, seed=0)
    lora = build_model(ModelConfig(tiny=True, max_length=8, lora=True), LABELS, seed=0)
    for model in (full, lora):
        assert {resolve_owner_engine(e, model) for e in OWNER_ENGINES} <= {"hooks", "bk"}
    with pytest.raises(ValueError):
        resolve_owner_engine("ghost", lora)


def test_a_deployed_node_runs_the_owners_engine_not_the_runs(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from veil.client.settings import NodeSettings

    import veil.client.trainer as trainer

    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"my card was lost {i},card\n" for i in range(20)), encoding="utf-8")
    used: list[str] = []
    real = trainer.make_private

    def spy(**kwargs: Any) -> Any:
        used.append(kwargs["grad_sample_mode"])
        return real(**kwargs)

    monkeypatch.setattr(trainer, "make_private", spy)
    cfg = _cfg(lora=True)
    cfg.privacy.grad_sample_mode, cfg.privacy.target_epsilon = "ghost", 0.0
    cfg.federation.local_steps, cfg.federation.batch_size = 1, 4
    cfg.federation.sample_rate = 0.5  # a deployed DP-SGD run states its public q
    for engine in ("hooks", "bk", "auto"):
        settings = NodeSettings(data_path=str(data), text_column=None, label_column=None, max_epsilon=50.0,
                                ledger_path=tmp_path / f"{engine}.json", device="cpu", partition_id=None,
                                num_partitions=None, dp_engine=engine, allow_test_model=True)
        _u, weight, _m = VeilClient(cfg, settings, run_id=1).fit(get_trainable(build_model(cfg.model, LABELS, seed=0)),
                                                                 {"server_round": 1})
        assert weight == 1
    assert used[:2] == ["hooks", "bk"] and used[2] in ("hooks", "bk") and "ghost" not in used


class _Probe(nn.Module):
    """A small classifier every engine supports; called as the trainer calls a task model."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))  # (B, 3)


def _clipped_sum_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Per-example loop: each example's gradient clipped to CLIP, summed."""
    params = [p for p in model.parameters()]
    total = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        loss = nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        factor = min(1.0, CLIP / (float(norm) + 1e-6))
        total = [t + g * factor for t, g in zip(total, grads)]
    return total


@pytest.mark.parametrize("engine", ["hooks", "ghost", "bk"])
def test_the_noisy_sum_is_divided_by_the_fixed_expected_batch_not_the_batch_drawn(engine: str) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(64, 6) * 3, torch.randint(0, 3, (64,))
    fixed = 5  # E[B] fixed by the node; the Poisson batches at q = 0.25 hold ~16 examples
    sizes = set()
    for _ in range(3):
        model = _Probe()
        reference_model = _Probe()
        reference_model.load_state_dict(model.state_dict())
        dp = make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                          loader=DataLoader(TensorDataset(x, y), batch_size=8), noise_multiplier=0.0,
                          max_grad_norm=CLIP, grad_sample_mode=engine, sample_rate=0.25, expected_batch_size=fixed)
        assert dp.sample_rate == 0.25
        bx, by = next(iter(dp.loader))
        sizes.add(int(bx.shape[0]))
        before = [p.detach().clone() for p in model.parameters()]
        dp.optimizer.zero_grad(set_to_none=True)
        per_example = nn.functional.cross_entropy(dp.module(bx), by, reduction="none")  # (B,)
        dp.mean_loss(per_example).backward()
        if engine == "hooks":
            zero_nonfinite_samples(dp.module)
        dp.optimizer.step()
        released = [(b - p.detach()) for b, p in zip(before, model.parameters())]  # lr 1: the divided noisy sum
        reference = _clipped_sum_reference(reference_model, bx, by)
        for got, want in zip(released, reference):
            torch.testing.assert_close(got, want / fixed, rtol=1e-4, atol=1e-6)
    assert sizes != {fixed}, "the batches drawn were not the fixed size (else the test proves nothing)"


def test_no_node_setting_or_run_config_turns_ghost_on_for_a_deployed_node(tmp_path: Any) -> None:
    """The owner cannot pick ghost either: --dp-engine ghost is refused in one line when the node starts; every
    accepted engine resolves to hooks or bk whatever privacy.grad_sample_mode the run sends."""
    from veil.client.settings import node_settings
    from veil.errors import ConfigError

    base = {"data-path": str(tmp_path / "d.csv"), "max-epsilon": 8.0, "ledger-path": str(tmp_path / "l.json")}
    with pytest.raises(ConfigError, match="dp-engine='ghost' is invalid"):
        node_settings({**base, "dp-engine": "ghost"})
    lora = build_model(ModelConfig(tiny=True, max_length=8, lora=True), LABELS, seed=0)
    for engine in OWNER_ENGINES:
        assert resolve_owner_engine(node_settings({**base, "dp-engine": engine}).dp_engine, lora) in ("hooks", "bk")
