"""The projected gradient's encodings (spec/rule.md, `grad_encoding`): bf16, fp8 and sign.

Training records `gq`, the gradient as the encoding can hold it, and applies that decoded value, so a
replay is exact whatever the encoding. Every encoding's decoded values are bfloat16 values (fp8 has 4
significant bits, sign 1, both times a power of two within 2^+-69), so everything after the record (the
coefficient, the kernels, the device path, the `Trajectory.grad_bits` array) sees one representation: the
bfloat16 bit pattern of gq. Only the step records in the file differ (format.md `STEP`).

Host arithmetic: binary64 on Python floats, each operation exact or correctly rounded as stated.
"""
from __future__ import annotations

import math
import struct

ENCODINGS = ("bf16", "fp8", "sign")
SCALE_LOG2_RANGE = (-60, 60)  # grad_scale = 2^k, k in this range (fp8 and sign only)
FP8_MAX = 448.0               # the largest finite E4M3 magnitude: (1 + 6/8) 2^8
_TINY = 2.0**-100


def check_scale(encoding: str, scale: float | None) -> None:
    """Raises ValueError unless `scale` fits `encoding`: None for bf16, 2^k (k in [-60, 60]) otherwise."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown grad_encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
    if encoding == "bf16":
        if scale is not None:
            raise ValueError("grad_scale is only for the fp8 and sign encodings")
        return
    lo, hi = SCALE_LOG2_RANGE
    if not (isinstance(scale, float) and math.isfinite(scale) and scale > 0 and math.frexp(scale)[0] == 0.5
            and lo <= math.frexp(scale)[1] - 1 <= hi):
        raise ValueError(f"grad_scale must be a power of two in [2^{lo}, 2^{hi}], got {scale!r}")


def bf16_bits(q: float) -> int:
    """The bfloat16 pattern of q, which must be a bfloat16 value (packing is then exact)."""
    return struct.unpack("<I", struct.pack("<f", q))[0] >> 16


def bf16_value(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", (bits & 0xFFFF) << 16))[0]


def _round_to_quantum(x: float, quantum: float) -> float:
    """x rounded to a multiple of quantum (a power of two), ties to even: exact in binary64 while
    x / quantum < 2^53 (round() of a float rounds half to even)."""
    return round(x / quantum) * quantum


def quantize(g: float, encoding: str, scale: float | None = None) -> float:
    """gq, the value a writer records for projected gradient g (rule.md); ValueError where it refuses."""
    if not math.isfinite(g):
        raise ValueError(f"projected gradient is {g}: a loss was not finite")
    if encoding == "bf16":
        from .rule import round_significant
        q = 0.0 if abs(g) < _TINY else round_significant(g, 8)
        if abs(q) >= 2.0**127:
            raise ValueError(f"projected gradient {g:g} is beyond bfloat16's range")
        return q
    assert scale is not None
    if abs(g) < _TINY:
        return 0.0
    if encoding == "sign":
        return math.copysign(scale, g)
    # fp8: E4M3 times scale. Quantum 2^(e - 3) for |g| in [2^e, 2^(e+1)) with e >= log2(scale) - 6 (4
    # significant bits), else the subnormal quantum 2^-9 * scale; then saturate at 448 * scale.
    x = min(abs(g), 1024.0 * scale)  # anything above 448 * scale saturates; this keeps x / quantum small
    e = math.frexp(x)[1] - 1
    k = math.frexp(scale)[1] - 1
    q = _round_to_quantum(x, 2.0 ** (max(e, k - 6) - 3))
    q = min(q, FP8_MAX * scale)
    return math.copysign(q, g) if q else 0.0


def encode(g: float, encoding: str, scale: float | None = None) -> int:
    """The bfloat16 pattern of gq (the internal form of every encoding's record)."""
    return bf16_bits(quantize(g, encoding, scale))


def fp8_value(code: int) -> float:
    """The E4M3 value of an 8-bit code (rule.md); NaN for 0x7F and 0xFF, which readers refuse."""
    e, m = (code >> 3) & 15, code & 7
    if e == 15 and m == 7:
        return math.nan
    v = math.ldexp(m, -9) if e == 0 else math.ldexp(8 + m, e - 10)
    return -v if code & 0x80 else v
