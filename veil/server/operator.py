"""The operator's run, and only it, in the operator's run directory (review M8).

Flower's open-source Control API has no login: anyone who can reach the SuperLink may submit a run, and with veil's
own app bundle (which nodes accept) the ServerApp would use that run config's ``output_dir``, ``resume`` and
``data.test_path`` as paths on the coordinator (``export_model`` replaces ``<output_dir>/model``). So ``veil server``
tells the ServerApp, through the SuperLink's environment (inherited by ``flower-superexec`` and ``flwr-serverapp``),
which run directory is the operator's; the ServerApp then runs only the run config ``veil server`` wrote there
(``run_config.toml``, a file the operator controls) and refuses any other with one line naming the first field that
differs. Without that variable (``veil simulate``, tests, a bare ``flwr run``) nothing changes.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from veil.conf.runconfig import from_run_config, to_run_config
from veil.conf.schema import VeilConfig
from veil.errors import ConfigError

OPERATOR_RUN_DIR_ENV = "VEIL_OPERATOR_RUN_DIR"
RUN_CONFIG_FILE = "run_config.toml"  # written by `veil server` into its run directory


def operator_env(run_dir: Path) -> dict[str, str]:
    """The variable ``veil server`` sets on the SuperLink it starts."""
    return {OPERATOR_RUN_DIR_ENV: str(run_dir.resolve())}


def operator_config(submitted: VeilConfig, environ: Mapping[str, str] | None = None) -> VeilConfig:
    """``submitted`` when no operator run directory is set; else the operator's own config, if and only if the
    submitted one equals it (ConfigError naming the first differing field otherwise)."""
    run_dir = (os.environ if environ is None else environ).get(OPERATOR_RUN_DIR_ENV, "")
    if not run_dir:
        return submitted
    path = Path(run_dir) / RUN_CONFIG_FILE
    try:
        own = from_run_config(tomllib.loads(path.read_text(encoding="utf-8")))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"the operator's run config {path} is unreadable ({err}); restart `veil server`") from err
    if own.output_dir and Path(own.output_dir).resolve() != Path(run_dir).resolve():
        raise ConfigError(f"{path} names output_dir {own.output_dir}, not its own run directory; restart `veil server`")
    differ = _first_difference(to_run_config(own), to_run_config(submitted))
    if differ is not None:
        key, mine, theirs = differ
        raise ConfigError(
            f"refusing a run config that is not the operator's: {key.removeprefix('veil.')}={theirs!r} but "
            f"`veil server` set {mine!r} (in {path}); only the run `veil server` submitted runs on this coordinator"
        )
    return dataclasses.replace(own)


def _first_difference(own: dict[str, Any], submitted: dict[str, Any]) -> tuple[str, Any, Any] | None:
    # output_dir and resume first: they are the paths review M8 is about
    keys = sorted(set(own) | set(submitted), key=lambda k: (k not in ("veil.output_dir", "veil.resume"), k))
    for key in keys:
        if own.get(key) != submitted.get(key):
            return key, own.get(key), submitted.get(key)
    return None
