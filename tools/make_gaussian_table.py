"""Builds spec/gaussian16.bin: the 65,536 bfloat16 quantiles of N(0,1) that the gaussian16 sampler uses.

Entry u is the standard normal quantile at the bin midpoint (u + 1/2) / 65536, computed with mpmath at
80 significant digits and rounded once, to nearest with ties to even, to 8 significant bits (bfloat16).
The file is the entries' bit patterns as little-endian u16. Run: python tools/make_gaussian_table.py
(needs mpmath, which is not a runtime dependency: the table ships as data so no device ever evaluates a
transcendental function).
"""
from __future__ import annotations

import hashlib
import struct
import sys
from fractions import Fraction
from pathlib import Path

import mpmath

ENTRIES = 65536


def bf16_bits(x: mpmath.mpf) -> int:
    """Rounds x to bfloat16 directly from the 80-digit value (no detour through binary64)."""
    sign = 0x8000 if x < 0 else 0
    a = Fraction(mpmath.nstr(abs(x), 70, min_fixed=-100, max_fixed=100, strip_zeros=False))
    e = 0
    while a >= 2:
        a /= 2
        e += 1
    while a < 1:
        a *= 2
        e -= 1
    scaled = a * 128  # in [128, 256): 8 significant bits
    r = int(scaled)
    rest = scaled - r
    if rest == Fraction(1, 2):
        raise AssertionError("exact tie: needs more precision")
    if rest > Fraction(1, 2):
        r += 1
    if r == 256:
        r, e = 128, e + 1
    exponent = e + 127
    assert 1 <= exponent <= 254, "quantiles are normal numbers"
    return sign | (exponent << 7) | (r - 128)


def build() -> bytes:
    mpmath.mp.dps = 80
    out = []
    for u in range(ENTRIES):
        p = (mpmath.mpf(u) + mpmath.mpf(1) / 2) / ENTRIES
        out.append(bf16_bits(mpmath.sqrt(2) * mpmath.erfinv(2 * p - 1)))
    for u in range(ENTRIES):
        assert out[u] ^ 0x8000 == out[ENTRIES - 1 - u], "table must be antisymmetric"
    return struct.pack(f"<{ENTRIES}H", *out)


if __name__ == "__main__":
    data = build()
    root = Path(__file__).resolve().parent.parent
    for path in (root / "spec" / "gaussian16.bin", root / "mezo_replay" / "arithmetic" / "gaussian16.bin"):
        path.write_bytes(data)
    print(hashlib.sha256(data).hexdigest(), file=sys.stdout)
