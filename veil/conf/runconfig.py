"""The bridge between a composed Hydra config and Flower's run config.

Flower carries a run's configuration to the ServerApp and every ClientApp as a flat mapping of dotted keys to
scalars (lists are rejected, types are not enforced in deployment). ``to_run_config`` flattens a validated
:class:`VeilConfig`; ``from_run_config`` rebuilds it on the other side, casting every value back to the schema's type,
and validates again, so a hand-edited run config cannot smuggle in a bad value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, get_type_hints

from omegaconf import DictConfig, OmegaConf

from veil.conf.schema import VeilConfig
from veil.errors import ConfigError

RUN_CONFIG_PREFIX = "veil."


def to_veil_config(cfg: DictConfig | VeilConfig) -> VeilConfig:
    """Turn a composed Hydra config into a validated :class:`VeilConfig`."""
    if isinstance(cfg, VeilConfig):
        return cfg.validate()
    try:
        obj = OmegaConf.to_object(cfg)
    except Exception as err:  # omegaconf raises many types; all mean "this value is wrong"
        raise ConfigError(f"invalid configuration: {str(err).splitlines()[0]}") from err
    if not isinstance(obj, VeilConfig):
        raise ConfigError("the composed configuration is not a veil config; start from veil/conf/config.yaml")
    return obj.validate()


def to_run_config(cfg: VeilConfig) -> dict[str, bool | int | float | str]:
    """Flatten ``cfg`` into Flower run-config entries ``veil.<group>.<field>``."""
    flat: dict[str, bool | int | float | str] = {}
    for group in dataclasses.fields(cfg):
        value = getattr(cfg, group.name)
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                flat[f"{RUN_CONFIG_PREFIX}{group.name}.{f.name}"] = getattr(value, f.name)
        else:
            flat[f"{RUN_CONFIG_PREFIX}{group.name}"] = value
    return flat


def from_run_config(run_config: Mapping[str, Any]) -> VeilConfig:
    """Rebuild and validate a :class:`VeilConfig` from Flower run-config entries (unknown keys are ignored)."""
    cfg = VeilConfig()
    for group in dataclasses.fields(cfg):
        value = getattr(cfg, group.name)
        if dataclasses.is_dataclass(value):
            hints = get_type_hints(type(value))
            for f in dataclasses.fields(value):
                key = f"{RUN_CONFIG_PREFIX}{group.name}.{f.name}"
                if key in run_config:
                    setattr(value, f.name, _cast(key, run_config[key], hints[f.name]))
        else:
            key = f"{RUN_CONFIG_PREFIX}{group.name}"
            if key in run_config:
                setattr(cfg, group.name, _cast(key, run_config[key], get_type_hints(VeilConfig)[group.name]))
    return cfg.validate()


def _cast(key: str, value: Any, kind: Any) -> Any:
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "1")
            return bool(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"run config {key}={value!r} is not a valid {getattr(kind, '__name__', kind)}") from err
