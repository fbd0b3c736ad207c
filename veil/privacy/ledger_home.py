"""Where a data owner's privacy ledger lives: bound to the data, not to a working directory.

A ledger is only as good as its being found again. The ledger belongs to the owner's node: ``veil client`` keys it
by the data file's absolute path (:func:`node_key`, the sha256 of that path) under a per-user state directory
(``$XDG_STATE_HOME/veil/ledgers/<key>/privacy_ledger.json``, ``~/.local/state`` when unset), so a node restarted
from another directory, or with another ``--node-dir``, finds the budget it already spent, and a file that grows or
changes (one row appended) *continues* the same ledger (review M4: a content hash gave it a fresh, empty one). The
content fingerprint (sha256 of the bytes) is remembered too, so the same data moved to another path finds its
ledger and is refused a fresh one. An owner who keeps the ledger elsewhere (``--ledger``) has that path remembered;
starting a *fresh* ledger needs the explicit ``--new-ledger`` (the budget starts again: the owner's own call; an
existing ledger file is kept beside it, renamed, never deleted).
Written by hand: no library keeps DP ledgers; the state-directory convention is the XDG base-directory one.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from veil.errors import LedgerError

log = logging.getLogger("veil.privacy")

__all__ = ["data_fingerprint", "default_ledger_path", "known_ledgers", "bind_ledger", "node_key", "state_dir"]

_CHUNK = 1 << 20


def state_dir() -> Path:
    """``$XDG_STATE_HOME/veil`` (default ``~/.local/state/veil``)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base).expanduser() / "veil"


def data_fingerprint(path: Path) -> str:
    """sha256 of the data file's bytes (hex)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                digest.update(chunk)
    except OSError as err:
        raise LedgerError(f"cannot read data file {path} to fingerprint its ledger ({err.strerror}); check --data") from None
    return digest.hexdigest()


def node_key(data_path: Path) -> str:
    """The key of an owner's node: the sha256 (hex) of its data file's absolute path (not of the file's bytes)."""
    return hashlib.sha256(str(Path(data_path).expanduser().resolve()).encode("utf-8")).hexdigest()


def _home(fingerprint: str) -> Path:
    if len(fingerprint) != 64 or any(c not in "0123456789abcdef" for c in fingerprint):
        raise LedgerError(f"data fingerprint {fingerprint!r} is not a sha256 hex digest")
    return state_dir() / "ledgers" / fingerprint


def default_ledger_path(fingerprint: str) -> Path:
    """The ledger of the data with this fingerprint, in the per-user state directory."""
    return _home(fingerprint) / "privacy_ledger.json"


def known_ledgers(fingerprint: str) -> list[Path]:
    """Ledger files on disk that were ever bound to this data (the default one and any ``--ledger`` path)."""
    home = _home(fingerprint)
    paths = [default_ledger_path(fingerprint)]
    index = home / "ledgers.txt"
    if index.is_file():
        paths += [Path(line) for line in index.read_text(encoding="utf-8").splitlines() if line.strip()]
    seen: list[Path] = []
    for p in paths:
        if p.is_file() and p not in seen:
            seen.append(p)
    return seen


def bind_ledger(ledger_path: Path, fingerprint: str, *, new_ledger: bool) -> None:
    """Check that ``ledger_path`` is the ledger of this data, and remember it.

    Raises
    ------
    veil.errors.LedgerError
        ``ledger_path`` does not exist yet while the data already has a ledger elsewhere, and ``new_ledger`` is
        false: a fresh ledger would silently give the owner a new budget.
    """
    ledger_path = ledger_path.expanduser().resolve()
    if new_ledger and ledger_path.is_file():  # the owner's explicit fresh start: keep the old one, renamed
        import time

        kept = ledger_path.with_name(f"{ledger_path.name}.{time.strftime('%Y%m%d-%H%M%S')}.old")
        ledger_path.rename(kept)
        log.warning("--new-ledger: the privacy ledger %s was moved to %s; the owner's budget starts again",
                    ledger_path, kept)
    existing = [p.resolve() for p in known_ledgers(fingerprint)]
    if not ledger_path.exists() and existing and not new_ledger:
        raise LedgerError(
            f"this data file already has a privacy ledger at {existing[0]}; use --ledger {existing[0]} "
            "(or pass --new-ledger to start a fresh one: its budget starts again)"
        )
    if ledger_path.exists() and not ledger_path.is_file():
        raise LedgerError(f"privacy ledger {ledger_path} is not a file; give --ledger a file path")
    home = _home(fingerprint)
    try:
        home.mkdir(parents=True, exist_ok=True)
        if ledger_path != default_ledger_path(fingerprint).resolve() and ledger_path not in existing:
            with open(home / "ledgers.txt", "a", encoding="utf-8") as fh:
                fh.write(f"{ledger_path}\n")
    except OSError as err:
        raise LedgerError(f"cannot write the ledger index under {home} ({err.strerror}); check permissions "
                          "or set XDG_STATE_HOME") from None
    if new_ledger and existing and not ledger_path.exists():
        log.warning("a fresh privacy ledger %s for data that already has %s: the owner's budget starts again",
                    ledger_path, existing[0])
