"""The writer's choice of layer-wise exponents (spec/layerwise.md, not normative): from the base weights.

A replay never recomputes these: the exponents are recorded in the header's tensor entries, so the
float64 norms below may be summed in any order, on any device, without touching replay's exactness.

Why scale per tensor: MeZO perturbs every weight by eps * z whatever its size, so a tensor of small weights
(a layer norm's bias, a LoRA A matrix) is shaken relatively hard and one of large weights hardly at all;
`perturbation` makes the probe proportional to each tensor's typical magnitude (u_k = 2^e_k z_k, the SPSA
update following the same direction). `step` keeps the probe and scales only the step, as LARS does for
first-order training: larger weights take larger steps. `both` does both.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

from ..arithmetic.rule import MAX_EXP

MODES = ("none", "perturbation", "step", "both")
BLOCKS = ("tensor", "layer")
# a decoder (or encoder) layer of the common architectures: model.layers.3., transformer.h.3., encoder.layer.3.
_LAYER = re.compile(r"^(.*?\.(?:layers|layer|h|blocks|block)\.\d+)\.")


def block_of(name: str, blocks: str) -> str:
    """The block a tensor belongs to: itself ("tensor"), or its numbered layer ("layer"; a tensor outside
    every layer, such as the embeddings or the final norm, is a block of its own)."""
    if blocks not in BLOCKS:
        raise ValueError(f"unknown layer-wise block {blocks!r}; choose one of {', '.join(BLOCKS)}")
    m = _LAYER.match(name) if blocks == "layer" else None
    return m.group(1) if m else name


def rms_exponent(t: torch.Tensor) -> int | None:
    """round(log2(rms)) of a tensor in float64 (any summation order: recorded, not replayed); None for an
    rms of 0 or a non-finite one (a zero-initialised bias, a new head, LoRA B, a NaN)."""
    if t.numel() == 0:
        return None
    total = 0.0
    flat = t.detach().reshape(-1)
    for at in range(0, flat.numel(), 1 << 22):  # bounded float64 temporaries
        total += float(flat[at:at + (1 << 22)].to(torch.float64).square().sum())
    rms = math.sqrt(total / flat.numel()) if math.isfinite(total) else math.nan
    if not math.isfinite(rms) or rms == 0.0:
        return None
    return round(math.log2(rms))


def exponents_from_rms(raw: Sequence[int | None], counts: Sequence[int], eps: float) -> list[int]:
    """One exponent per tensor: its rms exponent minus the offset that makes the element-weighted mean ~0
    (so --eps and --lr keep their average meaning), 0 where the rms was 0 or non-finite, clamped to
    [-40, 40] and to what keeps eps * 2^e in [2^-60, 2^60]."""
    known = [(r, n) for r, n in zip(raw, counts) if r is not None and n]
    if not known:
        return [0] * len(raw)
    offset = round(sum(r * n for r, n in known) / sum(n for _, n in known))
    lo = next(e for e in range(-MAX_EXP, 1) if math.ldexp(eps, e) >= 2.0**-60)  # eps itself is in range
    hi = next(e for e in range(MAX_EXP, -1, -1) if math.ldexp(eps, e) <= 2.0**60)
    return [0 if r is None else min(hi, max(lo, r - offset)) for r in raw]


def layerwise_exponents(tensors: Sequence[torch.Tensor], mode: str, eps: float,
                        groups: Sequence[str] | None = None) -> list[tuple[int, int]]:
    """(perturb_exp, step_exp) per tensor for `mode` (MODES). groups: a block name per tensor; tensors of one
    block share the exponent computed from all of them together (None: every tensor is its own block)."""
    if mode not in MODES:
        raise ValueError(f"unknown layer-wise mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "none":
        return [(0, 0)] * len(tensors)
    counts = [t.numel() for t in tensors]
    if groups is None:
        raw = [rms_exponent(t) for t in tensors]
    else:
        sums: dict[str, tuple[float, int]] = {}
        for g, t in zip(groups, tensors):
            s = float(t.detach().reshape(-1).to(torch.float64).square().sum())
            a, n = sums.get(g, (0.0, 0))
            sums[g] = (a + s, n + t.numel())
        exps: dict[str, int | None] = {}
        for g, (s, n) in sums.items():
            rms = math.sqrt(s / n) if n and math.isfinite(s) else 0.0
            exps[g] = round(math.log2(rms)) if rms and math.isfinite(rms) else None
        raw = [exps[g] for g in groups]
    e = exponents_from_rms(raw, counts, eps)
    if mode == "perturbation":
        return [(x, 0) for x in e]
    if mode == "step":
        return [(0, x) for x in e]
    return [(x, x) for x in e]
