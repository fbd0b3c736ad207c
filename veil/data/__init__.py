"""Data sets shipped inside veil (package data), so ``veil simulate`` works from any directory after ``pip install``.

A data path ``package:NAME`` (e.g. the default ``package:banking77/train.csv``) names a file under this package,
found with :mod:`importlib.resources`; any other relative path resolves against the launch directory.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from veil.errors import DataFileError

__all__ = ["PACKAGE_PREFIX", "resolve_data_path"]

PACKAGE_PREFIX = "package:"


def resolve_data_path(path: str) -> str:
    """An absolute path for a data file: ``package:NAME`` inside veil, anything else against the working directory."""
    if not path:
        return path
    if path.startswith(PACKAGE_PREFIX):
        name = path[len(PACKAGE_PREFIX):].lstrip("/")
        resource = files(__name__).joinpath(*name.split("/"))
        if not resource.is_file():
            raise DataFileError(f"data file {path} is not shipped with this veil; give a file's path instead")
        return str(Path(str(resource)).resolve())
    return str(Path(path).expanduser().resolve())
