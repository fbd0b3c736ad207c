"""Export of the open model: the global weights with adapters merged, saved with ``save_pretrained`` and the
tokenizer, plus a model card stating the privacy guarantee (DESIGN.md decision 11).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from veil.atomic import atomic_write
from veil.conf.schema import VeilConfig
from veil.server.guarantee import fixed_sigma_rate
from veil.task import get_task
from veil.task.model import set_trainable


def export_global_model(template: nn.Module, arrays: list[np.ndarray], out_dir: Path, *,
                        cfg: VeilConfig, summary: dict[str, Any]) -> Path:
    """Write ``out_dir`` (a Hugging Face model directory, written by the task) and its ``README.md`` model card."""
    model = copy.deepcopy(template).cpu()
    set_trainable(model, arrays)
    get_task(cfg.task.name).export(model, cfg, out_dir)
    card = out_dir / "README.md"
    atomic_write(card, model_card(cfg, summary))
    return out_dir


def model_card(cfg: VeilConfig, summary: dict[str, Any]) -> str:
    """The model card: what was trained, on what kind of data (never the data), under which guarantee.

    It states only what holds (docs/privacy.md): the ε of ``summary['epsilon_basis']`` (veil.server.guarantee), the
    trust behind SecAgg+ (the coordinator cannot know whether owners pinned a roster), and no per-client σ or q
    (nodes do not report them).
    """
    priv, fed = cfg.privacy, cfg.federation
    lines = [
        "---", f"library_name: {_library(cfg)}", f"base_model: {_identity(cfg)[0]}", f"license: {_identity(cfg)[1]}",
        f"pipeline_tag: {get_task(cfg.task.name).pipeline_tag}", "tags: [veil, federated-learning, differential-privacy]", "---",
        "", f"# {cfg.run_name}: federated fine-tune of {cfg.model.name}", "",
        _training_line(cfg), "", "## Privacy guarantee", "", _guarantee(cfg, summary), "",
        "| field | value |", "|---|---|",
        f"| DP level | {_level(cfg)} |",
        f"| ε | {_epsilon_text(summary)} |",
        f"| δ | {priv.delta:g} (the run's; each owner accounts at its own δ ≤ this) |" if priv.enabled else "| δ | – |",
        f"| accountant | {priv.accountant} |",
        *_noise_rows(cfg),
        f"| rounds completed | {summary.get('rounds_completed', 0)} of {fed.rounds} |",
        f"| clients per round | {fed.clients_per_round} of {fed.num_clients} |",
        f"| local training per round | {f'{fed.local_steps} steps' if fed.local_steps else f'{fed.local_epochs} epoch(s)'} |",
        f"| secure aggregation | {_SECAGG_ROW if cfg.secagg.enabled else 'off'} |",
        "", "## Data", "", cfg.data.description,
        "", "## Evaluation", "",
        f"Final accuracy {summary.get('accuracy', float('nan')):.4f} on the coordinator's evaluation split "
        f"({summary.get('eval_examples', 0)} examples)"
        + (f"; perplexity {summary['perplexity']:.3f}" if "perplexity" in summary else "")
        + _choice_text(summary) + ".",
        "", "## Model", "",
        _model_line(cfg),
        "",
    ]
    return "\n".join(lines)


def _choice_text(summary: dict[str, Any]) -> str:
    """The closed-set accuracy (causal_lm, :mod:`veil.task.choices`), beside the starting model's when evaluated."""
    if "choice_accuracy" not in summary:
        return ""
    before = (summary.get("before_training") or {}).get("choice_accuracy")
    start = f" (starting model: {before:.4f})" if isinstance(before, float) else ""
    return (f"; closed-set accuracy {summary['choice_accuracy']:.4f}{start}, the highest log-likelihood among the "
            "known completions")


def _identity(cfg: VeilConfig) -> tuple[str, str]:
    from veil.task.packaged import base_model_identity

    return base_model_identity(cfg.model.path, cfg.model.source) if not cfg.model.tiny else ("tiny test model", "none")


def _library(cfg: VeilConfig) -> str:
    from veil.task.model import model_pooling

    pooled = cfg.task.name == "classification" and model_pooling(cfg.model).mode != "pooler"
    return "sentence-transformers" if pooled else "transformers"


def _model_line(cfg: VeilConfig) -> str:
    """The base model by its Hugging Face id and licence, how it is read, and which layers trained."""
    from veil.task.model import model_pooling, tuning_of

    base_id, licence = _identity(cfg)
    model = cfg.model
    trained = {"head": "only the classification head trained; the base model's weights are unchanged",
               "lora": f"LoRA r={model.lora_r} on {model.lora_targets} (merged into the weights) and the head trained",
               "full": "every weight trained (full fine-tuning)"}[tuning_of(model)]
    line = f"Base model: {base_id} (licence: {licence}); {trained}."
    if get_task(cfg.task.name).pipeline_tag == "text-classification":
        pooling = model_pooling(model)
        if pooling.mode != "pooler":
            line += (f" The head reads the {pooling.mode}-pooled{' and L2-normalised' if pooling.normalize else ''} "
                     "sentence embedding; load it with `SentenceTransformer(dir).encode(texts)` (logits) or "
                     "`veil.load_classifier(dir).predict(texts)` (label names).")
            if model.feature_center != "none" or model.feature_scale != 1.0:
                centre = " minus the label names' mean embedding (public)" if model.feature_center != "none" else ""
                line += (f" The head read that embedding{centre}, scaled to norm ~{model.feature_scale:g} (a fixed map "
                         "from the label names, folded into the exported dense layer).")
        else:
            line += " Load it with `AutoModelForSequenceClassification.from_pretrained(dir)`."
        if model.init_from:
            line += (" Training started from the global model of an earlier veil run (LP-FT: head first, then "
                     "adapters); each owner's ledger, and so the ε above, covers both runs.")
        elif model.head_init == "label_names":
            line += " The head started from the encoded label names (public; no privacy cost)."
    return line


_SECAGG_ROW = ("SecAgg+ (full-strength masks; honest-but-curious coordinator, or malicious against owners that pinned "
               "a roster of signing keys: docs/privacy.md)")


def _training_line(cfg: VeilConfig) -> str:
    if not cfg.secagg.enabled:
        return "Trained with veil (secure aggregation was off: the coordinator saw each client's update)."
    how = "under Opacus DP-SGD" if cfg.privacy.enabled and cfg.privacy.level == "sample" else "on its own data"
    return (f"Trained with veil: each data owner fine-tuned locally {how}; the coordinator combined the updates with "
            "Flower SecAgg+ (masks from the whole key; no neighbourhood smaller than announced beyond each owner's "
            "--max-dropouts), so a coordinator that follows the protocol (honest but curious) saw only their sum. "
            "Against a coordinator that deviates from it, SecAgg+ holds for an owner only if that owner pinned the "
            "owners' roster of signing keys (veil client --roster); without one, the coordinator may substitute keys "
            "and recover that owner's update (docs/privacy.md).")


def _epsilon_text(summary: dict[str, Any]) -> str:
    eps = summary.get("epsilon_max")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps):
        return "see each owner's ledger (`veil privacy report`)"
    return f"{eps:.4f}" + (" (bound after all planned rounds)" if summary.get("epsilon_basis") == "target" else "")


def _guarantee(cfg: VeilConfig, summary: dict[str, Any]) -> str:
    """One paragraph per basis of veil.server.guarantee."""
    priv, fed, basis = cfg.privacy, cfg.federation, summary.get("epsilon_basis", "")
    eps, rounds = summary.get("epsilon_max", float("nan")), summary.get("rounds_completed", 0)
    ledger = ("Each owner's own ledger holds its all-time figure over every run it took part in "
              "(`veil privacy report`).")
    if not priv.enabled:
        return "**No differential privacy.** This model was trained without DP-SGD; do not publish it as private."
    if basis == "client_level":
        trust = ("the coordinator added it and is trusted to have done so" if priv.noise_placement == "central" else
                 "each contributing owner added its share, and SecAgg+ revealed only the sum to an honest-but-curious "
                 "coordinator, or to any coordinator where every owner pinned the roster with no drop-outs allowed; "
                 "against a coordinator that breaks SecAgg+, each owner's update carries only its own share, and "
                 "only its per-record ledger bound holds")
        return (f"**(ε = {eps:.3f}, δ = {priv.delta:g})-differential privacy at the client level**: for each owner's "
                f"entire data, over {rounds} rounds, accounted by the coordinator with the noise the round's "
                f"contributing owners actually added (updates clipped to L2 norm S = {priv.max_grad_norm:g}), without "
                f"amplification by client sampling (q = 1). The noise: {trust}. {ledger}")
    head = "**(ε, δ) differential privacy at the sample level** for every example of every owner"
    if basis == "simulated_ledgers":
        return (f"{head}, ε = {eps:.3f} at δ = {priv.delta:g}: the largest ε over the simulated owners' own ledgers "
                f"({priv.accountant.upper()} accountant). Each owner's DP-SGD runs on its own machine, whatever the "
                "coordinator does.")
    if basis == "target":
        return (f"{head}: ε ≤ {priv.target_epsilon:g} at δ = {priv.delta:g} for this run, a bound after all "
                f"{fed.rounds} planned rounds: each owner's node calibrated its noise so that its ε for this run, at its "
                f"owner's δ (at most {priv.delta:g}), stays within it (an owner may add more noise). It does not rely "
                f"on SecAgg+: each owner's node enforces it. {ledger}")
    if basis == "shared_noise":
        return (f"{head} **in the published model**: ε = {eps:.3f} at δ = {priv.delta:g} over "
                f"{summary.get('rounds_run', rounds)} rounds of one DP-SGD step each, sampled at q = "
                f"{fed.sample_rate:g} (the run's federation.sample_rate), with the noise each SecAgg+ sum carried: every "
                "contributing owner added σ/sqrt(M) (M its own --min-cohort), so the sum carries σ when at least M "
                "honest owners contributed to it. That is an assumption about the other owners, not something one "
                "owner's node enforces: against a coordinator that colludes with other owners or breaks SecAgg+, "
                "each owner's update carries only its own share, and only its own ledger's figure holds (its share "
                f"alone, a larger ε; owners should pin the roster with --max-dropouts 0). {ledger}")
    if basis == "fixed_sigma":
        return (f"{head}: ε ≤ {eps:.3f} at δ = {priv.delta:g} for this run: {fed.local_steps} DP-SGD steps per round "
                f"at noise multiplier σ ≥ {priv.noise_multiplier:g} over {summary.get('rounds_run', rounds)} rounds, "
                f"accounted at sampling rate q = {fixed_sigma_rate(cfg):g} (the run's federation.sample_rate, which every "
                "owner's node samples at or below; 1 when the run states none), so it holds whatever each owner's data "
                f"size; each owner's ledger gives its own figure. {ledger}")
    return (f"{head}; the coordinator cannot state ε for this run: the number of DP-SGD steps (or the noise) depends "
            f"on each owner's data, which the coordinator does not see. {ledger}")


def _noise_rows(cfg: VeilConfig) -> list[str]:
    """What the run asked for (no per-client value: nodes report none)."""
    priv = cfg.privacy
    if not priv.enabled:
        return []
    if priv.level == "client":
        return [f"| update clipping norm S (whole update) | {priv.max_grad_norm:g} |",
                f"| noise placement | {priv.noise_placement} |"]
    asked = (f"target ε {priv.target_epsilon:g} (each node calibrates its own σ)" if priv.target_epsilon > 0
             else f"σ ≥ {priv.noise_multiplier:g} (a node may add more)")
    if priv.share_noise:
        asked += "; shared: each node adds σ/sqrt(M) of the sum's noise, M its owner's --min-cohort"
    clip = (f"{priv.max_grad_norm:g}" if not priv.max_grad_norm_final else
            f"{priv.max_grad_norm:g} in round 1 to {priv.max_grad_norm_final:g} in round {cfg.federation.rounds} "
            "(geometric; σ is a multiple of each round's C)")
    return [f"| per-sample clipping norm C | {clip} |", f"| noise | {asked} |"]


def _level(cfg: VeilConfig) -> str:
    if not cfg.privacy.enabled:
        return "none"
    if cfg.privacy.level == "client":
        return f"client (update clipping + Gaussian noise, {cfg.privacy.noise_placement})"
    return "sample (DP-SGD on each client)"
