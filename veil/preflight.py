"""The checks before anything starts, shared by ``veil simulate`` and ``veil server``.

:func:`preflight` composes the configuration once with Hydra's compose API and validates it, so a typo, a missing
value, a missing model or a bad data file fails with one line before any output exists;
:func:`resolve_paths_and_labels` fixes the config every process of a run gets (absolute paths, one label set).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from veil.errors import ConfigError

__all__ = ["check_data", "check_exact", "check_model", "check_set", "check_tokenizer", "follow_defaults", "preflight", "register_schema",
           "resolve_paths_and_labels"]


# A setting given on the command line that another default would silently override: (given, follower, value).
# ``privacy.noise_multiplier`` is used only when ``privacy.target_epsilon`` is 0, and ``federation.local_epochs``
# only when ``federation.local_steps`` is 0, so giving the first alone means the second's "off" value.
FOLLOWERS = (
    ("privacy.noise_multiplier", "privacy.target_epsilon", "0"),
    ("federation.local_epochs", "federation.local_steps", "0"),
    ("model.lora", "model.tuning", "''"),  # the former switch decides (true: lora, false: full) unless tuning is given
)


def follow_defaults(overrides: list[str]) -> list[str]:
    """``overrides`` plus the follower of every setting given without it (see :data:`FOLLOWERS`)."""
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    extra = [f"{follower}={value}" for key, follower, value in FOLLOWERS if key in given and follower not in given]
    return [*overrides, *extra]


def register_schema() -> None:
    """The dataclass schema under the name ``config.yaml``'s defaults list refers to."""
    from hydra.core.config_store import ConfigStore

    from veil.conf.schema import VeilConfig

    ConfigStore.instance().store(name="veil_schema", node=VeilConfig)


def preflight(overrides: list[str]) -> Any:
    """Compose once with Hydra's compose API so a typo or bad value fails with one line before anything starts."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from veil.conf import CONF_DIR
    from veil.conf.runconfig import to_veil_config

    register_schema()
    plain = [o for o in overrides if not o.startswith("-") and not o.startswith("hydra.") and not o.startswith("hydra/")]
    sweeping = "-m" in overrides or "--multirun" in overrides
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            # In a sweep, every swept value is composed and validated once (beside the first of the others), so a
            # typo in any value fails before the first member starts; combinations are left to the members.
            variants = _sweep_variants(plain) if sweeping else [plain]
            cfgs = [compose(config_name="config", overrides=variant) for variant in variants]
    except Exception as err:  # Hydra/OmegaConf raise many types; all mean "the command line is wrong"
        raise ConfigError(_one_line(err)) from err
    finally:
        GlobalHydra.instance().clear()
    for cfg in cfgs:
        check_set(cfg)
    veil_cfgs = [to_veil_config(cfg) for cfg in cfgs]
    for each in veil_cfgs:
        check_model(each.model)
        check_tokenizer(each)
        check_exact(each)
    veil_cfg = veil_cfgs[0]
    if not sweeping:
        check_data(veil_cfg)
    return veil_cfg


def check_set(cfg: Any) -> None:
    """Every mandatory value (``???`` in a group file, e.g. ``data=csv``'s paths) is given."""
    from omegaconf import OmegaConf

    missing = sorted(OmegaConf.missing_keys(cfg), key=lambda key: ("test" in key, key))  # train before test
    if missing:
        given = " ".join(f"{key}=..." for key in missing)
        raise ConfigError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; give {given}")


def check_model(model: Any) -> None:
    """The model directory holds a config.json (a tiny test model needs only the default tokenizer's)."""
    from veil.task.model import default_model_dir, model_dir

    if model.tiny:
        default_model_dir()
    else:
        model_dir(model)


def check_tokenizer(cfg: Any) -> None:
    """Refuse a model and tokenizer the run's task cannot train (special tokens, vocabulary; one line)."""
    from veil.task.model_check import check_model_files

    check_model_files(cfg)


def check_exact(cfg: Any) -> None:
    """Refuse, before anything starts, an untested Opacus or a model whose DP-SGD per-sample gradients cannot be exact
    (one line)."""
    from veil.privacy.exact import refusal_for_model_type
    from veil.privacy.opacus_compat import require_tested_opacus
    from veil.task.model import model_dir

    if not cfg.privacy.enabled or cfg.privacy.level != "sample":
        return
    require_tested_opacus()  # the DP engines use Opacus internals: an untested Opacus fails here, in one line
    if cfg.model.tiny:
        return
    config = json.loads((model_dir(cfg.model) / "config.json").read_text(encoding="utf-8"))
    reason = refusal_for_model_type(str(config.get("model_type", "")), lora=cfg.model.tuning != "full")  # head: no weight-read layer trains
    if reason is not None:
        raise ConfigError(reason)


def check_data(cfg: Any) -> list[str]:
    """Read the data files once before any output exists: a bad file fails with one line and writes nothing."""
    from veil.task import get_task
    from veil.task.split import draw_split

    resolved = resolve_paths_and_labels(cfg, Path.cwd())
    labels: list[str] = json.loads(resolved.data.labels)
    get_task(cfg.task.name).check_files(resolved)
    if not resolved.data.test_path:  # the split must leave something to evaluate on
        draw_split(resolved, seed=cfg.federation.seed)
    return labels


def resolve_paths_and_labels(cfg: Any, out_dir: Path) -> Any:
    """The config every process gets: absolute data paths, the label set fixed once, the output directory."""
    from veil.task.shards import absolute, run_labels
    from veil.task.split import with_split_path

    data = dataclasses.replace(cfg.data, train_path=absolute(cfg.data.train_path), test_path=absolute(cfg.data.test_path))
    labels = run_labels(dataclasses.replace(cfg, data=data))
    data = with_split_path(dataclasses.replace(data, labels=json.dumps(labels)), out_dir.resolve())
    model = cfg.model
    if model.init_from:  # the coordinator's own path (model.init_from): absolute for every process of the run
        model = dataclasses.replace(model, init_from=str(Path(model.init_from).expanduser().resolve()))
    return dataclasses.replace(cfg, data=data, model=model, output_dir=str(out_dir.resolve()),
                               resume=str(Path(cfg.resume).expanduser().resolve()) if cfg.resume else "")


def _sweep_values(override: str) -> list[str]:
    """``key=a,b,c`` -> ``[key=a, key=b, key=c]``; any other override stands for itself."""
    key, sep, value = override.partition("=")
    if sep and "," in value and not value.startswith(("[", "{", "'", '"')):
        return [f"{key}={v}" for v in value.split(",")]
    return [override]


def _sweep_variants(overrides: list[str]) -> list[list[str]]:
    """The first value of every swept key, then each other value of each swept key in turn."""
    values = [_sweep_values(o) for o in overrides]
    first = [v[0] for v in values]
    return [first] + [[*first[:i], other, *first[i + 1:]] for i, v in enumerate(values) for other in v[1:]]


def _one_line(err: BaseException) -> str:
    """Hydra's multi-line error and its causes, as one line without search paths or internals."""
    parts: list[str] = []
    seen: BaseException | None = err
    while seen is not None and len(parts) < 4:
        for line in str(seen).split("\n"):
            line = line.strip()
            if line.startswith(("Config search path", "provider=", "full_key", "object_type", "reference_type",
                                "Set the environment variable")):
                break
            if "$VALUE" in line:
                continue
            if line and line not in parts:
                parts.append(line)
        seen = seen.__cause__ or seen.__context__
    text = " ".join(parts).replace("To append to your config use", "(to add a new key use")
    if "(to add a new key use" in text:
        text = text.replace(" Key ", ") Key ", 1) if " Key " in text else text + ")"
    return f"invalid configuration: {text or type(err).__name__}"
