"""Domain errors of veil.

Every failure a user can cause (bad configuration, bad data file, exhausted budget, unreadable key) is raised as a
subclass of :class:`VeilError`. Its message is one line that names the problem and the fix; the CLI prints it as
``veil: error: <message>`` and exits non-zero, without a traceback.
"""

from __future__ import annotations


class VeilError(Exception):
    """Base class of every user-facing veil failure; ``str(err)`` is the one line shown to the user."""

    exit_code: int = 2


class ConfigError(VeilError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class DataFileError(VeilError):
    """A data file is missing, unreadable, malformed or lacks a required column."""


class ModelError(VeilError):
    """A model directory is missing or does not hold a loadable Hugging Face model."""


class NodeRefusal(VeilError):
    """A node declines a round on its owner's authority (budget, privacy floor); the run goes on without it."""

    exit_code = 3


class PrivacyBudgetExhausted(NodeRefusal):
    """Training would push a data owner's ε past its own budget."""


class LedgerError(VeilError):
    """The on-disk privacy ledger is unreadable or inconsistent; never reset silently."""


class LedgerWriteError(LedgerError):
    """The privacy ledger could not be written (a full disk, a read-only path); the previous ledger is intact and
    the round is not booked, so it must not train. Passes when the disk does: the next round may be tried."""


class CredentialError(VeilError):
    """A certificate or key file is missing, malformed, expired or from the wrong authority."""


class DependencyError(VeilError):
    """An installed library is a version whose internals veil was not tested against; install a tested one."""
