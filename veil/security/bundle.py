"""Which app bundle a veil node trusts: exactly the one built from the veil its owner installed.

Stock Flower lets whoever submits a run ship client code to every node (LIBRARY_NOTES.md, "Security gaps"), and
``--trusted-entities`` only accepts Flower Hub signatures. A veil node therefore pins the bundle (FAB) itself
(DESIGN.md decision 12): the operator's ``veil server`` submits the app directory written by :func:`write_app_dir`,
and every node rebuilds the very same bytes with :func:`build_fab` from its own installation. A run whose FAB
differs by one byte is refused by :mod:`veil.client.executor` before any of its code runs.

The bundle holds only a ``pyproject.toml``: the components name the *installed* veil apps
(``veil.server.app:app``, ``veil.client.app:app``) and ``[tool.flwr.app.config]`` declares every ``veil.*`` run-config
key with its schema default (Flower rejects keys an app does not declare). It is built with Flower's own
``build_fab_from_files``, which writes zip entries with a fixed date in sorted order, so the bytes depend only on
the veil version, the schema and the installed flwr/zlib: server and nodes must run the same veil and flwr releases.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import zipfile
from pathlib import Path

from veil.conf.runconfig import to_run_config
from veil.conf.schema import VeilConfig

__all__ = ["APP_NAME", "app_files", "build_fab", "describe_difference", "fab_hash", "write_app_dir"]

APP_NAME = "veil-app"
SERVER_APP = "veil.server.app:app"
CLIENT_APP = "veil.client.app:app"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("veil")
    except PackageNotFoundError:  # running from a source tree without installation
        from veil import __version__

        return str(__version__)


def _pyproject() -> str:
    """The app's pyproject.toml: metadata, components and every run-config key with its default."""
    import tomli_w

    defaults = to_run_config(VeilConfig())
    doc = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": APP_NAME,
            "version": _version(),
            "description": "veil: federated DP fine-tuning of Transformers (the installed veil apps)",
            "license": "Apache-2.0",
            "dependencies": [f"veil=={_version()}"],
        },
        "tool": {"flwr": {"app": {
            "publisher": "veil",
            "components": {"serverapp": SERVER_APP, "clientapp": CLIENT_APP},
            "config": dict(sorted(defaults.items())),
        }}},
    }
    return tomli_w.dumps(doc)


def app_files() -> dict[str, bytes]:
    """The files of the veil Flower app directory, by relative path (deterministic)."""
    return {"pyproject.toml": _pyproject().encode("utf-8")}


def write_app_dir(directory: Path) -> Path:
    """Write the app directory ``flwr run`` builds its FAB from; anything else in it is removed first."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    for name, content in app_files().items():
        (directory / name).write_bytes(content)
    return directory


def build_fab() -> bytes:
    """The FAB bytes ``flwr run`` produces from :func:`write_app_dir`'s directory (Flower's own builder)."""
    import warnings

    from veil.flower.names import build_fab_from_files

    with warnings.catch_warnings():  # pathspec's notice about its own pattern names, raised inside Flower's builder
        warnings.filterwarnings("ignore", "GitWildMatchPattern", DeprecationWarning)
        fab, _meta = build_fab_from_files(dict(app_files()))
    return fab


def fab_hash(content: bytes | None = None) -> str:
    """sha256 hex digest of ``content`` (default: the FAB of the installed veil), as Flower names FABs."""
    return hashlib.sha256(build_fab() if content is None else content).hexdigest()


def describe_difference(content: bytes) -> str:
    """Name, without executing anything, how a received FAB differs from the trusted one (for the log line)."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as fab:
            names = sorted(n for n in fab.namelist() if not n.startswith(".info/"))
            pyproject = fab.read("pyproject.toml").decode("utf-8", "replace") if "pyproject.toml" in names else ""
    except (zipfile.BadZipFile, KeyError, OSError):
        return "it is not a readable zip archive"
    extra = [n for n in names if n != "pyproject.toml"]
    if extra:
        return f"it carries code files ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})"
    if CLIENT_APP not in pyproject:
        return "its clientapp component is not veil's installed ClientApp"
    if f'version = "{_version()}"' not in pyproject:
        return f"it was built for another veil version (this node runs veil {_version()})"
    keys = _config_difference(pyproject)
    if keys:
        return f"its run-config keys or defaults differ from this node's veil ({', '.join(keys[:3])}); same veil release?"
    return "its packaging differs (same veil and flwr releases on server and node?)"


def _config_difference(pyproject: str) -> list[str]:
    """The ``veil.*`` keys whose declared default differs from this node's schema (TOML parsed as data)."""
    import tomllib

    try:
        theirs = tomllib.loads(pyproject)["tool"]["flwr"]["app"]["config"]
    except (tomllib.TOMLDecodeError, KeyError, TypeError):
        return ["unreadable"]
    ours = to_run_config(VeilConfig())
    return sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
