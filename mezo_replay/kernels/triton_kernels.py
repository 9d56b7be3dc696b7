"""The element phases of spec/rule.md as Triton kernels: noise made in registers, never stored.

Why Triton: one Python-level source compiles for every recent NVIDIA GPU (and AMD's), and the same
source runs on the CPU under Triton's interpreter (TRITON_INTERPRET=1), so CI tests the very logic the
GPU runs, bit for bit against the numpy reference, on machines without a GPU.

One tile body, four modes (the same as the compiled CPU kernel's), launched per tensor (`apply_`) or,
for training, over all tensors of a dtype at once (`apply_group_`):
- PERTURB: P1 or P2 of one step (training);
- RESTORE_UPDATE: P3 of one step, restore, decay and update fused (training);
- UPDATE_PERTURB: P3 of step t, then P1 of step t+1 on its rounded result, in one pass (training: a step
  that goes straight on to the next costs two passes over the weights instead of three);
- REPLAY: P1, P2 and P3 of many steps: each program loads its tile once, runs every step in registers
  and stores once (reconstruction).

In the training modes c (and UPDATE_PERTURB's go) may be read from device memory (0-dim tensors), so the
host never has to know the step's projected gradient before launching: no synchronisation per step.

Exactness (spec/rule.md): every product is exact in binary32, so contraction into FMAs cannot change
a bit, and the kernels are launched with it allowed (FP_FUSION): an FMA saves an instruction per
phase; GPU tests hold the result to the reference. R_D for bfloat16 has two forms that give the same
bits: the spec's integer rounding, and the hardware's round-to-nearest-even conversion (cvt.rn.bf16.f32,
sm_80 and later: fewer instructions per rounding). The conversion is the default on such GPUs (see
native_bf16_default); the integer form everywhere else, and always under Triton's interpreter, which
truncates in that conversion where GPUs round. Float16 uses the round-to-nearest-even conversion, which
both the GPU and the interpreter (numpy) implement with subnormals.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..arithmetic.noise import _gauss16_bits
from ..arithmetic.rule import MezoSGD

try:
    import triton
    import triton.language as tl
except ImportError:  # an optional dependency: CPU-only installs run without it
    triton = None

REPLAY, PERTURB, RESTORE_UPDATE, UPDATE_PERTURB = 0, 1, 2, 3  # the same codes as cpu_kernel's
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
NOISES = {"gaussian16": 0, "rademacher16": 1}
FP_FUSION = True  # safe: every product is exact, so an FMA rounds as mul-then-add does
_MAX_LAUNCH = 1 << 30  # elements per launch (a multiple of 8)
BLOCK = 1024  # elements per program: a multiple of 8, so a tile holds whole Philox blocks


def available() -> bool:
    return triton is not None


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1 at import): tests use it."""
    return triton is not None and not isinstance(_kernel, triton.runtime.JITFunction)


def runs_on(w: torch.Tensor) -> bool:
    """Whether the kernel can take this tensor: CUDA tensors, or CPU ones under the interpreter."""
    if triton is None or w.dtype not in DTYPES:
        return False
    return w.device.type == "cpu" if interpreting() else w.device.type == "cuda"


if triton is not None:
    @triton.jit
    def _philox(blocks, tensor_index, step, key0, key1):
        """Philox4x32-10 of the counters (block, tensor, step) for the blocks `blocks` (int64 [N]):
        four uint32 words per block, which feed its 8 elements (spec/generator.md)."""
        c0 = (blocks & 0xFFFFFFFF).to(tl.uint32)
        c1 = (blocks >> 32).to(tl.uint32)
        c2 = tl.zeros_like(c0) + tensor_index
        c3 = tl.zeros_like(c0) + step
        k0 = key0
        k1 = key1
        for _ in tl.static_range(10):
            hi0 = tl.umulhi(c0, 0xD2511F53)
            lo0 = c0 * 0xD2511F53
            hi1 = tl.umulhi(c2, 0xCD9E8D57)
            lo1 = c2 * 0xCD9E8D57
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        return c0, c1, c2, c3

    @triton.jit
    def _round(x, DT: tl.constexpr):
        """R_D, kept in binary32: the value the dtype stores, as a float32. NaN lanes may come out as
        anything: the kernel restores them at the store (a NaN stays NaN, spec/rule.md).

        DT 3 is bfloat16 through the hardware's round-to-nearest-even conversion (fewer instructions;
        the default from sm_80 on, never interpreted, since the interpreter truncates): tests hold it to
        DT 1's bits on the GPU, on every float32 pattern.
        """
        if DT == 3:
            return x.to(tl.bfloat16).to(tl.float32)
        elif DT == 1:  # bfloat16: round to nearest even on the pattern, as the spec writes it
            bits = x.to(tl.uint32, bitcast=True)
            r = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return r.to(tl.float32, bitcast=True)
        elif DT == 2:
            return x.to(tl.float16).to(tl.float32)
        else:
            return x

    @triton.jit
    def _decay(s, d):
        """DECAY(s) with 12-bit halves (both products exact); tiny, infinite and NaN values kept."""
        keep = (tl.abs(s) >= 2.0**-60) & (tl.abs(s) < float("inf"))
        x = tl.where(keep, s, 1.0)  # no inf - inf on the lanes that are not decayed
        hi = (x.to(tl.int32, bitcast=True) & -4096).to(tl.float32, bitcast=True)
        return tl.where(keep, (x - hi * d) - (x - hi) * d, s)

    @triton.jit
    def _noise(u, table_ptr, NOISE: tl.constexpr):
        """z of elements whose 16 random bits are u (int32)."""
        if NOISE == 0:
            z = (tl.load(table_ptr + u).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            z = tl.where(u < 32768, -1.0, 1.0)
        return z

    @triton.jit
    def _element_step(w, u, u2, table_ptr, eps, scale, c, d, go,
                      DT: tl.constexpr, NOISE: tl.constexpr, MODE: tl.constexpr, DECAY: tl.constexpr,
                      GO_PTR: tl.constexpr):
        """One step of one mode on elements whose 16 random bits are u (int32), in binary32. u2: the
        next step's bits (UPDATE_PERTURB only); go: whether its P1 half runs (only read if GO_PTR)."""
        z = _noise(u, table_ptr, NOISE)
        if MODE == 1:
            w = _round(w + z * scale, DT)
        else:
            if MODE == 0:
                w = _round(w + z * eps, DT)
                w = _round(w - z * (eps + eps), DT)
            s = w + z * eps
            if DECAY:
                s = _decay(s, d)
            w = _round(s - z * c, DT)
            if MODE == 3:  # P1 of the next step on P3's rounded value: PERTURB's bits with scale eps
                w1 = _round(w + _noise(u2, table_ptr, NOISE) * eps, DT)
                if GO_PTR:
                    w = tl.where(go, w1, w)
                else:
                    w = w1
        return w

    @triton.jit
    def _load(ptr, mask, DT: tl.constexpr):
        if DT == 1 or DT == 3:
            return (tl.load(ptr, mask=mask).to(tl.int32) << 16).to(tl.float32, bitcast=True)
        else:
            return tl.load(ptr, mask=mask).to(tl.float32)

    @triton.jit
    def _store(ptr, w, nan, mask, DT: tl.constexpr):
        """R_D's bits; NaN lanes get the canonical NaN (their value is not portable, spec/rule.md)."""
        if DT == 1 or DT == 3:
            bits = tl.where(nan, 0x7FC0, w.to(tl.uint32, bitcast=True) >> 16)
            tl.store(ptr, bits.to(tl.int16), mask=mask)
        elif DT == 2:
            tl.store(ptr, tl.where(nan, float("nan"), w).to(tl.float16), mask=mask)
        else:
            tl.store(ptr, tl.where(nan, float("nan"), w), mask=mask)

    @triton.jit
    def _tile(w_ptr, n, base, pid, table_ptr, c_ptr, d_ptr, go_ptr, nsteps, first_step, k_idx, k0, k1, eps, scale,
              c1, d1, decay_on, DT: tl.constexpr, NOISE: tl.constexpr, MODE: tl.constexpr, DECAY: tl.constexpr,
              BLOCK: tl.constexpr, C_PTR: tl.constexpr, GO_PTR: tl.constexpr):
        """Tile `pid` of elements base .. base+n-1 of one tensor, stored contiguously at w_ptr.

        A tile holds BLOCK/8 Philox blocks as eight [BLOCK/8] tensors, the j-th holding element 8b+j of
        each block b: one Philox call per thread feeds its own 8 elements, and every tensor shares one
        layout, so nothing moves between threads. Tiles are aligned to Philox blocks in index space,
        so an unaligned `base` (a slice starting mid-block) only masks the edges. bfloat16 arrives as
        int16. decay_on (runtime) selects decay where DECAY (compile time) allows it. In the one-step
        modes c is c1, or the float32 at c_ptr where C_PTR; UPDATE_PERTURB's go is the byte at go_ptr
        where GO_PTR (else true). Reading them in the kernel is what spares the host a synchronisation.
        """
        blocks = (base >> 3) + pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8).to(tl.int64)
        o = blocks * 8 - base  # offset of each block's element 0 from w_ptr
        p = w_ptr + o
        m0, m1, m2, m3 = (o >= 0) & (o < n), (o >= -1) & (o < n - 1), (o >= -2) & (o < n - 2), (o >= -3) & (o < n - 3)
        m4, m5, m6, m7 = (o >= -4) & (o < n - 4), (o >= -5) & (o < n - 5), (o >= -6) & (o < n - 6), (o >= -7) & (o < n - 7)
        w0, w1, w2, w3 = _load(p, m0, DT), _load(p + 1, m1, DT), _load(p + 2, m2, DT), _load(p + 3, m3, DT)
        w4, w5, w6, w7 = _load(p + 4, m4, DT), _load(p + 5, m5, DT), _load(p + 6, m6, DT), _load(p + 7, m7, DT)
        n0, n1, n2, n3, n4, n5, n6, n7 = w0 != w0, w1 != w1, w2 != w2, w3 != w3, w4 != w4, w5 != w5, w6 != w6, w7 != w7
        c_one = c1
        if C_PTR:
            c_one = tl.load(c_ptr)
        go = True
        if GO_PTR:
            go = tl.load(go_ptr) != 0
        steps = 1
        if MODE == 0:
            steps = nsteps
        for j in range(steps):
            c = c_one
            d = d1
            if MODE == 0:
                c = tl.load(c_ptr + j)
                d = tl.load(d_ptr + j)
            d = tl.where(decay_on, d, 0.0)
            x0, x1, x2, x3 = _philox(blocks, k_idx, (first_step + j).to(tl.uint32), k0, k1)
            if MODE == 3:  # the next step's words (its counter word wraps at 2^32 like the host's)
                y0, y1, y2, y3 = _philox(blocks, k_idx, (first_step + j + 1).to(tl.uint32), k0, k1)
            else:
                y0, y1, y2, y3 = x0, x1, x2, x3
            # element 8b+j takes the low (even j) or high (odd j) half of word j // 2
            w0 = _element_step(w0, (x0 & 0xFFFF).to(tl.int32), (y0 & 0xFFFF).to(tl.int32), table_ptr, eps,
                               scale, c, d, go, DT, NOISE, MODE, DECAY, GO_PTR)
            w1 = _element_step(w1, (x0 >> 16).to(tl.int32), (y0 >> 16).to(tl.int32), table_ptr, eps,
                               scale, c, d, go, DT, NOISE, MODE, DECAY, GO_PTR)
            w2 = _element_step(w2, (x1 & 0xFFFF).to(tl.int32), (y1 & 0xFFFF).to(tl.int32), table_ptr, eps,
                               scale, c, d, go, DT, NOISE, MODE, DECAY, GO_PTR)
            w3 = _element_step(w3, (x1 >> 16).to(tl.int32), (y1 >> 16).to(tl.int32), table_ptr, eps,
                               scale, c, d, go, DT, NOISE, MODE, DECAY, GO_PTR)
            w4 = _element_step(w4, (x2 & 0xFFFF).to(tl.int32), (y2 & 0xFFFF).to(tl.int32), table_ptr, eps,
                               scale, c, d, go, DT, NOISE, MODE, DECAY, GO_PTR)
            w5 = _element_step(w5, (x2 >> 16).to(tl.int32), (y2 >> 16).to(tl.int32), table_ptr, eps,
                               scale, c, d, go, DT, NOISE, MODE, DECAY, GO_PTR)
            w6 = _element_step(w6, (x3 & 0xFFFF).to(tl.int32), (y3 & 0xFFFF).to(tl.int32), table_ptr, eps,
                               scale, c, d, go, DT, NOISE, MODE, DECAY, GO_PTR)
            w7 = _element_step(w7, (x3 >> 16).to(tl.int32), (y3 >> 16).to(tl.int32), table_ptr, eps,
                               scale, c, d, go, DT, NOISE, MODE, DECAY, GO_PTR)
        _store(p, w0, n0, m0, DT)
        _store(p + 1, w1, n1, m1, DT)
        _store(p + 2, w2, n2, m2, DT)
        _store(p + 3, w3, n3, m3, DT)
        _store(p + 4, w4, n4, m4, DT)
        _store(p + 5, w5, n5, m5, DT)
        _store(p + 6, w6, n6, m6, DT)
        _store(p + 7, w7, n7, m7, DT)

    @triton.jit(do_not_specialize=["n", "base_hi", "base_lo", "tensor_index", "first_step", "key0", "key1",
                                   "nsteps"])
    def _kernel(w_ptr, n, base_hi, base_lo, table_ptr, c_ptr, d_ptr, go_ptr, nsteps, first_step, tensor_index, key0,
                key1, eps, scale, c1, d1,
                DT: tl.constexpr, NOISE: tl.constexpr, MODE: tl.constexpr, DECAY: tl.constexpr,
                BLOCK: tl.constexpr, C_PTR: tl.constexpr, GO_PTR: tl.constexpr):
        """One tensor (or a contiguous run of one), base = base_hi * 2^31 + base_lo: Triton types an
        integer argument by its value, and one typed unsigned 32-bit does not widen the same way
        everywhere (the interpreter differs), so the 64-bit index travels as two halves."""
        base = (base_hi.to(tl.int64) << 31) + base_lo.to(tl.int64)
        _tile(w_ptr, n, base, tl.program_id(0).to(tl.int64), table_ptr, c_ptr, d_ptr, go_ptr, nsteps, first_step,
              tensor_index.to(tl.uint32), key0.to(tl.uint32), key1.to(tl.uint32), eps, scale, c1, d1, True,
              DT, NOISE, MODE, DECAY, BLOCK, C_PTR, GO_PTR)

    @triton.jit(do_not_specialize=["step", "key0", "key1"])
    def _group_kernel(ptrs, sizes, starts, indices, decays, tile_slot, tile_num, table_ptr, c_ptr, go_ptr, step,
                      key0, key1, eps, scale, c1, d1,
                      DT: tl.constexpr, NOISE: tl.constexpr, MODE: tl.constexpr, DECAY: tl.constexpr,
                      BLOCK: tl.constexpr, PTR: tl.constexpr, C_PTR: tl.constexpr, GO_PTR: tl.constexpr):
        """One training phase over many tensors of one dtype in one launch: program i takes tile
        tile_num[i] of tensor tile_slot[i], whose address, size, first element index (a shard's start, 0
        for a whole tensor), trajectory index and decay flag come from the per-tensor tables. A model has
        hundreds of tensors, most of them small; a launch per tensor would cost more than the arithmetic."""
        pid = tl.program_id(0)
        slot = tl.load(tile_slot + pid)
        w_ptr = tl.load(ptrs + slot).to(tl.pointer_type(PTR))
        _tile(w_ptr, tl.load(sizes + slot), tl.load(starts + slot), tl.load(tile_num + pid).to(tl.int64), table_ptr,
              c_ptr, table_ptr, go_ptr, 1, step, tl.load(indices + slot).to(tl.uint32), key0.to(tl.uint32),
              key1.to(tl.uint32), eps, scale, c1, d1, tl.load(decays + slot) != 0, DT, NOISE, MODE, DECAY, BLOCK,
              C_PTR, GO_PTR)
    @triton.jit
    def _z8(blocks, k_idx, step, k0, k1, table_ptr, NOISE: tl.constexpr):
        """The noise of the 8 elements of each Philox block in `blocks` for step `step` (the _tile layout)."""
        x0, x1, x2, x3 = _philox(blocks, k_idx, step, k0, k1)
        return (_noise((x0 & 0xFFFF).to(tl.int32), table_ptr, NOISE), _noise((x0 >> 16).to(tl.int32), table_ptr, NOISE),
                _noise((x1 & 0xFFFF).to(tl.int32), table_ptr, NOISE), _noise((x1 >> 16).to(tl.int32), table_ptr, NOISE),
                _noise((x2 & 0xFFFF).to(tl.int32), table_ptr, NOISE), _noise((x2 >> 16).to(tl.int32), table_ptr, NOISE),
                _noise((x3 & 0xFFFF).to(tl.int32), table_ptr, NOISE), _noise((x3 >> 16).to(tl.int32), table_ptr, NOISE))

    @triton.jit
    def _next_p1(w0, w1, w2, w3, w4, w5, w6, w7, blocks, k_idx, step, k0, k1, table_ptr, eps, DT: tl.constexpr,
                 NOISE: tl.constexpr):
        """P1 of step `step` on the 8 element tensors of the _tile layout: PERTURB's bits with scale eps."""
        z0, z1, z2, z3, z4, z5, z6, z7 = _z8(blocks, k_idx, step, k0, k1, table_ptr, NOISE)
        return (_round(w0 + z0 * eps, DT), _round(w1 + z1 * eps, DT), _round(w2 + z2 * eps, DT),
                _round(w3 + z3 * eps, DT), _round(w4 + z4 * eps, DT), _round(w5 + z5 * eps, DT),
                _round(w6 + z6 * eps, DT), _round(w7 + z7 * eps, DT))

    @triton.jit
    def _p12(w, z, eps, DT: tl.constexpr):
        w = _round(w + z * eps, DT)
        return _round(w - z * (eps + eps), DT)

    @triton.jit
    def _restore(w, z, eps, d, DECAY: tl.constexpr):
        s = w + z * eps
        if DECAY:
            s = _decay(s, d)
        return s

    @triton.jit(do_not_specialize=["n", "base_hi", "base_lo", "tensor_index", "first_step", "key0", "key1",
                                   "nsteps"])
    def _terms_kernel(w_ptr, n, base_hi, base_lo, table_ptr, d_ptr, toff_ptr, tstep_ptr, tc_ptr, nsteps, first_step,
                      tensor_index, key0, key1, eps,
                      DT: tl.constexpr, NOISE: tl.constexpr, REPLAY_STEPS: tl.constexpr, DECAY: tl.constexpr,
                      BLOCK: tl.constexpr, NEXT_PERTURB: tl.constexpr):
        """The multi-term P3 of spec/momentum.md (with P1 and P2 before it where REPLAY_STEPS) on one tensor
        or a contiguous run of it, in the layout of _tile: step j's terms are (tstep, tc)[toff[j] ..
        toff[j+1]), each term's noise regenerated in registers, subtracted in order in binary32."""
        base = (base_hi.to(tl.int64) << 31) + base_lo.to(tl.int64)
        k_idx, k0, k1 = tensor_index.to(tl.uint32), key0.to(tl.uint32), key1.to(tl.uint32)
        blocks = (base >> 3) + tl.program_id(0).to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8).to(tl.int64)
        o = blocks * 8 - base
        p = w_ptr + o
        m0, m1, m2, m3 = (o >= 0) & (o < n), (o >= -1) & (o < n - 1), (o >= -2) & (o < n - 2), (o >= -3) & (o < n - 3)
        m4, m5, m6, m7 = (o >= -4) & (o < n - 4), (o >= -5) & (o < n - 5), (o >= -6) & (o < n - 6), (o >= -7) & (o < n - 7)
        w0, w1, w2, w3 = _load(p, m0, DT), _load(p + 1, m1, DT), _load(p + 2, m2, DT), _load(p + 3, m3, DT)
        w4, w5, w6, w7 = _load(p + 4, m4, DT), _load(p + 5, m5, DT), _load(p + 6, m6, DT), _load(p + 7, m7, DT)
        n0, n1, n2, n3, n4, n5, n6, n7 = w0 != w0, w1 != w1, w2 != w2, w3 != w3, w4 != w4, w5 != w5, w6 != w6, w7 != w7
        for j in range(nsteps):
            d = tl.load(d_ptr + j)
            z0, z1, z2, z3, z4, z5, z6, z7 = _z8(blocks, k_idx, (first_step + j).to(tl.uint32), k0, k1, table_ptr,
                                                 NOISE)
            if REPLAY_STEPS:
                w0, w1, w2, w3 = _p12(w0, z0, eps, DT), _p12(w1, z1, eps, DT), _p12(w2, z2, eps, DT), _p12(w3, z3, eps, DT)
                w4, w5, w6, w7 = _p12(w4, z4, eps, DT), _p12(w5, z5, eps, DT), _p12(w6, z6, eps, DT), _p12(w7, z7, eps, DT)
            s0, s1, s2, s3 = (_restore(w0, z0, eps, d, DECAY), _restore(w1, z1, eps, d, DECAY),
                              _restore(w2, z2, eps, d, DECAY), _restore(w3, z3, eps, d, DECAY))
            s4, s5, s6, s7 = (_restore(w4, z4, eps, d, DECAY), _restore(w5, z5, eps, d, DECAY),
                              _restore(w6, z6, eps, d, DECAY), _restore(w7, z7, eps, d, DECAY))
            for q in range(tl.load(toff_ptr + j), tl.load(toff_ptr + j + 1)):
                c = tl.load(tc_ptr + q)
                y0, y1, y2, y3, y4, y5, y6, y7 = _z8(blocks, k_idx, tl.load(tstep_ptr + q).to(tl.uint32), k0, k1,
                                                     table_ptr, NOISE)
                s0, s1, s2, s3 = s0 - y0 * c, s1 - y1 * c, s2 - y2 * c, s3 - y3 * c
                s4, s5, s6, s7 = s4 - y4 * c, s5 - y5 * c, s6 - y6 * c, s7 - y7 * c
            w0, w1, w2, w3 = _round(s0, DT), _round(s1, DT), _round(s2, DT), _round(s3, DT)
            w4, w5, w6, w7 = _round(s4, DT), _round(s5, DT), _round(s6, DT), _round(s7, DT)
        if NEXT_PERTURB:  # P1 of the next step on P3's rounded values (UPDATE_PERTURB)
            w0, w1, w2, w3, w4, w5, w6, w7 = _next_p1(w0, w1, w2, w3, w4, w5, w6, w7, blocks, k_idx,
                                                      (first_step + 1).to(tl.uint32), k0, k1, table_ptr, eps,
                                                      DT, NOISE)
        _store(p, w0, n0, m0, DT)
        _store(p + 1, w1, n1, m1, DT)
        _store(p + 2, w2, n2, m2, DT)
        _store(p + 3, w3, n3, m3, DT)
        _store(p + 4, w4, n4, m4, DT)
        _store(p + 5, w5, n5, m5, DT)
        _store(p + 6, w6, n6, m6, DT)
        _store(p + 7, w7, n7, m7, DT)
    @triton.jit
    def _buffer_p3(w, m, z, eps, c, beta, d, DT: tl.constexpr, DECAY: tl.constexpr):
        """mezo-momentum-buffer's P3: m = fl32(fl32(beta*m) + c*z); w = R_D(DECAY(w + eps*z) - m). The launch
        forbids fusion (enable_fp_fusion=False): beta*m is the spec's one inexact product."""
        m = beta * m + z * c
        s = _restore(w, z, eps, d, DECAY)
        return _round(s - m, DT), m

    @triton.jit(do_not_specialize=["n", "base_hi", "base_lo", "tensor_index", "first_step", "key0", "key1",
                                   "nsteps"])
    def _buffer_kernel(w_ptr, m_ptr, n, base_hi, base_lo, table_ptr, c_ptr, d_ptr, nsteps, first_step, tensor_index,
                       key0, key1, eps, beta,
                       DT: tl.constexpr, NOISE: tl.constexpr, REPLAY_STEPS: tl.constexpr, DECAY: tl.constexpr,
                       BLOCK: tl.constexpr, NEXT_PERTURB: tl.constexpr):
        """mezo-momentum-buffer on one tensor (or a run of it) and its float32 states at m_ptr, in the layout of
        _tile: P1, P2 (where REPLAY_STEPS) and the buffered P3 for each step, weights and states in registers."""
        base = (base_hi.to(tl.int64) << 31) + base_lo.to(tl.int64)
        k_idx, k0, k1 = tensor_index.to(tl.uint32), key0.to(tl.uint32), key1.to(tl.uint32)
        blocks = (base >> 3) + tl.program_id(0).to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8).to(tl.int64)
        o = blocks * 8 - base
        p = w_ptr + o
        q = m_ptr + o
        m0, m1, m2, m3 = (o >= 0) & (o < n), (o >= -1) & (o < n - 1), (o >= -2) & (o < n - 2), (o >= -3) & (o < n - 3)
        m4, m5, m6, m7 = (o >= -4) & (o < n - 4), (o >= -5) & (o < n - 5), (o >= -6) & (o < n - 6), (o >= -7) & (o < n - 7)
        w0, w1, w2, w3 = _load(p, m0, DT), _load(p + 1, m1, DT), _load(p + 2, m2, DT), _load(p + 3, m3, DT)
        w4, w5, w6, w7 = _load(p + 4, m4, DT), _load(p + 5, m5, DT), _load(p + 6, m6, DT), _load(p + 7, m7, DT)
        h0, h1, h2, h3 = tl.load(q, mask=m0), tl.load(q + 1, mask=m1), tl.load(q + 2, mask=m2), tl.load(q + 3, mask=m3)
        h4, h5, h6, h7 = tl.load(q + 4, mask=m4), tl.load(q + 5, mask=m5), tl.load(q + 6, mask=m6), tl.load(q + 7, mask=m7)
        n0, n1, n2, n3, n4, n5, n6, n7 = w0 != w0, w1 != w1, w2 != w2, w3 != w3, w4 != w4, w5 != w5, w6 != w6, w7 != w7
        for j in range(nsteps):
            c = tl.load(c_ptr + j)
            d = tl.load(d_ptr + j)
            z0, z1, z2, z3, z4, z5, z6, z7 = _z8(blocks, k_idx, (first_step + j).to(tl.uint32), k0, k1, table_ptr,
                                                 NOISE)
            if REPLAY_STEPS:
                w0, w1, w2, w3 = _p12(w0, z0, eps, DT), _p12(w1, z1, eps, DT), _p12(w2, z2, eps, DT), _p12(w3, z3, eps, DT)
                w4, w5, w6, w7 = _p12(w4, z4, eps, DT), _p12(w5, z5, eps, DT), _p12(w6, z6, eps, DT), _p12(w7, z7, eps, DT)
            w0, h0 = _buffer_p3(w0, h0, z0, eps, c, beta, d, DT, DECAY)
            w1, h1 = _buffer_p3(w1, h1, z1, eps, c, beta, d, DT, DECAY)
            w2, h2 = _buffer_p3(w2, h2, z2, eps, c, beta, d, DT, DECAY)
            w3, h3 = _buffer_p3(w3, h3, z3, eps, c, beta, d, DT, DECAY)
            w4, h4 = _buffer_p3(w4, h4, z4, eps, c, beta, d, DT, DECAY)
            w5, h5 = _buffer_p3(w5, h5, z5, eps, c, beta, d, DT, DECAY)
            w6, h6 = _buffer_p3(w6, h6, z6, eps, c, beta, d, DT, DECAY)
            w7, h7 = _buffer_p3(w7, h7, z7, eps, c, beta, d, DT, DECAY)
        if NEXT_PERTURB:
            w0, w1, w2, w3, w4, w5, w6, w7 = _next_p1(w0, w1, w2, w3, w4, w5, w6, w7, blocks, k_idx,
                                                      (first_step + 1).to(tl.uint32), k0, k1, table_ptr, eps,
                                                      DT, NOISE)
        _store(p, w0, n0, m0, DT)
        _store(p + 1, w1, n1, m1, DT)
        _store(p + 2, w2, n2, m2, DT)
        _store(p + 3, w3, n3, m3, DT)
        _store(p + 4, w4, n4, m4, DT)
        _store(p + 5, w5, n5, m5, DT)
        _store(p + 6, w6, n6, m6, DT)
        _store(p + 7, w7, n7, m7, DT)
        tl.store(q, h0, mask=m0)
        tl.store(q + 1, h1, mask=m1)
        tl.store(q + 2, h2, mask=m2)
        tl.store(q + 3, h3, mask=m3)
        tl.store(q + 4, h4, mask=m4)
        tl.store(q + 5, h5, mask=m5)
        tl.store(q + 6, h6, mask=m6)
        tl.store(q + 7, h7, mask=m7)

    # --- mezo-adam and mezo-adam-buffer (spec/adam.md): launched with enable_fp_fusion=False, division and
    # square root correctly rounded (div_rn, sqrt_rn: Triton's `/` and sqrt are approximate on NVIDIA GPUs).

    @triton.jit
    def _adam_finish(w, z, mm, vv, eps, alpha, h, delta, d, DT: tl.constexpr, DECAY: tl.constexpr):
        """r = sqrt32(v); den = fl32(fl32(r*h) + delta); upd = fl32(fl32(alpha*m) / den); R_D(DECAY(w + eps z) - upd)."""
        r = tl.math.sqrt_rn(vv)
        rh = r * h
        den = rh + delta
        am = mm * alpha
        upd = tl.math.div_rn(am, den)
        s = _restore(w, z, eps, d, DECAY)
        return _round(s - upd, DT)

    @triton.jit
    def _adam_moments(mm, vv, z, gq, b1, u1, b2, u2):
        """mezo-adam-buffer: g = gq*z (exact); m = b1*m + u1*g; v = b2*v + u2*(g*g), each product rounded alone."""
        g = z * gq
        bm = mm * b1
        ug = g * u1
        gg = g * g
        ugg = gg * u2
        bv = vv * b2
        return bm + ug, bv + ugg

    @triton.jit
    def _adam_term(mm, vv, y, cm, cv):
        """mezo-adam, one window term: m + cm*y (exact product); v + fl32(cv * (y*y)) (y*y exact)."""
        yy = y * y
        p = yy * cv
        return mm + y * cm, vv + p

    @triton.jit(do_not_specialize=["n", "base_hi", "base_lo", "tensor_index", "first_step", "key0", "key1",
                                   "nsteps"])
    def _adam_kernel(w_ptr, m_ptr, v_ptr, n, base_hi, base_lo, table_ptr, d_ptr, alpha_ptr, h_ptr, toff_ptr, tstep_ptr,
                     tcm_ptr, tcv_ptr, nsteps, first_step, tensor_index, key0, key1, eps, b1, u1, b2, u2, delta,
                     DT: tl.constexpr, NOISE: tl.constexpr, REPLAY_STEPS: tl.constexpr, DECAY: tl.constexpr,
                     BLOCK: tl.constexpr, NEXT_PERTURB: tl.constexpr, BUFFERED: tl.constexpr):
        """spec/adam.md on one tensor (or a run of it) in the layout of _tile. BUFFERED (mezo-adam-buffer): m and
        v at m_ptr, v_ptr (float32, loaded once, stored once), step j's gq at tcm[toff[j]]; otherwise
        (mezo-adam) m and v summed from +0 over step j's terms (tstep, tcm, tcv)[toff[j] .. toff[j+1]), each
        term's noise regenerated in registers."""
        base = (base_hi.to(tl.int64) << 31) + base_lo.to(tl.int64)
        k_idx, k0, k1 = tensor_index.to(tl.uint32), key0.to(tl.uint32), key1.to(tl.uint32)
        blocks = (base >> 3) + tl.program_id(0).to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8).to(tl.int64)
        o = blocks * 8 - base
        p = w_ptr + o
        m0, m1, m2, m3 = (o >= 0) & (o < n), (o >= -1) & (o < n - 1), (o >= -2) & (o < n - 2), (o >= -3) & (o < n - 3)
        m4, m5, m6, m7 = (o >= -4) & (o < n - 4), (o >= -5) & (o < n - 5), (o >= -6) & (o < n - 6), (o >= -7) & (o < n - 7)
        w0, w1, w2, w3 = _load(p, m0, DT), _load(p + 1, m1, DT), _load(p + 2, m2, DT), _load(p + 3, m3, DT)
        w4, w5, w6, w7 = _load(p + 4, m4, DT), _load(p + 5, m5, DT), _load(p + 6, m6, DT), _load(p + 7, m7, DT)
        n0, n1, n2, n3, n4, n5, n6, n7 = w0 != w0, w1 != w1, w2 != w2, w3 != w3, w4 != w4, w5 != w5, w6 != w6, w7 != w7
        zero = tl.zeros_like(w0)
        a0, a1, a2, a3, a4, a5, a6, a7 = zero, zero, zero, zero, zero, zero, zero, zero
        b0, b1_, b2_, b3, b4, b5, b6, b7 = zero, zero, zero, zero, zero, zero, zero, zero
        if BUFFERED:
            q = m_ptr + o
            r = v_ptr + o
            a0, a1, a2, a3 = tl.load(q, mask=m0), tl.load(q + 1, mask=m1), tl.load(q + 2, mask=m2), tl.load(q + 3, mask=m3)
            a4, a5, a6, a7 = tl.load(q + 4, mask=m4), tl.load(q + 5, mask=m5), tl.load(q + 6, mask=m6), tl.load(q + 7, mask=m7)
            b0, b1_, b2_, b3 = tl.load(r, mask=m0), tl.load(r + 1, mask=m1), tl.load(r + 2, mask=m2), tl.load(r + 3, mask=m3)
            b4, b5, b6, b7 = tl.load(r + 4, mask=m4), tl.load(r + 5, mask=m5), tl.load(r + 6, mask=m6), tl.load(r + 7, mask=m7)
        for j in range(nsteps):
            d = tl.load(d_ptr + j)
            alpha = tl.load(alpha_ptr + j)
            h = tl.load(h_ptr + j)
            z0, z1, z2, z3, z4, z5, z6, z7 = _z8(blocks, k_idx, (first_step + j).to(tl.uint32), k0, k1, table_ptr,
                                                 NOISE)
            if REPLAY_STEPS:
                w0, w1, w2, w3 = _p12(w0, z0, eps, DT), _p12(w1, z1, eps, DT), _p12(w2, z2, eps, DT), _p12(w3, z3, eps, DT)
                w4, w5, w6, w7 = _p12(w4, z4, eps, DT), _p12(w5, z5, eps, DT), _p12(w6, z6, eps, DT), _p12(w7, z7, eps, DT)
            if BUFFERED:
                gq = tl.load(tcm_ptr + tl.load(toff_ptr + j))
                a0, b0 = _adam_moments(a0, b0, z0, gq, b1, u1, b2, u2)
                a1, b1_ = _adam_moments(a1, b1_, z1, gq, b1, u1, b2, u2)
                a2, b2_ = _adam_moments(a2, b2_, z2, gq, b1, u1, b2, u2)
                a3, b3 = _adam_moments(a3, b3, z3, gq, b1, u1, b2, u2)
                a4, b4 = _adam_moments(a4, b4, z4, gq, b1, u1, b2, u2)
                a5, b5 = _adam_moments(a5, b5, z5, gq, b1, u1, b2, u2)
                a6, b6 = _adam_moments(a6, b6, z6, gq, b1, u1, b2, u2)
                a7, b7 = _adam_moments(a7, b7, z7, gq, b1, u1, b2, u2)
            else:
                a0, a1, a2, a3, a4, a5, a6, a7 = zero, zero, zero, zero, zero, zero, zero, zero
                b0, b1_, b2_, b3, b4, b5, b6, b7 = zero, zero, zero, zero, zero, zero, zero, zero
                for t in range(tl.load(toff_ptr + j), tl.load(toff_ptr + j + 1)):
                    cm = tl.load(tcm_ptr + t)
                    cv = tl.load(tcv_ptr + t)
                    y0, y1, y2, y3, y4, y5, y6, y7 = _z8(blocks, k_idx, tl.load(tstep_ptr + t).to(tl.uint32), k0, k1,
                                                         table_ptr, NOISE)
                    a0, b0 = _adam_term(a0, b0, y0, cm, cv)
                    a1, b1_ = _adam_term(a1, b1_, y1, cm, cv)
                    a2, b2_ = _adam_term(a2, b2_, y2, cm, cv)
                    a3, b3 = _adam_term(a3, b3, y3, cm, cv)
                    a4, b4 = _adam_term(a4, b4, y4, cm, cv)
                    a5, b5 = _adam_term(a5, b5, y5, cm, cv)
                    a6, b6 = _adam_term(a6, b6, y6, cm, cv)
                    a7, b7 = _adam_term(a7, b7, y7, cm, cv)
            w0 = _adam_finish(w0, z0, a0, b0, eps, alpha, h, delta, d, DT, DECAY)
            w1 = _adam_finish(w1, z1, a1, b1_, eps, alpha, h, delta, d, DT, DECAY)
            w2 = _adam_finish(w2, z2, a2, b2_, eps, alpha, h, delta, d, DT, DECAY)
            w3 = _adam_finish(w3, z3, a3, b3, eps, alpha, h, delta, d, DT, DECAY)
            w4 = _adam_finish(w4, z4, a4, b4, eps, alpha, h, delta, d, DT, DECAY)
            w5 = _adam_finish(w5, z5, a5, b5, eps, alpha, h, delta, d, DT, DECAY)
            w6 = _adam_finish(w6, z6, a6, b6, eps, alpha, h, delta, d, DT, DECAY)
            w7 = _adam_finish(w7, z7, a7, b7, eps, alpha, h, delta, d, DT, DECAY)
        if NEXT_PERTURB:
            w0, w1, w2, w3, w4, w5, w6, w7 = _next_p1(w0, w1, w2, w3, w4, w5, w6, w7, blocks, k_idx,
                                                      (first_step + 1).to(tl.uint32), k0, k1, table_ptr, eps,
                                                      DT, NOISE)
        _store(p, w0, n0, m0, DT)
        _store(p + 1, w1, n1, m1, DT)
        _store(p + 2, w2, n2, m2, DT)
        _store(p + 3, w3, n3, m3, DT)
        _store(p + 4, w4, n4, m4, DT)
        _store(p + 5, w5, n5, m5, DT)
        _store(p + 6, w6, n6, m6, DT)
        _store(p + 7, w7, n7, m7, DT)
        if BUFFERED:
            tl.store(q, a0, mask=m0)
            tl.store(q + 1, a1, mask=m1)
            tl.store(q + 2, a2, mask=m2)
            tl.store(q + 3, a3, mask=m3)
            tl.store(q + 4, a4, mask=m4)
            tl.store(q + 5, a5, mask=m5)
            tl.store(q + 6, a6, mask=m6)
            tl.store(q + 7, a7, mask=m7)
            tl.store(r, b0, mask=m0)
            tl.store(r + 1, b1_, mask=m1)
            tl.store(r + 2, b2_, mask=m2)
            tl.store(r + 3, b3, mask=m3)
            tl.store(r + 4, b4, mask=m4)
            tl.store(r + 5, b5, mask=m5)
            tl.store(r + 6, b6, mask=m6)
            tl.store(r + 7, b7, mask=m7)
else:
    _kernel = None

def _dt_code(dtype: torch.dtype, native_bf16: bool = False) -> int:
    """The kernels' DT: 0 float32, 1 bfloat16 (integer rounding), 2 float16, 3 bfloat16 (hardware)."""
    return 3 if native_bf16 and dtype == torch.bfloat16 else DTYPES[dtype]


_native: dict[tuple[str, int | None], bool] = {}


def native_bf16_default(device: torch.device) -> bool:
    """Whether bfloat16 rounds by the hardware conversion by default on this device: on NVIDIA GPUs of
    compute capability 8.0 or later, whose cvt.rn.bf16.f32 rounds to nearest even exactly as the spec's
    integer formula does (the same bits: tests/test_kernels.py checks all 2^32 patterns and the kernel on
    such a GPU), in fewer instructions. Not under the interpreter (numpy's conversion truncates), not
    before sm_80 (Triton emulates the conversion there), not on AMD GPUs (not checked on one)."""
    device = torch.device(device)
    key = (device.type, device.index)
    if key not in _native:
        _native[key] = (not interpreting() and device.type == "cuda" and torch.version.hip is None
                        and torch.cuda.get_device_capability(device) >= (8, 0))
    return _native[key]


def _element_type(dtype: torch.dtype):
    """How the kernels see the weights in memory: bfloat16 as its int16 patterns."""
    return {torch.float32: tl.float32, torch.bfloat16: tl.int16, torch.float16: tl.float16}[dtype]


_tables: dict[torch.device, torch.Tensor] = {}
_constants: dict[tuple[int, bool, torch.device], tuple[object, torch.Tensor, torch.Tensor]] = {}


def _table(device: torch.device) -> torch.Tensor:
    """The gaussian16 table as its bfloat16 patterns (uint16): 128 KiB, half the cache of float32."""
    if device not in _tables:
        _tables[device] = torch.frombuffer(bytearray(_gauss16_bits()), dtype=torch.uint16).to(device)
    return _tables[device]


def _device_constants(constants: Sequence[tuple[float, float]], decay: bool,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """c and d of every step as float32 device tensors, uploaded once per replay, not once per tensor.

    Every c and d is a binary32 value (spec/rule.md), so the conversion is exact.
    """
    key = (id(constants) if len(constants) > 1 else hash(tuple(constants)), decay, device)
    hit = _constants.get(key)
    if hit is None or (len(constants) > 1 and hit[0] is not constants):
        c = torch.tensor([x for x, _ in constants], dtype=torch.float32)
        d = torch.tensor([y if decay else 0.0 for _, y in constants], dtype=torch.float32)
        if len(_constants) > 8:
            _constants.clear()
        hit = _constants[key] = (constants, c.to(device), d.to(device))
    return hit[1], hit[2]


def _scalars(c: float | torch.Tensor, go: torch.Tensor | None, device: torch.device,
             dummy: torch.Tensor) -> tuple[float, torch.Tensor, bool, torch.Tensor, bool]:
    """(c1, c_ptr, C_PTR, go_ptr, GO_PTR) for a launch: a host float travels as a by-value argument, a 0-dim
    tensor as a pointer the kernel reads (C_PTR, a compile-time flag: two variants, each with no extra work).
    That is the cheapest either way: wrapping a host float in a device tensor would cost a host-to-device
    copy per step, and reading a device c on the host would wait for every queued kernel. go travels as a
    pointer to its byte. Only views and no-op casts here: none of them waits for the GPU."""
    c_ptr, go_ptr = dummy, dummy
    if isinstance(c, torch.Tensor):
        c_ptr = c.reshape(()).to(device=device, dtype=torch.float32)
        c = 0.0
    if go is not None:
        go = go.reshape(()).to(device=device)
        go_ptr = (go if go.dtype == torch.bool else go != 0).view(torch.uint8)
    return float(c), c_ptr, c_ptr is not dummy, go_ptr, go is not None


def apply_(w: torch.Tensor, start: int, rule: MezoSGD, index: int, first_step: int, mode: int, *,
           constants: Sequence[tuple[float | torch.Tensor, float]] = ((0.0, 0.0),), decay: bool = False,
           scale: float = 0.0, go: torch.Tensor | None = None, steps_per_launch: int = 1024, block: int = BLOCK,
           num_warps: int = 4, native_bf16: bool | None = None,
           progress: Callable[[int], None] | None = None) -> None:
    """One tensor (or contiguous slice holding elements start..) through the kernel, in place.

    REPLAY launches cover `steps_per_launch` steps each, so each tile is read and written once per
    launch and progress can be reported between launches. In RESTORE_UPDATE and UPDATE_PERTURB the c of
    constants[0] may be a 0-dim tensor (read on the device); go (UPDATE_PERTURB: a 0-dim bool tensor, None
    for true) skips the P1 half where false. block, num_warps and native_bf16 (None: native_bf16_default)
    are for benchmarks: the bits are the same for any value.
    """
    if not runs_on(w) or not w.is_contiguous():
        raise ValueError("the Triton kernel takes contiguous float32/bfloat16/float16 CUDA tensors "
                         "(CPU tensors only under TRITON_INTERPRET=1)")
    if mode not in (REPLAY, PERTURB, RESTORE_UPDATE, UPDATE_PERTURB):
        raise ValueError(f"unknown kernel mode {mode!r}")
    if w.numel() == 0:
        return
    view = (w.view(torch.int16) if w.dtype == torch.bfloat16 else w).view(-1)
    table = _table(w.device)
    dummy = _device_constants(((0.0, 0.0),), False, w.device)[0]
    if mode == REPLAY:
        c_all, d_all = _device_constants(constants, decay, w.device)
        c1, go_ptr, c_from_ptr, go_from_ptr, d1 = 0.0, dummy, False, False, 0.0
    else:  # single steps pass c and d as scalars (or c as a device pointer): nothing to upload per tensor
        c, d1 = constants[0] if mode in (RESTORE_UPDATE, UPDATE_PERTURB) else (0.0, 0.0)
        c1, c_all, c_from_ptr, go_ptr, go_from_ptr = _scalars(c, go if mode == UPDATE_PERTURB else None,
                                                              w.device, dummy)
        d_all = dummy
    if native_bf16 is None:
        native_bf16 = native_bf16_default(w.device)
    meta = dict(DT=_dt_code(w.dtype, native_bf16), NOISE=NOISES[rule.noise],
                MODE=mode, DECAY=bool(decay) and mode != PERTURB, BLOCK=block, C_PTR=c_from_ptr,
                GO_PTR=go_from_ptr, num_warps=num_warps, enable_fp_fusion=FP_FUSION)
    total = len(constants) if mode == REPLAY else 1
    for first in range(0, total, steps_per_launch):
        count = min(steps_per_launch, total - first)
        for part in range(0, w.numel(), _MAX_LAUNCH):  # n and offsets stay in int32
            n = min(_MAX_LAUNCH, w.numel() - part)
            base = start + part
            _kernel[(triton.cdiv((base & 7) + n, block),)](
                view[part:], n, base >> 31, base & 0x7FFFFFFF, table, c_all[first:] if mode == REPLAY else c_all,
                d_all[first:] if mode == REPLAY else d_all, go_ptr, count, first_step + first, index,
                rule.seed & 0xFFFFFFFF, rule.seed >> 32, rule.eps, scale, c1, float(d1) if decay else 0.0, **meta)
        if progress is not None:
            progress(w.numel() * count)


_groups: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _group_tables(tensors: Sequence[torch.Tensor], indices: Sequence[int], decays: Sequence[bool],
                  block: int, starts: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Per-tensor (address, size, start, index, decay) and per-tile (tensor slot, tile number) device
    tables, built once: a training run's tensors keep their storage from step to step. Tiles are aligned
    to Philox blocks in index space, so a shard starting mid-block takes (start % 8 + size) / block tiles,
    as apply_'s grid does."""
    key = (tuple((t.data_ptr(), t.numel()) for t in tensors), tuple(indices), tuple(decays), block, tuple(starts))
    if key not in _groups:
        device = tensors[0].device
        sizes = torch.tensor([t.numel() for t in tensors], dtype=torch.int64)
        first = torch.tensor(list(starts), dtype=torch.int64)
        tiles = (sizes + (first & 7) + block - 1) // block
        slot = torch.repeat_interleave(torch.arange(len(tensors), dtype=torch.int32), tiles)
        num = torch.arange(int(tiles.sum()), dtype=torch.int32) - torch.repeat_interleave(
            (torch.cumsum(tiles, 0) - tiles).to(torch.int32), tiles)
        tables = (torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64), sizes, first,
                  torch.tensor(list(indices), dtype=torch.int64), torch.tensor(list(decays), dtype=torch.int8),
                  slot, num)
        if len(_groups) > 4:
            _groups.clear()
        _groups[key] = tuple(x.to(device) for x in tables)
    return _groups[key]


def apply_group_(tensors: Sequence[torch.Tensor], indices: Sequence[int], decays: Sequence[bool], rule: MezoSGD,
                 step: int, mode: int, *, c: float | torch.Tensor = 0.0, d: float = 0.0, scale: float = 0.0,
                 go: torch.Tensor | None = None, block: int = BLOCK, native_bf16: bool | None = None,
                 starts: Sequence[int] | None = None) -> None:
    """PERTURB, RESTORE_UPDATE or UPDATE_PERTURB of one step on whole tensors (tensors[i] is trajectory
    tensor indices[i]), one launch per dtype. Tensors must be contiguous; decays[i] says whether tensor i
    takes the decay d. c and go as in apply_: device tensors are read by the kernel, never by the host.
    starts[i]: the element of tensor indices[i] at which tensors[i] begins (a rank's shard), None: all 0."""
    if mode not in (PERTURB, RESTORE_UPDATE, UPDATE_PERTURB):
        raise ValueError("replay runs tensor by tensor (apply_), many steps per launch")
    starts = [0] * len(tensors) if starts is None else [int(x) for x in starts]
    if len(starts) != len(tensors) or any(x < 0 for x in starts):
        raise ValueError("one non-negative start per tensor")
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        if not runs_on(t) or not t.is_contiguous():
            raise ValueError("the Triton kernel takes contiguous float32/bfloat16/float16 CUDA tensors")
        if t.numel():
            by_dtype.setdefault(t.dtype, []).append(i)
    for dtype, members in by_dtype.items():
        ts = [tensors[i] for i in members]
        device = ts[0].device
        ptrs, sizes, first, idx, dec, slot, num = _group_tables(ts, [indices[i] for i in members],
                                                                [bool(decays[i]) for i in members], block,
                                                                [starts[i] for i in members])
        table = _table(device)
        c1, c_ptr, c_from_ptr, go_ptr, go_from_ptr = _scalars(c if mode != PERTURB else 0.0,
                                                              go if mode == UPDATE_PERTURB else None, device, table)
        native = native_bf16_default(device) if native_bf16 is None else native_bf16
        _group_kernel[(slot.numel(),)](
            ptrs, sizes, first, idx, dec, slot, num, table, c_ptr, go_ptr, step, rule.seed & 0xFFFFFFFF,
            rule.seed >> 32, rule.eps, scale, c1, d, DT=_dt_code(dtype, native), NOISE=NOISES[rule.noise], MODE=mode,
            DECAY=mode != PERTURB and any(decays[i] for i in members), BLOCK=block, PTR=_element_type(dtype),
            C_PTR=c_from_ptr, GO_PTR=go_from_ptr, enable_fp_fusion=FP_FUSION)


def compile_for_gpu(dtype: torch.dtype, mode: int, *, noise: str = "gaussian16", decay: bool = False,
                    arch: int = 90, block: int = BLOCK, num_warps: int = 4, native_bf16: bool | None = None,
                    group: bool = False, c_on_device: bool = False, go_on_device: bool = False):
    """Compiles the kernel for an NVIDIA GPU of compute capability `arch` on a machine without one
    (Triton ships ptxas): tests check that every variant builds and that its PTX flushes no
    subnormals; tools/roofline.py counts its machine instructions. Not under TRITON_INTERPRET.
    native_bf16 None: what a launch on such a GPU uses by default (the conversion from sm_80 on);
    c_on_device / go_on_device: the variants that read c / go through a pointer."""
    if triton is None or interpreting():
        raise RuntimeError("compiling needs Triton, and TRITON_INTERPRET unset")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptr = {torch.float32: "*fp32", torch.bfloat16: "*i16", torch.float16: "*fp16"}[dtype]
    signature = {"w_ptr": ptr, "n": "i32", "base_hi": "i32", "base_lo": "i32", "table_ptr": "*u16",
                 "c_ptr": "*fp32", "d_ptr": "*fp32", "go_ptr": "*u8", "nsteps": "i32", "first_step": "i32",
                 "tensor_index": "i32", "key0": "i32", "key1": "i32", "eps": "fp32", "scale": "fp32", "c1": "fp32",
                 "d1": "fp32"}
    dt = _dt_code(dtype, arch >= 80 if native_bf16 is None else native_bf16)
    constexprs = {"DT": dt, "NOISE": NOISES[noise], "MODE": mode, "DECAY": decay, "BLOCK": block,
                  "C_PTR": c_on_device, "GO_PTR": go_on_device}
    kernel = _kernel
    if group:  # the grouped training kernel (apply_group_)
        kernel = _group_kernel
        signature = {"ptrs": "*i64", "sizes": "*i64", "starts": "*i64", "indices": "*i64", "decays": "*i8",
                     "tile_slot": "*i32",
                     "tile_num": "*i32", "table_ptr": "*u16", "c_ptr": "*fp32", "go_ptr": "*u8", "step": "i32",
                     "key0": "i32", "key1": "i32", "eps": "fp32", "scale": "fp32", "c1": "fp32", "d1": "fp32"}
        constexprs["PTR"] = _element_type(dtype)
    signature.update({k: "constexpr" for k in constexprs})
    return triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "enable_fp_fusion": FP_FUSION})


def apply_terms_(w: torch.Tensor, start: int, rule: MezoSGD, index: int, first_step: int, mode: int, *,
                 steps: Sequence[tuple[Sequence[tuple[int, float]], float]], decay: bool = False,
                 steps_per_launch: int = 256, block: int = BLOCK, native_bf16: bool | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
    """The multi-term P3 of spec/momentum.md on one tensor (or a contiguous slice holding elements start..):
    mode REPLAY runs P1, P2 and it for steps first_step.. (steps[j] = (terms, d)); RESTORE_UPDATE runs it
    for first_step alone. One launch per tensor (no grouped variant yet): each term's noise is made in
    registers, so a step of window K costs K + 1 Philox calls per block. Terms and d travel as small
    device tensors, uploaded per call (host floats: a momentum step's terms are known on the host)."""
    if not runs_on(w) or not w.is_contiguous():
        raise ValueError("the Triton kernel takes contiguous float32/bfloat16/float16 CUDA tensors "
                         "(CPU tensors only under TRITON_INTERPRET=1)")
    if mode not in (REPLAY, RESTORE_UPDATE, UPDATE_PERTURB):
        raise ValueError("the multi-term pass runs modes REPLAY, RESTORE_UPDATE and UPDATE_PERTURB")
    if w.numel() == 0 or not steps:
        return
    view = (w.view(torch.int16) if w.dtype == torch.bfloat16 else w).view(-1)
    table = _table(w.device)
    if native_bf16 is None:
        native_bf16 = native_bf16_default(w.device)
    meta = dict(DT=_dt_code(w.dtype, native_bf16), NOISE=NOISES[rule.noise], REPLAY_STEPS=mode == REPLAY,
                DECAY=bool(decay), BLOCK=block, NEXT_PERTURB=mode == UPDATE_PERTURB, enable_fp_fusion=FP_FUSION)
    for first in range(0, len(steps), steps_per_launch):
        part_steps = steps[first:first + steps_per_launch]
        offsets, tstep, tc = [0], [], []
        for terms, _ in part_steps:
            tstep.extend(s & 0xFFFFFFFF for s, _ in terms)
            tc.extend(c for _, c in terms)
            offsets.append(len(tstep))
        d = torch.tensor([y if decay else 0.0 for _, y in part_steps], dtype=torch.float32).to(w.device)
        toff = torch.tensor(offsets, dtype=torch.int32).to(w.device)
        ts = torch.tensor(tstep or [0], dtype=torch.int64).to(torch.int32 if max(tstep or [0]) < 2**31 else torch.int64)
        ts = ts.to(w.device)
        cs = torch.tensor(tc or [0.0], dtype=torch.float32).to(w.device)  # every c is a binary32 value: exact
        for part in range(0, w.numel(), _MAX_LAUNCH):
            n = min(_MAX_LAUNCH, w.numel() - part)
            base = start + part
            _terms_kernel[(triton.cdiv((base & 7) + n, block),)](
                view[part:], n, base >> 31, base & 0x7FFFFFFF, table, d, toff, ts, cs, len(part_steps),
                first_step + first, index, rule.seed & 0xFFFFFFFF, rule.seed >> 32, rule.eps, **meta)
        if progress is not None:
            progress(w.numel() * len(part_steps))


def apply_buffer_(w: torch.Tensor, state: torch.Tensor, start: int, rule: MezoSGD, index: int, first_step: int,
                  mode: int, *, constants: Sequence[tuple[float, float]], decay: bool = False,
                  steps_per_launch: int = 1024, block: int = BLOCK, native_bf16: bool | None = None,
                  progress: Callable[[int], None] | None = None) -> None:
    """mezo-momentum-buffer (spec/momentum.md) on one tensor (or a contiguous slice holding elements start..)
    and its float32 states `state` (w's element count, updated in place): REPLAY runs P1, P2 and the
    buffered P3 per step, RESTORE_UPDATE the buffered P3 of first_step. Launched with fusion off: beta*m is
    rounded before the sum, as the spec requires (no FMA)."""
    if not runs_on(w) or not w.is_contiguous():
        raise ValueError("the Triton kernel takes contiguous float32/bfloat16/float16 CUDA tensors "
                         "(CPU tensors only under TRITON_INTERPRET=1)")
    if mode not in (REPLAY, RESTORE_UPDATE, UPDATE_PERTURB):
        raise ValueError("the buffered pass runs modes REPLAY, RESTORE_UPDATE and UPDATE_PERTURB")
    if state.dtype != torch.float32 or not state.is_contiguous() or state.numel() != w.numel() or \
            state.device != w.device:
        raise ValueError("the momentum state must be a contiguous float32 tensor of the weights' size and device")
    if w.numel() == 0 or not constants:
        return
    view = (w.view(torch.int16) if w.dtype == torch.bfloat16 else w).view(-1)
    flat = state.view(-1)
    table = _table(w.device)
    if native_bf16 is None:
        native_bf16 = native_bf16_default(w.device)
    meta = dict(DT=_dt_code(w.dtype, native_bf16), NOISE=NOISES[rule.noise], REPLAY_STEPS=mode == REPLAY,
                DECAY=bool(decay), BLOCK=block, NEXT_PERTURB=mode == UPDATE_PERTURB, enable_fp_fusion=False)
    for first in range(0, len(constants), steps_per_launch):
        part = constants[first:first + steps_per_launch]
        c = torch.tensor([float(x) for x, _ in part], dtype=torch.float32).to(w.device)  # binary32 values: exact
        d = torch.tensor([y if decay else 0.0 for _, y in part], dtype=torch.float32).to(w.device)
        for at in range(0, w.numel(), _MAX_LAUNCH):
            n = min(_MAX_LAUNCH, w.numel() - at)
            base = start + at
            _buffer_kernel[(triton.cdiv((base & 7) + n, block),)](
                view[at:], flat[at:], n, base >> 31, base & 0x7FFFFFFF, table, c, d, len(part), first_step + first,
                index, rule.seed & 0xFFFFFFFF, rule.seed >> 32, rule.eps, rule.momentum, **meta)
        if progress is not None:
            progress(w.numel() * len(part))


def compile_momentum_for_gpu(kind: str, dtype: torch.dtype, *, replay: bool = True, decay: bool = True,
                             noise: str = "gaussian16", arch: int = 90, block: int = BLOCK, num_warps: int = 4):
    """compile_for_gpu for the momentum kernels (spec/momentum.md): kind "terms" (mezo-momentum's multi-term
    pass, fusion allowed: its products are exact) or "buffer" (mezo-momentum-buffer, fusion off: tests check
    that its PTX holds no fused multiply-add). Not under TRITON_INTERPRET."""
    if triton is None or interpreting():
        raise RuntimeError("compiling needs Triton, and TRITON_INTERPRET unset")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptr = {torch.float32: "*fp32", torch.bfloat16: "*i16", torch.float16: "*fp16"}[dtype]
    common = {"n": "i32", "base_hi": "i32", "base_lo": "i32", "table_ptr": "*u16"}
    if kind == "terms":
        kernel, fusion = _terms_kernel, FP_FUSION
        signature = {"w_ptr": ptr, **common, "d_ptr": "*fp32", "toff_ptr": "*i32", "tstep_ptr": "*i32",
                     "tc_ptr": "*fp32", "nsteps": "i32", "first_step": "i32", "tensor_index": "i32", "key0": "i32",
                     "key1": "i32", "eps": "fp32"}
    elif kind == "buffer":
        kernel, fusion = _buffer_kernel, False
        signature = {"w_ptr": ptr, "m_ptr": "*fp32", **common, "c_ptr": "*fp32", "d_ptr": "*fp32", "nsteps": "i32",
                     "first_step": "i32", "tensor_index": "i32", "key0": "i32", "key1": "i32", "eps": "fp32",
                     "beta": "fp32"}
    else:
        raise ValueError(f"unknown momentum kernel {kind!r}")
    constexprs = {"DT": _dt_code(dtype, arch >= 80), "NOISE": NOISES[noise], "REPLAY_STEPS": replay,
                  "DECAY": decay, "BLOCK": block, "NEXT_PERTURB": not replay}
    signature.update({k: "constexpr" for k in constexprs})
    return triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "enable_fp_fusion": fusion})


def apply_adam_(w: torch.Tensor, state: torch.Tensor | None, start: int, rule: MezoSGD, index: int, first_step: int,
                mode: int, *, steps: Sequence, steps_per_launch: int = 256, block: int = BLOCK,
                native_bf16: bool | None = None, progress: Callable[[int], None] | None = None) -> None:
    """mezo-adam(-buffer) (spec/adam.md) on one tensor (or a contiguous slice holding elements start..): mode
    REPLAY runs P1, P2 and Adam's P3 for steps first_step.. (steps[j]: an AdamStep, its d already 0 where the
    tensor has no decay); RESTORE_UPDATE its P3 of first_step; UPDATE_PERTURB that, then P1 of first_step + 1.
    state: mezo-adam-buffer's float32 m then v of w's elements (2 * numel, updated in place); None for
    mezo-adam. Launched with fusion off; division and square root are div_rn and sqrt_rn."""
    if not runs_on(w) or not w.is_contiguous():
        raise ValueError("the Triton kernel takes contiguous float32/bfloat16/float16 CUDA tensors "
                         "(CPU tensors only under TRITON_INTERPRET=1)")
    if mode not in (REPLAY, RESTORE_UPDATE, UPDATE_PERTURB):
        raise ValueError("the Adam pass runs modes REPLAY, RESTORE_UPDATE and UPDATE_PERTURB")
    n_all = w.numel()
    buffered = state is not None
    if buffered and (state.dtype != torch.float32 or not state.is_contiguous() or state.numel() != 2 * n_all
                     or state.device != w.device):
        raise ValueError("the mezo-adam-buffer state must be a contiguous float32 tensor of twice the weights' size")
    if n_all == 0 or not steps:
        return
    view = (w.view(torch.int16) if w.dtype == torch.bfloat16 else w).view(-1)
    flat = state.view(-1) if buffered else torch.zeros(2, dtype=torch.float32, device=w.device)
    table = _table(w.device)
    if native_bf16 is None:
        native_bf16 = native_bf16_default(w.device)
    decay = any(st.d for st in steps)
    meta = dict(DT=_dt_code(w.dtype, native_bf16), NOISE=NOISES[rule.noise], REPLAY_STEPS=mode == REPLAY,
                DECAY=decay, BLOCK=block, NEXT_PERTURB=mode == UPDATE_PERTURB, BUFFERED=buffered,
                enable_fp_fusion=False)
    f32 = dict(dtype=torch.float32)
    b1, b2 = rule.momentum, rule.beta2
    for first in range(0, len(steps), steps_per_launch):
        part_steps = steps[first:first + steps_per_launch]
        offsets, tstep, tcm, tcv = [0], [], [], []
        for st in part_steps:
            tstep.extend(s & 0xFFFFFFFF for s, _, _ in st.terms)
            tcm.extend(c for _, c, _ in st.terms)
            tcv.extend(c for _, _, c in st.terms)
            offsets.append(len(tstep))
        d = torch.tensor([st.d for st in part_steps], **f32).to(w.device)
        alpha = torch.tensor([st.alpha for st in part_steps], **f32).to(w.device)  # binary32 values: exact
        h = torch.tensor([st.h for st in part_steps], **f32).to(w.device)
        toff = torch.tensor(offsets, dtype=torch.int32).to(w.device)
        ts = torch.tensor(tstep or [0], dtype=torch.int64).to(torch.int32 if max(tstep or [0]) < 2**31 else torch.int64)
        ts = ts.to(w.device)
        cm = torch.tensor(tcm or [0.0], **f32).to(w.device)
        cv = torch.tensor(tcv or [0.0], **f32).to(w.device)
        for at in range(0, n_all, _MAX_LAUNCH):
            n = min(_MAX_LAUNCH, n_all - at)
            base = start + at
            mp = flat[at:] if buffered else flat
            vp = flat[n_all + at:] if buffered else flat
            _adam_kernel[(triton.cdiv((base & 7) + n, block),)](
                view[at:], mp, vp, n, base >> 31, base & 0x7FFFFFFF, table, d, alpha, h, toff, ts, cm, cv,
                len(part_steps), first_step + first, index, rule.seed & 0xFFFFFFFF, rule.seed >> 32, rule.eps,
                b1, 1.0 - b1, b2, 1.0 - b2, rule.adam_eps, **meta)
        if progress is not None:
            progress(n_all * len(part_steps))


def compile_adam_for_gpu(dtype: torch.dtype, *, buffered: bool, replay: bool = True, decay: bool = True,
                         noise: str = "gaussian16", arch: int = 90, block: int = BLOCK, num_warps: int = 4):
    """_adam_kernel compiled for an NVIDIA GPU (fusion off), for tests that read its PTX: div.rn.f32 and
    sqrt.rn.f32, no fma and no approx. Not under TRITON_INTERPRET."""
    if triton is None or interpreting():
        raise RuntimeError("compiling needs Triton, and TRITON_INTERPRET unset")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptr = {torch.float32: "*fp32", torch.bfloat16: "*i16", torch.float16: "*fp16"}[dtype]
    signature = {"w_ptr": ptr, "m_ptr": "*fp32", "v_ptr": "*fp32", "n": "i32", "base_hi": "i32", "base_lo": "i32",
                 "table_ptr": "*u16", "d_ptr": "*fp32", "alpha_ptr": "*fp32", "h_ptr": "*fp32", "toff_ptr": "*i32",
                 "tstep_ptr": "*i32", "tcm_ptr": "*fp32", "tcv_ptr": "*fp32", "nsteps": "i32", "first_step": "i32",
                 "tensor_index": "i32", "key0": "i32", "key1": "i32", "eps": "fp32", "b1": "fp32", "u1": "fp32",
                 "b2": "fp32", "u2": "fp32", "delta": "fp32"}
    constexprs = {"DT": _dt_code(dtype, arch >= 80), "NOISE": NOISES[noise], "REPLAY_STEPS": replay,
                  "DECAY": decay, "BLOCK": block, "NEXT_PERTURB": not replay, "BUFFERED": buffered}
    signature.update({k: "constexpr" for k in constexprs})
    return triton.compile(ASTSource(_adam_kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "enable_fp_fusion": False})
