"""mezo-replay: a MeZO fine-tune as a few kilobytes of seeded steps, replayed bit for bit on any device.

    from mezo_replay import MeZO, fit, read_trajectory, plan, reconstruct
    from mezo_replay import MeZOTrainer        # transformers.Trainer, stepping with MeZO

Names are imported on first use, so the command line starts without loading torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "MeZO": "training.optimizer", "NonFiniteLossError": "training.optimizer",
    "Trajectory": "format.mzt", "TrajectoryWriter": "format.mzt", "read_trajectory": "format.mzt",
    "plan": "rebuild.replay", "reconstruct": "rebuild.replay", "verify": "rebuild.replay",
    "BaseMismatchError": "rebuild.replay", "VerificationError": "rebuild.replay",
    "MezoReplayError": "errors", "fit": "training.train", "Schedule": "arithmetic.rule",
    "load_trajectory": "hub.fetch", "push_to_hub": "hub.publish", "MeZOTrainer": "training.trainer",
}
__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from .errors import MezoReplayError
    from .format.mzt import Trajectory, TrajectoryWriter, read_trajectory
    from .training.optimizer import MeZO, NonFiniteLossError
    from .rebuild.replay import BaseMismatchError, VerificationError, plan, reconstruct, verify
    from .arithmetic.rule import Schedule
    from .hub.fetch import load_trajectory
    from .hub.publish import push_to_hub
    from .training.train import fit
    from .training.trainer import MeZOTrainer


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
