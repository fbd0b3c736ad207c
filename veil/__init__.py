"""veil: federated, privacy-preserving fine-tuning of Transformers (Opacus DP-SGD + Flower SecAgg+)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_classifier"]


def load_classifier(path: str) -> object:
    """A classifier veil exported with a pooled head: ``veil.load_classifier(dir).predict(["my card is lost"])``
    (:func:`veil.task.pooling.load_classifier`)."""
    from veil.task.pooling import load_classifier as _load

    return _load(path)
