"""Tiny random models of every supported family, built from configs in code (no download, no weights on disk).

Each entry gives a config class and the keyword arguments of a 2-layer, 32-wide model with a small vocabulary; the
tests use them for exactness (per-sample clipped gradients against a per-example loop) and for LoRA targets.
"""

from __future__ import annotations

from typing import Any

VOCAB = 96
PAD = 1  # every tiny config uses this pad id (and a padding_idx where the family has one)

_COMMON: dict[str, Any] = {"vocab_size": VOCAB, "pad_token_id": PAD}
_BERTISH: dict[str, Any] = {
    **_COMMON, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
    "max_position_embeddings": 64, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
}
_DECODER: dict[str, Any] = {
    **_COMMON, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 64, "max_position_embeddings": 64, "bos_token_id": 2, "eos_token_id": 3,
}

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "bert": ("BertConfig", _BERTISH),
    "roberta": ("RobertaConfig", {**_BERTISH, "max_position_embeddings": 70}),
    "distilbert": ("DistilBertConfig", {**_COMMON, "dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64,
                                        "max_position_embeddings": 64, "dropout": 0.0, "attention_dropout": 0.0,
                                        "seq_classif_dropout": 0.0}),
    "deberta-v2": ("DebertaV2Config", {**_BERTISH, "relative_attention": True, "position_buckets": 8,
                                       "pos_att_type": ["p2c", "c2p"], "position_biased_input": False,
                                       "max_relative_positions": 16}),
    "electra": ("ElectraConfig", {**_BERTISH, "embedding_size": 16}),
    "modernbert": ("ModernBertConfig", {**_COMMON, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                        "intermediate_size": 64, "max_position_embeddings": 64,
                                        "global_attn_every_n_layers": 2, "local_attention": 16,
                                        "attention_dropout": 0.0, "embedding_dropout": 0.0, "mlp_dropout": 0.0,
                                        "classifier_dropout": 0.0, "bos_token_id": 2, "eos_token_id": 3,
                                        "cls_token_id": 2, "sep_token_id": 3}),
    "gpt2": ("GPT2Config", {**_COMMON, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64,
                            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": 2,
                            "eos_token_id": 3}),
    "llama": ("LlamaConfig", _DECODER),
    "qwen2": ("Qwen2Config", _DECODER),
}
DECODERS = ("gpt2", "llama", "qwen2")


def tiny_config(family: str, **extra: Any) -> Any:
    """A tiny random config of ``family`` (``extra`` overrides, e.g. ``num_labels``)."""
    import transformers

    cls_name, kwargs = FAMILIES[family]
    return getattr(transformers, cls_name)(**{**kwargs, **extra})
