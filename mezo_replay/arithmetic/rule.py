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
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, NamedTuple

from . import grad_codec
from .noise import GAUSS16_SHA256, NOISES

MAX_SEED = 2**64 - 1
SCHEDULES = ("constant", "linear", "cosine")
RULES = ("mezo-sgd", "mezo-momentum", "mezo-momentum-buffer", "mezo-adam", "mezo-adam-buffer")
ADAM_RULES = ("mezo-adam", "mezo-adam-buffer")  # spec/adam.md
ADAM_GRAD_LIMIT = 2.0**40  # |gq| at or beyond it is an invalid Adam step (spec/adam.md)
MAX_WINDOW = 64
MAX_PERTURBATIONS = 64  # n-SPSA (spec/nspsa.md): perturbations per step, 1 .. 64
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
    perturbations: int = 1            # n-SPSA (spec/nspsa.md): N perturbations a step, mezo-sgd only
    beta2: float = 0.0                # Adam (spec/adam.md): beta2, nonzero for mezo-adam(-buffer); momentum is beta1
    adam_eps: float = 0.0             # Adam's delta
    adam_window: int = 0              # mezo-adam's K; 0 with beta2 set: mezo-adam-buffer (m, v per element)
    # layer-wise scaling (spec/layerwise.md): (perturb_exp e_k, step_exp f_k) of each tuned tensor, from the
    # header's tensor entries; () when every exponent is 0 (the rule then is exactly rule.md's)
    exponents: tuple[tuple[int, int], ...] = ()

    @classmethod
    def create(cls, *, lr: float, eps: float, seed: int, noise: str = "gaussian16",
               schedule: Schedule | None = None, weight_decay: float = 0.0, grad_encoding: str = "bf16",
               grad_scale: float | None = None, rule: str = "mezo-sgd", momentum: float = 0.9,
               window: int = 16, perturbations: int = 1, beta2: float = 0.999,
               adam_eps: float = 1e-8, exponents: Sequence[tuple[int, int]] = ()) -> MezoSGD:
        """Quantises user values as the spec requires writers to: eps to 16 bits, lr and wd to 24, momentum to
        16. fp8 and sign take grad_scale 1 unless given one (it must be a power of two). momentum and window
        apply to rule "mezo-momentum" only; perturbations (n-SPSA, spec/nspsa.md) to "mezo-sgd" only. Adam
        rules (spec/adam.md): momentum is beta1, and beta1 and beta2 are stored as multiples of 2^-24,
        adam_eps to 24 bits; window is mezo-adam's K."""
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; known: {', '.join(RULES)}")
        if grad_encoding != "bf16" and grad_scale is None:
            grad_scale = 1.0
        common = dict(lr=round_significant(float(lr), 24), eps=round_significant(float(eps), 16), seed=int(seed),
                      noise=noise, schedule=schedule or Schedule(),
                      weight_decay=round_significant(float(weight_decay), 24), grad_encoding=grad_encoding,
                      grad_scale=None if grad_scale is None else float(grad_scale), perturbations=perturbations,
                      exponents=_normal_exponents(exponents))
        if rule in ADAM_RULES:
            return cls(**common, momentum=adam_beta(momentum, "beta1 (momentum)"), beta2=adam_beta(beta2, "beta2"),
                       adam_eps=round_significant(float(adam_eps), 24),
                       adam_window=window if rule == "mezo-adam" else 0).validated()
        momentum_on = rule in ("mezo-momentum", "mezo-momentum-buffer")
        buffered = rule == "mezo-momentum-buffer"
        return cls(**common, momentum=round_significant(float(momentum), 16) if momentum_on else 0.0,
                   window=window if momentum_on and not buffered else 0, buffered=buffered).validated()

    @property
    def name(self) -> str:
        if self.adam:
            return "mezo-adam" if self.adam_window else "mezo-adam-buffer"
        return "mezo-momentum-buffer" if self.buffered else "mezo-momentum" if self.window else "mezo-sgd"

    @property
    def adam(self) -> bool:
        """mezo-adam or mezo-adam-buffer (spec/adam.md)."""
        return bool(self.beta2)

    @property
    def stateful(self) -> bool:
        """Whether a step's update reaches beyond its own record (momentum and Adam rules): such steps are
        never queued on the device, and a resume rebuilds their history or state from the records."""
        return bool(self.window or self.buffered or self.adam)

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
        _int(self.perturbations, "perturbations", 1, MAX_PERTURBATIONS)
        if self.perturbations > 1 and (self.window or self.buffered or self.adam):
            raise ValueError(f"{self.name} takes one perturbation a step: perturbations (n-SPSA) apply to "
                             f"mezo-sgd only")
        if self.exponents and (self.adam or self.perturbations > 1):  # spec/layerwise.md: not defined (yet)
            raise ValueError(f"layer-wise exponents (perturb_exp, step_exp) apply to mezo-sgd with one perturbation "
                             f"a step and the momentum rules, not to {self.name}"
                             + (f" with {self.perturbations} perturbations" if self.perturbations > 1 else ""))
        if self.adam:
            return self._adam_validated()
        if self.adam_window or self.adam_eps:
            raise ValueError("adam_eps and the Adam window belong to mezo-adam(-buffer) only")
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

    def _adam_validated(self) -> MezoSGD:
        """spec/adam.md's header checks (the mezo-sgd ones have passed)."""
        if self.window or self.buffered:
            raise ValueError(f"{self.name} has no momentum window or momentum buffer")
        for what, b in (("beta1", self.momentum), ("beta2", self.beta2)):
            if not (isinstance(b, float) and 2.0**-24 <= b <= 1.0 - 2.0**-24 and (b * 2.0**24).is_integer()):
                raise ValueError(f"{what} must be a multiple of 2^-24 in [2^-24, 1 - 2^-24], got {b!r}")
        e = self.adam_eps
        if not (isinstance(e, float) and _TINY <= e <= 1.0 and round_significant(e, 24) == e):
            raise ValueError(f"adam_eps must be in [2^-100, 1] with at most 24 significant bits, got {e!r}")
        if self.adam_window:
            _int(self.adam_window, "Adam window", 1, MAX_WINDOW)
        bound = round_significant(self.lr / (1.0 - self.momentum), 24)
        if bound > 2.0**80 * e:
            raise ValueError(f"lr / (1 - beta1) = {bound:g} is beyond 2^80 * adam_eps: Adam's update could overflow")
        return self

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> MezoSGD:
        """Raises ValueError for anything rule.md does not allow (mzt turns it into a file error)."""
        if header["rule"].get("name") in ADAM_RULES:
            return cls._adam_from_header(header)
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
        perturbations = rule.get("perturbations", 1)
        if "perturbations" in rule:  # spec/nspsa.md: an integer in [2, 64], on mezo-sgd only; absent means 1
            if rule.get("name") != "mezo-sgd":
                raise ValueError(f"rule {rule.get('name')} takes no perturbations (n-SPSA is defined for "
                                 f"mezo-sgd only)")
            if isinstance(perturbations, bool) or not isinstance(perturbations, int) or \
                    not 2 <= perturbations <= MAX_PERTURBATIONS:
                raise ValueError(f"rule perturbations must be an integer in [2, {MAX_PERTURBATIONS}] (a writer "
                                 f"omits it for 1), got {perturbations!r}")
        return cls(lr=float(numbers["lr"]), eps=float(numbers["eps"]), seed=int(seed), noise=noise["name"],
                   schedule=Schedule.from_header(schedule), weight_decay=float(numbers["weight_decay"]),
                   grad_encoding=rule["grad_encoding"],
                   grad_scale=None if scale is None else float(scale), momentum=momentum,
                   window=window, buffered=buffered, perturbations=perturbations,
                   exponents=_header_exponents(header.get("tensors"), rule.get("layerwise"))).validated()

    @classmethod
    def _adam_from_header(cls, header: dict[str, Any]) -> MezoSGD:
        rule = header["rule"]
        if "perturbations" in rule:
            raise ValueError(f"rule {rule['name']} takes no perturbations (n-SPSA is defined for mezo-sgd only)")
        base = cls.from_header({**header, "rule": {k: v for k, v in rule.items()
                                                    if k not in ("name", "beta1", "beta2", "adam_eps", "window")}
                                           | {"name": "mezo-sgd"}})
        values = {}
        for key in ("beta1", "beta2", "adam_eps"):
            v = rule.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"rule {key} must be a number, got {v!r}")
            values[key] = float(v)
        window = rule.get("window", 0 if rule["name"] == "mezo-adam-buffer" else None)
        if rule["name"] == "mezo-adam-buffer" and "window" in rule:
            raise ValueError(f"rule mezo-adam-buffer has no window, got {window!r}")
        if rule["name"] == "mezo-adam" and (isinstance(window, bool) or not isinstance(window, int)
                                            or not 1 <= window <= MAX_WINDOW):
            raise ValueError(f"rule window must be an integer in [1, {MAX_WINDOW}], got {window!r}")
        return replace(base, momentum=values["beta1"], beta2=values["beta2"], adam_eps=values["adam_eps"],
                       adam_window=window).validated()

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
        if self.adam:
            rule["beta1"], rule["beta2"], rule["adam_eps"] = self.momentum, self.beta2, self.adam_eps
            if self.adam_window:
                rule["window"] = self.adam_window
        elif self.window:
            rule["momentum"], rule["window"] = self.momentum, self.window
        elif self.buffered:
            rule["momentum"] = self.momentum
        if self.perturbations > 1:
            rule["perturbations"] = self.perturbations
        if self.exponents:  # spec/layerwise.md: readers that predate the tensor keys refuse the file by this one
            rule["layerwise"] = True
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
        """c = RS(lr_t * gq, 16); lr_t * gq is exact in binary64 (24 + 8 significant bits). Adam rules:
        the gradient bound of spec/adam.md instead (c is then unused but returned, unchecked)."""
        c = round_significant(self.lr_at(t) * decode_grad(grad_bits), 16)
        if self.adam:
            if abs(decode_grad(grad_bits)) >= ADAM_GRAD_LIMIT:
                raise ValueError(f"step {t}: projected gradient {decode_grad(grad_bits):g} is beyond 2^40, "
                                 "the limit of an Adam step: the step diverged")
            return 0.0 if abs(c) < _TINY else c
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


    @property
    def max_steps(self) -> int:
        """The most steps a file of this rule holds: its noise steps N t + j end at 2^32 - 2 (spec/nspsa.md)."""
        return (2**32 - 1) // self.perturbations

    def perturbation_rate(self, t: int) -> float:
        """q = RS(lr_t / N, 24) of spec/nspsa.md: the learning rate each of step t's N records gets."""
        return round_significant(self.lr_at(t) / self.perturbations, 24)

    def perturbation_coefficient(self, t: int, grad_bits: int) -> float:
        """c_j = RS(q * gq_j, 16), +0 below 2^-100; ValueError beyond 2^100 (the step is invalid)."""
        c = round_significant(self.perturbation_rate(t) * decode_grad(grad_bits), 16)
        if abs(c) < _TINY:
            return 0.0
        if abs(c) > _HUGE:
            raise ValueError(f"step {t}: update coefficient {c:g} is beyond 2^100: the step diverged")
        return c

    def substeps(self, t: int, grad_bits: Sequence[int]) -> list[tuple[tuple[tuple[int, float], ...], float]]:
        """Optimizer step t of an n-SPSA rule as its N sub-steps (terms, d) (spec/nspsa.md): sub-step N t + j
        has no terms and d 0 for j < N - 1; the last has the N terms (N t + j, c_j) and step t's d."""
        n = self.perturbations
        if len(grad_bits) != n:
            raise ValueError(f"step {t} needs {n} records (one a perturbation), got {len(grad_bits)}")
        terms = tuple((n * t + j, self.perturbation_coefficient(t, int(b))) for j, b in enumerate(grad_bits))
        return [((), 0.0)] * (n - 1) + [(terms, self.decay(t))]


def _normal_exponents(pairs: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """() when every exponent is 0, so that such a rule equals (and replays as) the plain one."""
    out = tuple((e, f) for e, f in pairs)
    return out if any(e or f for e, f in out) else ()


def _header_exponents(tensors: object, flag: object = None) -> tuple[tuple[int, int], ...]:
    """(perturb_exp, step_exp) of every header tensor entry; absent means 0. A value that is not a JSON integer
    (a boolean, 1.5, "2") is refused here, the range by validated(). `flag` is the rule's `layerwise` key: true
    exactly when some exponent is non-zero (so readers that predate layer-wise refuse such files by their rule)."""
    if flag is not None and flag is not True:
        raise ValueError(f"rule layerwise must be true when present, got {flag!r}")
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
    out = _normal_exponents(out)
    if bool(out) != (flag is True):
        raise ValueError('a tensor entry has a non-zero perturb_exp or step_exp: the rule needs "layerwise": true'
                         if out else 'rule "layerwise": true, but no tensor entry has a non-zero perturb_exp or '
                         'step_exp')
    return out


@lru_cache(maxsize=64)
def _powers(beta: float, window: int) -> tuple[float, ...]:
    """momentum.md's p_k: each product p * beta is exact in binary64 for betas of up to 24 significant bits
    (momentum's 16, Adam's multiples of 2^-24), then rounded to 24 bits."""
    p = [1.0]
    for _ in range(1, window):
        nxt = round_significant(p[-1] * beta, 24)
        p.append(0.0 if nxt < _TINY else nxt)
    return tuple(p)


# --- Adam (spec/adam.md) -------------------------------------------------------------------------------

class AdamStep(NamedTuple):
    """The host constants of one Adam step: terms ((noise step, cm, cv), ...) in order (the buffer form:
    ((t, gq, 0.0),), gq flushed), alpha_t, h_t and the decay factor d."""

    terms: tuple[tuple[int, float, float], ...]
    alpha: float
    h: float
    d: float


def adam_beta(beta: float, what: str = "beta") -> float:
    """A writer's beta: round_half_even(beta * 2^24) / 2^24, refused if that is 0 or 1 (spec/adam.md)."""
    q = round(float(beta) * 2.0**24) / 2.0**24
    if not 2.0**-24 <= q <= 1.0 - 2.0**-24:
        raise ValueError(f"{what} {beta!r} rounds to {q!r} at 24 bits; it must lie in (0, 1)")
    return q


def adam_gq(bits: int) -> float:
    """gq of a record as the Adam rules apply it: +0 below 2^-100 (spec/adam.md)."""
    g = decode_grad(bits)
    return 0.0 if abs(g) < _TINY else g


def binary64_power(beta: float, n: int) -> float:
    """beta^n by n binary64 products, rounded each time (spec/adam.md's power(); never pow())."""
    p = 1.0
    for _ in range(n):
        p = p * beta
    return p


def adam_bias(lr_t: float, b1: float, b2: float) -> tuple[float, float]:
    """(alpha_t, h_t) = (RS(lr_t / (1 - B1), 24), RS(1 / sqrt(1 - B2), 24)), binary64."""
    return round_significant(lr_t / (1.0 - b1), 24), round_significant(1.0 / math.sqrt(1.0 - b2), 24)


def adam_window_terms(rule: MezoSGD, t: int, grad_bits: Sequence[int]) -> tuple[tuple[int, float, float], ...]:
    """mezo-adam's terms (t - k, cm_k, cv_k), k = 0 .. K'-1; grad_bits[-1] is step t's record."""
    count = min(rule.adam_window, t + 1)
    if len(grad_bits) < count:
        raise ValueError(f"step {t} needs the records of its last {count} steps, got {len(grad_bits)}")
    u1, u2 = 1.0 - rule.momentum, 1.0 - rule.beta2
    p1, p2 = _powers(rule.momentum, rule.adam_window), _powers(rule.beta2, rule.adam_window)  # 24-bit betas: exact too
    out = []
    for k in range(count):
        gq = adam_gq(grad_bits[-1 - k])
        cm = round_significant(round_significant(u1 * p1[k], 24) * gq, 16)
        cv = round_significant(round_significant(u2 * p2[k], 24) * (gq * gq), 16)
        out.append((t - k, 0.0 if abs(cm) < _TINY else cm, 0.0 if cv < _TINY else cv))
    return tuple(out)


class AdamHost:
    """Adam's host arithmetic for steps taken in order (training): B1_t, B2_t advance by one product a step,
    so step t costs O(1) instead of t products; a step out of order recomputes them from step 0."""

    def __init__(self, rule: MezoSGD) -> None:
        self.rule = rule
        self._t, self._b1, self._b2 = -1, 1.0, 1.0  # B_-1 = 1

    def step(self, t: int, grad_bits: Sequence[int]) -> AdamStep:
        """Step t's constants; grad_bits ends with step t's record (and holds the window before it)."""
        r = self.rule
        r.coefficient(t, grad_bits[-1])  # the gradient bound
        lr = r.lr_at(t)
        if r.adam_window:
            count = min(r.adam_window, t + 1)
            alpha, h = adam_bias(lr, binary64_power(r.momentum, count), binary64_power(r.beta2, count))
            return AdamStep(adam_window_terms(r, t, grad_bits), alpha, h, r.decay(t))
        if t < self._t:
            self._t, self._b1, self._b2 = -1, 1.0, 1.0
        while self._t < t:
            self._t, self._b1, self._b2 = self._t + 1, self._b1 * r.momentum, self._b2 * r.beta2
        alpha, h = adam_bias(lr, self._b1, self._b2)
        return AdamStep(((t, adam_gq(grad_bits[-1]), 0.0),), alpha, h, r.decay(t))
