"""Export of the open model: the global weights with adapters merged, saved with ``save_pretrained`` and the
tokenizer, plus a model card stating the privacy guarantee (DESIGN.md decision 11).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from veil.conf.schema import VeilConfig
from veil.task import get_task
from veil.task.model import set_trainable


def export_global_model(template: nn.Module, arrays: list[np.ndarray], out_dir: Path, *,
                        cfg: VeilConfig, summary: dict[str, Any]) -> Path:
    """Write ``out_dir`` (a Hugging Face model directory, written by the task) and its ``README.md`` model card."""
    model = copy.deepcopy(template).cpu()
    set_trainable(model, arrays)
    get_task(cfg.task.name).export(model, cfg, out_dir)
    card = out_dir / "README.md"
    tmp = card.with_suffix(".md.tmp")
    tmp.write_text(model_card(cfg, summary), encoding="utf-8")
    os.replace(tmp, card)
    return out_dir


def model_card(cfg: VeilConfig, summary: dict[str, Any]) -> str:
    """The model card: what was trained, on what kind of data (never the data), under which guarantee."""
    priv, fed = cfg.privacy, cfg.federation
    if priv.enabled and priv.level == "client":
        guarantee = (
            f"**(ε = {summary.get('epsilon_max', float('nan')):.3f}, δ = {priv.delta:g})-differential privacy at the "
            f"client level**: for each client's entire data, over {summary.get('rounds_completed', 0)} rounds with "
            f"{fed.clients_per_round} of {fed.num_clients} clients sampled per round ({priv.accountant.upper()} "
            f"accountant; noise {priv.noise_placement}; updates clipped to L2 norm {priv.max_grad_norm:g})."
        )
    elif priv.enabled:
        guarantee = (
            f"**(ε = {summary.get('epsilon_max', float('nan')):.3f}, δ = {priv.delta:g})-differential privacy at the "
            f"sample level** for every example of every client, as an upper bound reported by each client's own "
            f"{priv.accountant.upper()} accountant over all its DP-SGD steps in this run (the maximum over clients)."
        )
    else:
        guarantee = "**No differential privacy.** This model was trained without DP-SGD; do not publish it as private."
    lines = [
        "---", "library_name: transformers", f"pipeline_tag: {get_task(cfg.task.name).pipeline_tag}", "tags: [veil, federated-learning, differential-privacy]", "---",
        "", f"# {cfg.run_name}: federated fine-tune of {cfg.model.name}", "",
        "Trained with veil: each data owner fine-tuned locally under Opacus DP-SGD; the coordinator combined the",
        "updates with Flower SecAgg+ and never saw a single owner's update." if cfg.secagg.enabled else
        "Trained with veil (secure aggregation was off: the coordinator saw each client's update).",
        "", "## Privacy guarantee", "", guarantee, "",
        "| field | value |", "|---|---|",
        f"| DP level | {_level(cfg)} |",
        f"| ε (max over clients) | {summary.get('epsilon_max', 0.0):.4f} |",
        f"| δ | {priv.delta:g} |",
        f"| accountant | {priv.accountant} |",
        f"| noise multiplier σ (largest over clients; each calibrated) | {summary.get('noise_multiplier_max', 0.0):.4f} |",
        f"| per-sample clipping norm C | {priv.max_grad_norm:g} |",
        f"| Poisson sample rate q (max) | {summary.get('sample_rate_max', 0.0):.5f} |",
        f"| rounds completed | {summary.get('rounds_completed', 0)} of {fed.rounds} |",
        f"| clients per round | {fed.clients_per_round} of {fed.num_clients} |",
        f"| local training per round | {f'{fed.local_steps} steps' if fed.local_steps else f'{fed.local_epochs} epoch(s)'} |",
        f"| secure aggregation | {'SecAgg+' if cfg.secagg.enabled else 'off'} |",
        "", "## Data", "", cfg.data.description,
        "", "## Evaluation", "",
        f"Final accuracy {summary.get('accuracy', float('nan')):.4f} on the coordinator's evaluation split "
        f"({summary.get('eval_examples', 0)} examples)"
        + (f"; perplexity {summary['perplexity']:.3f}." if "perplexity" in summary else "."),
        "", "## Model", "",
        f"Base model: {cfg.model.name}; "
        + (f"LoRA r={cfg.model.lora_r} on {cfg.model.lora_targets}, merged into the weights; classification head trained."
           if cfg.model.lora else "full fine-tuning.")
        + (" The head started from the encoded label names (public; no privacy cost)."
           if cfg.model.head_init == "label_names" and get_task(cfg.task.name).pipeline_tag == "text-classification" else ""),
        "",
    ]
    return "\n".join(lines)


def _level(cfg: VeilConfig) -> str:
    if not cfg.privacy.enabled:
        return "none"
    if cfg.privacy.level == "client":
        return f"client (update clipping + Gaussian noise, {cfg.privacy.noise_placement})"
    return "sample (DP-SGD on each client)"
