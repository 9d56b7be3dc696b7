"""The spec, executed: a literal numpy transcription of spec/generator.md, noise.md, init.md and rule.md.

It exists to be obviously right, not fast: tests hold every other implementation (torch on CPU and CUDA,
later kernels) to its bits, and tools/make_vectors.py writes the spec's test vectors with it. It shares
no code with the torch path on purpose, so one mistake cannot hide in both.
"""
from __future__ import annotations

import hashlib
import math
import struct
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np

MASK32 = 0xFFFFFFFF
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
GAUSS16_SHA256 = "33888ab6f4616c9a0d6bba520458612f7f70d5be5df01e655e1fe972d49d478b"
CANONICAL_NAN = {"F32": 0x7FC00000, "BF16": 0x7FC0, "F16": 0x7E00}
BITS_DTYPE = {"F32": np.uint32, "BF16": np.uint16, "F16": np.uint16}


# --- bits: Philox4x32-10 -------------------------------------------------------------------------

def philox4x32_10(ctr: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """One Philox call on Python integers, exactly as Random123 defines it."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0 = PHILOX_M[0] * c0
        p1 = PHILOX_M[1] * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0, p1 & MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & MASK32)
        k0, k1 = (k0 + PHILOX_W[0]) & MASK32, (k1 + PHILOX_W[1]) & MASK32
    return c0, c1, c2, c3


def _mulhilo(m: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.uint64(m) * x  # both factors < 2^32, so the u64 product is exact
    return p >> np.uint64(32), p & np.uint64(MASK32)


def philox_blocks(seed: int, t: int, k: int, blocks: np.ndarray) -> np.ndarray:
    """Philox outputs (n, 4) as uint64 for counters (b mod 2^32, b >> 32, k, t) under key = seed."""
    b = blocks.astype(np.uint64)
    c0, c1 = b & np.uint64(MASK32), b >> np.uint64(32)
    c2 = np.full_like(b, k)
    c3 = np.full_like(b, t)
    k0, k1 = seed & MASK32, seed >> 32
    for _ in range(10):
        hi0, lo0 = _mulhilo(PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo(PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ np.uint64(k0), lo1, hi0 ^ c3 ^ np.uint64(k1), lo0
        k0, k1 = (k0 + PHILOX_W[0]) & MASK32, (k1 + PHILOX_W[1]) & MASK32
    return np.stack([c0, c1, c2, c3], axis=1)


def random_u16(seed: int, t: int, k: int, index: np.ndarray) -> np.ndarray:
    """Element i's 16 bits: half (i & 1) of word ((i & 7) >> 1) of block i >> 3."""
    i = np.asarray(index, dtype=np.uint64)
    words = philox_blocks(seed, t, k, i >> np.uint64(3))
    j = (i & np.uint64(7)).astype(np.int64)
    word = words[np.arange(len(i)), j >> 1]
    return ((word >> (np.uint64(16) * (j & 1).astype(np.uint64))) & np.uint64(0xFFFF)).astype(np.uint16)


# --- noise ---------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def gauss16_table() -> np.ndarray:
    """The spec's table as float32 values, checked against the hash the spec publishes."""
    data = (Path(__file__).parent / "gaussian16.bin").read_bytes()
    if hashlib.sha256(data).hexdigest() != GAUSS16_SHA256:
        raise RuntimeError("gaussian16.bin does not match the spec's SHA-256: the package is damaged")
    bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << np.uint32(16)
    return bits.view(np.float32)


def noise(name: str, seed: int, t: int, k: int, index: np.ndarray) -> np.ndarray:
    u = random_u16(seed, t, k, index)
    if name == "gaussian16":
        return gauss16_table()[u]
    if name == "rademacher16":
        return np.where(u < 32768, np.float32(-1.0), np.float32(1.0))
    raise ValueError(f"unknown noise {name!r}")


# --- generated initial values (init.md) ------------------------------------------------------------

INIT_STREAM = 2**32 - 1  # the step index of the init stream: no step of a file has it
INIT_SCALE_KEY = {"zeros": None, "uniform16": "bound", "gaussian16": "std"}


def initial_elements(spec: dict, seed: int, k: int, index: np.ndarray, dtype: str) -> np.ndarray:
    """Bits (of dtype) of elements `index` of tensor k's initial value named by header object `spec`."""
    name = spec.get("name")
    if name not in INIT_SCALE_KEY or set(spec) != {"name"} | ({INIT_SCALE_KEY[name]} - {None}):
        raise ValueError(f"unknown initial value {spec!r}")
    i = np.asarray(index, dtype=np.uint64)
    if name == "zeros":
        return round_to(np.zeros(i.size, dtype=np.float32), dtype)
    scale = spec[INIT_SCALE_KEY[name]]
    if not (type(scale) in (int, float) and math.isfinite(scale) and scale > 0 and float(np.float32(scale)) == scale):
        raise ValueError(f"{name}: the scale must be a positive finite binary32 number, not {scale!r}")
    u = random_u16(seed, INIT_STREAM, k, i).astype(np.int64)
    if name == "uniform16":
        unit = (2 * u - 65535).astype(np.float32) * np.float32(2.0**-16)  # exact: at most 16 significant bits
        with np.errstate(over="ignore"):
            v = np.float32(scale) * unit  # one binary32 multiply, rounded to nearest even
    else:
        with np.errstate(over="ignore"):
            v = np.float32(scale) * gauss16_table()[u]
    return round_to(v, dtype)  # R_D of rule.md


def initial_value(spec: dict, seed: int, k: int, shape: list[int], dtype: str) -> np.ndarray:
    """The whole initial value of tensor k, row-major, as bits of dtype (a flat array)."""
    return initial_elements(spec, seed, k, np.arange(math.prod(shape), dtype=np.uint64), dtype)


def initial_binary32(spec: dict, seed: int, k: int, index: np.ndarray) -> np.ndarray:
    """The binary32 value before R_D: what the dtype is rounded from (init.md's `v`)."""
    return to_f32(initial_elements(spec, seed, k, index, "F32"), "F32")


def starting_bits(entry: dict, seed: int, k: int, stored: bytes | None = None) -> np.ndarray:
    """Header entry k's value before step 0 (bits): generated when its `init` is an object, else the
    `stored` bytes (from the base, or from INIT chunks when `init` is true)."""
    if isinstance(entry.get("init"), dict):
        return initial_value(entry["init"], seed, k, entry["shape"], entry["dtype"])
    if stored is None:
        raise ValueError(f"{entry['name']} starts from stored bytes (base or INIT), none given")
    return np.frombuffer(stored, dtype="<" + np.dtype(BITS_DTYPE[entry["dtype"]]).str[1:]).copy()


# --- host arithmetic (binary64) ------------------------------------------------------------------

def round_significant(x: float, bits: int) -> float:
    """RS(x, n): x rounded to n significant bits, to nearest, ties to even."""
    if x == 0 or not math.isfinite(x):
        return x
    m, e = math.frexp(x)
    return math.ldexp(round(m * (1 << bits)), e - bits)  # round() on a float is ties-to-even


def grad_bits(g: float) -> int:
    """The bfloat16 bits a writer records for projected gradient g."""
    if not math.isfinite(g):
        raise ValueError("non-finite projected gradient")
    q = 0.0 if abs(g) < 2.0**-100 else round_significant(g, 8)
    if abs(q) >= 2.0**127:
        raise ValueError("projected gradient too large for bfloat16")
    return int(np.array([q], dtype=np.float32).view(np.uint32)[0] >> 16)


def grad_value(bits: int) -> float:
    return float(np.array([bits << 16], dtype=np.uint32).view(np.float32)[0])


def coefficient(lr: float, bits: int) -> float:
    """c for a step whose learning rate is lr (lr_t of the schedule)."""
    c = round_significant(lr * grad_value(bits), 16)
    if abs(c) < 2.0**-100:
        return 0.0
    if abs(c) > 2.0**100:
        raise ValueError("update coefficient beyond 2^100")
    return c


COS_K = [float.fromhex(h) for h in (
    "0x1.0000000000000p+0", "-0x1.3bd3cc9be45dep+2", "0x1.03c1f081b5ac4p+2", "-0x1.55d3c7e3cbffap+0",
    "0x1.e1f506891babbp-3", "-0x1.a6d1f2a204a8cp-6", "0x1.f9d38a3763cc3p-10", "-0x1.b6e24f44b128fp-14",
    "0x1.20c62c2f2d7f5p-18", "-0x1.2a0c591af8314p-23", "0x1.ef6e308d6d1c4p-29", "-0x1.52ae4120fde27p-34",
    "0x1.838d8f4321800p-40")]


def cos_pi(p: float) -> float:
    if p > 0.5:
        return -cos_pi(1.0 - p)
    q = p * p
    r = COS_K[12]
    for k in range(11, -1, -1):
        r = r * q + COS_K[k]
    return r


def lr_at(rule: dict, t: int) -> float:
    """lr_t: the rule's lr times the schedule's multiplier f(t), rounded to 24 bits."""
    sched = rule["schedule"]
    w, total = sched.get("warmup_steps", 0), sched.get("total_steps", 0)
    if t < w:
        f = (t + 1) / (w + 1)
    else:
        p = min(1.0, (t - w) / max(1, total - w))
        f = {"constant": 1.0, "linear": 1.0 - p, "cosine": 0.5 * (1.0 + cos_pi(p))}[sched["name"]]
    lr = round_significant(rule["lr"] * f, 24)
    return 0.0 if lr < 2.0**-100 else lr


def decay_factor(rule: dict, t: int) -> float:
    d = round_significant(lr_at(rule, t) * rule.get("weight_decay", 0.0), 12)
    if d >= 1.0:
        raise ValueError("lr * weight_decay >= 1")
    return 0.0 if d < 2.0**-40 else d


# --- element arithmetic (binary32) ---------------------------------------------------------------

def to_f32(bits: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "F32":
        return bits.astype(np.uint32).view(np.float32)
    if dtype == "BF16":
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    if dtype == "F16":
        return bits.astype(np.uint16).view(np.float16).astype(np.float32)  # widening is exact
    raise ValueError(dtype)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """R_D: binary32 values to dtype D's bits, with rule.md's roundings written out on the bit patterns."""
    with np.errstate(invalid="ignore", over="ignore"):
        return _round_to(np.asarray(x, dtype=np.float32), dtype)


def _round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    u = x.view(np.uint32).astype(np.uint64)
    nan = (u & np.uint64(0x7FFFFFFF)) > np.uint64(0x7F800000)
    if dtype == "F32":
        out = u
    elif dtype == "BF16":
        out = (u + np.uint64(0x7FFF) + ((u >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)
    elif dtype == "F16":
        sign = (u >> np.uint64(16)) & np.uint64(0x8000)
        a = u & np.uint64(0x7FFFFFFF)
        normal = (a + np.uint64(0x0FFF) + ((a >> np.uint64(13)) & np.uint64(1))) >> np.uint64(13)
        normal = normal - np.uint64(112 << 10)  # rebias the exponent: 127 - 15 = 112
        magnitude = np.abs(x.astype(np.float64))
        tiny = np.rint(magnitude * 2.0**24).astype(np.uint64)  # subnormal: units of 2^-24, ties to even
        h = np.where(a < np.uint64(0x38800000), tiny, normal)  # below 2^-14: subnormal range
        h = np.where(a >= np.uint64(0x477FF000), np.uint64(0x7C00), h)  # >= 65520 rounds to infinity
        out = sign | h
    else:
        raise ValueError(dtype)
    out = np.where(nan, np.uint64(CANONICAL_NAN[dtype]), out)
    return out.astype(BITS_DTYPE[dtype])


def decay(s: np.ndarray, d: float) -> np.ndarray:
    """DECAY(s) of rule.md: split s into 12-bit halves so that both products are exact."""
    if d == 0.0:
        return s
    s_hi = (s.view(np.uint32) & np.uint32(0xFFFFF000)).view(np.float32)
    s_lo = s - s_hi
    decayed = (s - np.float32(d) * s_hi) - np.float32(d) * s_lo
    return np.where(np.isfinite(s) & (np.abs(s) >= np.float32(2.0**-60)), decayed, s)


def phases(bits: np.ndarray, dtype: str, z: np.ndarray, eps: float, c: float, d: float = 0.0) -> list[np.ndarray]:
    """One step on elements: the bits after P1, P2 and P3."""
    with np.errstate(invalid="ignore", over="ignore"):  # inf and NaN inputs are cases, not accidents
        a = np.float32(eps) * z  # exact
        b = np.float32(c) * z  # exact
        p1 = round_to(to_f32(bits, dtype) + a, dtype)
        p2 = round_to(to_f32(p1, dtype) - (a + a), dtype)
        p3 = round_to(decay(to_f32(p2, dtype) + a, d) - b, dtype)
    return [p1, p2, p3]


def replay(bits: np.ndarray, dtype: str, *, seed: int, k: int, noise_name: str, rule: dict, grads: list[int],
           decayed: bool = False, start: int = 0, perturb_exp: int = 0, step_exp: int = 0) -> np.ndarray:
    """Elements start.. of tensor k after every step in `grads` (bf16 bits); `rule` is the header's
    (mezo-sgd, mezo-momentum or mezo-momentum-buffer); perturb_exp and step_exp are the tensor entry's
    layer-wise exponents (layerwise.md: eps_k = eps * 2^e, every coefficient times 2^(e + f))."""
    index = np.arange(start, start + bits.size, dtype=np.uint64)
    m = np.zeros(bits.size, dtype=np.float32)  # mezo-momentum-buffer's state
    if (perturb_exp or step_exp) and (rule.get("perturbations", 1) > 1 or rule.get("name", "").startswith("mezo-adam")):
        raise ValueError("layer-wise exponents apply to mezo-sgd with one perturbation and the momentum rules")
    if rule.get("perturbations", 1) > 1:  # n-SPSA (nspsa.md): grads[t] holds step t's N records
        return nspsa_replay(bits, dtype, seed=seed, k=k, noise_name=noise_name, rule=rule, grads=grads,
                            decayed=decayed, index=index)
    v = np.zeros(bits.size, dtype=np.float32)  # mezo-adam-buffer's second one
    eps = layerwise_eps(rule["eps"], perturb_exp)
    for t, gb in enumerate(grads):
        z = noise(noise_name, seed, t, k, index)
        d = decay_factor(rule, t) if decayed else 0.0
        if rule.get("name") in ("mezo-adam", "mezo-adam-buffer"):
            terms, alpha, h = adam_host(rule, t, grads[:t + 1])
            pre = perturbed(bits, dtype, z, rule["eps"])
            if rule["name"] == "mezo-adam-buffer":
                bits, m, v = adam_buffer_p3(pre, m, v, dtype, z, rule, terms[0][1], alpha, h, d)
            else:
                zs = [z if s == t else noise(noise_name, seed, s, k, index) for s, _, _ in terms]
                bits = adam_window_p3(pre, dtype, z, rule, [(cm, cv, zj) for (_, cm, cv), zj in zip(terms, zs)],
                                      alpha, h, d)
        elif rule.get("name") == "mezo-momentum-buffer":
            c = layerwise_coefficient(coefficient(lr_at(rule, t), gb), perturb_exp, step_exp)
            bits, m = buffer_update(perturbed(bits, dtype, z, eps), m, dtype, z, eps, c, rule["momentum"], d)
        elif rule.get("name") == "mezo-momentum":
            terms = [(s, layerwise_coefficient(c, perturb_exp, step_exp), noise(noise_name, seed, s, k, index))
                     for s, c in momentum_terms(rule, t, grads[:t + 1])]
            bits = multi_term_update(perturbed(bits, dtype, z, eps), dtype, z, eps,
                                     [(c, zs) for _, c, zs in terms], d)
        else:
            c = layerwise_coefficient(coefficient(lr_at(rule, t), gb), perturb_exp, step_exp)
            bits = phases(bits, dtype, z, eps, c, d)[2]
    return bits


# --- layer-wise scaling (layerwise.md) ----------------------------------------------------------------

def layerwise_eps(eps: float, e: int) -> float:
    """eps_k = eps * 2^e; a header whose eps_k leaves [2^-60, 2^60] is refused."""
    if isinstance(e, bool) or not isinstance(e, int) or not -40 <= e <= 40:
        raise ValueError("perturb_exp must be an integer in [-40, 40]")
    out = math.ldexp(eps, e)
    if not 2.0**-60 <= out <= 2.0**60:
        raise ValueError("eps * 2^perturb_exp outside [2^-60, 2^60]")
    return out


def layerwise_coefficient(c: float, e: int, f: int) -> float:
    """c_k = c * 2^(e + f): +0 below 2^-100; beyond 2^100 the step is invalid."""
    ck = math.ldexp(c, e + f)
    if abs(ck) < 2.0**-100:
        return 0.0
    if abs(ck) > 2.0**100:
        raise ValueError("layer-wise update coefficient beyond 2^100")
    return ck


# --- mezo-momentum (momentum.md) ----------------------------------------------------------------------

def momentum_powers(beta: float, window: int) -> list[float]:
    """p_0 .. p_(K-1): p_k = RS(p_(k-1) * beta, 24), +0 below 2^-100."""
    p = [1.0]
    for _ in range(1, window):
        q = round_significant(p[-1] * beta, 24)
        p.append(0.0 if q < 2.0**-100 else q)
    return p


def momentum_terms(rule: dict, t: int, grads: list[int]) -> list[tuple[int, float]]:
    """Step t's terms (noise step t-k, c_(t,k)) in order; grads: the records of steps 0..t (bf16 bits)."""
    lr = lr_at(rule, t)
    coefficient(lr, grads[t])  # the validity check on c_(t,0)
    out = []
    for k, p in enumerate(momentum_powers(rule["momentum"], rule["window"])[:min(rule["window"], t + 1)]):
        c = round_significant(round_significant(lr * p, 24) * grad_value(grads[t - k]), 16)
        out.append((t - k, 0.0 if abs(c) < 2.0**-100 else c))
    return out


def perturbed(bits: np.ndarray, dtype: str, z: np.ndarray, eps: float) -> np.ndarray:
    """P1 then P2 of a step: the bits P3 starts from."""
    return phases(bits, dtype, z, eps, 0.0)[1]


def buffer_update(bits: np.ndarray, m: np.ndarray, dtype: str, z: np.ndarray, eps: float, c: float, beta: float,
                  d: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """mezo-momentum-buffer's P3: m = fl32(fl32(beta*m) + c*z); w = R_D(fl32(DECAY(fl32(w + eps*z)) - m)).
    numpy rounds each binary32 operation on its own (it never fuses a multiply-add)."""
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        m = (np.float32(beta) * m) + np.float32(c) * z
        s = decay(to_f32(bits, dtype) + np.float32(eps) * z, d)
        return round_to(s - m, dtype), m.astype(np.float32)


def multi_term_update(bits: np.ndarray, dtype: str, z: np.ndarray, eps: float,
                      terms: list[tuple[float, np.ndarray]], d: float = 0.0) -> np.ndarray:
    """The multi-term P3: s = DECAY(fl32(w + eps*z)); s = fl32(s - c_j*z_j) for each term in order; R_D(s)."""
    with np.errstate(invalid="ignore", over="ignore"):
        s = decay(to_f32(bits, dtype) + np.float32(eps) * z, d)
        for c, zj in terms:
            s = s - np.float32(c) * zj  # the product is exact; one binary32 rounding per term
        return round_to(s, dtype)


# --- n-SPSA (nspsa.md) ------------------------------------------------------------------------------

def nspsa_terms(rule: dict, t: int, records: list[int]) -> list[tuple[int, float]]:
    """Step t's N terms (noise step N t + j, c_j): q = RS(lr_t / N, 24), c_j = RS(q * gq_j, 16)."""
    n = rule["perturbations"]
    q = round_significant(lr_at(rule, t) / n, 24)
    out = []
    for j, gb in enumerate(records):
        c = round_significant(q * grad_value(gb), 16)
        if abs(c) > 2.0**100:
            raise ValueError("update coefficient beyond 2^100")
        out.append((n * t + j, 0.0 if abs(c) < 2.0**-100 else c))
    return out


def nspsa_replay(bits: np.ndarray, dtype: str, *, seed: int, k: int, noise_name: str, rule: dict,
                 grads: list[list[int]], decayed: bool, index: np.ndarray) -> np.ndarray:
    """Perturbation j of step t: P1 and P2 with z of noise step u = N t + j, then a plain restore for
    j < N - 1, and for j = N - 1 the multi-term P3: restore, DECAY with step t's d, the N terms in order."""
    n = rule["perturbations"]
    for t, records in enumerate(grads):
        if len(records) != n:
            raise ValueError(f"step {t} has {len(records)} records, not {n}")
        terms = nspsa_terms(rule, t, records)
        d = decay_factor(rule, t) if decayed else 0.0
        for j in range(n):
            z = noise(noise_name, seed, n * t + j, k, index)
            bits = perturbed(bits, dtype, z, rule["eps"])
            if j < n - 1:
                bits = multi_term_update(bits, dtype, z, rule["eps"], [], 0.0)
            else:
                bits = multi_term_update(bits, dtype, z, rule["eps"],
                                         [(c, noise(noise_name, seed, u, k, index)) for u, c in terms], d)
    return bits


# --- grad_encoding records (rule.md): written from the spec, by exhaustive search over the codes ------

def fp8_decode(code: int, scale: float) -> float | None:
    """gq of an fp8 (E4M3) code, or None for the two NaN codes a reader refuses."""
    sign, exponent, mantissa = code >> 7, (code >> 3) & 0xF, code & 0x7
    if exponent == 15 and mantissa == 7:
        return None
    v = Fraction(mantissa, 8) * Fraction(2) ** -6 if exponent == 0 else \
        (1 + Fraction(mantissa, 8)) * Fraction(2) ** (exponent - 7)
    return -float(v * Fraction(scale)) if sign else float(v * Fraction(scale))  # 0x80 is -0


def fp8_encode(g: float, scale: float) -> int:
    """The code nearest g among all finite E4M3 values times scale (ties: the even code; beyond the
    largest, the largest: saturation); zero is always code 0x00."""
    if not math.isfinite(g):
        raise ValueError("non-finite projected gradient")
    x = Fraction(abs(g)) / Fraction(scale)
    best = min(range(0x7F), key=lambda c: (abs(Fraction(fp8_decode(c, 1.0)) - x), c & 1))
    return best | 0x80 if g < 0 and best else best


def sign_encode(g: float) -> tuple[int, int]:
    """(nonzero, negative) bits of a sign record."""
    if not math.isfinite(g):
        raise ValueError("non-finite projected gradient")
    if abs(g) < 2.0**-100:
        return 0, 0
    return 1, int(g < 0)


def record_bf16_bits(encoding: str, scale: float | None, record) -> int:
    """The bfloat16 pattern of a record's gq (the form `replay` and `coefficient` take)."""
    if encoding == "bf16":
        return int(record)
    if encoding == "fp8":
        gq = fp8_decode(record, scale)
        if gq is None:
            raise ValueError("fp8 NaN code")
    else:
        nonzero, negative = record
        if negative and not nonzero:
            raise ValueError("negative zero sign record")
        gq = (-scale if negative else scale) if nonzero else 0.0
    return int(np.array([gq], dtype=np.float32).view(np.uint32)[0] >> 16)


def decode_step_payload(encoding: str, payload: bytes, perturbations: int = 1) -> tuple[int, list]:
    """(first_step, records) of a decompressed STEP payload (format.md); ValueError if malformed. With
    perturbations N > 1 (nspsa.md) the region holds count * N records, returned as count lists of N."""
    first, steps = struct.unpack_from("<II", payload)
    if not 1 <= steps <= 1 << 20:
        raise ValueError("count out of range")
    count = steps * perturbations
    if count > 1 << 20:
        raise ValueError("count * perturbations out of range")
    if perturbations > 1:
        _, flat = decode_step_payload(encoding, struct.pack("<II", first, count) + payload[8:])
        return first, [flat[v:v + perturbations] for v in range(0, count, perturbations)]
    body = payload[8:]
    if encoding == "bf16":
        if len(body) != 2 * count:
            raise ValueError("length")
        return first, [body[j] << 8 | body[count + j] for j in range(count)]
    if encoding == "fp8":
        if len(body) != count:
            raise ValueError("length")
        return first, list(body)
    n = (count + 7) // 8
    if len(body) != 2 * n:
        raise ValueError("length")
    bit = [[(body[p * n + j // 8] >> (j % 8)) & 1 for j in range(8 * n)] for p in (0, 1)]
    if any(bit[0][count:]) or any(bit[1][count:]):
        raise ValueError("padding bits set")
    return first, [(bit[0][j], bit[1][j]) for j in range(count)]


# --- mezo-adam and mezo-adam-buffer (adam.md) --------------------------------------------------------

def adam_flush(bits: int) -> float:
    """gq as the Adam rules apply it: +0 when |gq| < 2^-100; ValueError at or beyond 2^40."""
    g = grad_value(bits)
    if not abs(g) < 2.0**40:
        raise ValueError("Adam step with |gq| >= 2^40")
    return 0.0 if abs(g) < 2.0**-100 else g


def adam_power(beta: float, n: int) -> float:
    p = 1.0
    for _ in range(n):
        p = p * beta  # binary64, rounded each time
    return p


def adam_host(rule: dict, t: int, grads: list[int]) -> tuple[list[tuple[int, float, float]], float, float]:
    """Step t's (terms, alpha_t, h_t); grads: the records of steps 0..t. Buffer form: terms = [(t, gq, 0)]."""
    lr = lr_at(rule, t)
    b1, b2 = rule["beta1"], rule["beta2"]
    adam_flush(grads[t])
    if rule["name"] == "mezo-adam-buffer":
        n, terms = t + 1, [(t, adam_flush(grads[t]), 0.0)]
    else:
        n = min(rule["window"], t + 1)
        p1, p2 = momentum_powers(b1, rule["window"]), momentum_powers(b2, rule["window"])
        terms = []
        for k in range(n):
            gq = adam_flush(grads[t - k])
            cm = round_significant(round_significant((1.0 - b1) * p1[k], 24) * gq, 16)
            cv = round_significant(round_significant((1.0 - b2) * p2[k], 24) * (gq * gq), 16)
            terms.append((t - k, 0.0 if abs(cm) < 2.0**-100 else cm, 0.0 if cv < 2.0**-100 else cv))
    alpha = round_significant(lr / (1.0 - adam_power(b1, n)), 24)
    h = round_significant(1.0 / math.sqrt(1.0 - adam_power(b2, n)), 24)
    return terms, alpha, h


def adam_finish(bits: np.ndarray, dtype: str, z: np.ndarray, eps: float, m: np.ndarray, v: np.ndarray,
                alpha: float, h: float, delta: float, d: float) -> np.ndarray:
    """r = sqrt32(v); den = fl32(fl32(r*h) + delta); upd = fl32(fl32(alpha*m) / den); then P3's restore,
    DECAY and R_D(fl32(s - upd)). numpy's float32 sqrt and division are IEEE's, correctly rounded."""
    with np.errstate(invalid="ignore", over="ignore", under="ignore", divide="ignore"):
        r = np.sqrt(v)
        den = (r * np.float32(h)) + np.float32(delta)
        upd = (np.float32(alpha) * m) / den
        s = decay(to_f32(bits, dtype) + np.float32(eps) * z, d)
        return round_to(s - upd, dtype)


def adam_buffer_p3(bits: np.ndarray, m: np.ndarray, v: np.ndarray, dtype: str, z: np.ndarray, rule: dict,
                   gq: float, alpha: float, h: float, d: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mezo-adam-buffer's P3: g = gq*z; m = fl32(fl32(b1*m) + fl32(u1*g)); v = fl32(fl32(b2*v) + fl32(u2*fl32(g*g)))."""
    f = np.float32
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        g = f(gq) * z
        m = (f(rule["beta1"]) * m) + (f(1.0 - rule["beta1"]) * g)
        v = (f(rule["beta2"]) * v) + (f(1.0 - rule["beta2"]) * (g * g))
    m, v = m.astype(np.float32), v.astype(np.float32)
    return adam_finish(bits, dtype, z, rule["eps"], m, v, alpha, h, rule["adam_eps"], d), m, v


def adam_window_p3(bits: np.ndarray, dtype: str, z: np.ndarray, rule: dict,
                   terms: list[tuple[float, float, np.ndarray]], alpha: float, h: float, d: float = 0.0) -> np.ndarray:
    """mezo-adam's P3: m, v summed over the terms (cm, cv, z_j) in order, then adam_finish."""
    f = np.float32
    m = np.zeros(z.shape, dtype=np.float32)
    v = np.zeros(z.shape, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        for cm, cv, zj in terms:
            m = m + f(cm) * zj  # exact product
            v = v + f(cv) * (zj * zj)  # zj*zj exact, the product rounded
    return adam_finish(bits, dtype, z, rule["eps"], m, v, alpha, h, rule["adam_eps"], d)
