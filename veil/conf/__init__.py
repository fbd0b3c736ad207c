"""Hydra configuration of veil: the schema, the YAML groups beside this file, and the run-config bridge."""

from __future__ import annotations

from pathlib import Path

from veil.conf.runconfig import from_run_config as from_run_config
from veil.conf.runconfig import to_run_config as to_run_config
from veil.conf.schema import VeilConfig as VeilConfig

CONF_DIR = Path(__file__).resolve().parent

__all__ = ["CONF_DIR", "VeilConfig", "from_run_config", "to_run_config"]
