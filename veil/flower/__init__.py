"""The Flower wing: every place veil reaches past Flower's public API, each behind one version gate.

Flower's public API (:data:`PUBLIC`: ``flwr.app``, ``flwr.clientapp``, ``flwr.serverapp``, ``flwr.server``,
``flwr.server.strategy``, ``flwr.server.workflow``, ``flwr.client``, ``flwr.client.mod``, ``flwr.common``,
``flwr.simulation``) may be used anywhere in veil. Everything else, a patch, a subclass that overrides a stage, a
re-composition of legacy parts, a private module's function or constant, lives in this folder
(tests/test_flower_wing.py checks that no other veil module imports a Flower module outside :data:`PUBLIC`):

==================  ==============================================================================================
``patches.py``      the SuperNode's poll sleeps, the object-pull back-off, the simulation engine's node sweep,
                    ``python -m veil.flower.patches`` (a patched ``flower-supernode``)
``sessions.py``     node sessions that outlive their node (heartbeat, activation, resume, reply pulls, stale receive)
``secagg.py``       SecAgg+'s record keys, and its mask generator replaced by a full-strength one
``polling.py``      the ServerApp's grid with a short pull interval (composition over ``Grid``)
``workflows.py``    the round loop with an after-round hook, SecAgg+ surviving an early drop-out
``runtime.py``      the node executor's half that talks to the SuperNode's Runtime API
``task_claims.py``  the ServerApp process's start window, ``python -m veil.flower.task_claims`` (a patched SuperLink)
``names.py``        private Flower names veil uses as they are (types, constants, helpers)
==================  ==============================================================================================

Each guard calls :func:`check_version` (the installed ``flwr.__version__`` must be in :data:`TESTED`) before its own
shape checks, and fails in one line (:class:`FlowerVersionError`) naming the installed version and the tested set.
Each wing module lists what it reaches for in a ``REACHES`` table of :class:`Reach` rows; tests/test_flower_wing.py
checks every row against the installed Flower, so the same test run after installing the newest wheel proves the
wing against it (docs/upstream/README.md, "Checking a new Flower release"). The upstream proposal that would make
each piece unnecessary is linked from its docstring; the index is docs/upstream/README.md.

Nothing here imports Flower at import time: a node sets its quiet environment before Flower loads.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

from veil.errors import DependencyError

__all__ = ["PUBLIC", "TESTED", "FlowerVersionError", "Reach", "check_version", "installed_version", "problem"]

TESTED = ("1.41.0", "1.42.0")  # Flower releases whose internals the wing was read against (1.41.0 pinned)

PUBLIC = frozenset({"flwr", "flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.serverapp.strategy", "flwr.server",
                    "flwr.server.strategy", "flwr.server.workflow", "flwr.client", "flwr.client.mod", "flwr.common",
                    "flwr.simulation"})


class FlowerVersionError(DependencyError, RuntimeError):
    """The installed Flower is not one the wing was tested on, or no longer has what a guard patches (a
    :class:`veil.errors.DependencyError`, as for an untested Opacus)."""


def installed_version() -> str:
    """``flwr.__version__`` of the Flower this process imports (``?`` when it does not say)."""
    import flwr

    return str(getattr(flwr, "__version__", "?"))


def check_version(what: str) -> str:
    """The installed Flower version, after checking that it is in :data:`TESTED`; ``what`` names the guard."""
    version = installed_version()
    if version not in TESTED:
        raise FlowerVersionError(f"flwr {version}: veil's {what} is tested on flwr {', '.join(TESTED)} only; "
                                 f"install one of those (pip install 'flwr=={TESTED[0]}')")
    return version


@dataclass(frozen=True)
class Reach:
    """One Flower name the wing reaches for: ``attribute`` (dotted for a class's method) of ``module``.

    ``params``: the leading parameter names a callable must have (``self`` included for a method), or None to check
    only that the name exists; ``keywords``: parameter names it must accept anywhere in its signature."""

    module: str
    attribute: str
    params: tuple[str, ...] | None = None
    keywords: tuple[str, ...] = ()


def problem(reach: Reach) -> str | None:
    """What the installed Flower lacks of ``reach`` (one phrase), or None when it fits."""
    try:
        target: object = importlib.import_module(reach.module)
    except ImportError:
        return f"module {reach.module} is gone"
    for part in reach.attribute.split("."):
        if not hasattr(target, part):
            return f"{reach.module}.{reach.attribute} is gone"
        target = getattr(target, part)
    if reach.params is None and not reach.keywords:
        return None
    try:
        names = list(inspect.signature(target).parameters)  # type: ignore[arg-type] # follows veil's __wrapped__
    except (TypeError, ValueError):
        return f"{reach.module}.{reach.attribute} is no longer a function"
    if reach.params is not None and tuple(names[:len(reach.params)]) != reach.params:
        return f"{reach.module}.{reach.attribute} takes ({', '.join(names)}), not ({', '.join(reach.params)}, ...)"
    missing = [k for k in reach.keywords if k not in names]
    if missing:
        return f"{reach.module}.{reach.attribute} takes no {', '.join(missing)}"
    return None
