"""The run's training file as a simulation worker holds it: tokenized once, split once, shards assembled on demand.

A Ray worker serves many simulated clients (1,000 or more in a population study). Reading, splitting and
tokenizing the whole file for each sampled client made every client cost as much as the file; here the worker
does that once and keeps the token ids unpadded (one flat int32 array and offsets: 4 bytes a token, independent of
the population size). A client's shard is then its own examples padded to their longest with the tokenizer's
``pad`` (Hugging Face's own padding rules: side, pad id, attention mask), which is exactly what tokenizing the
client's texts alone with ``padding="longest"`` gives (tests/test_shard_cache.py checks it against a fresh
tokenization for every client).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TrainingSplit:
    """Token ids of every training example, their label ids and each simulated client's example indices."""

    tokenizer: object
    flat_ids: np.ndarray  # (total tokens,) int32, the examples' unpadded ids back to back
    offsets: np.ndarray  # (N + 1,) int64, example i is flat_ids[offsets[i]:offsets[i + 1]]
    label_ids: np.ndarray  # (N,) int64
    parts: tuple[np.ndarray, ...]  # one sorted index array per client

    @classmethod
    def build(cls, tokenizer: object, texts: Sequence[str], label_ids: np.ndarray, parts: Sequence[np.ndarray], *,
              max_length: int) -> TrainingSplit:
        """Tokenize ``texts`` once (truncated to ``max_length``, not padded)."""
        enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)  # type: ignore[operator]
        ids: list[list[int]] = enc["input_ids"]
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        flat = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(offsets[-1]))
        return cls(tokenizer, flat, offsets, np.asarray(label_ids, dtype=np.int64), tuple(parts))

    def shard(self, partition: int) -> dict[str, torch.Tensor]:
        """Client ``partition``'s ``input_ids`` / ``attention_mask`` (n, T: T its longest example) and ``labels``
        (n,); the work is proportional to the client's examples."""
        if not 0 <= partition < len(self.parts):
            raise IndexError(f"partition {partition} is outside 0..{len(self.parts) - 1}")
        idx = self.parts[partition]
        ids = [self.flat_ids[self.offsets[i]:self.offsets[i + 1]].tolist() for i in idx]
        padded = self.tokenizer.pad(  # type: ignore[attr-defined]
            {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}, padding="longest", return_tensors="pt"
        )
        return {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"],  # (n, T) each
                "labels": torch.as_tensor(self.label_ids[idx])}  # (n,)
