"""The update rule `mezo-sgd` (spec/rule.md): its hyperparameters and the per-step host arithmetic.

Everything here is binary64 arithmetic on the host, done the same way by training and replay: the
learning rate of a step, the coefficient c applied to z, and the decay factor d. The element phases
that use them live in steps.py. eps and c carry at most 16 significant bits, d at most 12, so the
products the element phases form are exact in binary32 and immune to fused multiply-add.
"""
from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from . import grad_codec
from .noise import GAUSS16_SHA256, NOISES

MAX_SEED = 2**64 - 1
SCHEDULES = ("constant", "linear", "cosine")
RULES = ("mezo-sgd", "mezo-momentum", "mezo-momentum-buffer")
MAX_WINDOW = 64
MAX_EXP = 40  # layer-wise scaling (spec/layerwise.md): perturb_exp and step_exp lie in [-MAX_EXP, MAX_EXP]
LAYERWISE_KEYS = ("perturb_exp", "step_exp")
_TINY, _HUGE = 2.0**-100, 2.0**100

# K[k]: the binary64 values nearest (-1)^k pi^(2k) / (2k)! (spec/rule.md, COS_PI).
_COS_K = [float.fromhex(h) for h in (
    "0x1.0000000000000p+0", "-0x1.3bd3cc9be45dep+2", "0x1.03c1f081b5ac4p+2", "-0x1.55d3c7e3cbffap+0",
    "0x1.e1f506891babbp-3", "-0x1.a6d1f2a204a8cp-6", "0x1.f9d38a3763cc3p-10", "-0x1.b6e24f44b128fp-14",
    "0x1.20c62c2f2d7f5p-18", "-0x1.2a0c591af8314p-23", "0x1.ef6e308d6d1c4p-29", "-0x1.52ae4120fde27p-34",
    "0x1.838d8f4321800p-40")]


def round_significant(x: float, bits: int) -> float:
    """RS(x, n): x rounded to n significant bits, to nearest, ties to even (exact in binary64)."""
    if x == 0 or not math.isfinite(x):
        return x
    m, e = math.frexp(x)
    return math.ldexp(round(m * (1 << bits)), e - bits)  # round() of a float is ties-to-even


def cos_pi(p: float) -> float:
    """COS_PI(p) on [0, 1]: a polynomial, so the same bits everywhere (CPython never fuses * and +)."""
    if p > 0.5:
        return -cos_pi(1.0 - p)
    q = p * p
    r = _COS_K[12]
    for k in range(11, -1, -1):
        r = r * q + _COS_K[k]
    return r


def encode_grad(g: float) -> int:
    """The bfloat16 bits recorded for a projected gradient (grad_encoding bf16); refuses what replay could
    not use. MezoSGD.encode_grad does the same for the rule's own encoding."""
    return grad_codec.encode(g, "bf16")


def decode_grad(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", (bits & 0xFFFF) << 16))[0]


def _int(x: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or not lo <= x <= hi:
        raise ValueError(f"{what} must be an integer in [{lo}, {hi}], got {x!r}")
    return x


@dataclass(frozen=True)
class Schedule:
    """The learning-rate multiplier of each step: warmup, then constant, linear or cosine decay."""

    name: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 0

    def validated(self) -> Schedule:
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.name!r}; known: {', '.join(SCHEDULES)}")
        _int(self.total_steps, "schedule total_steps", 0, 2**32 - 1)
        _int(self.warmup_steps, "schedule warmup_steps", 0, self.total_steps)
        if self.name != "constant" and self.total_steps < 1:
            raise ValueError(f"a {self.name} schedule needs total_steps >= 1")
        return self

    @classmethod
    def from_header(cls, obj: dict[str, Any]) -> Schedule:
        unknown = set(obj) - {"name", "warmup_steps", "total_steps"}
        if unknown:
            raise ValueError(f"unknown schedule keys {sorted(unknown)}: the file needs a newer mezo-replay")
        return cls(obj.get("name"), obj.get("warmup_steps", 0), obj.get("total_steps", 0)).validated()

    def header(self) -> dict[str, Any]:
        if self.name == "constant" and self.warmup_steps == 0:
            return {"name": "constant"}
        return {"name": self.name, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}

    def multiplier(self, t: int) -> float:
        w, total = self.warmup_steps, self.total_steps
        if t < w:
            return (t + 1) / (w + 1)
        p = min(1.0, (t - w) / max(1, total - w))
        if self.name == "linear":
            return 1.0 - p
        if self.name == "cosine":
            return 0.5 * (1.0 + cos_pi(p))
        return 1.0


@dataclass(frozen=True)
class MezoSGD:
    """The rule's hyperparameters exactly as a trajectory stores them (already quantised)."""

    lr: float
    eps: float
    seed: int
    noise: str = "gaussian16"
    schedule: Schedule = field(default_factory=Schedule)
    weight_decay: float = 0.0
    grad_encoding: str = "bf16"       # how step records hold the projected gradient (grad_codec.py)
    grad_scale: float | None = None   # fp8 and sign: the power of two gq is a multiple of
    momentum: float = 0.0             # mezo-momentum's beta (spec/momentum.md); 0 with window 0: mezo-sgd
    window: int = 0                   # mezo-momentum's K, the records its average spans; 0: mezo-sgd
    buffered: bool = False            # mezo-momentum-buffer: a binary32 state m per element (momentum.md)
    # layer-wise scaling (spec/layerwise.md): (perturb_exp e_k, step_exp f_k) of each tuned tensor, from the
    # header's tensor entries; () when every exponent is 0 (the rule then is exactly rule.md's)
    exponents: tuple[tuple[int, int], ...] = ()

    @classmethod
    def create(cls, *, lr: float, eps: float, seed: int, noise: str = "gaussian16",
               schedule: Schedule | None = None, weight_decay: float = 0.0, grad_encoding: str = "bf16",
               grad_scale: float | None = None, rule: str = "mezo-sgd", momentum: float = 0.9,
               window: int = 16, exponents: Sequence[tuple[int, int]] = ()) -> MezoSGD:
        """Quantises user values as the spec requires writers to: eps to 16 bits, lr and wd to 24, momentum to
        16. fp8 and sign take grad_scale 1 unless given one (it must be a power of two). momentum and window
        apply to rule "mezo-momentum" only."""
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; known: {', '.join(RULES)}")
        momentum_on = rule in ("mezo-momentum", "mezo-momentum-buffer")
        buffered = rule == "mezo-momentum-buffer"
        if grad_encoding != "bf16" and grad_scale is None:
            grad_scale = 1.0
        return cls(lr=round_significant(float(lr), 24), eps=round_significant(float(eps), 16), seed=int(seed),
                   noise=noise, schedule=schedule or Schedule(),
                   weight_decay=round_significant(float(weight_decay), 24), grad_encoding=grad_encoding,
                   grad_scale=None if grad_scale is None else float(grad_scale),
                   momentum=round_significant(float(momentum), 16) if momentum_on else 0.0,
                   window=window if momentum_on and not buffered else 0, buffered=buffered,
                   exponents=_normal_exponents(exponents)).validated()

    @property
    def name(self) -> str:
        return "mezo-momentum-buffer" if self.buffered else "mezo-momentum" if self.window else "mezo-sgd"

    def validated(self) -> MezoSGD:
        if self.noise not in NOISES:
            raise ValueError(f"unknown noise {self.noise!r}; known: {', '.join(NOISES)}")
        _int(self.seed, "seed", 0, MAX_SEED)
        if not (isinstance(self.eps, float) and math.isfinite(self.eps) and 2.0**-60 <= self.eps <= 2.0**60
                and round_significant(self.eps, 16) == self.eps):
            raise ValueError(f"eps must be in [2^-60, 2^60] with at most 16 significant bits, got {self.eps!r}")
        if not (isinstance(self.lr, float) and math.isfinite(self.lr) and _TINY <= self.lr <= _HUGE
                and round_significant(self.lr, 24) == self.lr):
            raise ValueError(f"lr must be in [2^-100, 2^100] with at most 24 significant bits, got {self.lr!r}")
        wd = self.weight_decay
        if not (isinstance(wd, float) and math.isfinite(wd) and 0.0 <= wd <= _HUGE
                and round_significant(wd, 24) == wd):
            raise ValueError(f"weight_decay must be in [0, 2^100] with at most 24 significant bits, got {wd!r}")
        self.schedule.validated()
        grad_codec.check_scale(self.grad_encoding, self.grad_scale)
        if self.buffered and self.window:
            raise ValueError("mezo-momentum-buffer has no window")
        if self.window or self.momentum or self.buffered:
            if not self.buffered:
                _int(self.window, "momentum window", 1, MAX_WINDOW)
            b = self.momentum
            if not (isinstance(b, float) and 2.0**-16 <= b <= 1.0 - 2.0**-16 and round_significant(b, 16) == b):
                raise ValueError(f"momentum must be in [2^-16, 1 - 2^-16] with at most 16 significant bits, got {b!r}")
        for k, pair in enumerate(self.exponents):
            for key, x in zip(LAYERWISE_KEYS, pair):
                _int(x, f"tensors[{k}] {key}", -MAX_EXP, MAX_EXP)
            if not 2.0**-60 <= math.ldexp(self.eps, pair[0]) <= 2.0**60:
                raise ValueError(f"tensors[{k}] perturb_exp {pair[0]} puts eps * 2^{pair[0]} outside [2^-60, 2^60]")
        return self

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> MezoSGD:
        """Raises ValueError for anything rule.md does not allow (mzt turns it into a file error)."""
        rule, gen, noise = header["rule"], header["generator"], header["noise"]
        numbers = {k: rule.get(k, 0.0) for k in ("lr", "eps", "weight_decay")}
        for k, v in numbers.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"rule {k} must be a number, got {v!r}")
        schedule = rule["schedule"]
        if not isinstance(schedule, dict):
            raise ValueError("rule schedule must be an object")
        seed = gen["seed"]
        if not (isinstance(seed, str) and seed.isdigit() and seed.isascii() and (seed == "0" or seed[0] != "0")):
            raise ValueError(f"generator seed must be a decimal string, got {seed!r}")
        scale = rule.get("grad_scale")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
            raise ValueError(f"rule grad_scale must be a number, got {scale!r}")
        momentum, window, buffered = 0.0, 0, rule.get("name") == "mezo-momentum-buffer"
        if rule.get("name") in ("mezo-momentum", "mezo-momentum-buffer"):
            momentum, window = rule.get("momentum"), rule.get("window", 0 if buffered else None)
            if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
                raise ValueError(f"rule momentum must be a number, got {momentum!r}")
            if buffered and window != 0:
                raise ValueError(f"rule {rule['name']} has no window, got {window!r}")
            if not buffered and (isinstance(window, bool) or not isinstance(window, int)
                                 or not 1 <= window <= MAX_WINDOW):
                raise ValueError(f"rule window must be an integer in [1, {MAX_WINDOW}], got {window!r}")
            momentum = float(momentum)
            if not 0.0 < momentum < 1.0:
                raise ValueError(f"rule momentum must be in [2^-16, 1 - 2^-16], got {momentum!r}")
        return cls(lr=float(numbers["lr"]), eps=float(numbers["eps"]), seed=int(seed), noise=noise["name"],
                   schedule=Schedule.from_header(schedule), weight_decay=float(numbers["weight_decay"]),
                   grad_encoding=rule["grad_encoding"],
                   grad_scale=None if scale is None else float(scale), momentum=momentum,
                   window=window, buffered=buffered, exponents=_header_exponents(header.get("tensors"))).validated()

    def header_fields(self) -> dict[str, Any]:
        noise: dict[str, Any] = {"name": self.noise}
        if self.noise == "gaussian16":
            noise["table_sha256"] = GAUSS16_SHA256
        rule: dict[str, Any] = {"name": self.name, "eps": self.eps, "lr": self.lr,
                                "schedule": self.schedule.header(), "grad_encoding": self.grad_encoding}
        if self.grad_scale is not None:
            rule["grad_scale"] = self.grad_scale
        if self.weight_decay:
            rule["weight_decay"] = self.weight_decay
        if self.window:
            rule["momentum"], rule["window"] = self.momentum, self.window
        elif self.buffered:
            rule["momentum"] = self.momentum
        return {"generator": {"name": "philox4x32-10", "seed": str(self.seed)}, "noise": noise, "rule": rule}

    def tensor_fields(self, k: int) -> dict[str, int]:
        """The layer-wise keys of tensor k's header entry: its non-zero exponents (writers omit zeros)."""
        if not self.exponents:
            return {}
        return {key: x for key, x in zip(LAYERWISE_KEYS, self.exponents[k]) if x}

    def tensor_scaling(self, k: int) -> tuple[float, float]:
        """(eps_k, scale_k) of tuned tensor k (spec/layerwise.md): eps_k = eps * 2^e_k is what its P1, P2 and
        P3 use, and its coefficients are c * scale_k with scale_k = 2^(e_k + f_k); both exact (powers of two),
        so every product of rule.md keeps its bits and stays FMA-immune. (eps, 1.0) without exponents."""
        if not self.exponents:
            return self.eps, 1.0
        e, f = self.exponents[k]
        return math.ldexp(self.eps, e), math.ldexp(1.0, e + f)

    def tensor_coefficient(self, c: float, k: int) -> float:
        """c_k = c * 2^(e_k + f_k) for tensor k: +0 below 2^-100 like c, and beyond 2^100 the step is invalid
        (coefficient refuses such steps through coefficient_limit, so this only guards)."""
        if not self.exponents or c == 0.0:
            return c
        ck = c * self.tensor_scaling(k)[1]  # a power of two: exact in binary64
        if abs(ck) < _TINY:
            return 0.0
        if abs(ck) > _HUGE:
            raise ValueError(f"tensor {k}: update coefficient {ck:g} is beyond 2^100: the step diverged")
        return ck

    @property
    def coefficient_limit(self) -> float:
        """The largest valid |c|: 2^100, lowered by the largest e_k + f_k so that every c_k stays within 2^100."""
        shift = max([0, *(e + f for e, f in self.exponents)])
        return math.ldexp(_HUGE, -shift)

    def lr_at(self, t: int) -> float:
        lr = round_significant(self.lr * self.schedule.multiplier(t), 24)
        return 0.0 if lr < _TINY else lr

    def encode_grad(self, g: float) -> int:
        """The bfloat16 pattern of gq, the value this rule's encoding records for g and training applies;
        ValueError where a writer refuses the step (rule.md)."""
        return grad_codec.encode(g, self.grad_encoding, self.grad_scale)

    def coefficient(self, t: int, grad_bits: int) -> float:
        """c = RS(lr_t * gq, 16); lr_t * gq is exact in binary64 (24 + 8 significant bits)."""
        c = round_significant(self.lr_at(t) * decode_grad(grad_bits), 16)
        if abs(c) < _TINY:
            return 0.0
        if abs(c) > _HUGE:
            raise ValueError(f"step {t}: update coefficient {c:g} is beyond 2^100: the step diverged")
        if self.exponents and abs(c) > self.coefficient_limit:  # some tensor's c_k (spec/layerwise.md)
            raise ValueError(f"step {t}: update coefficient {c:g} scaled layer-wise is beyond 2^100: "
                             f"the step diverged")
        return c

    def decay(self, t: int) -> float:
        """d = RS(lr_t * wd, 12): the decoupled weight-decay factor of step t (0 when negligible)."""
        d = round_significant(self.lr_at(t) * self.weight_decay, 12)
        if d < 2.0**-40:
            return 0.0
        if d >= 1.0:
            raise ValueError(f"step {t}: lr * weight_decay = {d:g} >= 1 would flip the weights' sign")
        return d

    def powers(self) -> tuple[float, ...]:
        """p_0 .. p_(K-1) of spec/momentum.md: beta^k rounded to 24 bits step by step, +0 below 2^-100."""
        return _powers(self.momentum, self.window)

    def terms(self, t: int, grad_bits: Sequence[int]) -> tuple[tuple[int, float], ...]:
        """Step t's multi-term update (spec/momentum.md): ((t - k, c_(t,k)) for k = 0 .. K'-1), where
        grad_bits[-1] is step t's record and grad_bits[-1 - k] step t-k's. mezo-sgd: ((t, c),)."""
        if not self.window:
            return ((t, self.coefficient(t, grad_bits[-1])),)
        lr = self.lr_at(t)
        count = min(self.window, t + 1)
        if len(grad_bits) < count:
            raise ValueError(f"step {t} needs the records of its last {count} steps, got {len(grad_bits)}")
        self.coefficient(t, grad_bits[-1])  # the one validity check (|c_(t,0)| bounds every term)
        out = []
        for k, p in enumerate(self.powers()[:count]):
            c = round_significant(round_significant(lr * p, 24) * decode_grad(grad_bits[-1 - k]), 16)
            out.append((t - k, 0.0 if abs(c) < _TINY else c))
        return tuple(out)


def _normal_exponents(pairs: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """() when every exponent is 0, so that such a rule equals (and replays as) the plain one."""
    out = tuple((e, f) for e, f in pairs)
    return out if any(e or f for e, f in out) else ()


def _header_exponents(tensors: object) -> tuple[tuple[int, int], ...]:
    """(perturb_exp, step_exp) of every header tensor entry; absent means 0. A value that is not a JSON integer
    (a boolean, 1.5, "2") is refused here, the range by validated()."""
    if not isinstance(tensors, list):
        return ()
    out = []
    for k, entry in enumerate(tensors):
        pair = []
        for key in LAYERWISE_KEYS:
            x = entry.get(key, 0) if isinstance(entry, dict) else 0
            if isinstance(x, bool) or not isinstance(x, int):
                raise ValueError(f"tensors[{k}] {key} must be an integer in [-{MAX_EXP}, {MAX_EXP}], got {x!r}")
            pair.append(x)
        out.append((pair[0], pair[1]))
    return _normal_exponents(out)


@lru_cache(maxsize=64)
def _powers(beta: float, window: int) -> tuple[float, ...]:
    p = [1.0]
    for _ in range(1, window):
        nxt = round_significant(p[-1] * beta, 24)
        p.append(0.0 if nxt < _TINY else nxt)
    return tuple(p)
