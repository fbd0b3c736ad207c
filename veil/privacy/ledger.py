"""The data owner's privacy ledger: every DP-SGD release this node made, on its own disk, append-only.

Each :class:`LedgerEvent` is one release of ``steps`` Poisson-subsampled Gaussian steps; ε is always computed
from the *whole* history as one composition (DESIGN.md decision 5) with :mod:`veil.privacy.accounting` (PRV,
Gopi, Lee, Wutschitz arXiv:2106.02848; RDP, Mironov arXiv:1702.07476 and Mironov, Talwar, Zhang
arXiv:1908.10530). The file survives restarts and is never reset: there is no API that removes an event, an
unreadable file is an error (never a fresh start), and every write is atomic (temp file in the same
directory, flush, fsync, rename, fsync of the directory), so a crash leaves either the old or the new ledger.

The ledger also keeps the runs in which this node told the coordinator it cannot train another round
(``can_train_next=False``): the optional key ``stopped_runs``, a sorted list of run ids that only grows, so a
restarted node still refuses the rest of such a run (review 2026-12-07, N10). A ledger without it reads as before;
a veil release older than this key refuses a ledger that has it, in one line (it never resets it).

Over 300 lines: one stateful object and its on-disk format (events, stop marks, atomic writes, the checks that
refuse a damaged file); the ε arithmetic lives in :mod:`veil.privacy.accounting`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from veil.atomic import atomic_write
from veil.errors import LedgerError, LedgerWriteError, PrivacyBudgetExhausted
from veil.privacy.accounting import EpsilonResult, Event, compute_epsilon, validate_delta, validate_event

try:  # POSIX advisory lock: two processes recording into one ledger must not lose an event
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LEDGER_FORMAT", "LEDGER_VERSION", "LedgerEvent", "PrivacyLedger"]

LEDGER_FORMAT = "veil-privacy-ledger"
LEDGER_VERSION = 1

@dataclasses.dataclass(frozen=True, kw_only=True)
class LedgerEvent:
    """One DP-SGD release recorded on the ledger (keyword-only: a swapped σ and q is a silent privacy bug).

    Attributes
    ----------
    run_id : str
        Federation run that asked for the release.
    round : int
        Server round, ≥ 0.
    noise_multiplier, sample_rate, steps : float, float, int
        σ ≥ 0, Poisson rate q in (0, 1], number of steps ≥ 0.
    delta : float
        δ the owner accounts at, in (0, 1).
    timestamp : float
        Seconds since the epoch; defaults to now.
    """

    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    timestamp: float = dataclasses.field(default_factory=time.time)

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, str):
            raise TypeError(f"run_id must be a string, got {self.run_id!r}")
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise ValueError(f"round must be an integer >= 0, got {self.round!r}")
        sigma, q, steps = validate_event((self.noise_multiplier, self.sample_rate, self.steps), where="event")
        object.__setattr__(self, "noise_multiplier", sigma)
        object.__setattr__(self, "sample_rate", q)
        object.__setattr__(self, "delta", validate_delta(self.delta))
        if isinstance(self.timestamp, bool) or not isinstance(self.timestamp, (int, float)):
            raise TypeError(f"timestamp must be a number, got {self.timestamp!r}")
        if not math.isfinite(self.timestamp):
            raise ValueError(f"timestamp must be finite, got {self.timestamp!r}")
        object.__setattr__(self, "timestamp", float(self.timestamp))

    @property
    def triple(self) -> Event:
        """``(noise_multiplier, sample_rate, steps)`` for the accountant."""
        return self.noise_multiplier, self.sample_rate, self.steps


_EVENT_KEYS = frozenset(f.name for f in dataclasses.fields(LedgerEvent))
_STATE_KEYS = frozenset({"format", "version", "events"})
_STOPPED_KEY = "stopped_runs"  # optional: run ids this node stopped in (written only when there is one)


def _parse_state(state: Any, source: str) -> tuple[list[LedgerEvent], frozenset[str]]:
    """Events and stopped runs of a ledger document; LedgerError (one line naming ``source`` and the fix) on any
    mismatch."""
    fix = "restore it from a backup or move it aside to start a new ledger (veil never resets one)"
    if (not isinstance(state, Mapping) or set(state) - {_STOPPED_KEY} != _STATE_KEYS
            or state["format"] != LEDGER_FORMAT):
        raise LedgerError(f"privacy ledger {source} is not a veil ledger (expected keys {sorted(_STATE_KEYS)}); {fix}")
    if state["version"] != LEDGER_VERSION:
        raise LedgerError(
            f"privacy ledger {source} has version {state['version']!r}, this veil reads version {LEDGER_VERSION}; "
            f"use the veil release that wrote it, or {fix}"
        )
    if not isinstance(state["events"], list):
        raise LedgerError(f"privacy ledger {source}: 'events' must be a list; {fix}")
    events = []
    for i, raw in enumerate(state["events"]):
        if not isinstance(raw, Mapping) or set(raw) != _EVENT_KEYS:
            raise LedgerError(f"privacy ledger {source}: event {i} must have keys {sorted(_EVENT_KEYS)}; {fix}")
        try:
            events.append(LedgerEvent(**raw))
        except (TypeError, ValueError) as err:
            raise LedgerError(f"privacy ledger {source}: event {i} is invalid ({err}); {fix}") from None
    stopped = state.get(_STOPPED_KEY, [])
    if not isinstance(stopped, list) or not all(isinstance(r, str) for r in stopped):
        raise LedgerError(f"privacy ledger {source}: '{_STOPPED_KEY}' must be a list of run ids; {fix}")
    return events, frozenset(stopped)


class PrivacyLedger:
    """Append-only record of a node's DP-SGD releases, persisted atomically at ``path``.

    Use :meth:`open`; the constructor does not touch the disk.
    """

    def __init__(self, path: str | os.PathLike[str], events: list[LedgerEvent] | None = None) -> None:
        self.path = Path(path)
        self._events: list[LedgerEvent] = list(events or [])
        self._stopped: frozenset[str] = frozenset()

    # ---- loading and saving -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool = True) -> PrivacyLedger:
        """Load the ledger at ``path``; create it (and its parent folders) if absent and ``create`` is true.

        Raises
        ------
        veil.errors.LedgerError
            If the file is missing (``create=False``), unreadable, not JSON, or of another schema or version.
        """
        ledger = cls(path)
        if ledger.path.exists():
            ledger._events, ledger._stopped = ledger._read()
        elif create:
            try:
                ledger.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise LedgerError(f"cannot create the folder of privacy ledger {ledger.path}: {err}") from None
            with ledger._locked():
                if ledger.path.exists():  # another process created it meanwhile
                    ledger._events, ledger._stopped = ledger._read()
                else:
                    ledger._write(ledger._events, ledger._stopped)
        else:
            raise LedgerError(f"privacy ledger {ledger.path} does not exist; check the --ledger path")
        return ledger

    def _read(self) -> tuple[list[LedgerEvent], frozenset[str]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise LedgerError(f"cannot read privacy ledger {self.path}: {err}; check its permissions") from None
        try:
            state = json.loads(text)
        except json.JSONDecodeError as err:
            raise LedgerError(
                f"privacy ledger {self.path} is not valid JSON ({err.msg} at line {err.lineno}); restore it from "
                "a backup or move it aside to start a new ledger (veil never resets one)"
            ) from None
        return _parse_state(state, str(self.path))

    def _document(self, events: list[LedgerEvent], stopped: frozenset[str] = frozenset()) -> dict[str, Any]:
        doc: dict[str, Any] = {"format": LEDGER_FORMAT, "version": LEDGER_VERSION,
                               "events": [dataclasses.asdict(e) for e in events]}
        if stopped:
            doc[_STOPPED_KEY] = sorted(stopped)
        return doc

    def _write(self, events: list[LedgerEvent], stopped: frozenset[str]) -> None:
        """Atomically replace the file with ``events`` and ``stopped``: temp file, flush, fsync, rename, fsync of
        the folder."""
        data = json.dumps(self._document(events, stopped), indent=1, allow_nan=False).encode("utf-8")
        folder = self.path.parent
        for stale in folder.glob(f".{self.path.name}.*.tmp"):  # a writer killed mid-write (we hold the lock)
            with contextlib.suppress(OSError):
                stale.unlink()
        try:
            atomic_write(self.path, data, mode=0o600)
        except OSError as err:
            raise LedgerWriteError(f"cannot write privacy ledger {self.path}: {err}; check disk space "
                                   "and permissions (the previous ledger is intact)") from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive advisory lock on ``<path>.lock`` (no-op where fcntl is unavailable)."""
        if fcntl is None:  # pragma: no cover
            yield
            return
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            lock = open(lock_path, "a+b")  # noqa: SIM115 - closed below
        except OSError as err:  # a read-only or full disk: one line, nothing written
            raise LedgerWriteError(f"cannot write privacy ledger {self.path}: {err}; check disk space and permissions "
                              "(the previous ledger is intact)") from None
        with lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    # ---- recording ----------------------------------------------------------------------------------------
    def record(self, event: LedgerEvent) -> None:
        """Append ``event`` and persist the ledger atomically before returning.

        Events another process recorded into the same file meanwhile are kept. On failure the file and this
        object are unchanged.
        """
        if not isinstance(event, LedgerEvent):
            raise TypeError(f"event must be a LedgerEvent, got {type(event).__name__}")
        with self._locked():
            on_disk, stopped = self._on_disk()
            events = [*on_disk, event]
            self._write(events, stopped)
            self._events, self._stopped = events, stopped

    def stop_run(self, run_id: str) -> None:
        """Persist that this node told run ``run_id`` it cannot train another round (atomically, like
        :meth:`record`); :meth:`stopped` is then true for it in every later process."""
        if not isinstance(run_id, str):
            raise TypeError(f"run_id must be a string, got {run_id!r}")
        with self._locked():
            events, stopped = self._on_disk()
            if run_id not in stopped:
                self._write(events, stopped | {run_id})
            self._events, self._stopped = events, stopped | {run_id}

    def _on_disk(self) -> tuple[list[LedgerEvent], frozenset[str]]:
        """The file's events and stopped runs (call with the lock held); LedgerError if it lost what this object
        holds (a ledger only grows)."""
        on_disk, stopped = self._read() if self.path.exists() else ([], frozenset())
        if on_disk[: len(self._events)] != self._events or not self._stopped <= stopped:
            raise LedgerError(f"privacy ledger {self.path} changed on disk and lost events this node recorded; "
                              "restore it from a backup (veil never shrinks a ledger)")
        return on_disk, stopped

    # ---- queries ------------------------------------------------------------------------------------------
    @property
    def events(self) -> tuple[LedgerEvent, ...]:
        """All recorded events, oldest first (read-only)."""
        return tuple(self._events)

    def stopped(self, run_id: str) -> bool:
        """True when this node told run ``run_id`` that it cannot train another round (:meth:`stop_run`)."""
        return run_id in self._stopped

    def history(self) -> list[Event]:
        """The ``(noise_multiplier, sample_rate, steps)`` triples of every release, oldest first."""
        return [e.triple for e in self._events]

    def epsilon(self, *, delta: float, accountant: str = "prv") -> EpsilonResult:
        """ε spent so far: the whole history as one composition."""
        return compute_epsilon(self.history(), delta=delta, accountant=accountant)

    def epsilon_if(self, event: LedgerEvent, *, delta: float, accountant: str = "prv") -> EpsilonResult:
        """ε the ledger would show after also recording ``event``."""
        return compute_epsilon([*self.history(), event.triple], delta=delta, accountant=accountant)

    def check_budget(
        self, event: LedgerEvent, *, max_epsilon: float, delta: float, accountant: str = "prv"
    ) -> EpsilonResult:
        """ε after ``event``, or :class:`~veil.errors.PrivacyBudgetExhausted` if it would exceed ``max_epsilon``."""
        if isinstance(max_epsilon, bool) or not isinstance(max_epsilon, (int, float)) or not max_epsilon > 0:
            raise ValueError(f"max_epsilon must be a number > 0, got {max_epsilon!r}")
        after = self.epsilon_if(event, delta=delta, accountant=accountant)
        if after.epsilon > max_epsilon:
            spent = self.epsilon(delta=delta, accountant=accountant)
            raise PrivacyBudgetExhausted(
                f"privacy budget exhausted: ledger {self.path} has spent epsilon={spent.epsilon:.4g} and round "
                f"{event.round} of run {event.run_id!r} would bring it to {after.epsilon:.4g} > max_epsilon="
                f"{max_epsilon:g} (delta={after.delta:g}, {after.accountant}); this node refuses to train"
            )
        return after

    # ---- checkpointing ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The ledger as a JSON-serialisable document (the same schema as the file)."""
        return self._document(self._events, self._stopped)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load ``state`` (from :meth:`state_dict`) and persist it; it may only extend the current events.

        Raises
        ------
        veil.errors.LedgerError
            On wrong keys, format or version, or if ``state`` would drop or alter a recorded event.
        """
        events, stopped = _parse_state(state, "state_dict")
        with self._locked():
            current, current_stopped = self._read() if self.path.exists() else (self._events, self._stopped)
            if (events[: len(current)] != current or current[: len(self._events)] != self._events
                    or not current_stopped <= stopped or not self._stopped <= stopped):
                raise LedgerError(f"refusing to load a ledger state that drops or alters events of {self.path}; "
                                  "a privacy ledger only grows")
            self._write(events, stopped)
        self._events, self._stopped = events, stopped

    def __len__(self) -> int:
        return len(self._events)

    def __repr__(self) -> str:
        return f"PrivacyLedger({str(self.path)!r}, events={len(self._events)})"
