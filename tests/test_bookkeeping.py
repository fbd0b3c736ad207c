"""Book-keeping (``privacy.grad_sample_mode=bk``, one backward): the noise of a release has std sigma*C / B_expected
(chi-square bounds) from an OS-seeded generator; an empty Poisson batch still releases it; an example with a
non-finite gradient is zeroed and the rest equals the per-example loop; what bk cannot do exactly is refused in one
line; the trainer runs it. Exactness against the per-example loop for every family is in tests/test_families.py and
tests/test_dp_exact_full.py."""

from __future__ import annotations

import copy

import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from support.families import tiny_config
from support.references import clipped_mean_gradient
from veil.client.trainer import LocalPlan, train_round
from veil.conf.schema import ModelConfig
from veil.errors import ConfigError
from veil.privacy.bk import unsupported_layer
from veil.privacy.dpsgd import make_private
from veil.task import get_task
from veil.task.data import tokenize
from veil.task.model import build_model, get_trainable, load_tokenizer

SIGMA, C, N, BATCH = 1.3, 0.7, 40, 8  # q = 1/5: expected batch size 8


def _private(model: nn.Module, *, sigma: float = SIGMA, clip: float = C, n: int = N, batch: int = BATCH) -> object:
    ids = torch.randint(5, 90, (n, 6))
    loader = DataLoader(TensorDataset(ids, torch.ones_like(ids), torch.zeros(n, dtype=torch.long)), batch_size=batch)
    params = [p for p in model.parameters() if p.requires_grad]
    return make_private(module=model, optimizer=torch.optim.SGD(params, lr=1.0), loader=loader,
                        noise_multiplier=sigma, max_grad_norm=clip, grad_sample_mode="bk")


def _noise_of_an_empty_batch(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)  # the run's seed: it must not fix the noise
    model = nn.Sequential(nn.Linear(100, 200))
    dp = _private(model)
    dp.optimizer.zero_grad(set_to_none=True)
    dp.optimizer.original_optimizer.step = lambda *a, **k: None  # keep p.grad as released, skip the update
    dp.noise_only_step()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_empty_batch_releases_noise_of_std_sigma_c_over_expected_batch() -> None:
    noise = _noise_of_an_empty_batch(0).double()  # 20,200 values of a zero gradient, all noise
    n = noise.numel()
    std = SIGMA * C / BATCH
    statistic = float((noise**2).sum()) / std**2  # chi-square with n degrees of freedom if the std is right
    low, high = stats.chi2.ppf(1e-6, n), stats.chi2.ppf(1 - 1e-6, n)
    assert low < statistic < high, (statistic / n, "sample variance / expected")
    assert abs(float(noise.mean())) < 6 * std / n**0.5  # centred
    assert not torch.equal(noise, _noise_of_an_empty_batch(0).double()), "the same run seed, different noise"


def test_a_non_finite_example_is_zeroed_and_the_rest_is_the_loop() -> None:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config("bert", num_labels=2))
    gen = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(4, 90, (3, 7), generator=gen), "attention_mask": torch.ones(3, 7).long(),
             "labels": torch.tensor([0, 1, 1])}
    batch["attention_mask"][0, 5:] = 0
    kept = {k: v[[0, 2]] for k, v in batch.items()}
    reference = [r * 2 / 3 for r in clipped_mean_gradient(copy.deepcopy(model), kept, clip=0.01)]  # sum / B
    dp = _private(model, sigma=0.0, clip=0.01, n=3, batch=3)
    logits = dp.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_example = nn.functional.cross_entropy(logits, batch["labels"], reduction="none")  # (B,)
    poisoned = per_example * torch.tensor([1.0, float("nan"), 1.0])  # example 1's gradient is all nan
    dp.mean_loss(poisoned).backward()
    assert dp.bookkeeping.take_zeroed() == 1
    dp.optimizer.pre_step()
    got = [p.grad for p in model.parameters()]
    for g, r in zip(got, reference, strict=True):
        torch.testing.assert_close(g.double(), r.double(), atol=1e-6, rtol=1e-5)


class _Narrow(nn.Module):
    """Narrow layers over many tokens (2 T^2 > d p: bk instantiates their per-sample gradients, "mixed"), GPT-2's
    Conv1D, a LayerNorm, and one Linear called twice (its calls are joined along the tokens)."""

    def __init__(self) -> None:
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.emb = nn.Embedding(30, 4, padding_idx=0)
        self.conv, self.norm, self.twice = Conv1D(3, 4), nn.LayerNorm(3), nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> object:
        from types import SimpleNamespace

        h = self.twice(torch.tanh(self.twice(self.norm(self.conv(self.emb(input_ids))))))  # (B, T, 3)
        pooled = (h * attention_mask.unsqueeze(-1)).sum(dim=1)  # (B, 3)
        return SimpleNamespace(logits=self.head(pooled))


def test_mixed_conv1d_and_repeated_layers_match_the_loop() -> None:
    torch.manual_seed(0)
    model = _Narrow()
    ids = torch.randint(1, 30, (3, 12))
    mask = torch.ones_like(ids)
    ids[0, 8:], mask[0, 8:] = 0, 0  # pad tokens
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1])}
    reference = clipped_mean_gradient(copy.deepcopy(model), batch, clip=0.01)
    dp = _private(model, sigma=0.0, clip=0.01, n=3, batch=3)
    dp.criterion(dp.module(input_ids=ids, attention_mask=mask).logits, batch["labels"]).backward()
    dp.optimizer.pre_step()
    for g, r in zip([p.grad for p in model.parameters()], reference, strict=True):
        torch.testing.assert_close(g.double(), r.double(), atol=1e-7, rtol=1e-5)
    assert float(model.emb.weight.grad[0].abs().max()) == 0.0 and float(model.conv.weight.grad.abs().max()) > 0


def test_what_bk_cannot_do_exactly_is_refused_in_one_line() -> None:
    from transformers import AutoModelForCausalLM

    tied = AutoModelForCausalLM.from_config(tiny_config("gpt2"))
    assert "tied" in (unsupported_layer(tied) or "")
    with pytest.raises(ConfigError) as err:
        _private(tied)
    assert "\n" not in str(err.value) and "grad_sample_mode=hooks" in str(err.value)
    clipped = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Linear(4, 2))
    assert "max_norm" in (unsupported_layer(clipped) or "")
    supported = nn.Sequential(nn.Embedding(10, 4, padding_idx=0), nn.LayerNorm(4), nn.Linear(4, 2))
    assert unsupported_layer(supported) is None


def test_trainer_runs_bk_full_fine_tuning() -> None:
    cfg = ModelConfig(tiny=True, lora=False)
    template = build_model(cfg, ["a", "b"], seed=0, dropout=0.0)
    enc = tokenize(load_tokenizer(cfg), ["card lost", "atm ate my cash", "pin", "fee high"] * 4, max_length=12)
    enc["labels"] = torch.tensor([0, 1] * 8)
    received = get_trainable(template)
    plan = LocalPlan(steps=3, batch_size=4, lr=0.05, private=True, noise_multiplier=0.5, max_grad_norm=1.0,
                     grad_sample_mode="bk")
    result = train_round(template, received, enc, plan=plan, device=torch.device("cpu"), seed=1,
                         task=get_task("classification"))
    assert result.steps == 3 and abs(result.sample_rate - 0.25) < 1e-12
    assert all(bool(torch.isfinite(torch.as_tensor(u)).all()) for u in result.update)
    assert sum(float(abs(u).max()) > 0 for u in result.update) > len(result.update) // 2, "noise moves the weights"


def test_each_layers_tensors_are_let_go_in_the_backward() -> None:
    """Once a layer's norms are taken and its live tokens packed, the record its output's hook holds is emptied: the
    graph keeps that hook until the loss is dropped, and the record held the layer's full (B, T, d) input and
    (B, T, p) output gradient (on MiniLM-L6 every layer's, to the end of the step: 1.9x the non-private working set,
    docs/benchmarks.md). Small layers (LayerNorm) are done in the backward too."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(tiny=True, lora=False), ["a", "b"], seed=0, dropout=0.0)
    ids = torch.randint(5, 90, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # pad tokens: packing copies the live rows
    dp = _private(model, sigma=0.0, clip=0.5, n=3, batch=3)
    bk, seen = dp.bookkeeping, []
    hook = bk._on_backprop

    def watch(module: nn.Module, record: list, grad: torch.Tensor) -> None:
        seen.append((type(module).__name__, record))  # the list the output's hook holds
        hook(module, record, grad)

    bk._on_backprop = watch  # bound into each output's hook at the forward
    loss = dp.criterion(dp.module(input_ids=ids, attention_mask=mask).logits, torch.tensor([0, 1, 1]))
    loss.backward()  # ``loss`` (and with it the graph and its hooks) is still alive here
    assert {"Linear", "LayerNorm", "Embedding"} <= {name for name, _ in seen}

    def tensors(x: object) -> int:
        return 1 if isinstance(x, torch.Tensor) else sum(map(tensors, x)) if isinstance(x, (list, tuple)) else 0

    held = [name for name, record in seen if tensors(record)]
    assert not held, f"{len(held)} of {len(seen)} layers' tensors still held by their hooks: {held[:5]}"
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
