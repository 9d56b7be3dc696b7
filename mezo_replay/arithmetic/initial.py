"""Generated initial values (spec/init.md): tensors a trajectory starts from but never stores.

A PEFT adapter starts from random values (LoRA's A, a prefix's embeddings) and zeros (LoRA's B). Stored
in INIT chunks they would cost four bytes per parameter, more than the whole rest of the trajectory;
drawn from the run's own generator they cost a few header bytes and rebuild bit for bit anywhere. The
draws use step index INIT_STREAM, which no step can have (a trajectory holds fewer than 2^32 - 1
steps), so they are independent of every step's noise. Each value is one binary32 product, correctly
rounded, then rounded to the tensor's dtype: nothing a compiler could fuse or reorder.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .noise import gauss16_table
from .philox import random_u16

INIT_STREAM = 0xFFFFFFFF  # the generator's step index for initial values (spec/init.md)
_SLICE = 1 << 22


def zeros() -> dict[str, Any]:
    return {"name": "zeros"}


def uniform16(bound: float) -> dict[str, Any]:
    """Uniform on (-bound, bound) in 65,536 equal bins (their midpoints); `bound` rounded to binary32."""
    return {"name": "uniform16", "bound": _binary32(bound)}


def gaussian16(std: float) -> dict[str, Any]:
    """The gaussian16 table's values (noise.md) times `std`, rounded to binary32."""
    return {"name": "gaussian16", "std": _binary32(std)}


def kaiming_uniform_bound(fan_in: int) -> float:
    """torch's kaiming_uniform_(a=sqrt(5)) bound, which nn.Linear and peft's LoRA A use: gain sqrt(1/3)
    times sqrt(3 / fan_in) = 1 / sqrt(fan_in)."""
    return 1.0 / math.sqrt(fan_in)


def _binary32(x: float) -> float:
    value = float(torch.tensor(float(x), dtype=torch.float32))
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"an initial value's scale must be a positive finite binary32 number, not {x!r}")
    return value


def generate(spec: Mapping[str, Any], seed: int, index: int, shape: Sequence[int], dtype: torch.dtype,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """The initial value spec/init.md defines for tensor `index` of a run with generator seed `seed`."""
    name = spec["name"]
    n = math.prod(shape)
    if name == "zeros":
        return torch.zeros(tuple(shape), dtype=dtype, device=device)
    if name not in ("uniform16", "gaussian16"):
        raise ValueError(f"unknown initial value {name!r}")
    out = torch.empty(n, dtype=dtype, device=device)
    for start in range(0, n, _SLICE):
        count = min(_SLICE, n - start)
        u = random_u16(seed, INIT_STREAM, index, start, count, device)
        if name == "uniform16":
            unit = (2 * u - 65535).to(torch.float32) * (2.0 ** -16)  # exact: 16 significant bits at most
            v = unit * torch.tensor(spec["bound"], dtype=torch.float32, device=device)
        else:
            v = gauss16_table(torch.device(device)).index_select(0, u) * \
                torch.tensor(spec["std"], dtype=torch.float32, device=device)
        out[start:start + count] = v.to(dtype)  # round to nearest even (rule.md R_D)
    return out.reshape(tuple(shape))
