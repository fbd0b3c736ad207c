"""``model.init_from=RUN_DIR``: start a run from an earlier run's global weights — the second half of LP-FT
(Kumar et al., ICLR 2022: probe first, then fine-tune). Run 1 trains the head on frozen features
(``model.tuning=head``); run 2 (``model.tuning=lora``, same model and pooling) starts its head from run 1's and
trains the adapters with it.

Only the coordinator reads RUN_DIR: it sets the starting global weights, which every node receives in round 1 as
usual; a deployed node never opens a path the run names. Privacy composes where it always does, in each owner's
ledger: a deployed node's ledger already holds run 1's rounds, and a simulation continues each simulated owner's
ledger from RUN_DIR (:func:`carry_simulated_ledgers`), so the ε a run reports covers both runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from torch import nn

from veil.conf.schema import VeilConfig
from veil.errors import ConfigError
from veil.task.model import get_trainable, set_trainable, trainable_names

# what must agree between the two runs for the tensors to mean the same thing
_SAME = ("path", "source", "tiny", "pooling", "max_length", "feature_center", "feature_scale")


def _earlier(cfg: VeilConfig) -> Path:
    run_dir = Path(cfg.model.init_from).expanduser().resolve()
    if not (run_dir / "global_trainable.npz").is_file():
        raise ConfigError(f"model.init_from={cfg.model.init_from} holds no global_trainable.npz; give the directory "
                          "of a finished veil run")
    return run_dir


def warm_start(template: nn.Module, cfg: VeilConfig) -> list[str]:
    """Load into ``template`` every trainable tensor of the earlier run whose name and shape match; returns the
    names loaded. Refuses (one line) when the earlier run used another base model or pooling, or nothing matches."""
    from omegaconf import OmegaConf

    run_dir = _earlier(cfg)
    resolved = run_dir / "config.resolved.yaml"
    if resolved.is_file():
        earlier = OmegaConf.to_container(OmegaConf.load(resolved).get("model", {}))
        for key in _SAME:
            if isinstance(earlier, dict) and key in earlier and earlier[key] != getattr(cfg.model, key):
                raise ConfigError(f"model.init_from={cfg.model.init_from} was trained with model.{key}="
                                  f"{earlier[key]!r}, this run has {getattr(cfg.model, key)!r}; use the same model")
    names, arrays = trainable_names(template), get_trainable(template)
    loaded = []
    with np.load(run_dir / "global_trainable.npz") as saved:
        for i, name in enumerate(names):
            if name in saved.files and saved[name].shape == arrays[i].shape:
                arrays[i] = saved[name].astype(np.float32)
                loaded.append(name)
    if not loaded:
        raise ConfigError(f"model.init_from={cfg.model.init_from}: none of its tensors fits this model; it must be a "
                          "run of the same model and labels")
    set_trainable(template, arrays)
    return loaded


def carry_simulated_ledgers(cfg: VeilConfig, out_dir: Path) -> int:
    """Simulation: copy each simulated owner's ledger of the earlier run into this run's node directory (a node
    that already has one keeps it), so every owner's ε composes both runs. Returns how many were carried."""
    carried = 0
    for ledger in sorted(_earlier(cfg).glob("nodes/node-*/privacy_ledger.json")):
        target = out_dir / "nodes" / ledger.parent.name / ledger.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ledger, target)
            carried += 1
    return carried
