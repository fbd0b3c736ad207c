"""FFA-LoRA (model.lora_variant=ffa): only B and the head train and travel; the frozen A is the same at the server
and on every client (built separately, after unrelated RNG use), stays fixed through DP training, and the adapter
upload halves."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import torch

from veil.client.app import _template
from veil.client.trainer import LocalPlan, train_round
from veil.conf.runconfig import to_run_config
from veil.conf.schema import ModelConfig, VeilConfig
from veil.task import get_task
from veil.task.data import tokenize
from veil.task.model import build_model, get_trainable, load_tokenizer, trainable_names

LABELS = ["a", "b", "c"]
FFA = ModelConfig(tiny=True, lora_r=4, lora_variant="ffa")


def _lora_a(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters() if ".lora_A." in n}


def test_only_b_and_head_travel_and_the_adapter_upload_halves() -> None:
    ffa = build_model(FFA, LABELS, seed=0)
    lora = build_model(replace(FFA, lora_variant="lora"), LABELS, seed=0)
    names = trainable_names(ffa)
    assert names and not any("lora_A" in n for n in names)
    assert all("lora_B" in n or "classifier" in n for n in names)
    assert set(names) == {n for n in trainable_names(lora) if "lora_A" not in n}

    def adapter_values(model: torch.nn.Module) -> int:
        return sum(a.size for n, a in zip(trainable_names(model), get_trainable(model), strict=True) if "lora_" in n)

    # query/value are square (hidden x hidden), so A (r x hidden) and B (hidden x r) are the same size
    assert adapter_values(ffa) * 2 == adapter_values(lora)
    a_values = sum(a.size for a in _lora_a(lora).values())
    assert sum(a.size for a in get_trainable(ffa)) == sum(a.size for a in get_trainable(lora)) - a_values


def test_frozen_a_is_identical_at_the_server_and_every_client_and_stays_fixed() -> None:
    server = build_model(FFA, LABELS, seed=3)
    torch.manual_seed(12345)
    torch.rand(1000)  # a client process has used the global RNG for other things first
    run = VeilConfig(model=FFA)
    run.data.train_path, run.data.labels, run.federation.seed = "train.csv", json.dumps(LABELS), 3
    key = json.dumps(to_run_config(run.validate()), sort_keys=True)  # what a client builds its template from
    _template.cache_clear()
    clients = [_template(key) for _ in range(2)]
    _template.cache_clear()
    clients.append(_template(key))
    reference = _lora_a(server)
    assert len(reference) == 2 * 2  # 2 layers x (query, value)
    for name, a in reference.items():
        fan_in = a.shape[1]
        assert np.abs(a).max() <= 1 / math.sqrt(fan_in) and np.abs(a).min() >= 0 and np.abs(a).std() > 0, name
        for client in clients:
            assert np.array_equal(_lora_a(client)[name], a), name
    other_seed = _lora_a(build_model(FFA, LABELS, seed=4))
    assert not any(np.array_equal(other_seed[n], a) for n, a in reference.items())

    # DP training on a client moves B and the head, never A, and the update carries only what is trainable
    cfg = FFA
    enc = tokenize(load_tokenizer(cfg), ["card lost", "atm ate cash", "pin forgot", "fee high"] * 8, max_length=16)
    enc["labels"] = torch.tensor([0, 1, 2, 1] * 8)
    received = get_trainable(server)
    plan = LocalPlan(steps=4, batch_size=8, lr=0.05, private=True, noise_multiplier=0.5, max_grad_norm=1.0)
    result = train_round(clients[0], received, enc, plan=plan, device=torch.device("cpu"), seed=1,
                         task=get_task("classification"))
    assert [u.shape for u in result.update] == [r.shape for r in received]
    moved = {n for n, u in zip(trainable_names(server), result.update, strict=True) if np.abs(u).max() > 0}
    assert any("lora_B" in n for n in moved) and any("classifier" in n for n in moved)
    for name, a in _lora_a(clients[0]).items():
        assert np.array_equal(a, reference[name])
