"""Bits: Philox4x32-10 as spec/generator.md addresses it, vectorised in torch for CPU and CUDA.

torch has no unsigned 32-bit arithmetic, so words live in int64 tensors. A 32x32-bit product needs 64
bits; int64 multiplication wraps modulo 2^64 on every torch backend (two's complement), so the product's
bit pattern is exact and its high and low words are read off with a shift and a mask. Random123's
known answers (spec/vectors/philox.json, whose all-ones case overflows int64) are tested on each device.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = x * m  # the 64-bit product, wrapped into int64's range: same bits
    return (p >> 32) & MASK32, p & MASK32


def philox4x32_10(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
                  key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four output words (int64 tensors holding u32 values) for counters given as int64 tensors."""
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & MASK32, (k1 + _W1) & MASK32
    return c0, c1, c2, c3


def random_u16(seed: int, step: int, tensor_index: int, start: int, count: int,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Elements start .. start+count-1 of one tensor's 16-bit draws at one step (int64 tensor).

    One Philox call per block of 8 elements; the blocks covering the range are computed once and the
    range is cut out of their 8 halfwords, so any split of a tensor into ranges gives the same bits.
    """
    if count == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    first, last = start >> 3, (start + count - 1) >> 3
    b = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    c0, c1 = b & MASK32, b >> 32
    x = philox4x32_10(c0, c1, torch.full_like(b, tensor_index), torch.full_like(b, step),
                      (seed & MASK32, seed >> 32))
    halves = torch.stack([h for w in x for h in (w & 0xFFFF, w >> 16)], dim=1)  # (blocks, 8)
    offset = start & 7
    return halves.reshape(-1)[offset:offset + count]
