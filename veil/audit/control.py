"""The audit's no-noise control arm (issue 26, scope 1): the same configuration and the same canaries, DP off.

A one-run lower bound of 0 at the claimed ε proves nothing when the attack would find 0 without DP too: the attack has
no power at that setting. ``veil audit`` therefore runs, by default, a control federation with noise off (same
overrides, same canaries drawn from the same seed, same planted owners) and states both bounds side by side, warning
in one line when the control's bound is near zero. Steinke, Nasr & Jagielski (arXiv:2305.08846) report the same
comparison (their Figure 2: the non-private run's bound beside the private one's).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["NO_POWER", "control_config", "power_warning", "side_by_side", "write_control"]

NO_POWER = 0.1  # a control bound below this: the attack cannot tell DP from no DP at this setting


def control_config(cfg: Any) -> Any:
    """``cfg`` with differential privacy off (``privacy=none``'s values), everything else the same."""
    return dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, enabled=False, noise_multiplier=0.0,
                                                                target_epsilon=0.0))


def side_by_side(audit: Any, control: Any) -> str:
    """"without DP this attack finds ε ≥ X; with DP ≥ Y; claimed Z"."""
    claimed = "∞" if math.isinf(audit.claimed_epsilon) else f"{audit.claimed_epsilon:.3f}"
    return (f"without DP this attack finds epsilon >= {control.lower_bound:.3f}; with DP >= {audit.lower_bound:.3f}; "
            f"claimed {claimed}")


def power_warning(control: Any) -> str | None:
    """One line when the control's bound is near zero, naming what would give the attack power."""
    if control.lower_bound >= NO_POWER:
        return None
    return (f"warning: without DP this attack finds only epsilon >= {control.lower_bound:.3f}, so it has no power at "
            "this setting and the DP bound says nothing; give it power with more federation.rounds or "
            "federation.local_steps, fewer clients (federation.num_clients), or --score gradient-canary with model.tuning=full")


def write_control(out_dir: Path, audit: Any, control: Any, write: Any) -> None:
    """Add the control arm to ``out_dir``'s audit.json (key ``control``) and audit.md (both bounds side by side)."""
    doc = json.loads((out_dir / "audit.json").read_text(encoding="utf-8"))
    doc["control"] = {**control.to_json(), "run_dir": str(out_dir / "control")}
    write(out_dir / "audit.json", json.dumps(doc, indent=2) + "\n")
    md = (out_dir / "audit.md").read_text(encoding="utf-8").rstrip("\n")
    warning = power_warning(control)
    md += ("\n\n## Control: the same attack without DP\n\n| | ε lower bound |\n|---|---|\n"
           f"| without DP (control, same canaries) | {control.lower_bound:.3f} ({control.correct} of "
           f"{control.guesses} guesses right) |\n"
           f"| with DP | {audit.lower_bound:.3f} ({audit.correct} of {audit.guesses} guesses right) |\n\n"
           + side_by_side(audit, control).replace("epsilon >=", "ε ≥").replace(">=", "≥") + ".\n"
           + (f"\n**{warning}**\n" if warning else ""))
    write(out_dir / "audit.md", md)
