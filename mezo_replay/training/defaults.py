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

#: With --peft, lr and eps replace MEZO_DEFAULTS's: MeZO's published PEFT settings (princeton-nlp/MeZO
#: large_models/README.md: MODE=lora LR=5e-5 EPS=1e-2, MODE=prefix LR=1e-3 EPS=1e-1; the paper's grids
#: are lr {1e-4, 5e-5} and {1e-2, 1e-3}). An adapter starts at (or near) no change and its parameters are
#: few, so both lr and eps are far larger than for full tuning.
PEFT_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"lr": 5e-5, "eps": 1e-2},
    "prefix": {"lr": 1e-3, "eps": 1e-1},
}

#: The same for the embedded demo's tiny model, measured on 2 CPU cores (150 steps, eval loss from 1.95):
#: LoRA r=8 lr 5e-5 -> 1.84, 1e-3 -> 1.52, 1e-2 diverges (7.5); prefix lr 1e-3 -> no change, 1e-2 -> 1.90.
PEFT_DEMO_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"lr": 1e-3, "eps": 1e-2},
    "prefix": {"lr": 1e-2, "eps": 1e-1},
}
