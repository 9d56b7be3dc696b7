"""UPDATE_PERTURB, P3 of step t and P1 of step t+1 in one pass, against the two passes it replaces.

Training's step-to-step pass must leave exactly the bytes of RESTORE_UPDATE followed by PERTURB (the
intermediate rounding is part of the spec, spec/rule.md), in every kernel build: the compiled C kernel
with each instruction set this CPU runs, the Triton kernel (interpreted here, compiled on a GPU), per
tensor and grouped, with c and go given as host values or as device tensors. The numpy reference is the
oracle; raw bit patterns are compared (torch.equal on integer views) wherever one kernel meets itself.
"""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from mezo_replay.arithmetic import reference as R, rule
from mezo_replay.arithmetic.rule import MezoSGD
from mezo_replay.kernels import cpu_kernel, steps, triton_kernels

from .test_spec_vectors import bits_to_torch, random_bits, torch_to_bits

ROOT = Path(__file__).resolve().parent.parent
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
BIG_BLOCK = 1 << 16  # under the interpreter one program per 65,536 elements: 20x faster, the same bits


def test_mode_codes_agree():
    assert steps.UPDATE_PERTURB == cpu_kernel.UPDATE_PERTURB == triton_kernels.UPDATE_PERTURB == 3


def _kernels() -> list[tuple[str, str]]:
    """(kernel, device): the C kernel with every instruction set this CPU runs, Triton interpreted or on CUDA."""
    out = [(f"compiled-{isa}", "cpu") for isa in cpu_kernel.isas()]
    if triton_kernels.available() and triton_kernels.interpreting():
        out.append(("triton", "cpu"))
    if triton_kernels.available() and torch.cuda.is_available():
        out.append(("triton", "cuda"))
    return out


def _cases(*axes: list, keep: Callable[..., bool]) -> list:
    """Every kernel x the product of `axes`. Under the interpreter (about 1 s a call) only the cases `keep`
    picks run by default; the rest are -m slow. Compiled ones always run (milliseconds)."""
    out = []
    for name, device in _kernels():
        for values in itertools.product(*axes):
            marks = [pytest.mark.cuda] if device == "cuda" else []
            if name == "triton" and device == "cpu" and not keep(*values):
                marks.append(pytest.mark.slow)
            kid = "triton-interpreted" if name == "triton" and device == "cpu" else name.replace("triton", "triton-cuda")
            out.append(pytest.param((name, device), *values, marks=marks,
                                    id="-".join([kid] + [str(v) for v in values])))
    return out or [pytest.param(None, *(a[0] for a in axes), marks=pytest.mark.skip("no kernel here"))]


def _apply(kernel: tuple[str, str]):
    """apply(w, start, sgd, index, step, mode, c=, d=, scale=) runs one kernel call. The C kernel takes c
    as a host float and has no go (steps turns go=false into RESTORE_UPDATE)."""
    name, device = kernel

    def apply(w, start, sgd, index, step, mode, *, c=0.0, d=0.0, scale=0.0):
        if name.startswith("compiled-"):
            cpu_kernel.apply_(w, start, sgd, index, step, mode, constants=[(float(c), d)], scale=scale,
                              isa=name.removeprefix("compiled-"))
        else:
            triton_kernels.apply_(w, start, sgd, index, step, mode, constants=[(c, d)], decay=d != 0.0,
                                  scale=scale, block=BIG_BLOCK if w.numel() > 8192 else triton_kernels.BLOCK)
    return apply, device


def _two_passes(apply, w, start, sgd, index, step, c, d):
    apply(w, start, sgd, index, step, cpu_kernel.RESTORE_UPDATE, c=c, d=d)
    apply(w, start, sgd, index, step + 1, cpu_kernel.PERTURB, scale=sgd.eps)


def _reference(bits, dtype, sgd, index, step, start, c, d, go=True):
    """P3 of `step` then (if go) P1 of `step + 1`, by the numpy reference."""
    idx = np.arange(start, start + bits.size, dtype=np.uint64)
    z = R.noise(sgd.noise, sgd.seed, step, index, idx)
    with np.errstate(invalid="ignore", over="ignore"):  # inf and NaN inputs are cases, not accidents
        p3 = R.round_to(R.decay(R.to_f32(bits, dtype) + np.float32(sgd.eps) * z, d) - np.float32(c) * z, dtype)
    return R.phases(p3, dtype, R.noise(sgd.noise, sgd.seed, step + 1, index, idx), sgd.eps, 0.0)[0] if go else p3


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))


def _special_f32(n: int, seed: int) -> np.ndarray:
    """Random weights and the values where the arithmetic has edges: signed zeros, subnormals, the
    largest finite value, inf, NaN, and either side of DECAY's 2^-60 threshold."""
    bits = random_bits("F32", n, seed)
    extra = [0x007FFFFF, 0x807FFFFF, 0x00000001, 0x80000001, 0x00800000, 0xFF7FFFFF, 0x21800000, 0x217FFFFF,
             0xA1800000, 0x7FA00001, 0x33800000, 0x3F800000]
    bits[10:10 + len(extra)] = extra
    return bits


@pytest.mark.parametrize("kernel,dtype,decayed,n,start", _cases(
    ["F32", "BF16", "F16"], [False, True], [1, 7, 9, 1025, 3001], [0, 5, 2**32 - 7],
    keep=lambda dtype, decayed, n, start: (n, start) == (3001, 2**32 - 7) or (dtype, decayed, n, start) == (
        "BF16", True, 9, 5)))
def test_fused_equals_restore_update_then_perturb(kernel, dtype, decayed, n, start):
    """Odd sizes, slice starts that are not multiples of 8 (a Philox block split between the edges) and
    an index crossing 2^32; special values; bytes equal to the two calls and to the reference."""
    apply, device = _apply(kernel)
    sgd = MezoSGD.create(lr=0.05, eps=1e-2, seed=2**40 + 11, weight_decay=0.1 if decayed else 0.0)
    bits = (_special_f32 if dtype == "F32" else lambda k, s: random_bits(dtype, k, s))(max(n, 32), n + start)[:n]
    step, index = 6, 4
    c, d = sgd.coefficient(step, rule.encode_grad(-2.75)), sgd.decay(step) if decayed else 0.0
    a, b = bits_to_torch(bits, dtype, device), bits_to_torch(bits, dtype, device)
    _two_passes(apply, a, start, sgd, index, step, c, d)
    apply(b, start, sgd, index, step, cpu_kernel.UPDATE_PERTURB, c=c, d=d)
    assert _same_bits(a, b)
    want = _reference(bits, dtype, sgd, index, step, start, c, d)
    assert torch_to_bits(b, dtype).tolist() == want.tolist()
    assert (want != bits).mean() > 0.5  # the pass does move the weights: the test can fail


@pytest.mark.parametrize("kernel,dtype,eps_lr", _cases(
    ["BF16", "F16"], [(16.0, 4.0), (2.0**-20, 2.0**-18), (2.0**-10, 2.0**-30)],
    keep=lambda dtype, eps_lr: eps_lr[0] == 16.0))
def test_every_16_bit_pattern_fused(kernel, dtype, eps_lr):
    """All 65,536 patterns (zeros, subnormals, the largest finite values, inf, NaN) with steps that cross
    the roundings' edges: overflow at eps = 16, subnormal ties at 2^-20, sub-ulp moves at 2^-10. Here a
    fused pass that skipped the intermediate rounding (x + eps z_t - c z_t + eps z_t+1 rounded once)
    would part from the two passes."""
    eps, lr = eps_lr
    apply, device = _apply(kernel)
    bits = np.arange(1 << 16, dtype=np.uint16)
    sgd = MezoSGD.create(lr=lr, eps=eps, seed=99, weight_decay=0.125)
    step, c, d = 2, sgd.coefficient(2, rule.encode_grad(3.0)), sgd.decay(2)
    a, b = bits_to_torch(bits, dtype, device), bits_to_torch(bits, dtype, device)
    _two_passes(apply, a, 5, sgd, 1, step, c, d)
    apply(b, 5, sgd, 1, step, cpu_kernel.UPDATE_PERTURB, c=c, d=d)
    assert _same_bits(a, b)
    want = _reference(bits, dtype, sgd, 1, step, 5, c, d)
    assert torch_to_bits(b, dtype).tolist() == want.tolist()
    index = np.arange(5, 5 + bits.size, dtype=np.uint64)
    z, z1 = (R.noise(sgd.noise, sgd.seed, t, 1, index) for t in (step, step + 1))
    with np.errstate(invalid="ignore", over="ignore"):
        s = R.decay(R.to_f32(bits, dtype) + np.float32(eps) * z, d) - np.float32(c) * z
        once = R.round_to(s + np.float32(eps) * z1, dtype)
    assert (once != want).any()  # rounding once would be wrong here: the test can fail


@pytest.mark.skipif(not triton_kernels.available() or not (triton_kernels.interpreting() or torch.cuda.is_available()),
                    reason="needs Triton on a GPU or interpreted")
@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_triton_reads_c_and_go_from_device_memory(dtype):
    """c as a 0-dim float32 tensor and go as a 0-dim bool tensor: the bytes of the host-float launch,
    and go=false leaves exactly RESTORE_UPDATE's bytes (the P1 half skipped on the device)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sgd = MezoSGD.create(lr=0.05, eps=1e-3, seed=7, weight_decay=0.2)
    bits = random_bits(dtype, 2053, seed=3)
    c, d = sgd.coefficient(9, rule.encode_grad(1.5)), sgd.decay(9)
    ct = torch.tensor(c, dtype=torch.float32, device=device)
    host = bits_to_torch(bits, dtype, device)
    triton_kernels.apply_(host, 3, sgd, 2, 9, cpu_kernel.UPDATE_PERTURB, constants=[(c, d)], decay=True)
    for go in (None, True):
        w = bits_to_torch(bits, dtype, device)
        triton_kernels.apply_(w, 3, sgd, 2, 9, cpu_kernel.UPDATE_PERTURB, constants=[(ct, d)], decay=True,
                              go=None if go is None else torch.tensor(go, device=device))
        assert _same_bits(w, host)
    p3 = bits_to_torch(bits, dtype, device)
    triton_kernels.apply_(p3, 3, sgd, 2, 9, cpu_kernel.RESTORE_UPDATE, constants=[(ct, d)], decay=True)
    stopped = bits_to_torch(bits, dtype, device)
    triton_kernels.apply_(stopped, 3, sgd, 2, 9, cpu_kernel.UPDATE_PERTURB, constants=[(c, d)], decay=True,
                          go=torch.tensor(False, device=device))
    assert _same_bits(stopped, p3) and not _same_bits(stopped, host)
    assert torch_to_bits(p3, dtype).tolist() == _reference(bits, dtype, sgd, 2, 9, 3, c, d, go=False).tolist()


SPECS = [("BF16", 1), ("F32", 1031), ("BF16", 2100), ("F16", 9), ("BF16", 0), ("F32", 2048), ("F16", 777)]
DECAYS = [True, False, True, True, False, True, False]


def _model(device: str) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """Tensors of mixed dtypes, sizes (one empty) and decay flags; one non-contiguous (the grouped launch
    leaves it to the per-tensor path)."""
    bits = [random_bits(dt, max(n, 16), seed=i)[:n] for i, (dt, n) in enumerate(SPECS)]
    ts = [bits_to_torch(b, dt, device) for b, (dt, _) in zip(bits, SPECS)]
    ts[5] = ts[5].reshape(32, 64).t()
    bits[5] = torch_to_bits(ts[5].contiguous(), "F32")
    return ts, bits


def _backend_cases() -> list:
    """Every backend x c (float, tensor) x go (None, True, False); interpreted Triton (about 5 s a case)
    keeps three by default, the tensor c with both go values among them."""
    out = []
    for name in ("torch", "compiled", "triton"):
        for c_on_device, go in itertools.product([False, True], [None, True, False]):
            slow = name == "triton" and not torch.cuda.is_available() and (c_on_device, go) not in (
                (False, None), (True, True), (True, False))
            out.append(pytest.param(name, c_on_device, go, marks=[pytest.mark.slow] if slow else [],
                                    id=f"{name}-c-{'tensor' if c_on_device else 'float'}-go-{go}"))
    return out


@pytest.fixture
def use_backend(request):
    def use(name: str) -> None:
        if name == "compiled" and not cpu_kernel.available():
            pytest.skip("the compiled CPU kernel is not built")
        if name == "triton" and not triton_kernels.available():
            pytest.skip("Triton is not installed")
        steps.set_backend(name)
    yield use
    steps.set_backend("auto")


@pytest.mark.parametrize("backend,c_on_device,go", _backend_cases())
def test_update_perturb_all_equals_the_two_calls_on_every_backend(use_backend, backend, c_on_device, go):
    """steps.update_perturb_all_ (the grouped Triton launch, the C kernel threaded over slices, the torch
    path) against the reference per tensor: P3 of step t, then P1 of t+1 unless go is false."""
    use_backend(backend)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    sgd = MezoSGD.create(lr=0.05, eps=1e-3, seed=2**33 + 1, weight_decay=0.2)
    step = 4
    c, d = sgd.coefficient(step, rule.encode_grad(-1.5)), sgd.decay(step)
    ts, bits = _model(device)
    ct = torch.tensor(c, dtype=torch.float32, device=device) if c_on_device else c
    steps.update_perturb_all_(ts, sgd, step, ct, d, DECAYS, go=None if go is None else torch.tensor(go, device=device))
    for k, ((dt, _), b) in enumerate(zip(SPECS, bits)):
        want = _reference(b, dt, sgd, k, step, 0, c, d if DECAYS[k] else 0.0, go=go is not False)
        assert torch_to_bits(ts[k].contiguous(), dt).tolist() == want.tolist(), k
    two, _ = _model(device)
    steps.restore_update_all_(two, sgd, step, ct, d, DECAYS)
    if go is not False:
        steps.perturb_all_(two, sgd, step + 1, sgd.eps)
    for k, (x, y) in enumerate(zip(ts, two)):
        assert _same_bits(x.contiguous(), y.contiguous()), k


@pytest.mark.skipif(not triton_kernels.available() or not triton_kernels.interpreting(),
                    reason="needs Triton's interpreter")
def test_the_triton_training_step_never_reads_c_or_go_on_the_host(monkeypatch):
    """On a GPU float(c) or bool(go) would wait for every queued kernel. Under the interpreter the same
    host code runs, so a tripwire on those conversions catches any that would sync on CUDA."""
    sgd = MezoSGD.create(lr=0.05, eps=1e-3, seed=5, weight_decay=0.1)
    ts, _ = _model("cpu")
    ct, go = torch.tensor(0.25, dtype=torch.float32), torch.tensor(True)
    watched = {ct.data_ptr(), go.data_ptr()}  # and so every view of them

    def tripwire(name):
        real = getattr(torch.Tensor, name)

        def check(self, *a, **k):
            if self.data_ptr() in watched:
                raise AssertionError(f"host read of a device scalar: Tensor.{name}")
            return real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, check)

    for name in ("__float__", "__bool__", "__int__", "__index__", "item", "tolist", "cpu", "numpy"):
        tripwire(name)
    steps.set_backend("triton")
    try:
        steps.update_perturb_all_(ts, sgd, 3, ct, sgd.decay(3), DECAYS, go=go)
        steps.restore_update_all_(ts, sgd, 4, ct, sgd.decay(4), DECAYS)
    finally:
        steps.set_backend("auto")
    with pytest.raises(AssertionError, match="host read"):
        float(ct)  # the tripwire works


def _compiler() -> list[str] | None:
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    return cc if shutil.which(cc[0]) else None


@pytest.mark.skipif(_compiler() is None or sys.platform != "linux" or os.uname().machine != "x86_64",
                    reason="needs a C compiler on x86-64 Linux")
def test_every_isa_build_of_the_c_kernel_compiles_warning_free(tmp_path):
    """The generic, AVX2 and AVX-512 builds all come from one source (target attributes, picked at run
    time), so one compile makes all three; AVX-512 cannot run on every CI machine, so this at least holds
    it to compiling, with warnings as errors, and to emitting 512-bit code for each dtype and mode."""
    obj = tmp_path / "k.o"
    flags = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-std=c99", "-Wno-psabi", "-Wall", "-Wextra",
             "-Werror", "-Wno-unused-parameter", "-fPIC"]
    out = subprocess.run(_compiler() + flags + ["-c", str(ROOT / "mezo_replay/kernels/_cpu_kernel.c"), "-o", str(obj)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    if shutil.which("objdump"):
        asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(obj)], capture_output=True, text=True).stdout
        bodies = {name: asm.split(f"<{name}>:")[1].split("\n\n")[0] for name in ("apply_avx512", "apply_avx2")}
        assert "zmm" in bodies["apply_avx512"] and "ymm" in bodies["apply_avx2"]


@pytest.mark.skipif(not triton_kernels.available(), reason="Triton is not installed")
def test_native_bf16_is_the_default_only_where_it_rounds_like_the_spec():
    """Interpreted (numpy truncates in that conversion) or on the CPU: the integer rounding. On an
    NVIDIA GPU of sm_80 or later: the hardware conversion, whose bits test_kernels holds to the spec's."""
    assert triton_kernels.native_bf16_default(torch.device("cpu")) is False
    if torch.cuda.is_available():
        expect = torch.version.hip is None and torch.cuda.get_device_capability() >= (8, 0)
        assert triton_kernels.native_bf16_default(torch.device("cuda")) is expect


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not triton_kernels.available(), reason="needs a CUDA device")
def test_native_and_integer_bf16_give_the_same_fused_bytes_on_the_gpu():
    """The grouped fused launch with each bfloat16 rounding, on weights that cross rounding ties."""
    sgd = MezoSGD.create(lr=2.0**-18, eps=2.0**-20, seed=4, weight_decay=0.2)
    bits = [np.arange(1 << 16, dtype=np.uint16), random_bits("BF16", 4099, seed=2)]
    c = torch.tensor(sgd.coefficient(1, rule.encode_grad(-0.75)), dtype=torch.float32, device="cuda")
    out = []
    for native in (False, True):
        ts = [bits_to_torch(b, "BF16", "cuda") for b in bits]
        triton_kernels.apply_group_(ts, [0, 1], [True, False], sgd, 1, cpu_kernel.UPDATE_PERTURB, c=c, d=sgd.decay(1),
                                    go=torch.tensor(True, device="cuda"), native_bf16=native)
        out.append(ts)
    for a, b in zip(*out):
        assert _same_bits(a, b)


@pytest.mark.slow
@pytest.mark.skipif(not triton_kernels.available(), reason="Triton is not installed")
def test_the_fused_pass_runs_fewer_gpu_instructions_than_the_two_it_replaces():
    """tools/roofline.py's SASS counts (sm_90, no GPU needed): UPDATE_PERTURB per element below PERTURB +
    RESTORE_UPDATE (it saves a load, a store and the address work of a whole pass), above either alone."""
    code = """
from roofline import pass_counts
from mezo_replay.kernels import triton_kernels as T
n = {m: sum(c.values()) / per for m, (c, per) in ((m, pass_counts('BF16', m)) for m in
     (T.PERTURB, T.RESTORE_UPDATE, T.UPDATE_PERTURB))}
assert max(n[T.PERTURB], n[T.RESTORE_UPDATE]) < n[T.UPDATE_PERTURB] < 0.9 * (n[T.PERTURB] + n[T.RESTORE_UPDATE]), n
print("ok", n)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{ROOT / 'tools'}"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-3000:]
