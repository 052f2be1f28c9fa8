"""Whether and where a run goes on after its SuperLink died: the last checkpoint, or why not.

Like a container restart policy, the launcher starts the SuperLink again on its state
database (the gateways reconnect by themselves) and submits the job again from the last
checkpointed round, at most ``fleet.resume_attempts`` times. The engine (``engine=sim``: its
virtual gateways died with the SuperLink), the privacy mode (an accountant a new run would
start from zero) and the strategy (``StrategySpec.resume_refusal``) can refuse.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from iiotfl.server.launch.engines import engine_class
from iiotfl.strategies import strategy_spec


def last_checkpoint(run_dir: Path) -> int:
    """The last round whose global model was checkpointed (0: none)."""
    found = [int(m.group(1)) for f in (run_dir / "checkpoints").glob("round-*.ckpt")
             if (m := re.fullmatch(r"round-(\d+)\.ckpt", f.name))]
    return max(found, default=0)


def resume_refusal(cfg: Mapping[str, Any], resumed: int) -> str | None:
    """Why a run whose SuperLink died cannot go on from its last checkpoint (None: it can)."""
    refusal = engine_class(cfg).resume_refusal
    if refusal:
        return refusal
    if resumed >= int(cfg["fleet"].get("resume_attempts", 0) or 0):
        return f"fleet.resume_attempts={cfg['fleet'].get('resume_attempts', 0)} restarts already used"
    privacy = (cfg.get("privacy") or {}).get("name", "none")
    if privacy != "none":
        return (f"privacy={privacy} keeps its accountant in the run's state, which a new run would start "
                "from zero (under-counting epsilon); start the run again")
    return strategy_spec(cfg).resume_refusal
