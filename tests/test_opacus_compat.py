"""Every private Opacus name lives in ``veil/privacy/opacus_compat.py``, behind a check of ``opacus.__version__``:
an untested Opacus fails before anything trains, in one line naming the installed version and the tested set; the
module links an upstream proposal that exists. Book-keeping picks a layer's rule by the most specific registered
class, and a new layer type is one registered function."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import opacus
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from veil.errors import DependencyError
from veil.privacy import opacus_compat
from veil.privacy.bk import registry
from veil.privacy.bk.layers import embedding, linear, other
from veil.privacy.dpsgd import make_private

ROOT = Path(__file__).resolve().parents[1]
PRIVATE_NAMES = {"_check_processed_flag", "_mark_as_processed", "_adjusted_noise_multiplier", "summed_grad",
                 "_forward_counter", "GRAD_SAMPLERS", "NORM_SAMPLERS"}
PRIVATE_ATTRIBUTES = {"activations"}  # a common word: only as an attribute (``module.activations``)


def _names_in_code(path: Path) -> set[str]:
    """The private Opacus names used in ``path``'s code: as names, or as a string that is exactly the name
    (``getattr(p, "summed_grad")``); not in docstrings or comments."""
    found, previous = set(), ""
    for token in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
        if token.type == tokenize.NAME and (token.string in PRIVATE_NAMES
                                            or (previous == "." and token.string in PRIVATE_ATTRIBUTES)):
            found.add(token.string)
        if token.type == tokenize.STRING and token.string.strip("\"'") in PRIVATE_NAMES | PRIVATE_ATTRIBUTES:
            found.add(token.string.strip("\"'"))
        if token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT):
            previous = token.string
    return found


def test_only_opacus_compat_uses_private_opacus_names() -> None:
    compat = ROOT / "veil/privacy/opacus_compat.py"
    users = {str(p.relative_to(ROOT)): names for p in sorted((ROOT / "veil").rglob("*.py"))
             if p != compat and (names := _names_in_code(p))}
    assert users == {}
    assert _names_in_code(compat) == PRIVATE_NAMES | PRIVATE_ATTRIBUTES  # the check itself can see them


def test_an_untested_opacus_fails_in_one_line_naming_both_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    assert opacus_compat.require_tested_opacus() == opacus.__version__  # the suite runs a tested Opacus
    monkeypatch.setattr(opacus, "__version__", "9.9.9")
    model = nn.Linear(3, 2)
    loader = DataLoader(TensorDataset(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)), batch_size=2)
    with pytest.raises(DependencyError) as err:
        make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), loader=loader,
                     noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="hooks")
    message = str(err.value)
    assert "\n" not in message and "opacus 9.9.9" in message
    assert all(v in message for v in opacus_compat.TESTED_OPACUS) and "pip install opacus==" in message
    assert not hasattr(model, "_module"), "nothing was attached"



def test_veil_simulate_refuses_an_untested_opacus_before_anything_starts(monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from veil import simulation
    from veil.cli import main

    def never(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the simulation started")

    monkeypatch.setattr(simulation, "simulate", never)
    monkeypatch.setattr(opacus, "__version__", "9.9.9")
    assert main(["simulate", "model=tiny_bert"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("veil: error: opacus 9.9.9 is installed") and "1.6.0" in err[0], err

def test_veil_client_refuses_an_untested_opacus_at_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from veil.cli import main

    data = tmp_path / "d.csv"
    data.write_text("text,label\nhello,a\n")
    monkeypatch.setattr(opacus, "__version__", "9.9.9")
    assert main(["client", "--superlink", "127.0.0.1:9", "--data", str(data), "--node-dir", str(tmp_path / "n"),
                 "--max-epsilon", "8", "--insecure"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("veil: error: opacus 9.9.9 is installed") and "1.6.0" in err[0], err
    assert not (tmp_path / "n").exists(), "nothing was written"


def test_opacus_compat_links_an_upstream_proposal_for_the_tested_version() -> None:
    links = re.findall(r"docs/upstream/([\w/-]+\.md)", (ROOT / "veil/privacy/opacus_compat.py").read_text())
    assert links
    for name in links:
        text = (ROOT / "docs/upstream" / name).read_text(encoding="utf-8")
        assert all(f"opacus {v}" in text for v in opacus_compat.TESTED_OPACUS), name
        assert "## Why" in text and "## Proposed change" in text, name
        assert all(n in text for n in PRIVATE_NAMES), "the proposal names every private name it would retire"


def test_book_keeping_picks_the_most_specific_registered_rule() -> None:
    from transformers.pytorch_utils import Conv1D

    class Wider(nn.Linear):  # a subclass of a registered type
        pass

    assert registry.rule_for(nn.Linear(2, 3))[0] is linear.linear
    assert registry.rule_for(Wider(2, 3))[0] is linear.linear
    assert registry.rule_for(Conv1D(3, 2))[0] is linear.linear
    assert registry.rule_for(nn.Embedding(5, 2))[0] is embedding.embedding
    assert registry.rule_for(nn.LayerNorm(4))[0] is other.other  # the nn.Module fallback


def test_a_new_layer_type_is_one_registered_function(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register a rule for a new layer type; book-keeping calls it, and its clipped sum is the per-example loop's."""
    import copy

    from veil.privacy.bk import BookKeeping

    class Scaled(nn.Linear):  # a "new" layer type: a linear layer whose rule is registered on its own
        pass

    monkeypatch.setattr(registry, "_RULES", dict(registry._RULES))  # the registration is undone after the test
    seen: list[str] = []

    @registry.register(Scaled)
    def scaled(m: nn.Module, calls: list[registry.Call], shared: registry.Shared) -> tuple[torch.Tensor, registry.Clip]:
        seen.append(type(m).__name__)
        return linear.linear(m, calls, shared)

    torch.manual_seed(0)
    model, clip = Scaled(3, 2), 0.5
    reference = copy.deepcopy(model)
    x = torch.randn(4, 5, 3)  # (B, T, d)
    bk = BookKeeping(model, max_grad_norm=clip)
    bk.backward(model(x).pow(2).sum(dim=(1, 2)))  # (B,) per-example losses
    assert seen == ["Scaled"]
    want = [torch.zeros_like(p) for p in reference.parameters()]
    for i in range(x.shape[0]):  # the per-example loop: clip each example's gradient, sum
        grads = torch.autograd.grad(reference(x[i:i + 1]).pow(2).sum(), list(reference.parameters()))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        want = [w + factor * g for w, g in zip(want, grads, strict=True)]
    for p, w in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, w, atol=1e-5, rtol=1e-4)
