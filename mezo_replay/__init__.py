"""mezo-replay: a MeZO fine-tune as a few kilobytes of seeded steps, replayed bit for bit on any device.

    from mezo_replay import MeZO, fit, read_trajectory, plan, reconstruct

Names are imported on first use, so the command line starts without loading torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "MeZO": "optimizer", "NonFiniteLossError": "optimizer",
    "Trajectory": "mzt", "TrajectoryWriter": "mzt", "read_trajectory": "mzt",
    "plan": "replay", "reconstruct": "replay", "verify": "replay",
    "BaseMismatchError": "replay", "VerificationError": "replay",
    "MezoReplayError": "errors", "fit": "train", "Schedule": "rule",
    "load_trajectory": "hub", "push_to_hub": "publish",
}
__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from .errors import MezoReplayError
    from .mzt import Trajectory, TrajectoryWriter, read_trajectory
    from .optimizer import MeZO, NonFiniteLossError
    from .replay import BaseMismatchError, VerificationError, plan, reconstruct, verify
    from .rule import Schedule
    from .hub import load_trajectory
    from .publish import push_to_hub
    from .train import fit


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
