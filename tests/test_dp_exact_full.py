"""Full fine-tuning under DP-SGD (issue 7, item 1): Opacus per-sample clipped gradients through veil's integration
equal a per-example loop (clip each example's gradient to C, average) for the whole tiny BERT on a batch with pad
tokens, in hooks, ghost and bk (book-keeping) mode; the padding row gets no gradient; and stock Opacus provably does not get there
(the reference check can fail), which documents the upstream bugs worked around in :mod:`veil.privacy.exact`."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from support.references import clipped_mean_gradient
from veil.conf.schema import ModelConfig
from veil.privacy.dpsgd import make_private
from veil.privacy.exact import ExplicitIds, embedding_grad_sample, embedding_norm_sample, make_exact
from veil.task.data import tokenize
from veil.task.model import build_model, load_tokenizer

TEXTS = ["hi", "my card has not arrived yet, what should i do about it", "fee?", "where is my money transfer now"]
LABELS = [0, 1, 2, 1]
C = 0.05  # small enough that every example is clipped, so the clip factors matter
FULL = ModelConfig(tiny=True, lora=False)


def _batch(*, masked: bool = True) -> dict[str, torch.Tensor]:
    """Four texts padded to the longest. ``masked=False`` lets every position attend to the pads: then the pad
    tokens' embeddings get non-zero backprops, which is what exposes the padding-row bug (with the mask and a [CLS]
    head their backprops are exactly zero, and the bug stays latent)."""
    enc = tokenize(load_tokenizer(FULL), TEXTS, max_length=24)
    if not masked:
        enc["attention_mask"] = torch.ones_like(enc["attention_mask"])
    enc["labels"] = torch.tensor(LABELS)
    return enc


def _model() -> nn.Module:
    return build_model(FULL, ["a", "b", "c"], seed=0, dropout=0.0)


def _reference(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return clipped_mean_gradient(model, batch, clip=C)


def _loader(batch: dict[str, torch.Tensor]) -> DataLoader:
    n = batch["labels"].shape[0]
    return DataLoader(TensorDataset(batch["input_ids"], batch["attention_mask"], batch["labels"]), batch_size=n)


def _veil_clipped(model: nn.Module, batch: dict[str, torch.Tensor], mode: str) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    dp = make_private(module=model, optimizer=torch.optim.SGD(params, lr=0.1), loader=_loader(batch),
                      noise_multiplier=0.0, max_grad_norm=C, grad_sample_mode=mode)
    logits = dp.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # trainer's call
    dp.criterion(logits, batch["labels"]).backward()
    dp.optimizer.pre_step()  # clip, accumulate, add (zero) noise, scale by the expected batch size
    return [p.grad for p in params]


def _max_diff(got: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return max(float((g.double() - r.double()).abs().max()) for g, r in zip(got, reference, strict=True))


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk", "auto"])
def test_full_per_sample_clipping_matches_loop(mode: str, masked: bool) -> None:
    # arrange
    batch = _batch(masked=masked)
    pad = _model().config.pad_token_id
    assert (batch["input_ids"] == pad).any(), "the batch must contain pad tokens"
    model = _model()
    assert all(p.requires_grad for p in model.parameters()), "full fine-tuning: every parameter trains"
    reference = _reference(copy.deepcopy(model), batch)
    # act
    got = _veil_clipped(model, batch, mode)
    # assert
    assert len(got) == len(reference)
    for g, r in zip(got, reference, strict=True):
        torch.testing.assert_close(g.double(), r.double(), atol=1e-6, rtol=1e-5)
    word = model.bert.embeddings.word_embeddings.weight
    assert float(word.grad.abs().max()) > 1e-5, "embedding gradients must not be trivially zero"


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_padding_row_gets_no_gradient(mode: str) -> None:
    batch = _batch(masked=False)
    model = _model()
    emb = model.bert.embeddings.word_embeddings
    pad = emb.padding_idx
    assert pad is not None and (batch["input_ids"] == pad).any()
    reference = _reference(copy.deepcopy(model), batch)
    ref_word = reference[[n for n, _ in model.named_parameters()].index("bert.embeddings.word_embeddings.weight")]
    assert float(ref_word[pad].abs().max()) == 0.0  # torch's own semantics, the target
    _veil_clipped(model, batch, mode)
    assert float(emb.weight.grad[pad].abs().max()) == 0.0
    if mode == "hooks":
        assert float(emb.weight.grad_sample[:, pad].abs().max()) == 0.0  # (B, H): no example touches the row


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_padding_row_stays_fixed_under_noise(mode: str) -> None:
    batch = _batch(masked=False)
    model = _model()
    emb = model.bert.embeddings.word_embeddings
    before = emb.weight.detach().clone()
    params = [p for p in model.parameters() if p.requires_grad]
    dp = make_private(module=model, optimizer=torch.optim.SGD(params, lr=0.1), loader=_loader(batch),
                      noise_multiplier=1.0, max_grad_norm=C, grad_sample_mode=mode)
    logits = dp.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    dp.criterion(logits, batch["labels"]).backward()
    dp.optimizer.step()
    assert torch.equal(emb.weight[emb.padding_idx], before[emb.padding_idx])
    assert not torch.equal(emb.weight[emb.padding_idx + 1], before[emb.padding_idx + 1]), "noise moves other rows"


def test_stock_opacus_hooks_differs_from_loop() -> None:
    """The reference check can fail: stock Opacus (explicit ids, stock embedding sampler) gives the pad row
    per-sample gradient, which shifts every clip factor. If this starts failing, upstream fixed it."""
    batch = _batch(masked=False)
    model = _model()
    reference = _reference(copy.deepcopy(model), batch)
    params = [p for p in model.parameters() if p.requires_grad]
    module, opt, _ = PrivacyEngine(accountant="rdp").make_private(
        module=ExplicitIds(model), optimizer=torch.optim.SGD(params, lr=0.1), data_loader=_loader(batch),
        noise_multiplier=0.0, max_grad_norm=C, poisson_sampling=True, grad_sample_mode="hooks",
    )
    logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nn.functional.cross_entropy(logits, batch["labels"]).backward()
    opt.pre_step()
    assert _max_diff([p.grad for p in params], reference) > 1e-6


@pytest.mark.parametrize(("mode", "message"), [("hooks", "stack expects each tensor"), ("ghost", "view size")])
def test_stock_opacus_fails_without_explicit_ids(mode: str, message: str) -> None:
    """Upstream: broadcast (1, T) position ids (Opacus issue 841) in hooks mode; the stride-0 expanded
    token_type_ids meeting ``view`` in Opacus' embedding norm sampler in ghost mode."""
    batch = _batch()
    model = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    criterion = nn.CrossEntropyLoss()
    out = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=torch.optim.SGD(params, lr=0.1), data_loader=_loader(batch), criterion=criterion,
        noise_multiplier=0.0, max_grad_norm=C, poisson_sampling=True, grad_sample_mode=mode,
    )
    module, opt = out[0], out[1]
    crit = out[2] if mode == "ghost" else criterion
    with pytest.raises(RuntimeError, match=message):
        crit(module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
             batch["labels"]).backward()
        opt.pre_step()


def test_embedding_norm_sample_equals_grad_sample_norms() -> None:
    torch.manual_seed(0)
    layer = nn.Embedding(11, 5, padding_idx=0)
    expanded = torch.randint(1, 4, (1, 7)).expand(3, 7)  # (B, T), batch stride 0: the layout that broke `view`
    ids = expanded.clone()
    ids[1, 2:] = 0  # pad tokens
    backprops = torch.randn(3, 7, 5)  # (B, T, H)
    for tokens in (expanded, ids):
        grads = embedding_grad_sample(layer, [tokens], backprops)[layer.weight]  # (B, V, H)
        norms = embedding_norm_sample(layer, [tokens], backprops)[layer.weight]  # (B,)
        assert float(grads[:, 0].abs().max()) == 0.0
        torch.testing.assert_close(norms, grads.reshape(3, -1).norm(dim=1), atol=1e-5, rtol=1e-5)


def test_lora_model_is_not_wrapped_and_modes_are_checked() -> None:
    lora = build_model(ModelConfig(tiny=True), ["a", "b"], seed=0, dropout=0.0)
    assert make_exact(lora) is lora
    assert isinstance(make_exact(_model()), ExplicitIds)
    model = _model()
    batch = _batch()
    with pytest.raises(ValueError, match="grad_sample_mode"):
        make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loader=_loader(batch),
                     noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ew")
