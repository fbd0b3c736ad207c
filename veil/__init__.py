"""veil: federated, privacy-preserving fine-tuning of Transformers (Opacus DP-SGD + Flower SecAgg+)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
