"""The compiled CPU path: a ctypes binding of _cpu_kernel.c (built at install when a C compiler exists).

Why C through ctypes: the arithmetic is a few integer and float operations per element that numpy and
torch can only run as separate passes over memory; one C loop keeps each chunk in L1 across many steps.
It needs no new dependency (numba would add LLVM; torch.compile would need a compiler at run time and may
reorder what the spec fixes), and it builds with the compiler that CPython's own extensions use. The C
holds one source for every vector width; the widest instruction set the CPU has is picked at run time.
"""
from __future__ import annotations

import ctypes
import importlib.machinery
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ..arithmetic.noise import gauss16_table
from ..arithmetic.rule import MezoSGD

DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
NOISES = {"gaussian16": 0, "rademacher16": 1}
REPLAY, PERTURB, RESTORE_UPDATE, UPDATE_PERTURB = 0, 1, 2, 3
ISAS = ("generic", "avx2", "avx512")  # the kernel's builds, narrowest first (generic: SSE2 on x86-64)
_D = ctypes.POINTER(ctypes.c_double)


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_cpu_kernel{suffix}"
        if path.exists():
            lib = ctypes.CDLL(str(path))
            if not hasattr(lib, "mezo_best_isa") or not hasattr(lib, "mezo_apply_terms") or \
                    not hasattr(lib, "mezo_apply_buffer"):  # a build of an older source: rebuild with pip install
                return None
            lib.mezo_best_isa.restype = ctypes.c_int
            lib.mezo_best_isa.argtypes = []
            lib.mezo_apply.restype = None
            lib.mezo_apply.argtypes = [
                ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint64,
                ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int64, _D, _D, ctypes.c_double, ctypes.c_double,
                ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_int]
            lib.mezo_apply_terms.restype = ctypes.c_int
            lib.mezo_apply_terms.argtypes = [
                ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint64,
                ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int64, _D, ctypes.c_double, ctypes.c_int,
                ctypes.POINTER(ctypes.c_float), ctypes.c_int, ctypes.POINTER(ctypes.c_int64),
                ctypes.POINTER(ctypes.c_uint32), _D, ctypes.c_int]
            if hasattr(lib, "mezo_apply_adam"):  # spec/adam.md; absent from an older build (apply_adam_ says so)
                lib.mezo_apply_adam.restype = ctypes.c_int
                lib.mezo_apply_adam.argtypes = [
                    ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint64,
                    ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int64, _D, ctypes.c_double, ctypes.c_int,
                    ctypes.POINTER(ctypes.c_float), ctypes.c_int, ctypes.POINTER(ctypes.c_int64),
                    ctypes.POINTER(ctypes.c_uint32), _D, _D, _D, _D, ctypes.c_double, ctypes.c_double,
                    ctypes.c_double, ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_float), ctypes.c_int]
            lib.mezo_apply_buffer.restype = None
            lib.mezo_apply_buffer.argtypes = [
                ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint64,
                ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int64, _D, _D, ctypes.c_double, ctypes.c_double,
                ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
            return lib
    return None


def available() -> bool:
    return _library() is not None


@lru_cache(maxsize=1)
def isas() -> tuple[str, ...]:
    """The instruction sets the kernel can run with on this CPU, narrowest first; the last is used."""
    lib = _library()
    return ISAS[:lib.mezo_best_isa() + 1] if lib is not None else ()


def _checked(w: torch.Tensor, mode: int, modes: tuple[int, ...], what: str, isa: str | None) -> tuple[Any, int]:
    """(library, ISA index) for one call on slice w, after the checks every entry point makes."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the compiled CPU kernel is not built")
    have = isas()
    if isa is not None and isa not in have:
        raise ValueError(f"this CPU runs the kernel with {', '.join(have)}, not {isa!r}")
    if mode not in modes:
        raise ValueError(f"{what} {mode!r}")
    if w.device.type != "cpu" or not w.is_contiguous() or w.dtype not in DTYPES:
        raise ValueError("the compiled kernel takes contiguous float32/bfloat16/float16 CPU tensors")
    return lib, have.index(isa) if isa is not None else len(have) - 1


def apply_(w: torch.Tensor, start: int, rule: MezoSGD, index: int, first_step: int, mode: int, *,
           constants: Sequence[tuple[float, float]] = ((0.0, 0.0),), scale: float = 0.0,
           isa: str | None = None) -> None:
    """One call of the kernel on a contiguous CPU slice holding elements start.. of tensor `index`.

    isa: one of isas() (all give the same bits; the tests run each); None takes the widest.
    UPDATE_PERTURB runs P3 of first_step with constants[0], then P1 of first_step + 1 (scale eps), in one
    pass: the bytes of RESTORE_UPDATE then PERTURB. c and d are host floats: for a CPU tensor float(c) of
    a 0-dim tensor is free, so the kernel has no device-memory variant.
    """
    lib, isa_index = _checked(w, mode, (REPLAY, PERTURB, RESTORE_UPDATE, UPDATE_PERTURB), "unknown kernel mode", isa)
    c = (ctypes.c_double * len(constants))(*(x for x, _ in constants))
    d = (ctypes.c_double * len(constants))(*(y for _, y in constants))
    table = gauss16_table(torch.device("cpu"))
    lib.mezo_apply(isa_index, w.data_ptr(), DTYPES[w.dtype], w.numel(), start, rule.seed, index, first_step,
                   len(constants), c, d, rule.eps, scale, NOISES[rule.noise],
                   ctypes.cast(table.data_ptr(), ctypes.POINTER(ctypes.c_float)), mode)


Terms = Sequence[tuple[int, float]]  # (noise step, coefficient) of a multi-term P3, in order


def apply_terms_(w: torch.Tensor, start: int, rule: MezoSGD, index: int, first_step: int, mode: int, *,
                 steps: Sequence[tuple[Terms, float]], isa: str | None = None) -> None:
    """The multi-term P3 of spec/momentum.md on a contiguous CPU slice: mode REPLAY runs P1, P2 and it for
    steps first_step.. (steps[j] = (terms, d) of step first_step + j); RESTORE_UPDATE runs it for
    first_step alone (steps[0]); UPDATE_PERTURB that, then P1 of first_step + 1, in one pass. The chunk keeps the noise of the last steps a term names in a ring as
    wide as the longest term list, so a momentum replay draws each step's noise once per chunk."""
    lib, isa_index = _checked(w, mode, (REPLAY, RESTORE_UPDATE, UPDATE_PERTURB),
                              "the multi-term pass runs modes REPLAY, RESTORE_UPDATE and UPDATE_PERTURB, not", isa)
    offsets, tstep, tc = [0], [], []
    for terms, _ in steps:
        tstep.extend(s & 0xFFFFFFFF for s, _ in terms)
        tc.extend(c for _, c in terms)
        offsets.append(len(tstep))
    ring = max(1, min(64, max(len(terms) for terms, _ in steps)))
    d = (ctypes.c_double * len(steps))(*(y for _, y in steps))
    table = gauss16_table(torch.device("cpu"))
    rc = lib.mezo_apply_terms(
        isa_index, w.data_ptr(), DTYPES[w.dtype], w.numel(), start,
        rule.seed, index, first_step, len(steps), d, rule.eps, NOISES[rule.noise],
        ctypes.cast(table.data_ptr(), ctypes.POINTER(ctypes.c_float)), mode,
        (ctypes.c_int64 * len(offsets))(*offsets), (ctypes.c_uint32 * max(1, len(tstep)))(*tstep),
        (ctypes.c_double * max(1, len(tc)))(*tc), ring)
    if rc != 0:
        raise MemoryError("the compiled kernel could not allocate its noise ring")


def apply_buffer_(w: torch.Tensor, state: torch.Tensor, start: int, rule: MezoSGD, index: int, first_step: int,
                  mode: int, *, constants: Sequence[tuple[float, float]], isa: str | None = None) -> None:
    """mezo-momentum-buffer (spec/momentum.md) on a contiguous CPU slice and its float32 states (same
    element count, updated in place): REPLAY runs P1, P2 and the buffered P3 per step; RESTORE_UPDATE
    the buffered P3 of first_step with constants[0]; UPDATE_PERTURB that, then P1 of first_step + 1."""
    lib, isa_index = _checked(w, mode, (REPLAY, RESTORE_UPDATE, UPDATE_PERTURB),
                              "the buffered pass runs modes REPLAY, RESTORE_UPDATE and UPDATE_PERTURB, not", isa)
    if state.dtype != torch.float32 or not state.is_contiguous() or state.numel() != w.numel() or \
            state.device.type != "cpu":
        raise ValueError("the momentum state must be a contiguous float32 CPU tensor of the weights' size")
    c = (ctypes.c_double * len(constants))(*(x for x, _ in constants))
    d = (ctypes.c_double * len(constants))(*(y for _, y in constants))
    table = gauss16_table(torch.device("cpu"))
    lib.mezo_apply_buffer(isa_index, w.data_ptr(), DTYPES[w.dtype], w.numel(), start, rule.seed, index, first_step,
                          len(constants), c, d, rule.eps, rule.momentum, NOISES[rule.noise],
                          ctypes.cast(table.data_ptr(), ctypes.POINTER(ctypes.c_float)), mode,
                          ctypes.cast(state.data_ptr(), ctypes.POINTER(ctypes.c_float)))


def apply_adam_(w: torch.Tensor, m: torch.Tensor | None, v: torch.Tensor | None, start: int, rule: MezoSGD,
                index: int, first_step: int, mode: int, *, steps: Sequence[Any], isa: str | None = None) -> None:
    """mezo-adam(-buffer) (spec/adam.md) on a contiguous CPU slice: steps[j] is step first_step + j's
    AdamStep (terms, alpha, h, d). m, v: mezo-adam-buffer's float32 states of the slice (updated in place),
    None for mezo-adam, whose chunks keep the noise of the window's steps in a ring. Modes as apply_terms_."""
    lib, isa_index = _checked(w, mode, (REPLAY, RESTORE_UPDATE, UPDATE_PERTURB),
                              "the Adam pass runs modes REPLAY, RESTORE_UPDATE and UPDATE_PERTURB, not", isa)
    if not hasattr(lib, "mezo_apply_adam"):
        raise RuntimeError("the compiled CPU kernel predates mezo-adam: rebuild it (pip install -e .)")
    for s in (m, v):
        if s is not None and (s.dtype != torch.float32 or not s.is_contiguous() or s.numel() != w.numel()
                              or s.device.type != "cpu"):
            raise ValueError("the Adam states must be contiguous float32 CPU tensors of the weights' size")
    offsets, tstep, tcm, tcv = [0], [], [], []
    for st in steps:
        tstep.extend(s & 0xFFFFFFFF for s, _, _ in st.terms)
        tcm.extend(c for _, c, _ in st.terms)
        tcv.extend(c for _, _, c in st.terms)
        offsets.append(len(tstep))
    ring = 1 if m is not None else max(1, min(64, max(len(st.terms) for st in steps)))
    k = len(steps)
    dbl = ctypes.c_double
    fptr = ctypes.POINTER(ctypes.c_float)
    table = gauss16_table(torch.device("cpu"))
    rc = lib.mezo_apply_adam(
        isa_index, w.data_ptr(), DTYPES[w.dtype], w.numel(), start, rule.seed, index, first_step, k,
        (dbl * k)(*(st.d for st in steps)), rule.eps, NOISES[rule.noise], ctypes.cast(table.data_ptr(), fptr), mode,
        (ctypes.c_int64 * len(offsets))(*offsets), (ctypes.c_uint32 * max(1, len(tstep)))(*tstep),
        (dbl * max(1, len(tcm)))(*tcm), (dbl * max(1, len(tcv)))(*tcv), (dbl * k)(*(st.alpha for st in steps)),
        (dbl * k)(*(st.h for st in steps)), rule.momentum, rule.beta2, rule.adam_eps,
        None if m is None else ctypes.cast(m.data_ptr(), fptr), None if v is None else ctypes.cast(v.data_ptr(), fptr),
        ring)
    if rc != 0:
        raise MemoryError("the compiled kernel could not allocate its noise ring")
