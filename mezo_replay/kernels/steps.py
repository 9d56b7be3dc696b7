"""The element phases of spec/rule.md in torch, applied to whole tensors slice by slice, for training
and for replay alike.

Training and replay run this same code, so they cannot disagree. Slicing bounds the temporaries
(noise and Philox words) to a few slices' worth, whatever the tensor's size, and is invisible in the
result because every element's noise depends only on its own index (spec/generator.md).
R_D is torch's copy_ from float32: bf16 and f16 round to nearest even and keep subnormals.
For the same reason a rank holding only a contiguous run of a tensor (FSDP2's dim-0 shard) passes the
index of its first element (`start`, `starts`) and gets exactly the bytes of the whole tensor there.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import cpu_kernel, triton_kernels
from ..format.mzt import _rs, invalid_perturbation_steps, invalid_steps, step_coefficients, step_rates
from ..arithmetic.noise import noise
from ..arithmetic.rule import AdamHost, AdamStep, MezoSGD

BACKENDS = ("auto", "torch", "compiled", "triton")
UPDATE_PERTURB = cpu_kernel.UPDATE_PERTURB  # P3 of a step fused with P1 of the next (both kernels' code 3)
_backend = "auto"
_warned: set[str] = set()


def set_backend(name: str) -> str:
    """Which implementation runs the element phases. All give the same bits: the choice is speed.

    auto: Triton kernels for CUDA tensors and the compiled C kernel for CPU tensors; torch: the torch
    path everywhere; compiled / triton: insist on that kernel for its device (auto for the other). A
    kernel that is missing falls back to torch with a warning. Returns what CPU tensors will use.
    """
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _backend = name
    _warned.clear()
    if name == "compiled" and not cpu_kernel.available():
        _warn("compiled")
    if name == "triton" and not triton_kernels.available():
        _warn("triton")
    return _path(torch.empty(0))


def _warn(kernel: str) -> None:
    if kernel not in _warned:
        _warned.add(kernel)
        why = ("the compiled CPU kernel is not built (no C compiler at install?)" if kernel == "compiled"
               else "Triton is not installed (pip install triton)")
        warnings.warn(f"{why}: using the torch path, with the same results but slower", stacklevel=4)


def _path(w: torch.Tensor) -> str:
    """torch, compiled or triton for this tensor under the chosen backend."""
    if _backend == "torch":
        return "torch"
    if w.device.type == "cuda" or (_backend == "triton" and triton_kernels.interpreting()):
        if triton_kernels.runs_on(w):
            return "triton"
        if w.device.type == "cuda" and w.dtype in triton_kernels.DTYPES:
            _warn("triton")
        return "torch"
    if w.device.type == "cpu" and w.dtype in cpu_kernel.DTYPES:
        if cpu_kernel.available():
            return "compiled"
        if _backend == "compiled":
            _warn("compiled")
    return "torch"


_pools: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="mezo-replay")
    return _pools[threads]


StepConstants = tuple[float, float]  # (c, d) of one step: update coefficient and decay factor
Terms = tuple[tuple[int, float], ...]  # a multi-term P3 (spec/momentum.md): (noise step, coefficient), in order
StepTerms = tuple[Terms, float]  # (terms, d) of one step of a rule whose P3 has several terms


def _has_terms(constants: Sequence[tuple[object, float]]) -> bool:
    return bool(constants) and isinstance(constants[0][0], tuple)


def _scaled_c(rule: MezoSGD, c: float | torch.Tensor, index: int) -> float | torch.Tensor:
    """c_k = c * 2^(e_k + f_k) of tensor `index` (spec/layerwise.md). A device c (a 0-dim float32 tensor of a
    queued step) is scaled where it lies: a power of two leaves its 16 bits exact, and a result below 2^-100
    (possibly subnormal in binary32, hence rounded) becomes +0 as the host's does."""
    if not isinstance(c, torch.Tensor):
        return rule.tensor_coefficient(c, index)
    ck = c * rule.tensor_scaling(index)[1]
    return torch.where(ck.abs() < 2.0**-100, torch.zeros_like(ck), ck)


def _for_tensor(rule: MezoSGD, index: int, constants: Sequence, scale: float = 0.0) -> tuple[MezoSGD, list, float]:
    """Layer-wise scaling (spec/layerwise.md) of one tensor's pass, applied where the passes begin so that every
    path (torch, the C kernel, Triton) gets it alike: (rule with eps_k and no exponents, constants with every
    coefficient c_k = c * 2^(e_k + f_k) (a multi-term step's terms each), the perturbation scale times 2^e_k).
    The decay factor d is not scaled. Without exponents the arguments come back as they are."""
    if not rule.exponents:
        return rule, constants, scale  # type: ignore[return-value]
    e = rule.exponents[index][0]
    local = dataclasses.replace(rule, eps=rule.tensor_scaling(index)[0], exponents=())
    scaled = _scaled_plan(constants, rule.tensor_scaling(index)[1]) if len(constants) > 1 else None
    if scaled is not None:
        return local, scaled, math.ldexp(scale, e)
    out: list = []
    for c, d in constants:
        if isinstance(c, tuple):  # a multi-term step: (noise step, coefficient) terms
            out.append((tuple((step, rule.tensor_coefficient(cj, index)) for step, cj in c), d))
        else:
            out.append((_scaled_c(rule, c, index), d))
    return local, out, math.ldexp(scale, e)


_last_plan: tuple | None = None  # (constants, their float64 table, {factor: scaled constants}) of the last plan


def _scaled_plan(constants: Sequence, factor: float) -> list | None:
    """A replay plan's (c, d) list with every c times `factor` (+0 below 2^-100), vectorised like
    step_constants, and shared by the tensors with the same e_k + f_k: converting a 20,000-step plan costs
    about 10 ms, once per distinct factor rather than once per tensor. None where it does not apply (a
    multi-term plan, a device c) or where some c_k is beyond 2^100 (the loop then raises the rule's error).
    Threads replaying tensors each hold their own entry: the global is only ever rebound, never mutated."""
    global _last_plan
    entry = _last_plan
    if entry is None or entry[0] is not constants:
        if not all(type(c) is float for c, _ in constants):
            return None
        entry = (constants, np.asarray(constants, dtype=np.float64).reshape(-1, 2), {})
        _last_plan = entry
    table, done = entry[1], entry[2]
    if factor not in done:
        ck = table[:, 0] * factor  # exact: a power of two, far from binary64's limits
        if (np.abs(ck) > 2.0**100).any():
            return None
        ck[np.abs(ck) < 2.0**-100] = 0.0
        done[factor] = list(zip(ck.tolist(), table[:, 1].tolist()))  # a dict store: atomic under the GIL
    return done[factor]


def perturb_(w: torch.Tensor, z: torch.Tensor, scale: float) -> None:
    """P1 (scale = eps) and P2 (scale = -2 eps): w = R_D(fl32(w + scale*z)); scale*z is exact."""
    w.copy_(w.to(torch.float32) + z * scale)


def _decay(s: torch.Tensor, d: float) -> torch.Tensor:
    """DECAY(s): s - d*s_hi - d*s_lo with 12-bit halves, so both products are exact binary32 numbers."""
    hi = (s.view(torch.int32) & -4096).view(torch.float32)  # clear the low 12 bits of the pattern
    decayed = (s - hi * d) - (s - hi) * d
    return torch.where(torch.isfinite(s) & (s.abs() >= 2.0**-60), decayed, s)


Coefficient = "float | torch.Tensor"  # c: a host float, or a 0-dim float32 tensor on the weights' device


def restore_update_(w: torch.Tensor, z: torch.Tensor, eps: float, c: float | torch.Tensor, d: float = 0.0) -> None:
    """P3: w = R_D(fl32(DECAY(fl32(w + eps*z)) - c*z)), the restore, decay and update in one pass."""
    s = w.to(torch.float32) + z * eps
    if d:
        s = _decay(s, d)
    w.copy_(s - z * c)


def restore_terms_(w: torch.Tensor, z: torch.Tensor, eps: float, terms: Iterable[tuple[float, torch.Tensor]],
                   d: float = 0.0) -> None:
    """The multi-term P3 (spec/momentum.md): s = DECAY(fl32(w + eps*z)); s = fl32(s - c_j*z_j) for each
    term in order; w = R_D(s). `terms` may be a generator, so that only one z_j exists at a time."""
    s = w.to(torch.float32) + z * eps
    if d:
        s = _decay(s, d)
    for c, zj in terms:
        s = s - zj * c  # exact product, one binary32 rounding: term by term, in order
    w.copy_(s)


def buffer_update_(w: torch.Tensor, m: torch.Tensor, z: torch.Tensor, eps: float, c: float, beta: float,
                   d: float = 0.0) -> None:
    """mezo-momentum-buffer's P3 (spec/momentum.md): m = fl32(fl32(beta*m) + c*z), then
    w = R_D(fl32(DECAY(fl32(w + eps*z)) - m)); m is float32 and updated in place. beta*m is the one inexact
    product of the spec: two eager torch operations round it before the sum (nothing fuses them)."""
    m.mul_(beta)
    m.add_(z * c)
    s = w.to(torch.float32) + z * eps
    if d:
        s = _decay(s, d)
    w.copy_(s - m)


def default_slice(device: torch.device) -> int:
    return 1 << 24 if device.type == "cuda" else 1 << 18


def _min_slice(steps: int) -> int:
    """Fewest elements worth a thread of their own: 2^16 for a step or a few (training), down to one
    kernel chunk (2,048) for a long replay, so that a small tensor (a LoRA matrix of 16,384 elements
    over 20,000 steps) still spreads over every core; each slice then holds at least 2^24 element-steps,
    far more than the cost of handing it to a thread."""
    return max(2048, min(1 << 16, -(-(1 << 24) // max(1, steps))))


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


def step_constants(rule: MezoSGD, grad_bits: Sequence[int], first_step: int = 0,
                   earlier: Sequence[int] = ()) -> list[StepConstants] | list[StepTerms]:
    """(c, d) for each recorded step, computed once and shared by every tensor of a replay; for
    mezo-momentum (terms, d) instead, where `earlier` holds the records of the steps before first_step
    (the last window - 1 of them suffice).

    Vectorised (mzt.step_coefficients, bit for bit the rule's): a Python loop over the rule costs about
    10 us a step, 0.2 s for a 20,000-step plan, which is a sizeable part of rebuilding a small adapter.
    Steps the rule refuses go through the rule itself, so that its error is the one raised."""
    if rule.adam:
        return _adam_constants(rule, grad_bits, first_step, earlier)  # type: ignore[return-value]
    if rule.window:
        return _momentum_constants(rule, grad_bits, first_step, earlier)
    if rule.perturbations > 1:
        return nspsa_constants(rule, grad_bits, first_step)
    bits = np.asarray(grad_bits, dtype=np.int64)
    if bits.size and (bits.min() < 0 or bits.max() > 0xFFFF or invalid_steps(bits.astype(np.uint16), rule,
                                                                              first_step).size):
        return [(rule.coefficient(first_step + j, int(b)), rule.decay(first_step + j))
                for j, b in enumerate(grad_bits)]
    c, d = step_coefficients(rule, bits.astype(np.uint16), first_step)
    return list(zip(c.tolist(), d.tolist()))


def _momentum_constants(rule: MezoSGD, grad_bits: Sequence[int], first_step: int,
                        earlier: Sequence[int]) -> list[StepTerms]:
    """step_constants for mezo-momentum: the terms c_(t,k) of every step, vectorised per k (bit for bit
    MezoSGD.terms: numpy rounds each binary64 product once, as the spec's host arithmetic does), so a
    20,000-step plan costs a fraction of a second rather than seconds."""
    window = rule.window
    before = [int(b) for b in earlier][-(window - 1):] if window > 1 else []
    before = before[max(0, len(before) - first_step):] if first_step < len(before) else before
    if first_step > 0 and len(before) < min(window - 1, first_step):
        raise ValueError(f"step {first_step} needs the records of the {min(window - 1, first_step)} steps before it")
    bits = np.asarray(grad_bits, dtype=np.int64)
    if bits.size and (bits.min() < 0 or bits.max() > 0xFFFF or invalid_steps(bits.astype(np.uint16), rule,
                                                                              first_step).size):
        history = list(before)  # the rule's own loop, so that its error is the one raised
        out: list[StepTerms] = []
        for j, b in enumerate(grad_bits):
            history = [*history, int(b)][-window:]
            out.append((rule.terms(first_step + j, history), rule.decay(first_step + j)))
        return out
    n, h = bits.size, len(before)
    every = np.concatenate([np.asarray(before, dtype=np.int64), bits]).astype(np.uint32)
    g = (every << np.uint32(16)).view(np.float32).astype(np.float64)
    d = step_coefficients(rule, bits.astype(np.uint16), first_step)[1].tolist()
    lr = step_rates(rule, np.arange(first_step, first_step + n, dtype=np.float64))
    columns = []
    for k, p in enumerate(rule.powers()):
        r = _rs(lr * p, 24)
        src = np.arange(n) + h - k
        c = _rs(r * g[np.maximum(src, 0)], 16)
        c[np.abs(c) < 2.0**-100] = 0.0
        columns.append(c.tolist())
    out = []
    for j in range(n):
        t = first_step + j
        out.append((tuple((t - k, columns[k][j]) for k in range(min(window, t + 1))), d[j]))
    return out


def nspsa_constants(rule: MezoSGD, grad_bits: Any, first_step: int = 0) -> list[StepTerms]:
    """step_constants for n-SPSA (spec/nspsa.md): grad_bits holds N records a step ((steps, N), or flat in
    that order), and the result is the N sub-steps of every step, (terms, d) each: a replay runs them as
    sub-steps N * first_step, ..., whose noise steps they are. Vectorised like step_coefficients (bit for
    bit MezoSGD.substeps); steps the rule refuses go through it, so that its error is the one raised."""
    n = rule.perturbations
    bits = np.asarray(grad_bits, dtype=np.int64).reshape(-1, n)
    steps = bits.shape[0]
    if bits.size and (bits.min() < 0 or bits.max() > 0xFFFF or
                      invalid_perturbation_steps(bits.astype(np.uint16), rule, first_step).size):
        return [sub for j, row in enumerate(bits.tolist()) for sub in rule.substeps(first_step + j, row)]
    g = (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    t = np.arange(first_step, first_step + steps, dtype=np.float64)
    lr = step_rates(rule, t)
    q = _rs(lr / n, 24)
    c = _rs(q[:, None] * g, 16)
    c[np.abs(c) < 2.0**-100] = 0.0
    d = _rs(lr * rule.weight_decay, 12)
    d[d < 2.0**-40] = 0.0
    out: list[StepTerms] = []
    idle: StepTerms = ((), 0.0)
    for j, (row, dj) in enumerate(zip(c.tolist(), d.tolist())):
        u = n * (first_step + j)
        out.extend([idle] * (n - 1))
        out.append((tuple((u + k, ck) for k, ck in enumerate(row)), dj))
    return out


def _adam_constants(rule: MezoSGD, grad_bits: Sequence[int], first_step: int,
                    earlier: Sequence[int]) -> list[AdamStep]:
    """step_constants for mezo-adam(-buffer) (spec/adam.md): each step's AdamStep, from the rule's own host
    arithmetic (O(1) per step for the buffer form, K terms for the window form). `earlier`: the records
    before first_step (the window form's last K - 1 of them)."""
    window = rule.adam_window
    history = [int(b) for b in earlier][-(window - 1):] if window > 1 else []
    if window and first_step > 0 and len(history) < min(window - 1, first_step):
        raise ValueError(f"step {first_step} needs the records of the {min(window - 1, first_step)} steps before it")
    bits = np.asarray(grad_bits, dtype=np.int64)
    if bits.size == 0:
        return []
    if bits.min() < 0 or bits.max() > 0xFFFF or invalid_steps(bits.astype(np.uint16), rule, first_step).size:
        host, out = AdamHost(rule), []  # the rule's own loop, so that its error is the one raised
        for j, b in enumerate(grad_bits):
            history = [*history, int(b)][-max(1, window):]
            out.append(host.step(first_step + j, history))
        return out
    # Vectorised, bit for bit AdamHost (numpy rounds each binary64 operation once, as the spec's host
    # arithmetic does): a 20,000-step window-16 plan in milliseconds instead of seconds.
    n, h0 = bits.size, len(history)
    every = np.concatenate([np.asarray(history, dtype=np.int64), bits]).astype(np.uint32)
    g = (every << np.uint32(16)).view(np.float32).astype(np.float64)
    g[np.abs(g) < 2.0**-100] = 0.0  # spec/adam.md: gq below 2^-100 is applied as +0
    t = np.arange(first_step, first_step + n, dtype=np.int64)
    lr = step_rates(rule, t.astype(np.float64))
    d = step_coefficients(rule, bits.astype(np.uint16), first_step)[1].tolist()
    b1, b2 = rule.momentum, rule.beta2
    if window:
        count = np.minimum(window, t + 1)
        p1, p2 = np.ones(window + 1), np.ones(window + 1)  # power(beta, k) for k = 0 .. K
        for k in range(1, window + 1):
            p1[k], p2[k] = p1[k - 1] * b1, p2[k - 1] * b2
        big1, big2 = p1[count], p2[count]
        u1p, u2p = _adam_powers24(rule)
        columns = []
        for k in range(window):
            src = np.maximum(np.arange(n) + h0 - k, 0)
            cm = _rs(u1p[k] * g[src], 16)
            cv = _rs(u2p[k] * (g[src] * g[src]), 16)
            cm[np.abs(cm) < 2.0**-100] = 0.0
            cv[cv < 2.0**-100] = 0.0
            columns.append((cm.tolist(), cv.tolist()))
    else:
        powers1 = np.multiply.accumulate(np.full(first_step + n, b1))  # B_t = B_(t-1) * beta, in order
        powers2 = np.multiply.accumulate(np.full(first_step + n, b2))
        big1, big2 = powers1[first_step:], powers2[first_step:]
    alpha = _rs(lr / (1.0 - big1), 24).tolist()
    h = _rs(1.0 / np.sqrt(1.0 - big2), 24).tolist()
    gq = g[h0:].tolist()
    out = []
    for j in range(n):
        tj = first_step + j
        if window:
            terms = tuple((tj - k, columns[k][0][j], columns[k][1][j]) for k in range(min(window, tj + 1)))
        else:
            terms = ((tj, gq[j], 0.0),)
        out.append(AdamStep(terms, alpha[j], h[j], d[j]))
    return out


def _adam_powers24(rule: MezoSGD) -> tuple[list[float], list[float]]:
    """RS(u * p_k, 24) for both betas (spec/adam.md's window weights), as AdamHost forms them."""
    from ..arithmetic.rule import _powers, round_significant

    p1, p2 = _powers(rule.momentum, rule.adam_window), _powers(rule.beta2, rule.adam_window)
    u1, u2 = 1.0 - rule.momentum, 1.0 - rule.beta2
    return ([round_significant(u1 * p, 24) for p in p1], [round_significant(u2 * p, 24) for p in p2])


def adam_update_(w: torch.Tensor, z: torch.Tensor, rule: MezoSGD, m: torch.Tensor, v: torch.Tensor,
                 step: AdamStep, d: float) -> None:
    """P3 of spec/adam.md from this step's m and v (float32): r = sqrt32(v); den = fl32(fl32(r*h) + delta);
    upd = fl32(fl32(alpha*m) / den); w = R_D(fl32(DECAY(fl32(w + eps*z)) - upd)). Every operation is one
    eager torch kernel, rounded on its own. torch's float32 sqrt on CPU is not correctly rounded (its
    vectorised kernel differs from IEEE's in about 17% of random inputs, measured with torch 2.13), so the
    root is taken in binary64 and rounded once to binary32: with 53 >= 2 * 24 + 2 bits that double rounding
    gives the correctly rounded binary32 root. float32 division is IEEE's."""
    den = torch.sqrt(v.double()).float().mul_(step.h).add_(rule.adam_eps)
    upd = (m * step.alpha).div_(den)
    s = w.to(torch.float32) + z * rule.eps
    if d:
        s = _decay(s, d)
    w.copy_(s - upd)


def adam_moments_buffer_(m: torch.Tensor, v: torch.Tensor, z: torch.Tensor, rule: MezoSGD, gq: float) -> None:
    """mezo-adam-buffer's state update, in place: g = gq*z (exact); m = fl32(fl32(b1*m) + fl32(u1*g));
    v = fl32(fl32(b2*v) + fl32(u2*fl32(g*g))). Separate kernels: nothing is fused."""
    g = z * gq
    m.mul_(rule.momentum).add_(g * (1.0 - rule.momentum))
    v.mul_(rule.beta2).add_((g * g).mul_(1.0 - rule.beta2))


def _dispatch(w: torch.Tensor, steps: int, slice_size: int | None, progress: Callable[[int], None] | None,
              on_triton: Callable[[torch.Tensor], None], on_compiled: Callable[[int, torch.Tensor], None],
              torch_slice: Callable[[int, torch.Tensor], None]) -> None:
    """Runs one element pass (or `steps` of a replay) over w, on the path its device has: Triton (one launch
    for the tensor; the kernel reports progress), the compiled kernel (slices on torch's CPU threads:
    ctypes releases the GIL), or the torch phases slice by slice. on_compiled and torch_slice get each
    slice's offset in w's row-major elements."""
    def run(t: torch.Tensor) -> None:
        path = _path(t)
        if path == "triton":
            on_triton(t)
            return
        if path == "compiled":
            threads = max(1, torch.get_num_threads())
            size = max(_min_slice(steps), min(1 << 20, -(-t.numel() // threads)))
            parts = list(_flat_slices(t, size))
            work = (lambda p: on_compiled(*p) or p[1])
            done = map(work, parts) if len(parts) == 1 else _pool(threads).map(work, parts)  # small: no hop
        else:
            size = slice_size or default_slice(t.device)
            done = (torch_slice(offset, s) or s for offset, s in _flat_slices(t, size))
        for s in done:
            if progress is not None:
                progress(s.numel() * steps)

    _in_place(w, run)


def _apply_(w: torch.Tensor, rule: MezoSGD, index: int, first_step: int, mode: int,
            constants: Sequence[tuple[float | torch.Tensor, float]], scale: float = 0.0, decay: bool = True,
            slice_size: int | None = None, progress: Callable[[int], None] | None = None,
            go: torch.Tensor | None = None, start: int = 0) -> None:
    """The one dispatcher: a kernel when the tensor's device has one, the torch phases otherwise.

    mode REPLAY runs P1, P2, P3 for every step in `constants`; PERTURB adds scale*z of `first_step`;
    RESTORE_UPDATE runs P3 of `first_step` with constants[0]; UPDATE_PERTURB runs that P3 and then P1 of
    `first_step + 1` (only where `go`, a 0-dim bool tensor, is true; None: always). decay=False ignores the
    d of `constants`. In the one-step modes c may be a 0-dim float32 tensor on w's device.
    `progress` gets element-steps done. start: the index in tensor `index` of w's first element (w a
    contiguous run of its row-major elements, e.g. a rank's dim-0 shard), so that w gets exactly the bytes
    those elements would get in the whole tensor.
    """
    if start < 0:
        raise ValueError(f"a shard's start must be a non-negative element index, not {start}")
    rule, constants, scale = _for_tensor(rule, index, constants, scale)  # layer-wise: eps_k, c_k (no-op without)
    if _has_terms(constants):
        _apply_terms_(w, rule, index, first_step, mode, constants, decay, slice_size, progress, start)  # type: ignore[arg-type]
        return

    def torch_slice(offset: int, s: torch.Tensor) -> None:
        for j, (c, d) in enumerate(constants):
            z = noise(rule.noise, rule.seed, first_step + j, index, start + offset, s.numel(), s.device)
            if mode == cpu_kernel.PERTURB:
                perturb_(s, z, scale)
                continue
            if mode == cpu_kernel.REPLAY:
                perturb_(s, z, rule.eps)
                perturb_(s, z, -2.0 * rule.eps)
            restore_update_(s, z, rule.eps, c, d if decay else 0.0)
            if mode == UPDATE_PERTURB:
                z = noise(rule.noise, rule.seed, first_step + 1, index, start + offset, s.numel(), s.device)
                if go is None:
                    perturb_(s, z, rule.eps)
                else:  # the P1 half only where go is true: otherwise P3's bytes stay as they are
                    s.copy_(torch.where(go, (s.to(torch.float32) + z * rule.eps).to(s.dtype), s))

    def on_triton(t: torch.Tensor) -> None:  # reads a device c and go itself (no host sync)
        triton_kernels.apply_(t, start, rule, index, first_step, mode, constants=constants, decay=decay,
                              scale=scale, go=go, progress=progress)

    def on_compiled(offset: int, s: torch.Tensor) -> None:
        kernel_mode, cs = mode, constants
        if mode != cpu_kernel.REPLAY and isinstance(cs[0][0], torch.Tensor):
            cs = [(float(cs[0][0]), cs[0][1])]  # a CPU tensor (the weights' device): reading it is free
        if mode == UPDATE_PERTURB and go is not None and not bool(go):
            kernel_mode = cpu_kernel.RESTORE_UPDATE  # the P1 half skipped: P3's bytes alone
        cs = cs if decay else [(c, 0.0) for c, _ in cs]
        cpu_kernel.apply_(s, start + offset, rule, index, first_step, kernel_mode, constants=cs, scale=scale)

    _dispatch(w, len(constants), slice_size, progress, on_triton, on_compiled, torch_slice)


def _apply_terms_(w: torch.Tensor, rule: MezoSGD, index: int, first_step: int, mode: int,
                  steps: Sequence[StepTerms], decay: bool, slice_size: int | None,
                  progress: Callable[[int], None] | None, start: int) -> None:
    """_apply_ for a multi-term P3 (spec/momentum.md): REPLAY or RESTORE_UPDATE. The compiled kernel on
    CPU tensors, Triton's (one launch per tensor) on CUDA ones; the torch path draws the noise of one term
    at a time, so that memory stays at a few z-sized buffers."""
    if mode not in (cpu_kernel.REPLAY, cpu_kernel.RESTORE_UPDATE, UPDATE_PERTURB):
        raise ValueError("a multi-term update runs in replay or as a step's restore-update (then perturb)")
    rule, steps, _ = _for_tensor(rule, index, steps)  # layer-wise: eps_k and every term's c_k
    steps = steps if decay else [(terms, 0.0) for terms, _ in steps]

    def torch_slice(offset: int, s: torch.Tensor) -> None:
        for j, (terms, d) in enumerate(steps):
            t = first_step + j
            z = noise(rule.noise, rule.seed, t, index, start + offset, s.numel(), s.device)
            if mode == cpu_kernel.REPLAY:
                perturb_(s, z, rule.eps)
                perturb_(s, z, -2.0 * rule.eps)
            restore_terms_(s, z, rule.eps, ((c, z if step == t else noise(rule.noise, rule.seed, step, index,
                                                                       start + offset, s.numel(), s.device))
                                            for step, c in terms), d)
            if mode == UPDATE_PERTURB:  # P1 of the next step on P3's rounded result
                perturb_(s, noise(rule.noise, rule.seed, t + 1, index, start + offset, s.numel(), s.device),
                         rule.eps)

    def on_triton(t: torch.Tensor) -> None:
        triton_kernels.apply_terms_(t, start, rule, index, first_step, mode, steps=steps, decay=decay,
                                    progress=progress)

    def on_compiled(offset: int, s: torch.Tensor) -> None:
        cpu_kernel.apply_terms_(s, start + offset, rule, index, first_step, mode, steps=steps)

    _dispatch(w, len(steps), slice_size, progress, on_triton, on_compiled, torch_slice)


def _apply_buffer_(w: torch.Tensor, state: torch.Tensor, rule: MezoSGD, index: int, first_step: int, mode: int,
                   constants: Sequence[StepConstants], decay: bool, slice_size: int | None,
                   progress: Callable[[int], None] | None, start: int) -> None:
    """mezo-momentum-buffer (spec/momentum.md): REPLAY (P1, P2, buffered P3 per step) or RESTORE_UPDATE (the
    buffered P3 of one step), with `state` the float32 m of w's elements (flat, contiguous, updated in
    place). The compiled kernel on CPU tensors, Triton's on CUDA ones (fusion off); the torch path: beta*m
    and its sum are two torch operations, never fused."""
    if mode not in (cpu_kernel.REPLAY, cpu_kernel.RESTORE_UPDATE, UPDATE_PERTURB):
        raise ValueError("a buffered momentum update runs in replay or as a step's restore-update (then perturb)")
    if state.dtype != torch.float32 or not state.is_contiguous() or state.numel() != w.numel():
        raise ValueError("the momentum state must be a contiguous float32 tensor with the weights' element count")
    rule, constants, _ = _for_tensor(rule, index, constants)  # layer-wise: eps_k, and b = c_k * z feeds m
    cs = [(float(c), d if decay else 0.0) for c, d in constants]
    flat_state = state.view(-1)

    def torch_slice(offset: int, s: torch.Tensor) -> None:
        m = flat_state[offset:offset + s.numel()]
        for j, (c, d) in enumerate(cs):
            z = noise(rule.noise, rule.seed, first_step + j, index, start + offset, s.numel(), s.device)
            if mode == cpu_kernel.REPLAY:
                perturb_(s, z, rule.eps)
                perturb_(s, z, -2.0 * rule.eps)
            buffer_update_(s, m, z, rule.eps, c, rule.momentum, d)
            if mode == UPDATE_PERTURB:  # P1 of the next step on P3's rounded result
                perturb_(s, noise(rule.noise, rule.seed, first_step + 1, index, start + offset, s.numel(),
                                  s.device), rule.eps)

    def on_triton(t: torch.Tensor) -> None:
        triton_kernels.apply_buffer_(t, flat_state, start, rule, index, first_step, mode, constants=cs,
                                     decay=decay, progress=progress)

    def on_compiled(offset: int, s: torch.Tensor) -> None:
        cpu_kernel.apply_buffer_(s, flat_state[offset:offset + s.numel()], start + offset, rule, index, first_step,
                                 mode, constants=cs)

    _dispatch(w, len(cs), slice_size, progress, on_triton, on_compiled, torch_slice)


def restore_buffer_all_(tensors: Sequence[torch.Tensor], states: Sequence[torch.Tensor], rule: MezoSGD, step: int,
                        c: float, d: float, decays: Sequence[bool], starts: Sequence[int] | None = None,
                        then_perturb: bool = False) -> None:
    """mezo-momentum-buffer's P3 of one step on every tuned tensor and its state (states[k]: float32, the
    element count of tensors[k]); decays and starts as in restore_update_all_. then_perturb: P1 of step + 1
    in the same pass (the bytes of this call then perturb_all_(step + 1, eps))."""
    starts = _starts(starts, len(tensors))
    mode = UPDATE_PERTURB if then_perturb else cpu_kernel.RESTORE_UPDATE
    for k, t in enumerate(tensors):
        _apply_buffer_(t, states[k], rule, k, step, mode, [(c, d)], bool(decays[k]), None, None, starts[k])


def restore_terms_all_(tensors: Sequence[torch.Tensor], rule: MezoSGD, step: int, terms: Terms, d: float,
                       decays: Sequence[bool], starts: Sequence[int] | None = None, then_perturb: bool = False) -> None:
    """The multi-term P3 of one step (spec/momentum.md) on every tuned tensor, one tensor at a time;
    decays and starts as in restore_update_all_. then_perturb: P1 of step + 1 in the same pass (the bytes
    of this call then perturb_all_(step + 1, eps))."""
    starts = _starts(starts, len(tensors))
    mode = UPDATE_PERTURB if then_perturb else cpu_kernel.RESTORE_UPDATE
    for k, t in enumerate(tensors):
        _apply_terms_(t, rule, k, step, mode, [(tuple(terms), d if decays[k] else 0.0)], bool(decays[k]), None,
                      None, starts[k])


def perturb_tensor_(w: torch.Tensor, rule: MezoSGD, step: int, index: int, scale: float,
                    slice_size: int | None = None, start: int = 0) -> None:
    """P1 (scale = eps) or P2 (scale = -2 eps) of one step on one tuned tensor (or its shard at start)."""
    _apply_(w, rule, index, step, cpu_kernel.PERTURB, [(0.0, 0.0)], scale, decay=False, slice_size=slice_size,
            start=start)


def restore_update_tensor_(w: torch.Tensor, rule: MezoSGD, step: int, index: int, c: float, d: float = 0.0,
                           slice_size: int | None = None, start: int = 0) -> None:
    """P3 of one step on one tuned tensor (d: its decay factor, 0 for tensors without decay)."""
    _apply_(w, rule, index, step, cpu_kernel.RESTORE_UPDATE, [(c, d)], decay=d != 0.0, slice_size=slice_size,
            start=start)


def replay_tensor_(w: torch.Tensor, rule: MezoSGD, index: int,
                   constants: Sequence[StepConstants] | Sequence[StepTerms], *,
                   decay: bool = False, first_step: int = 0, slice_size: int | None = None,
                   progress: Callable[[int], None] | None = None, start: int = 0,
                   state: torch.Tensor | None = None) -> None:
    """Steps first_step, first_step+1, ... of one tuned tensor, in place; with start, of the shard of it
    whose first element is element `start` of the whole tensor (a rank's rows of a sharded parameter).

    Each slice runs all its steps before the next slice starts, so the noise of a step is drawn once
    for its three phases and the slice stays in cache.

    constants: step_constants' output for the rule ((terms, d) per step under mezo-momentum). Under
    mezo-momentum-buffer, state is the float32 m of w's elements (updated in place; None: +0, from step 0).
    """
    if rule.adam:  # spec/adam.md: state is mezo-adam-buffer's m then v (2 * numel); None: +0, from step 0
        if rule.adam_window == 0 and state is None:
            if first_step:
                raise ValueError("a mezo-adam-buffer replay from a later step needs the state at that step")
            state = torch.zeros(2 * w.numel(), dtype=torch.float32, device=w.device)
        if constants:
            _apply_adam_(w, state if rule.adam_window == 0 else None, rule, index, first_step, cpu_kernel.REPLAY,
                         constants, decay, slice_size, progress, start)  # type: ignore[arg-type]
        return
    if rule.buffered:  # mezo-momentum-buffer: state is m (float32, w's element count); None: +0, from step 0
        if state is None:
            if first_step:
                raise ValueError("a mezo-momentum-buffer replay from a later step needs the state at that step")
            state = torch.zeros(w.numel(), dtype=torch.float32, device=w.device)
        if constants:
            _apply_buffer_(w, state, rule, index, first_step, cpu_kernel.REPLAY, constants, decay, slice_size,
                           progress, start)
        return
    if constants:
        _apply_(w, rule, index, first_step, cpu_kernel.REPLAY, constants, decay=decay, slice_size=slice_size,
                progress=progress, start=start)


def update_perturb_all_(tensors: Sequence[torch.Tensor], rule: MezoSGD, step: int, c: float | torch.Tensor,
                        d: float, decays: Sequence[bool], go: torch.Tensor | None = None,
                        starts: Sequence[int] | None = None) -> None:
    """P3 of `step` then P1 of `step + 1` on every tuned tensor, in one pass over the weights: the bytes of
    restore_update_all_(step) followed by perturb_all_(step + 1, eps), so a training step that goes
    straight on to the next one costs two passes instead of three.

    c may be a 0-dim float32 tensor on the weights' device, so that the GPU never waits for the host to
    know it; go (a 0-dim bool tensor there, None for true) lets the device skip the P1 half, leaving
    exactly restore_update_all_'s result, e.g. when the step it belongs to must stop the run. starts as in
    perturb_all_."""
    _each_(tensors, rule, step, UPDATE_PERTURB, decays, c=c, d=d, go=go, starts=starts)


def perturb_all_(tensors: Sequence[torch.Tensor], rule: MezoSGD, step: int, scale: float,
                 starts: Sequence[int] | None = None) -> None:
    """P1 or P2 of one step on every tuned tensor (tensors[k] is trajectory tensor k).

    starts[k]: the element of trajectory tensor k at which tensors[k] begins, when a rank holds only a
    contiguous run of it (FSDP2's dim-0 shard: rows r0.. of a row-major tensor start at r0 * row size);
    None: every tensor whole. The noise is keyed by element index, so shards passed with their starts get
    exactly the bytes of the whole tensors, and a sharded run rebuilds on one device."""
    _each_(tensors, rule, step, cpu_kernel.PERTURB, [False] * len(tensors), scale=scale, starts=starts)


def restore_update_all_(tensors: Sequence[torch.Tensor], rule: MezoSGD, step: int, c: float | torch.Tensor,
                        d: float, decays: Sequence[bool], starts: Sequence[int] | None = None) -> None:
    """P3 of one step on every tuned tensor; decays[k] says whether tensor k takes the decay d. c as in
    update_perturb_all_, starts as in perturb_all_."""
    _each_(tensors, rule, step, cpu_kernel.RESTORE_UPDATE, decays, c=c, d=d, starts=starts)


def _each_(tensors: Sequence[torch.Tensor], rule: MezoSGD, step: int, mode: int, decays: Sequence[bool], *,
           c: float | torch.Tensor = 0.0, d: float = 0.0, scale: float = 0.0, go: torch.Tensor | None = None,
           starts: Sequence[int] | None = None) -> None:
    """Tensors the Triton kernel takes go through one grouped launch per dtype (a launch per tensor
    would cost more than the arithmetic on a model's many small tensors); the rest one by one."""
    starts = _starts(starts, len(tensors))
    grouped = [k for k, t in enumerate(tensors) if t.is_contiguous() and _path(t) == "triton"
               and not (rule.exponents and any(rule.exponents[k]))]  # one eps and c per launch: layer-wise go alone
    if grouped:
        triton_kernels.apply_group_([tensors[k] for k in grouped], grouped, [decays[k] for k in grouped], rule,
                                    step, mode, c=c, d=d, scale=scale, go=go, starts=[starts[k] for k in grouped])
    done = set(grouped)
    for k, t in enumerate(tensors):
        if k not in done:
            _apply_(t, rule, k, step, mode, [(c, d if decays[k] else 0.0)], scale, decay=bool(decays[k]), go=go,
                    start=starts[k])


def _starts(starts: Sequence[int] | None, count: int) -> list[int]:
    """One element offset per tensor, checked here so that a bad one fails before any tensor is touched
    (a pass applied to half the tensors would leave the weights matching no step)."""
    if starts is None:
        return [0] * count
    out = [int(s) for s in starts]
    if len(out) != count:
        raise ValueError(f"{count} tensors but {len(out)} shard starts")
    if any(s < 0 for s in out):
        raise ValueError(f"a shard's start must be a non-negative element index, not {min(out)}")
    return out



def _apply_adam_(w: torch.Tensor, state: torch.Tensor | None, rule: MezoSGD, index: int, first_step: int, mode: int,
                 steps: Sequence[AdamStep], decay: bool, slice_size: int | None,
                 progress: Callable[[int], None] | None, start: int) -> None:
    """mezo-adam(-buffer) (spec/adam.md): REPLAY (P1, P2, Adam's P3 per step), RESTORE_UPDATE (the P3 of
    first_step) or UPDATE_PERTURB (that, then P1 of first_step + 1). state: the buffer form's float32 m
    then v of w's elements (2 * numel, flat, updated in place); None for mezo-adam. The compiled kernel on
    CPU tensors, Triton's on CUDA ones, else the torch operations one by one."""
    if mode not in (cpu_kernel.REPLAY, cpu_kernel.RESTORE_UPDATE, UPDATE_PERTURB):
        raise ValueError("an Adam update runs in replay or as a step's restore-update (then perturb)")
    n = w.numel()
    if rule.adam_window == 0 and (state is None or state.dtype != torch.float32 or not state.is_contiguous()
                                  or state.numel() != 2 * n):
        raise ValueError("the mezo-adam-buffer state must be a contiguous float32 tensor of twice the weights' "
                         "element count (m, then v)")
    steps = [s if decay else s._replace(d=0.0) for s in steps]
    flat = state.view(-1) if state is not None else None

    def torch_slice(offset: int, s: torch.Tensor) -> None:
        size = s.numel()
        for j, st in enumerate(steps):
            t = first_step + j
            z = noise(rule.noise, rule.seed, t, index, start + offset, size, s.device)
            if mode == cpu_kernel.REPLAY:
                perturb_(s, z, rule.eps)
                perturb_(s, z, -2.0 * rule.eps)
            if flat is not None:
                m, v = flat[offset:offset + size], flat[n + offset:n + offset + size]
                adam_moments_buffer_(m, v, z, rule, st.terms[0][1])
            else:
                m = torch.zeros(size, dtype=torch.float32, device=s.device)
                v = torch.zeros(size, dtype=torch.float32, device=s.device)
                for step, cm, cv in st.terms:
                    zj = z if step == t else noise(rule.noise, rule.seed, step, index, start + offset, size, s.device)
                    m.add_(zj * cm)  # exact product, one rounding
                    v.add_((zj * zj).mul_(cv))  # zj*zj exact, the product rounded, then the sum
            adam_update_(s, z, rule, m, v, st, st.d)
            if mode == UPDATE_PERTURB:
                perturb_(s, noise(rule.noise, rule.seed, t + 1, index, start + offset, size, s.device), rule.eps)

    def on_triton(t: torch.Tensor) -> None:
        triton_kernels.apply_adam_(t, flat, start, rule, index, first_step, mode, steps=steps, progress=progress)

    def on_compiled(offset: int, s: torch.Tensor) -> None:
        size = s.numel()
        cpu_kernel.apply_adam_(s, None if flat is None else flat[offset:offset + size],
                               None if flat is None else flat[n + offset:n + offset + size], start + offset, rule,
                               index, first_step, mode, steps=steps)

    _dispatch(w, len(steps), slice_size, progress, on_triton, on_compiled, torch_slice)


def restore_adam_all_(tensors: Sequence[torch.Tensor], states: Sequence[torch.Tensor] | None, rule: MezoSGD,
                      step: AdamStep, t: int, decays: Sequence[bool], starts: Sequence[int] | None = None,
                      then_perturb: bool = False) -> None:
    """Adam's P3 of step t (spec/adam.md) on every tuned tensor (states[k]: mezo-adam-buffer's m and v of
    tensors[k]; None under mezo-adam); then_perturb: P1 of t + 1 in the same pass."""
    starts = _starts(starts, len(tensors))
    mode = UPDATE_PERTURB if then_perturb else cpu_kernel.RESTORE_UPDATE
    for k, w in enumerate(tensors):
        _apply_adam_(w, states[k] if states else None, rule, k, t, mode, [step], bool(decays[k]), None, None,
                     starts[k])
