"""When a node's training reply leaves: at a fixed time after the instruction arrived, set by the owner alone.

Why (review 2026-12-07, N6): a deployed node pads every sequence to ``model.max_length`` and takes its step count from
the run config, but a Poisson batch still holds about q·N examples at the owner's q, and the node reads its whole
file each round, so a round's time grows with the owner's N. The coordinator times every reply. With ``veil client
--reply-after S`` the node holds each reply to a training instruction (trained, noise only, or refused) until S
seconds after the instruction reached the ClientApp: whenever the round's work ends within S, the reply's arrival
says nothing about the data.

Who picks S: the owner only (node config ``reply-after``), never the run config. A run-config value could only be
taken as ``max(owner, run)``; that arrival time, max(S, R, T), is a function of the owner-only arrival max(S, T) and
R, so it would leak nothing more — but it lets whoever submits a run stall the owner's node for as long as it
likes, and an honest operator gains nothing the owner cannot set. A run whose ``secagg.timeout`` would end the
round before the held reply is refused before anything is booked (:func:`veil.client.floor.check_run`).

A round that overruns S: the reply waits for the next whole multiple of S (2·S, 3·S, ...), and the node logs one
warning naming the flag to raise. The coordinator then learns ⌈T/S⌉ — that the round took between (k−1)·S and k·S
— rather than T to the millisecond. The alternatives are worse: sending at once leaks T; refusing, or sending noise
in place of an update that came too late, makes the *content* of the release depend on the data's size outside the
DP mechanism (a release of noise alone is DP-SGD on an empty set, not on a neighbour), and a refusal wastes the
round already booked.

The clock and the sleep are injected (:class:`ReplyTimer`), so tests check the release time without a wall clock.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["FLAG", "ReplyTimer", "release_offset"]

log = logging.getLogger("veil.client")

FLAG = "--reply-after"  # the owner's flag, named in every message about it


def release_offset(elapsed: float, *, hold: float) -> float:
    """Seconds after the instruction at which the reply leaves: ``hold`` if the work took at most that, else the
    next whole multiple of ``hold``; ``elapsed`` itself when nothing is held (``hold`` = 0)."""
    if hold <= 0:
        return elapsed
    return hold * max(1, math.ceil(elapsed / hold))


@dataclass
class ReplyTimer:
    """Holds a node's replies to a fixed time after each instruction (see the module docstring)."""

    clock: Callable[[], float] = field(default=time.monotonic)
    sleep: Callable[[float], None] = field(default=time.sleep)

    def start(self) -> float:
        """The instruction's arrival, on this timer's clock."""
        return self.clock()

    def hold(self, started: float, *, hold: float, server_round: int) -> float:
        """Wait until :func:`release_offset` after ``started``; warn once when the round overran ``hold``.

        Returns the offset at which the reply leaves (for the node's log and for tests).
        """
        elapsed = self.clock() - started
        offset = release_offset(elapsed, hold=hold)
        if hold <= 0:
            return offset
        if elapsed > hold:
            log.warning("round %d: this round took %.1f s, more than %s %g s; its reply leaves at %g s, which tells "
                        "the coordinator the round overran: raise %s above the slowest round's time",
                        server_round, elapsed, FLAG, hold, offset, FLAG)
        if offset > elapsed:
            self.sleep(offset - elapsed)
        return offset
