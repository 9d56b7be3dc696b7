"""The element phases of spec/rule.md as Triton kernels: noise made in registers, never stored.

Why Triton: one Python-level source compiles for every recent NVIDIA GPU (and AMD's), and the same
source runs on the CPU under Triton's interpreter (TRITON_INTERPRET=1), so CI tests the very logic the
GPU runs, bit for bit against the numpy reference, on machines without a GPU.

One tile body, three modes (the same as the compiled CPU kernel's), launched per tensor (`apply_`) or,
for training, over all tensors of a dtype at once (`apply_group_`):
- PERTURB: P1 or P2 of one step (training);
- RESTORE_UPDATE: P3 of one step, restore, decay and update fused (training);
- REPLAY: P1, P2 and P3 of many steps: each program loads its tile once, runs every step in registers
  and stores once (reconstruction).

Exactness (spec/rule.md): every product is exact in binary32, so contraction into FMAs cannot change
a bit, and the kernels are launched with it allowed (FP_FUSION): an FMA saves an instruction per
phase; GPU tests hold the result to the reference. R_D for bfloat16 is the spec's
integer rounding rather than a conversion instruction, because Triton's interpreter truncates where
GPUs round, and the integer form is the same everywhere. Float16 uses the round-to-nearest-even
conversion, which both the GPU and the interpreter (numpy) implement with subnormals.
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

REPLAY, PERTURB, RESTORE_UPDATE = 0, 1, 2  # the same codes as cpu_kernel's
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
        GPU only, since the interpreter truncates): tests hold it to DT 1's bits on the GPU.
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
    def _element_step(w, u, table_ptr, eps, scale, c, d,
                      DT: tl.constexpr, NOISE: tl.constexpr, MODE: tl.constexpr, DECAY: tl.constexpr):
        """One step of one mode on elements whose 16 random bits are u (int32), in binary32."""
        if NOISE == 0:
            z = (tl.load(table_ptr + u).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            z = tl.where(u < 32768, -1.0, 1.0)
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
    def _tile(w_ptr, n, base, pid, table_ptr, c_ptr, d_ptr, nsteps, first_step, k_idx, k0, k1, eps, scale, c1, d1,
              decay_on, DT: tl.constexpr, NOISE: tl.constexpr, MODE: tl.constexpr, DECAY: tl.constexpr,
              BLOCK: tl.constexpr):
        """Tile `pid` of elements base .. base+n-1 of one tensor, stored contiguously at w_ptr.

        A tile holds BLOCK/8 Philox blocks as eight [BLOCK/8] tensors, the j-th holding element 8b+j of
        each block b: one Philox call per thread feeds its own 8 elements, and every tensor shares one
        layout, so nothing moves between threads. Tiles are aligned to Philox blocks in index space,
        so an unaligned `base` (a slice starting mid-block) only masks the edges. bfloat16 arrives as
        int16. decay_on (runtime) selects decay where DECAY (compile time) allows it.
        """
        blocks = (base >> 3) + pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8).to(tl.int64)
        o = blocks * 8 - base  # offset of each block's element 0 from w_ptr
        p = w_ptr + o
        m0, m1, m2, m3 = (o >= 0) & (o < n), (o >= -1) & (o < n - 1), (o >= -2) & (o < n - 2), (o >= -3) & (o < n - 3)
        m4, m5, m6, m7 = (o >= -4) & (o < n - 4), (o >= -5) & (o < n - 5), (o >= -6) & (o < n - 6), (o >= -7) & (o < n - 7)
        w0, w1, w2, w3 = _load(p, m0, DT), _load(p + 1, m1, DT), _load(p + 2, m2, DT), _load(p + 3, m3, DT)
        w4, w5, w6, w7 = _load(p + 4, m4, DT), _load(p + 5, m5, DT), _load(p + 6, m6, DT), _load(p + 7, m7, DT)
        n0, n1, n2, n3, n4, n5, n6, n7 = w0 != w0, w1 != w1, w2 != w2, w3 != w3, w4 != w4, w5 != w5, w6 != w6, w7 != w7
        steps = 1
        if MODE == 0:
            steps = nsteps
        for j in range(steps):
            c = c1
            d = d1
            if MODE == 0:
                c = tl.load(c_ptr + j)
                d = tl.load(d_ptr + j)
            d = tl.where(decay_on, d, 0.0)
            x0, x1, x2, x3 = _philox(blocks, k_idx, (first_step + j).to(tl.uint32), k0, k1)
            # element 8b+j takes the low (even j) or high (odd j) half of word j // 2
            w0 = _element_step(w0, (x0 & 0xFFFF).to(tl.int32), table_ptr, eps, scale, c, d, DT, NOISE, MODE, DECAY)
            w1 = _element_step(w1, (x0 >> 16).to(tl.int32), table_ptr, eps, scale, c, d, DT, NOISE, MODE, DECAY)
            w2 = _element_step(w2, (x1 & 0xFFFF).to(tl.int32), table_ptr, eps, scale, c, d, DT, NOISE, MODE, DECAY)
            w3 = _element_step(w3, (x1 >> 16).to(tl.int32), table_ptr, eps, scale, c, d, DT, NOISE, MODE, DECAY)
            w4 = _element_step(w4, (x2 & 0xFFFF).to(tl.int32), table_ptr, eps, scale, c, d, DT, NOISE, MODE, DECAY)
            w5 = _element_step(w5, (x2 >> 16).to(tl.int32), table_ptr, eps, scale, c, d, DT, NOISE, MODE, DECAY)
            w6 = _element_step(w6, (x3 & 0xFFFF).to(tl.int32), table_ptr, eps, scale, c, d, DT, NOISE, MODE, DECAY)
            w7 = _element_step(w7, (x3 >> 16).to(tl.int32), table_ptr, eps, scale, c, d, DT, NOISE, MODE, DECAY)
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
    def _kernel(w_ptr, n, base_hi, base_lo, table_ptr, c_ptr, d_ptr, nsteps, first_step, tensor_index, key0, key1,
                eps, scale, c1, d1,
                DT: tl.constexpr, NOISE: tl.constexpr, MODE: tl.constexpr, DECAY: tl.constexpr,
                BLOCK: tl.constexpr):
        """One tensor (or a contiguous run of one), base = base_hi * 2^31 + base_lo: Triton types an
        integer argument by its value, and one typed unsigned 32-bit does not widen the same way
        everywhere (the interpreter differs), so the 64-bit index travels as two halves."""
        base = (base_hi.to(tl.int64) << 31) + base_lo.to(tl.int64)
        _tile(w_ptr, n, base, tl.program_id(0).to(tl.int64), table_ptr, c_ptr, d_ptr, nsteps, first_step,
              tensor_index.to(tl.uint32), key0.to(tl.uint32), key1.to(tl.uint32), eps, scale, c1, d1, True,
              DT, NOISE, MODE, DECAY, BLOCK)

    @triton.jit(do_not_specialize=["step", "key0", "key1"])
    def _group_kernel(ptrs, sizes, indices, decays, tile_slot, tile_num, table_ptr, step, key0, key1,
                      eps, scale, c1, d1,
                      DT: tl.constexpr, NOISE: tl.constexpr, MODE: tl.constexpr, DECAY: tl.constexpr,
                      BLOCK: tl.constexpr, PTR: tl.constexpr):
        """One training phase over many tensors of one dtype in one launch: program i takes tile
        tile_num[i] of tensor tile_slot[i], whose address, size, trajectory index and decay flag come
        from the per-tensor tables. A model has hundreds of tensors, most of them small; a launch per
        tensor would cost more than the arithmetic."""
        pid = tl.program_id(0)
        slot = tl.load(tile_slot + pid)
        w_ptr = tl.load(ptrs + slot).to(tl.pointer_type(PTR))
        _tile(w_ptr, tl.load(sizes + slot), 0, tl.load(tile_num + pid).to(tl.int64), table_ptr, table_ptr,
              table_ptr, 1, step, tl.load(indices + slot).to(tl.uint32), key0.to(tl.uint32), key1.to(tl.uint32),
              eps, scale, c1, d1, tl.load(decays + slot) != 0, DT, NOISE, MODE, DECAY, BLOCK)
else:
    _kernel = None

def _dt_code(dtype: torch.dtype, native_bf16: bool = False) -> int:
    """The kernels' DT: 0 float32, 1 bfloat16 (integer rounding), 2 float16, 3 bfloat16 (hardware)."""
    return 3 if native_bf16 and dtype == torch.bfloat16 else DTYPES[dtype]


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


def apply_(w: torch.Tensor, start: int, rule: MezoSGD, index: int, first_step: int, mode: int, *,
           constants: Sequence[tuple[float, float]] = ((0.0, 0.0),), decay: bool = False,
           scale: float = 0.0, steps_per_launch: int = 1024, block: int = BLOCK, num_warps: int = 4,
           native_bf16: bool = False, progress: Callable[[int], None] | None = None) -> None:
    """One tensor (or contiguous slice holding elements start..) through the kernel, in place.

    REPLAY launches cover `steps_per_launch` steps each, so each tile is read and written once per
    launch and progress can be reported between launches. block, num_warps and native_bf16 are for
    benchmarks: the bits are the same for any value.
    """
    if not runs_on(w) or not w.is_contiguous():
        raise ValueError("the Triton kernel takes contiguous float32/bfloat16/float16 CUDA tensors "
                         "(CPU tensors only under TRITON_INTERPRET=1)")
    if w.numel() == 0:
        return
    view = (w.view(torch.int16) if w.dtype == torch.bfloat16 else w).view(-1)
    table = _table(w.device)
    if mode == REPLAY:
        c_all, d_all = _device_constants(constants, decay, w.device)
    else:  # single steps pass c and d as scalars: nothing to upload per tensor per step
        c_all = d_all = _device_constants(((0.0, 0.0),), False, w.device)[0]
    c1, d1 = constants[0] if mode == RESTORE_UPDATE else (0.0, 0.0)
    meta = dict(DT=_dt_code(w.dtype, native_bf16), NOISE=NOISES[rule.noise],
                MODE=mode, DECAY=bool(decay) and mode != PERTURB, BLOCK=block, num_warps=num_warps,
                enable_fp_fusion=FP_FUSION)
    total = len(constants) if mode == REPLAY else 1
    for first in range(0, total, steps_per_launch):
        count = min(steps_per_launch, total - first)
        for part in range(0, w.numel(), _MAX_LAUNCH):  # n and offsets stay in int32
            n = min(_MAX_LAUNCH, w.numel() - part)
            base = start + part
            _kernel[(triton.cdiv((base & 7) + n, block),)](
                view[part:], n, base >> 31, base & 0x7FFFFFFF, table, c_all[first:], d_all[first:], count,
                first_step + first, index, rule.seed & 0xFFFFFFFF, rule.seed >> 32, rule.eps, scale, c1,
                d1 if decay else 0.0, **meta)
        if progress is not None:
            progress(w.numel() * count)


_groups: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _group_tables(tensors: Sequence[torch.Tensor], indices: Sequence[int], decays: Sequence[bool],
                  block: int) -> tuple[torch.Tensor, ...]:
    """Per-tensor (address, size, index, decay) and per-tile (tensor slot, tile number) device tables,
    built once: a training run's tensors keep their storage from step to step."""
    key = (tuple((t.data_ptr(), t.numel()) for t in tensors), tuple(indices), tuple(decays), block)
    if key not in _groups:
        device = tensors[0].device
        sizes = torch.tensor([t.numel() for t in tensors], dtype=torch.int64)
        tiles = (sizes + block - 1) // block
        slot = torch.repeat_interleave(torch.arange(len(tensors), dtype=torch.int32), tiles)
        num = torch.arange(int(tiles.sum()), dtype=torch.int32) - torch.repeat_interleave(
            (torch.cumsum(tiles, 0) - tiles).to(torch.int32), tiles)
        tables = (torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64), sizes,
                  torch.tensor(list(indices), dtype=torch.int64), torch.tensor(list(decays), dtype=torch.int8),
                  slot, num)
        if len(_groups) > 4:
            _groups.clear()
        _groups[key] = tuple(x.to(device) for x in tables)
    return _groups[key]


def apply_group_(tensors: Sequence[torch.Tensor], indices: Sequence[int], decays: Sequence[bool], rule: MezoSGD,
                 step: int, mode: int, *, c: float = 0.0, d: float = 0.0, scale: float = 0.0,
                 block: int = BLOCK) -> None:
    """PERTURB or RESTORE_UPDATE of one step on whole tensors (tensors[i] is trajectory tensor
    indices[i]), one launch per dtype. Tensors must be contiguous; decays[i] says whether tensor i
    takes the decay d."""
    if mode == REPLAY:
        raise ValueError("replay runs tensor by tensor (apply_), many steps per launch")
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        if not runs_on(t) or not t.is_contiguous():
            raise ValueError("the Triton kernel takes contiguous float32/bfloat16/float16 CUDA tensors")
        if t.numel():
            by_dtype.setdefault(t.dtype, []).append(i)
    for dtype, members in by_dtype.items():
        ts = [tensors[i] for i in members]
        ptrs, sizes, idx, dec, slot, num = _group_tables(ts, [indices[i] for i in members],
                                                         [bool(decays[i]) for i in members], block)
        ptr = _element_type(dtype)
        _group_kernel[(slot.numel(),)](
            ptrs, sizes, idx, dec, slot, num, _table(ts[0].device), step, rule.seed & 0xFFFFFFFF, rule.seed >> 32,
            rule.eps, scale, c, d, DT=DTYPES[dtype], NOISE=NOISES[rule.noise], MODE=mode,
            DECAY=mode == RESTORE_UPDATE and any(decays[i] for i in members), BLOCK=block, PTR=ptr,
            enable_fp_fusion=FP_FUSION)


def compile_for_gpu(dtype: torch.dtype, mode: int, *, noise: str = "gaussian16", decay: bool = False,
                    arch: int = 90, block: int = BLOCK, num_warps: int = 4, native_bf16: bool = False,
                    group: bool = False):
    """Compiles the kernel for an NVIDIA GPU of compute capability `arch` on a machine without one
    (Triton ships ptxas): tests check that every variant builds and that its PTX flushes no
    subnormals; tools/roofline.py counts its machine instructions. Not under TRITON_INTERPRET."""
    if triton is None or interpreting():
        raise RuntimeError("compiling needs Triton, and TRITON_INTERPRET unset")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptr = {torch.float32: "*fp32", torch.bfloat16: "*i16", torch.float16: "*fp16"}[dtype]
    signature = {"w_ptr": ptr, "n": "i32", "base_hi": "i32", "base_lo": "i32", "table_ptr": "*u16",
                 "c_ptr": "*fp32", "d_ptr": "*fp32", "nsteps": "i32", "first_step": "i32", "tensor_index": "i32",
                 "key0": "i32", "key1": "i32", "eps": "fp32", "scale": "fp32", "c1": "fp32", "d1": "fp32"}
    dt = _dt_code(dtype, native_bf16)
    constexprs = {"DT": dt, "NOISE": NOISES[noise], "MODE": mode, "DECAY": decay, "BLOCK": block}
    kernel = _kernel
    if group:  # the grouped training kernel (apply_group_)
        kernel = _group_kernel
        signature = {"ptrs": "*i64", "sizes": "*i64", "indices": "*i64", "decays": "*i8", "tile_slot": "*i32",
                     "tile_num": "*i32", "table_ptr": "*u16", "step": "i32", "key0": "i32", "key1": "i32",
                     "eps": "fp32", "scale": "fp32", "c1": "fp32", "d1": "fp32"}
        constexprs["PTR"] = _element_type(dtype)
    signature.update({k: "constexpr" for k in constexprs})
    return triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "enable_fp_fusion": FP_FUSION})
