"""The update rule `mezo-sgd` (spec/rule.md): host arithmetic in binary64 and the element phases in torch.

The element phases never multiply two numbers whose product could need rounding: eps and the step
coefficient carry at most 16 significant bits and z at most 8, so every product is exact in binary32.
That is what makes the same code give the same bits on a CPU, a GPU, or under a compiler that fuses
multiply-adds: there is nothing left for an FMA to round differently.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import torch

from .noise import GAUSS16_SHA256, NOISES

MAX_SEED = 2**64 - 1
_TINY, _HUGE = 2.0**-100, 2.0**100


def round_significant(x: float, bits: int) -> float:
    """RS(x, n): x rounded to n significant bits, to nearest, ties to even (exact in binary64)."""
    if x == 0 or not math.isfinite(x):
        return x
    m, e = math.frexp(x)
    return math.ldexp(round(m * (1 << bits)), e - bits)  # round() of a float is ties-to-even


def encode_grad(g: float) -> int:
    """The bfloat16 bits recorded for a projected gradient; refuses what replay could not use."""
    if not math.isfinite(g):
        raise ValueError(f"projected gradient is {g}: a loss was not finite")
    q = 0.0 if abs(g) < _TINY else round_significant(g, 8)
    if abs(q) >= 2.0**127:
        raise ValueError(f"projected gradient {g:g} is beyond bfloat16's range")
    return struct.unpack("<I", struct.pack("<f", q))[0] >> 16  # q has 8 bits: packing is exact


def decode_grad(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", (bits & 0xFFFF) << 16))[0]


@dataclass(frozen=True)
class MezoSGD:
    """The rule's hyperparameters exactly as a trajectory stores them (already quantised)."""

    lr: float
    eps: float
    seed: int
    noise: str = "gaussian16"

    @classmethod
    def create(cls, *, lr: float, eps: float, seed: int, noise: str = "gaussian16") -> MezoSGD:
        """Quantises user values the way the spec requires writers to: eps to 16 bits, lr to 24."""
        return cls(lr=round_significant(float(lr), 24), eps=round_significant(float(eps), 16),
                   seed=int(seed), noise=noise).validated()

    def validated(self) -> MezoSGD:
        if self.noise not in NOISES:
            raise ValueError(f"unknown noise {self.noise!r}; known: {', '.join(NOISES)}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2^64), got {self.seed}")
        if not (math.isfinite(self.eps) and 2.0**-60 <= self.eps <= 2.0**60
                and round_significant(self.eps, 16) == self.eps):
            raise ValueError(f"eps must be positive, in [2^-60, 2^60], with <= 16 significant bits: {self.eps!r}")
        if not (math.isfinite(self.lr) and _TINY <= self.lr <= _HUGE
                and round_significant(self.lr, 24) == self.lr):
            raise ValueError(f"lr must be positive, in [2^-100, 2^100], with <= 24 significant bits: {self.lr!r}")
        return self

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> MezoSGD:
        rule, gen, noise = header["rule"], header["generator"], header["noise"]
        return cls(lr=float(rule["lr"]), eps=float(rule["eps"]), seed=int(gen["seed"]),
                   noise=noise["name"]).validated()

    def header_fields(self) -> dict[str, Any]:
        noise: dict[str, Any] = {"name": self.noise}
        if self.noise == "gaussian16":
            noise["table_sha256"] = GAUSS16_SHA256
        return {
            "generator": {"name": "philox4x32-10", "seed": str(self.seed)},
            "noise": noise,
            "rule": {"name": "mezo-sgd", "eps": self.eps, "lr": self.lr,
                     "schedule": {"name": "constant"}, "grad_encoding": "bf16"},
        }

    def coefficient(self, grad_bits: int) -> float:
        """c = RS(lr * gq, 16); lr * gq is exact in binary64 (24 + 8 significant bits)."""
        c = round_significant(self.lr * decode_grad(grad_bits), 16)
        if abs(c) < _TINY:
            return 0.0
        if abs(c) > _HUGE:
            raise ValueError(f"update coefficient {c:g} is beyond 2^100: the step diverged")
        return c


# --- element phases, in place on a flat slice of a parameter ---------------------------------------

# R_D is torch's copy_ from float32: bf16 and f16 round to nearest even and keep subnormals.

def perturb_(w: torch.Tensor, z: torch.Tensor, scale: float) -> None:
    """P1 (scale = eps) and P2 (scale = -2 eps): w = R_D(fl32(w + scale*z)); scale*z is exact."""
    w.copy_(w.to(torch.float32) + z * scale)


def restore_update_(w: torch.Tensor, z: torch.Tensor, eps: float, c: float) -> None:
    """P3: w = R_D(fl32(fl32(w + eps*z) - c*z)), the restore and the update in one pass."""
    w.copy_((w.to(torch.float32) + z * eps) - z * c)
