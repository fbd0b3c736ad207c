"""The ``veil`` command: one sub-command per user task.

Each sub-command lives in its own module, which exposes ``configure_parser(parser)`` and ``run(args) -> int``.
This module only dispatches, and turns every :class:`veil.errors.VeilError` into one line on stderr and a
non-zero exit, so a user never sees a traceback for a failure they can fix.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from veil.errors import VeilError

# sub-command -> (module, one-line help). Modules are imported lazily: `veil certs` must not pay for torch.
_COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("veil.simulation", "run a simulated federation on this machine (Hydra overrides follow)"),
    "report": ("veil.report", "tables and plots of runs or a sweep: accuracy, loss, ε per round, privacy–utility curve"),
    "audit": ("veil.audit.cli", "an empirical lower bound on ε from one simulated run with canaries (simulate overrides follow)"),
    "privacy": ("veil.privacy.report", "inspect a node's privacy ledger (`veil privacy report --ledger PATH`)"),
    "certs": ("veil.security.certs", "create a CA, a server certificate and node key pairs"),
    "server": ("veil.server.deploy", "start the coordinator (SuperLink with TLS + node auth) and submit a run"),
    "client": ("veil.client.node", "start a data owner's node (SuperNode) next to its private data"),
    "keygen": ("veil.security.roster", "make a data owner's signing key pair for a SecAgg+ roster"),
}


def quiet_environment() -> None:
    """No telemetry, no update checks, no hub downloads from any veil process (DESIGN.md decisions 9, 10)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # torch's OpenMP threads sleep instead of spin-waiting between operators: veil runs several torch processes on
    # the same cores (Ray's simulated clients, a node's processes, a SuperLink beside them), where a spinning thread
    # takes the core its sibling needs (benchmarks/omp_wait.py: 3 processes on 2 cores 3.0x faster, one process
    # alone 7% slower). Read when torch loads, so set before any import of it; a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``veil: error:`` line naming the problem and where the options are."""

    def error(self, message: str) -> NoReturn:
        raise VeilError(f"{self.prog}: {message}; see `{self.prog} --help`")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``veil`` console script; returns the process exit status."""
    quiet_environment()
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="veil", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in _COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not args_list or args_list[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if args_list else 2
    name, rest = args_list[0], args_list[1:]
    if name not in _COMMANDS:
        print(f"veil: error: unknown command {name!r}; choose one of {', '.join(_COMMANDS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("flwr").propagate = False  # Flower prints through its own handler
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Flower's state database migrations
    try:
        module = importlib.import_module(_COMMANDS[name][0])
        sub_parser = _OneLineParser(prog=f"veil {name}", description=_COMMANDS[name][1])
        module.configure_parser(sub_parser)
        args = sub_parser.parse_args(rest)
        return int(module.run(args))
    except VeilError as err:
        print(f"veil: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("veil: interrupted", file=sys.stderr)
        return 130
