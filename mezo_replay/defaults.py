"""Training settings used when the user gives none; torch-free, so that `--help` can show them at once."""
from __future__ import annotations

from typing import Any

#: For a user's model: MeZO's published full-parameter settings (Malladi et al. 2023, appendix D;
#: princeton-nlp/MeZO large_models: lr 1e-6 or 1e-7, eps 1e-3, batch 16, constant schedule; the paper
#: runs 20,000 steps, evaluating every 4,000). The embedded demo has its own (embedded.DEFAULTS): its
#: lr 5e-5 suits only its tiny model, and is 50x these.
MEZO_DEFAULTS: dict[str, Any] = {
    "lr": 1e-6,
    "eps": 1e-3,
    "batch_size": 16,
    "steps": 1000,
    "max_length": 128,
    "seed": 0,
    "eval_every": 500,
}
