"""The projected gradient's encoding and the update coefficient, computed where the losses are.

`device_coefficient` gives, as 0-dim tensors on the losses' device, exactly what the host computes with
`rule.encode_grad((lp - lm) / (2 eps))` and `rule.coefficient(t, bits)`. A GPU step that used the host
functions would have to read both losses (a host synchronisation that drains the queue) before it could
launch the update; with this, the update kernel reads c and the failure flag from device memory and the
host never waits. So that trajectories stay byte-identical, every operation is one whose result IEEE 754
binary64 fixes, and nothing depends on how a backend rounds a conversion:

* The losses are widened to binary64. bf16, f16 and f32 values are all binary64 values, so widening is
  exact (as `float(tensor)`, which the host path uses, is).
* `lp - lm` and `/ (2 eps)` are one subtraction and one division, each correctly rounded to nearest even,
  as CPython's are. torch's sub is a + alpha*b with alpha = -1; -b is exact, so fused into an fma or not,
  the result is the one rounding of a - b. On the CPU torch uses the IEEE instructions. On CUDA, binary64 `-` and `/` compile to
  `sub.rn.f64` / `div.rn.f64` (the full-precision division routine): nvcc's fast-math switches
  (-prec-div, -ftz) change only binary32 code, and -fmad cannot fuse a lone subtraction or a division.
  PyTorch is not built with fast math anyway. One trap remains: torch's CUDA `div` by a *CPU scalar*
  multiplies by the reciprocal, which is not the quotient. The divisor is therefore made on the device
  (`torch.full`, a fill kernel with the value as its argument: no copy, no sync), so the tensor-by-tensor
  kernel, a plain `a / b`, runs. Subnormals cannot matter even where a device flushes them: a subnormal
  difference or quotient is far below the 2^-100 under which the gradient is recorded as 0 either way.
* Rounding to n significant bits (rule.round_significant) is done on the binary64 bit pattern with int64
  arithmetic: add half an ulp of the kept part minus one plus the lowest kept bit, then clear the dropped
  bits. That is round-to-nearest, ties-to-even, and a carry out of the fraction correctly bumps the
  exponent. Integer operations are exact everywhere, so no rounding mode or conversion is relied on.
* lr_t * gq has at most 24 + 8 significant bits and stays in binary64's normal range, so the product is
  exact whatever the rounding; c has 16 significant bits in [2^-100, 2^100] and gq 8 bits in
  [2^-100, 2^127), so both are exact binary32 values and their conversions round nothing.

* The fp8 and sign encodings (rule.md, grad_codec.py) are the same kind of integer work on the pattern:
  fp8 rounds to 4 significant bits, or below 2^(k-6) to a multiple of 2^(k-9) by adding and subtracting
  2^(k+43) (one correctly rounded binary64 addition, ties to even, and an exact subtraction), then
  saturates with a clamp of the pattern; sign replaces the magnitude by 2^k's. Their gq has at most 4
  significant bits in [2^-69, 2^69), so the conversions and the product above stay exact.

Failures (a non-finite gradient, one beyond bf16's range, a coefficient beyond 2^100) are a flag, not an
exception: the host reads it when it reads the losses, later. bits and c are then 0, as the optimizer
records a failed step. The functions take no decision on tensor values, so they run on tensors with no
values at all (the meta device), which the tests use to show that nothing here reads a value on the host.
"""
from __future__ import annotations

import math
import struct

import torch

from .rule import MezoSGD

_FRACTION_BITS = 52
_MAGNITUDE = 0x7FFF_FFFF_FFFF_FFFF
_INF = 0x7FF0_0000_0000_0000  # the binary64 pattern of +inf; NaNs lie above it
_SIGN = -(1 << 63)  # the sign bit, as an int64


def _pattern(e: int) -> int:
    """The binary64 bit pattern of 2^e (normal range)."""
    return (e + 1023) << _FRACTION_BITS


def _round_magnitude(a: torch.Tensor, bits: int) -> torch.Tensor:
    """RS on the magnitude pattern `a` (int64, at most +inf's pattern): n significant bits, ties to even."""
    drop = _FRACTION_BITS - (bits - 1)
    lowest_kept = torch.bitwise_and(torch.bitwise_right_shift(a, drop), 1)
    return torch.bitwise_and(a + ((1 << (drop - 1)) - 1) + lowest_kept, -(1 << drop))


def _float_pattern(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _quantize_magnitude(a: torch.Tensor, rule: MezoSGD) -> tuple[torch.Tensor, torch.Tensor]:
    """(|gq| as a binary64 pattern, refused) for |g|'s pattern `a` (at most +inf's), in the rule's
    grad_encoding (grad_codec.quantize). Every encoding refuses inf and NaN (after the clamp, +inf's
    pattern); bf16 also refuses |gq| >= 2^127, where fp8 saturates."""
    tiny = a < _pattern(-100)
    nonfinite = a >= _INF
    if rule.grad_encoding == "bf16":
        q = _round_magnitude(a, 8)
        failed = q >= _pattern(127)  # also every inf and NaN: their pattern is +inf's after the clamp
        return torch.where(tiny | failed, 0, q), failed
    assert rule.grad_scale is not None
    k = math.frexp(rule.grad_scale)[1] - 1  # grad_scale = 2^k
    if rule.grad_encoding == "sign":
        return torch.where(tiny | nonfinite, 0, _pattern(k)), nonfinite
    # fp8: 4 significant bits from 2^(k-6) up; below, multiples of 2^(k-9). Adding C = 2^(k+43) rounds
    # |g| < 2^(k-6) to that multiple (the ulp of [C, 2C) is 2^(k-9)), to nearest even, in one correctly
    # rounded binary64 addition; subtracting C again is exact. Then saturate at 448 * 2^k.
    c = torch.full((), 2.0 ** (k + 43), dtype=torch.float64, device=a.device)
    small = torch.sub(torch.add(a.view(torch.float64), c), c).view(torch.int64)
    q = torch.where(a < _pattern(k - 6), small, _round_magnitude(a, 4))
    q = torch.clamp(q, max=_float_pattern(448.0 * rule.grad_scale))  # patterns of magnitudes order as values
    return torch.where(tiny | nonfinite, 0, q), nonfinite


def _as_float64(loss: torch.Tensor) -> torch.Tensor:
    return loss.detach().reshape(()).to(torch.float64)


def device_coefficient(loss_plus: torch.Tensor, loss_minus: torch.Tensor, rule: MezoSGD,
                       t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bits int32, c float32, failed bool), 0-dim on the losses' device, equal to the host's
    encode_grad / coefficient for step t; where either would raise ValueError, failed is true and
    bits and c are 0. Nothing here waits for the device."""
    lp, lm = _as_float64(loss_plus), _as_float64(loss_minus)
    two_eps = torch.full((), 2.0 * rule.eps, dtype=torch.float64, device=lp.device)
    g = torch.sub(lp, lm) / two_eps  # both operands on the device: the correctly rounded quotient

    raw = g.view(torch.int64)
    negative = raw < 0
    a = torch.clamp(torch.bitwise_and(raw, _MAGNITUDE), max=_INF)  # NaN payloads could overflow the carry
    q, encode_failed = _quantize_magnitude(a, rule)
    # bf16 = binary32's top half: the sign, the exponent rebiased from 1023 to 127, 7 fraction bits.
    magnitude16 = torch.where(q == 0, 0, torch.bitwise_right_shift(q, _FRACTION_BITS - 7) - ((1023 - 127) << 7))
    bits = magnitude16 + torch.where(negative & (q != 0), 1 << 15, 0)

    lr = rule.lr_at(t)  # a host float with at most 24 significant bits, or 0
    gq = torch.bitwise_or(q, torch.bitwise_and(raw, _SIGN))  # the decoded gradient
    product = gq.view(torch.float64) * lr  # exact: 32 significant bits, in the normal range
    p = product.view(torch.int64)
    c = _round_magnitude(torch.clamp(torch.bitwise_and(p, _MAGNITUDE), max=_INF), 16)
    coefficient_failed = c > _pattern(int(math.log2(rule.coefficient_limit)))  # 2^100, lower layer-wise
    failed = encode_failed | coefficient_failed
    c = torch.where((c < _pattern(-100)) | failed, 0, c)
    c = torch.where(c == 0, 0, torch.bitwise_or(c, torch.bitwise_and(p, _SIGN)))  # +0, never -0, as the host
    bits = torch.where(failed, 0, bits)
    return bits.to(torch.int32), c.view(torch.float64).to(torch.float32), failed
