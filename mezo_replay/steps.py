"""The element phases of spec/rule.md in torch, applied to whole tensors slice by slice, for training
and for replay alike.

Training and replay run this same code, so they cannot disagree. Slicing bounds the temporaries
(noise and Philox words) to a few slices' worth, whatever the tensor's size, and is invisible in the
result because every element's noise depends only on its own index (spec/generator.md).
R_D is torch's copy_ from float32: bf16 and f16 round to nearest even and keep subnormals.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from . import cpu_kernel
from .noise import noise
from .rule import MezoSGD

BACKENDS = ("auto", "torch", "compiled")
_backend = "auto"


def set_backend(name: str) -> str:
    """auto: the compiled kernel for CPU tensors when it is built, torch otherwise; torch: always the
    torch path; compiled: the kernel, falling back to torch with a warning when it is not built. All
    give the same bits: the choice is only about speed. Returns the backend CPU tensors will use."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "compiled" and not cpu_kernel.available():
        warnings.warn("the compiled CPU kernel is not built (no C compiler at install?): using the torch path, "
                      "with the same results", stacklevel=2)
    _backend = name
    return "compiled" if name != "torch" and cpu_kernel.available() else "torch"


def _compiled(w: torch.Tensor) -> bool:
    return w.device.type == "cpu" and _backend != "torch" and w.dtype in cpu_kernel.DTYPES and cpu_kernel.available()


_pools: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="mezo-replay")
    return _pools[threads]


StepConstants = tuple[float, float]  # (c, d) of one step: update coefficient and decay factor


def perturb_(w: torch.Tensor, z: torch.Tensor, scale: float) -> None:
    """P1 (scale = eps) and P2 (scale = -2 eps): w = R_D(fl32(w + scale*z)); scale*z is exact."""
    w.copy_(w.to(torch.float32) + z * scale)


def _decay(s: torch.Tensor, d: float) -> torch.Tensor:
    """DECAY(s): s - d*s_hi - d*s_lo with 12-bit halves, so both products are exact binary32 numbers."""
    hi = (s.view(torch.int32) & -4096).view(torch.float32)  # clear the low 12 bits of the pattern
    decayed = (s - hi * d) - (s - hi) * d
    return torch.where(torch.isfinite(s) & (s.abs() >= 2.0**-60), decayed, s)


def restore_update_(w: torch.Tensor, z: torch.Tensor, eps: float, c: float, d: float = 0.0) -> None:
    """P3: w = R_D(fl32(DECAY(fl32(w + eps*z)) - c*z)), the restore, decay and update in one pass."""
    s = w.to(torch.float32) + z * eps
    if d:
        s = _decay(s, d)
    w.copy_(s - z * c)


def default_slice(device: torch.device) -> int:
    return 1 << 24 if device.type == "cuda" else 1 << 18


def _flat_slices(w: torch.Tensor, size: int) -> Iterator[tuple[int, torch.Tensor]]:
    flat = w.view(-1)
    for start in range(0, flat.numel(), size):
        yield start, flat[start:start + size]


def _in_place(w: torch.Tensor, fn: Callable[[torch.Tensor], None]) -> None:
    """Runs fn on a contiguous view; element indices are row-major whatever w's strides are."""
    if w.is_contiguous():
        fn(w)
    else:
        work = w.contiguous()
        fn(work)
        w.copy_(work)


def step_constants(rule: MezoSGD, grad_bits: Sequence[int], first_step: int = 0) -> list[StepConstants]:
    """(c, d) for each recorded step, computed once and shared by every tensor of a replay."""
    return [(rule.coefficient(first_step + j, int(b)), rule.decay(first_step + j))
            for j, b in enumerate(grad_bits)]


def _apply_(w: torch.Tensor, rule: MezoSGD, index: int, first_step: int, mode: int,
            constants: Sequence[StepConstants], scale: float = 0.0, slice_size: int | None = None,
            progress: Callable[[int], None] | None = None) -> None:
    """The one dispatcher: the compiled kernel for CPU tensors when chosen, the torch phases otherwise.

    mode REPLAY runs P1, P2, P3 for every step in `constants`; PERTURB adds scale*z of `first_step`;
    RESTORE_UPDATE runs P3 of `first_step` with constants[0]. `progress` gets element-steps done.
    """
    def torch_slice(start: int, s: torch.Tensor) -> None:
        for j, (c, d) in enumerate(constants):
            z = noise(rule.noise, rule.seed, first_step + j, index, start, s.numel(), s.device)
            if mode == cpu_kernel.PERTURB:
                perturb_(s, z, scale)
                continue
            if mode == cpu_kernel.REPLAY:
                perturb_(s, z, rule.eps)
                perturb_(s, z, -2.0 * rule.eps)
            restore_update_(s, z, rule.eps, c, d)

    def run(t: torch.Tensor) -> None:
        if _compiled(t):  # ctypes releases the GIL: slices run on torch's CPU threads
            threads = max(1, torch.get_num_threads())
            size = max(1 << 16, min(1 << 20, -(-t.numel() // threads)))
            work = (lambda p: cpu_kernel.apply_(p[1], p[0], rule, index, first_step, mode, constants=constants,
                                                scale=scale) or p[1])
            parts = list(_flat_slices(t, size))
            done = map(work, parts) if len(parts) == 1 else _pool(threads).map(work, parts)  # small: no hop
        else:
            done = (torch_slice(start, s) or s for start, s in _flat_slices(t, slice_size or default_slice(t.device)))
        for s in done:
            if progress is not None:
                progress(s.numel() * len(constants))

    _in_place(w, run)


def perturb_tensor_(w: torch.Tensor, rule: MezoSGD, step: int, index: int, scale: float,
                    slice_size: int | None = None) -> None:
    """P1 (scale = eps) or P2 (scale = -2 eps) of one step on one tuned tensor."""
    _apply_(w, rule, index, step, cpu_kernel.PERTURB, [(0.0, 0.0)], scale, slice_size)


def restore_update_tensor_(w: torch.Tensor, rule: MezoSGD, step: int, index: int, c: float, d: float = 0.0,
                           slice_size: int | None = None) -> None:
    """P3 of one step on one tuned tensor (d: its decay factor, 0 for tensors without decay)."""
    _apply_(w, rule, index, step, cpu_kernel.RESTORE_UPDATE, [(c, d)], slice_size=slice_size)


def replay_tensor_(w: torch.Tensor, rule: MezoSGD, index: int, constants: Sequence[StepConstants], *,
                   decay: bool = False, first_step: int = 0, slice_size: int | None = None,
                   progress: Callable[[int], None] | None = None) -> None:
    """Steps first_step, first_step+1, ... of one tuned tensor, in place.

    Each slice runs all its steps before the next slice starts, so the noise of a step is drawn once
    for its three phases and the slice stays in cache.
    """
    if constants:
        _apply_(w, rule, index, first_step, cpu_kernel.REPLAY, [(c, d if decay else 0.0) for c, d in constants],
                slice_size=slice_size, progress=progress)
