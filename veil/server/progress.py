"""A console progress bar over a run's rounds (tqdm), shown only when stderr is a terminal.

The per-round log line stays the record in logs and CI; the bar adds the time estimate for a person watching.
Local training steps run inside Ray workers (simulation) or on the data owners' machines (deployment), so the
server shows rounds only.
"""

from __future__ import annotations

import math
import sys
from typing import Any


class RoundProgress:
    """``rounds  2/5 [01:10<01:45, acc 0.41, eps 1.20]``; silent when stderr is not a terminal."""

    def __init__(self, *, total: int, done: int = 0) -> None:
        from tqdm import tqdm

        self._bar: Any = tqdm(total=total, initial=done, desc="rounds", unit="round", file=sys.stderr,
                              disable=not sys.stderr.isatty(), dynamic_ncols=True, leave=True)

    def update(self, row: dict[str, Any]) -> None:
        acc, eps = row.get("accuracy"), row.get("epsilon_max")
        eps_text = f"{eps:.2f}" if isinstance(eps, float) and math.isfinite(eps) else "n/a"
        self._bar.set_postfix_str(f"acc {acc:.3f}, eps {eps_text}" if isinstance(acc, float) else "", refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
