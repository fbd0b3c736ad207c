"""Pooling that follows the model, and the classifier that sits on the pooled sentence embedding.

A sentence-transformers directory (``modules.json`` + ``1_Pooling/config.json``, e.g. the packaged MiniLM-L6) says
how its encoder was trained to be read: mean pooling, often followed by L2 normalisation. Reading it any other way
wastes the base model: on BANKING77 a frozen MiniLM gives 62.2% zero-shot accuracy (label-name prototypes) through
mean pooling against 43.2% through BERT's pooler, which the sentence objective never trained (issue 22).

``model.pooling``:

* ``auto``: the directory's sentence-transformers pooling (and normalisation) when it has one, else ``pooler``;
* ``mean`` | ``cls`` | ``max`` | ``last``: :class:`PooledClassifier`, one ``nn.Linear`` head on the pooled (and,
  where the directory says so, normalised) embedding, for every family (encoders and decoders alike);
* ``pooler``: the family's own ``AutoModelForSequenceClassification`` (BERT's pooler, RoBERTa's head, the last
  token for GPT-2 / Llama / Qwen2).

A :class:`PooledClassifier` is exported in the sentence-transformers layout (the encoder with its tokenizer at the
top, ``1_Pooling``, ``2_Normalize`` where used, and a ``Dense`` head with identity activation): it loads in one line
with ``SentenceTransformer(dir)``, whose ``encode`` returns the logits, or ``veil.load_classifier(dir)`` for label
names. ``AutoModelForSequenceClassification`` cannot express mean pooling, and a custom class would need
``trust_remote_code``; this layout is one the ecosystem already reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from veil.conf.schema import POOLINGS
from veil.errors import ModelError

_ST_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
             "pooling_mode_lasttoken": "last"}


@dataclass(frozen=True)
class Pooling:
    mode: str  # mean | cls | max | last | pooler
    normalize: bool = False  # L2-normalise the pooled embedding (a sentence-transformers Normalize module)


def sentence_transformers_pooling(path: Path | None) -> Pooling | None:
    """The pooling a sentence-transformers directory declares (``modules.json``), or None for a plain HF directory."""
    if path is None or not (path / "modules.json").is_file():
        return None
    try:
        modules = json.loads((path / "modules.json").read_text(encoding="utf-8"))
        pooling_dir = next(m["path"] for m in modules if str(m.get("type", "")).endswith(".Pooling"))
        config = json.loads((path / pooling_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, StopIteration, TypeError):
        return None
    modes = [mode for key, mode in _ST_MODES.items() if config.get(key)]
    if len(modes) != 1:
        return None  # several modes concatenated, or weighted/sqrt-length: not offered, the caller falls back
    normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
    return Pooling(modes[0], normalize)


def resolve_pooling(requested: str, path: Path | None, *, tuning: str = "lora") -> Pooling:
    """``model.pooling`` for the model directory ``path`` (None: a model built in code).

    ``auto``: the pooling a sentence-transformers directory declares; else, for a frozen encoder
    (``tuning="head"``), the last token of a decoder and the mean of an encoder's tokens (so that its features can
    be computed once: a family's own classifier head cannot be split from its encoder); else ``pooler``."""
    if requested not in POOLINGS:
        raise ModelError(f"model.pooling={requested} is invalid; use one of {', '.join(POOLINGS)}")
    declared = sentence_transformers_pooling(path)
    if requested == "auto":
        if declared is not None:
            return declared
        if tuning == "head" and path is not None:
            return Pooling("last" if _is_decoder(path) else "mean")
        return Pooling("pooler")
    normalize = declared is not None and declared.normalize and requested == declared.mode
    return Pooling(requested, normalize)


def _is_decoder(path: Path) -> bool:
    """A causal LM directory (GPT-2, Llama, Qwen2, SmolLM2...): its config names a ``*ForCausalLM`` or
    ``*LMHeadModel`` architecture, or says ``is_decoder``."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    names = [str(a) for a in config.get("architectures") or []]
    return bool(config.get("is_decoder")) or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in names)


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, T, H) token states and (B, T) attention mask -> (B, H), as sentence-transformers pools them."""
    maskf = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    if mode == "mean":
        return (hidden * maskf).sum(dim=1) / maskf.sum(dim=1).clamp(min=1e-9)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(maskf == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    if mode == "last":  # the last attended token, whichever side the padding is on
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # (B, T)
        last = (positions * mask.long()).argmax(dim=1)  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ModelError(f"pooling mode {mode!r} is not one veil computes; use mean, cls, max or last")


class PooledClassifier(nn.Module):
    """``encoder`` (a Hugging Face ``AutoModel``) -> pooling (-> L2 normalisation) -> ``head`` (``nn.Linear``).

    ``forward(features=...)`` skips the encoder: a frozen encoder's pooled embeddings, computed once on the node
    (:meth:`embed`), are all the head needs, so DP-SGD steps on the head cost a matrix product.
    """

    def __init__(self, encoder: nn.Module, pooling: Pooling, num_labels: int) -> None:
        super().__init__()
        self.encoder, self.pooling = encoder, pooling
        hidden = int(getattr(encoder.config, "hidden_size", 0) or getattr(encoder.config, "n_embd"))
        self.head = nn.Linear(hidden, num_labels)
        self.config = encoder.config  # what callers read of an HF model (pad_token_id, model_type, labels)
        # the fixed map before the head, x -> feature_scale * (x - feature_center) (veil.task.model.set_feature_map);
        # not a parameter: never trained, never sent, rebuilt by every process from the public label names
        self.register_buffer("feature_center", torch.zeros(hidden), persistent=False)
        self.feature_scale, self.feature_mapped = 1.0, False

    def set_feature_map(self, center: torch.Tensor, scale: float) -> None:
        self.feature_center.copy_(center.detach().to(self.feature_center))
        self.feature_scale, self.feature_mapped = float(scale), True

    def head_input(self, features: torch.Tensor) -> torch.Tensor:
        """What the head reads: the pooled embedding through the fixed centre-and-scale map."""
        if not self.feature_mapped:  # a flag, not a test of the buffer: no device sync on every step
            return features
        return (features - self.feature_center.to(features)) * self.feature_scale

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The pooled (and normalised) sentence embeddings, (B, H)."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        pooled = pool(out.last_hidden_state, attention_mask, self.pooling.mode)
        return nn.functional.normalize(pooled, dim=-1) if self.pooling.normalize else pooled

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                features: torch.Tensor | None = None, **_: object) -> SequenceClassifierOutput:
        if features is None:
            if input_ids is None or attention_mask is None:
                raise ValueError("PooledClassifier needs input_ids and attention_mask, or features")
            features = self.embed(input_ids, attention_mask)
        return SequenceClassifierOutput(logits=self.head(self.head_input(features)))


def export_sentence_transformer(model: PooledClassifier, out_dir: Path, labels: list[str], *, max_length: int) -> None:
    """Write the sentence-transformers modules of ``model`` into ``out_dir``, which holds (or will hold) the
    merged encoder and its tokenizer as ``save_pretrained`` writes them. ``labels.json`` keeps the label names."""
    from safetensors.torch import save_file

    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if model.pooling.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    dense = f"{len(modules)}_Dense"
    modules.append({"idx": len(modules), "name": str(len(modules)), "path": dense,
                    "type": "sentence_transformers.models.Dense"})
    hidden, num_labels = model.head.in_features, model.head.out_features
    pooling = {"word_embedding_dimension": hidden, **{key: False for key in _ST_MODES},
               "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
               "include_prompt": True}
    pooling[next(k for k, v in _ST_MODES.items() if v == model.pooling.mode)] = True
    files = {
        "modules.json": modules,
        "1_Pooling/config.json": pooling,
        f"{dense}/config.json": {"in_features": hidden, "out_features": num_labels, "bias": True,
                                 "activation_function": "torch.nn.modules.linear.Identity"},
        "sentence_bert_config.json": {"max_seq_length": max_length, "do_lower_case": False},
        "labels.json": labels,
    }
    if model.pooling.normalize:
        (out_dir / "2_Normalize").mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    # the centre-and-scale map folds into the dense layer: W s (x - c) + b = (s W) x + (b - s W c)
    weight = model.head.weight.detach().cpu().double() * model.feature_scale
    bias = model.head.bias.detach().cpu().double() - weight @ model.feature_center.detach().cpu().double()
    head = {"linear.weight": weight.float().contiguous(), "linear.bias": bias.float().contiguous()}
    save_file(head, str(out_dir / dense / "model.safetensors"))


class LoadedClassifier:
    """An exported veil classifier: ``logits(texts)`` and ``predict(texts)`` (label names)."""

    def __init__(self, path: Path) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        self.labels: list[str] = json.loads((path / "labels.json").read_text(encoding="utf-8"))

    def logits(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode(texts, convert_to_tensor=True, batch_size=256)

    def predict(self, texts: list[str]) -> list[str]:
        return [self.labels[int(i)] for i in self.logits(texts).argmax(dim=-1)]


def load_classifier(path: str | Path) -> LoadedClassifier:
    """Load a classifier veil exported: ``veil.load_classifier("outputs/.../model").predict(["my card is lost"])``."""
    path = Path(path)
    if not (path / "modules.json").is_file() or not (path / "labels.json").is_file():
        raise ModelError(f"{path} is not a veil sentence-transformers export (no modules.json/labels.json); "
                         "an exported model with model.pooling=pooler loads with AutoModelForSequenceClassification")
    return LoadedClassifier(path)
