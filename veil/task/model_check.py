"""The pre-flight over a model directory and its tokenizer, before any round (issue 26, scope 4).

A model veil cannot train must end in one line naming the problem and the fix, never in a traceback from deep inside
the first forward pass. What is checked, from ``config.json`` and the tokenizer alone (no weights are loaded):

1. Every special-token id of the tokenizer (bos, eos, unk, sep, pad, cls, mask) and the tokenizer's size fit the
   model's vocabulary (``vocab_size``): a tokenizer whose ``eos_token`` is not in its vocabulary gets the token
   *added* with a new id past the embedding, and the first forward pass raised ``IndexError: index out of range``.
2. The special-token ids of ``config.json`` (``bos_token_id``, ``eos_token_id``, ``pad_token_id``, ids or lists of
   ids) fit the vocabulary too (a GPT-2 config keeps 50256 whatever ``vocab_size`` says).
3. The task's own needs (``Task.check_tokenizer`` where a task defines it): causal LM fine-tuning needs an
   end-of-sequence token, or the model never learns where an answer ends.
4. Batches are padded: the tokenizer needs a pad token, or an end-of-sequence token to pad with
   (:func:`veil.task.model.pad_token_for` handles that case).

What is handled rather than refused, each pinned by a test: a tokenizer without a pad token (padded with its end
token, padding never counted); a generation config whose end token differs from the tokenizer's (generation stops at
either, :func:`veil.task.causal_lm.build_causal_lm`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from veil.conf.schema import VeilConfig
from veil.errors import ModelError

__all__ = ["check_model_dir", "check_model_files", "check_token_ids"]

SPECIAL = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")  # the tokenizer's special-token attributes
CONFIG_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def check_model_files(cfg: VeilConfig) -> None:
    """Refuse, with one line, a model directory and tokenizer that ``cfg.task`` cannot train (see module docstring).

    A tiny test model (``model.tiny``) is built from its tokenizer in code and needs no check.
    """
    from veil.task import get_task

    if cfg.model.tiny:
        return
    path, config, tokenizer = _read(cfg.model)
    check_token_ids(tokenizer, config, path)
    own_check = getattr(get_task(cfg.task.name), "check_tokenizer", None)
    if own_check is not None:
        own_check(tokenizer, config, path)
    _check_pad(tokenizer, path)


def check_model_dir(path: Path) -> None:
    """The checks of :func:`check_model_files` that hold for every task (1, 2 and 4), on a model directory alone: what
    ``veil client --model`` runs at the node's start, before the run's task is known."""
    from veil.conf.schema import ModelConfig

    where, config, tokenizer = _read(ModelConfig(path=str(path), tiny=False))
    check_token_ids(tokenizer, config, where)
    _check_pad(tokenizer, where)


def _read(model: Any) -> tuple[Path, dict[str, Any], object]:
    from veil.task.model import load_tokenizer, model_dir

    path = model_dir(model)
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"model directory {path}: config.json is not readable JSON ({err}); "
                         "give a Hugging Face model directory") from err
    return path, config, load_tokenizer(model)


def _check_pad(tokenizer: object, path: Path) -> None:
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ModelError(f"model directory {path}: the tokenizer has neither a pad token nor an end-of-sequence "
                         "token to pad batches with; set \"pad_token\" in tokenizer_config.json to a token of the "
                         "vocabulary")


def vocab_size(config: dict[str, Any]) -> int | None:
    """``vocab_size`` of ``config.json`` (or of its ``text_config``), None when it names none."""
    for source in (config, config.get("text_config") or {}):
        value = source.get("vocab_size")
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_token_ids(tokenizer: object, config: dict[str, Any], path: Path) -> None:
    """Every special-token id of ``tokenizer`` and of ``config`` lies inside the model's vocabulary (one line)."""
    size = vocab_size(config)
    if size is None:
        return
    for kind in SPECIAL:
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(token_id, int) and not 0 <= token_id < size:
            token = getattr(tokenizer, f"{kind}_token", None)
            raise ModelError(
                f"model directory {path}: the tokenizer's {kind}_token {token!r} has id {token_id}, outside the "
                f"model's vocabulary (vocab_size {size} in config.json), so the first forward pass would fail; set "
                f"\"{kind}_token\" in tokenizer_config.json to a token of the vocabulary, or resize the model's "
                "embeddings and save it again")
    count = len(tokenizer)  # type: ignore[arg-type]
    if count > size:
        raise ModelError(
            f"model directory {path}: the tokenizer has {count} tokens but the model's vocabulary only {size} "
            "(vocab_size in config.json), so token ids past it would fail; give the tokenizer saved with this model, "
            "or resize the model's embeddings and save it again")
    for key in CONFIG_IDS:
        value = config.get(key)
        ids = value if isinstance(value, list) else [value]
        bad = [i for i in ids if isinstance(i, int) and not 0 <= i < size]
        if bad:
            raise ModelError(
                f"model directory {path}: config.json's {key}={value} is outside the model's vocabulary (vocab_size "
                f"{size}); set it to the tokenizer's id for that token, or null")
