"""Server checkpoints: after every round, the global trainable tensors, the strategy state, the round number, the
RNG states and the run config, written atomically (temp file, fsync, rename, fsync of the directory), so a crash
at any moment loses at most the round in flight and no round is ever applied twice.

Flower has no server checkpoint/resume of its own (flwr issue 599). One ``.npz`` file per round (no pickle: a
checkpoint is data, never code): arrays under ``param/<name>``, the strategy's array state (a server optimiser's
moments) under ``state/<path>/<i>``, everything else as JSON under ``__meta__``; the checksum covers both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from veil.atomic import atomic_write
from veil.errors import ConfigError

log = logging.getLogger("veil")

CHECKPOINT_DIR = "checkpoints"
# Fields that must not change across a resume: the model, its adapters, the task, the privacy mechanism and
# secure aggregation. Federation fields (rounds, clients per round) may change; raising `rounds` extends a run.
FROZEN_PREFIXES = ("veil.model.", "veil.privacy.", "veil.secagg.", "veil.strategy.", "veil.data.labels",
                   "veil.federation.seed", "veil.federation.num_clients", "veil.federation.partitioner",
                   "veil.federation.alpha", "veil.federation.batch_size", "veil.federation.local_epochs",
                   "veil.federation.local_steps")


@dataclass(frozen=True)
class Checkpoint:
    round: int
    names: list[str]
    arrays: list[np.ndarray]
    meta: dict[str, Any]


def weights_sha256(arrays: list[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
    return digest.hexdigest()


def save_checkpoint(run_dir: Path, *, round: int, names: list[str], arrays: list[np.ndarray],
                    run_config: dict[str, Any], strategy_state: dict[str, Any]) -> Path:
    """Write ``checkpoints/round-<k>.npz`` atomically and return its path."""
    directory = run_dir / CHECKPOINT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    state_arrays: dict[str, np.ndarray] = {}
    meta = {
        "round": round, "names": names, "run_config": run_config,
        "strategy": _split_arrays(strategy_state, "state", state_arrays),
        "weights_sha256": weights_sha256(arrays + list(state_arrays.values())), "rng": _rng_state(),
    }
    path = directory / f"round-{round:04d}.npz"
    payload = {f"param/{n}": a for n, a in zip(names, arrays, strict=True)}
    payload.update(state_arrays)
    payload["__meta__"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    return atomic_write(path, lambda fh: np.savez(fh, **payload))


def checkpoint_files(run_dir: Path) -> list[Path]:
    """The complete checkpoints in ``run_dir``, oldest round first (temp files from a crash are ignored)."""
    return sorted((run_dir / CHECKPOINT_DIR).glob("round-*.npz"))


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The last complete checkpoint in ``run_dir``, or None."""
    files = checkpoint_files(run_dir)
    return read_checkpoint(files[-1]) if files else None


def read_checkpoint(path: Path) -> Checkpoint:
    """One checkpoint file, its checksum verified."""
    try:
        with np.load(path) as data:
            meta = json.loads(bytes(data["__meta__"]).decode("utf-8"))
            arrays = [np.array(data[f"param/{n}"]) for n in meta["names"]]
            state_arrays: list[np.ndarray] = []
            meta["strategy"] = _join_arrays(meta["strategy"], data, state_arrays)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"checkpoint {path} is unreadable ({err}); resume from an intact run directory") from err
    if weights_sha256(arrays + state_arrays) != meta["weights_sha256"]:
        raise ConfigError(f"checkpoint {path} fails its checksum; resume from an intact run directory")
    return Checkpoint(round=int(meta["round"]), names=list(meta["names"]), arrays=arrays, meta=meta)


_ARRAYS = "__arrays__"  # JSON marker: a list of arrays stored in the npz under this path


def _split_arrays(value: Any, path: str, out: dict[str, np.ndarray]) -> Any:
    """``value`` with every non-empty list of arrays replaced by a marker; the arrays go into ``out``."""
    if isinstance(value, dict):
        return {k: _split_arrays(v, f"{path}/{k}", out) for k, v in value.items()}
    if isinstance(value, list) and value and all(isinstance(a, np.ndarray) for a in value):
        for i, a in enumerate(value):
            out[f"{path}/{i}"] = a
        return {_ARRAYS: path, "count": len(value)}
    return value


def _join_arrays(value: Any, data: Any, order: list[np.ndarray]) -> Any:
    """The inverse of :func:`_split_arrays`; the arrays read are appended to ``order`` (the checksum's order)."""
    if isinstance(value, dict) and _ARRAYS in value:
        arrays = [np.array(data[f"{value[_ARRAYS]}/{i}"]) for i in range(int(value["count"]))]
        order.extend(arrays)
        return arrays
    if isinstance(value, dict):
        return {k: _join_arrays(v, data, order) for k, v in value.items()}
    return value


def check_compatible(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume when a frozen field changed, naming it."""
    for key in sorted(set(saved) | set(current)):
        if key.startswith(FROZEN_PREFIXES) and saved.get(key) != current.get(key):
            field = key.removeprefix("veil.")
            raise ConfigError(
                f"cannot resume: {field} was {saved.get(key)!r} in the checkpoint but is {current.get(key)!r} now; "
                f"resume with the run's own settings or start a new run"
            )


def restore_rng(meta: dict[str, Any]) -> None:
    rng = meta.get("rng", {})
    if "python" in rng:
        random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    if "numpy" in rng:
        np.random.set_state(tuple(rng["numpy"]))  # type: ignore[arg-type]
    if "torch" in rng:
        torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))


def _rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }


def check_resumable(cfg: Any, flat: dict[str, Any]) -> None:
    """Refuse an incompatible resume before starting Flower (the ServerApp checks again)."""
    ckpt = latest_checkpoint(Path(cfg.resume))
    if ckpt is not None:
        check_compatible(ckpt.meta["run_config"], flat)
        log.info("resuming %s after round %d of %d", cfg.resume, ckpt.round, cfg.federation.rounds)
