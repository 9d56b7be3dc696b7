"""The fused kernels (compiled C on the CPU, Triton on CUDA or interpreted on the CPU) against the
numpy reference: the spec's element vectors, odd sizes and offsets, and element indices beyond 2^32.

Both kernels take a contiguous run of a tensor's elements with the index of its first element, so
a one-element tensor can stand for element 2^35 + 3 of a huge one: nothing that large is allocated.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mezo_replay.kernels import cpu_kernel, triton_kernels
from mezo_replay.arithmetic import philox, reference as R, rule
from mezo_replay.arithmetic.rule import MezoSGD
from mezo_replay.kernels.steps import step_constants

from .test_spec_vectors import TORCH_DTYPE, bits_to_torch, random_bits, torch_to_bits

ROOT = Path(__file__).resolve().parent.parent
MODES = (cpu_kernel.REPLAY, cpu_kernel.PERTURB, cpu_kernel.RESTORE_UPDATE)
assert MODES == (triton_kernels.REPLAY, triton_kernels.PERTURB, triton_kernels.RESTORE_UPDATE)


def _kernels() -> list:
    out = []
    for isa in cpu_kernel.isas():  # every vector width this CPU runs, not only the one it picks
        out.append(pytest.param((f"compiled-{isa}", "cpu"), id=f"compiled-{isa}"))
    if triton_kernels.available() and triton_kernels.interpreting():
        out.append(pytest.param(("triton", "cpu"), id="triton-interpreted"))
    if triton_kernels.available() and torch.cuda.is_available():
        out.append(pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.cuda))
    return out or [pytest.param(None, marks=pytest.mark.skip("no kernel here"))]


@pytest.fixture(params=_kernels())
def kernel(request):
    """(apply, device): apply(w, start, rule, index, first_step, mode, constants=, decay=, scale=)."""
    name, device = request.param

    def apply(w, start, sgd, index, first_step, mode, *, constants=((0.0, 0.0),), decay=False, scale=0.0):
        if name.startswith("compiled-"):
            cs = constants if decay else [(c, 0.0) for c, _ in constants]
            cpu_kernel.apply_(w, start, sgd, index, first_step, mode, constants=cs, scale=scale,
                              isa=name.removeprefix("compiled-"))
        else:
            triton_kernels.apply_(w, start, sgd, index, first_step, mode, constants=constants, decay=decay,
                                  scale=scale, steps_per_launch=4)
    return apply, device


def _index_with_noise(sgd: MezoSGD, step: int, k: int, z_bits: int, cache: dict) -> int:
    """An element index whose noise at (step, k) is exactly z: the element vectors give z, and a
    kernel makes its own noise, so the vector's w goes where the generator draws that z."""
    if z_bits not in cache:
        table = R.gauss16_table().view(np.uint32)
        start = 0
        while z_bits not in cache:
            u = philox.random_u16(sgd.seed, step, k, start, 1 << 20).numpy()
            hits = np.flatnonzero(table[u] == z_bits)
            if hits.size:
                cache[z_bits] = start + int(hits[0])
            start += 1 << 20
            assert start < 1 << 26, hex(z_bits)
    return cache[z_bits]


def test_element_vectors(kernel):
    """Every case of spec/vectors/rule.json (zeros, subnormals, overflow, inf, NaN, ties) through the
    kernel's three training modes, one element at the index that draws the case's z."""
    apply, device = kernel
    cases = json.loads((ROOT / "spec" / "vectors" / "rule.json").read_text())["elements"]
    found: dict = {}
    for case in cases:
        dtype = case["dtype"]
        sgd = MezoSGD(lr=2.0**-10, eps=case["eps"], seed=12345)
        i = _index_with_noise(sgd, 7, 3, int(case["z"], 16), found)
        w = bits_to_torch(np.array([int(case["w"], 16)], dtype=R.BITS_DTYPE[dtype]), dtype, device)
        got = []
        for mode, scale in ((cpu_kernel.PERTURB, case["eps"]), (cpu_kernel.PERTURB, -2.0 * case["eps"]),
                            (cpu_kernel.RESTORE_UPDATE, 0.0)):
            d = case.get("d", 0.0)
            apply(w, i, sgd, 3, 7, mode, constants=[(case["c"], d)], decay=d != 0.0, scale=scale)
            got.append(int(torch_to_bits(w, dtype)[0]))
        assert got == [int(case[p], 16) for p in ("p1", "p2", "p3")], case


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
@pytest.mark.parametrize("n,start", [(1, 0), (7, 0), (8, 0), (9, 3), (1023, 5), (1025, 0), (2053, 13), (3000, 8)])
def test_odd_sizes_and_offsets_replay_like_the_reference(kernel, dtype, n, start):
    apply, device = kernel
    bits = random_bits(dtype, max(n, 16), seed=n + start)[:n]
    sgd = MezoSGD.create(lr=0.02, eps=1e-3, seed=2**40 + 9, weight_decay=0.25,
                         schedule=rule.Schedule("linear", warmup_steps=1, total_steps=6))
    grads = [rule.encode_grad(g) for g in (0.5, -3.25, 1e-35, 40.0, -0.001, 7.0)]
    want = R.replay(bits, dtype, seed=sgd.seed, k=4, noise_name=sgd.noise, rule=sgd.header_fields()["rule"],
                    grads=grads, decayed=True, start=start)
    w = bits_to_torch(bits, dtype, device)
    apply(w, start, sgd, 4, 0, cpu_kernel.REPLAY, constants=step_constants(sgd, grads), decay=True)
    assert torch_to_bits(w, dtype).tolist() == want.tolist()


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
@pytest.mark.parametrize("eps,lr", [(16.0, 4.0), (2.0**-20, 2.0**-18), (2.0**-10, 2.0**-30)])
def test_every_16_bit_pattern_replays_like_the_reference(kernel, dtype, eps, lr):
    """All 65,536 bit patterns as weights (zeros, subnormals, the largest finite values, inf, NaN),
    moved by steps that cross the roundings' edges: overflow to inf at eps = 16, subnormal ties at
    2^-20, sub-ulp moves at 2^-10. The kernels' vector lanes round with integer formulas and f16
    subnormals with one addition; this is where such a shortcut would part from the reference."""
    apply, device = kernel
    bits = np.arange(1 << 16, dtype=np.uint16)
    sgd = MezoSGD.create(lr=lr, eps=eps, seed=99, weight_decay=0.125)
    grads = [rule.encode_grad(g) for g in (3.0, -0.5, 1e-3)]
    want = R.replay(bits, dtype, seed=sgd.seed, k=1, noise_name=sgd.noise, rule=sgd.header_fields()["rule"],
                    grads=grads, decayed=True, start=5)
    assert (want != bits).mean() > 0.3  # the steps do move most weights: the test can fail
    w = bits_to_torch(bits, dtype, device)
    apply(w, 5, sgd, 1, 0, cpu_kernel.REPLAY, constants=step_constants(sgd, grads), decay=True)
    assert torch_to_bits(w, dtype).tolist() == want.tolist()


@pytest.mark.parametrize("start", [2**32 - 5, 2**32 + 8, 2**35 + 3, 2**62 + 1])
@pytest.mark.parametrize("noise_name", ["gaussian16", "rademacher16"])
def test_indices_beyond_2_32(kernel, start, noise_name):
    """The block index's high word (counter c1) is live: a kernel that dropped it, or wrapped the
    element index at 32 bits, would draw another element's noise here."""
    apply, device = kernel
    n = 21
    bits = random_bits("BF16", n, seed=start % 1000)
    sgd = MezoSGD.create(lr=0.01, eps=1e-3, seed=3, noise=noise_name)
    grads = [rule.encode_grad(g) for g in (1.5, -2.0, 0.75)]
    want = R.replay(bits, "BF16", seed=sgd.seed, k=2, noise_name=noise_name, rule=sgd.header_fields()["rule"],
                    grads=grads, start=start)
    wrapped = R.replay(bits, "BF16", seed=sgd.seed, k=2, noise_name=noise_name, rule=sgd.header_fields()["rule"],
                       grads=grads, start=start % 2**32)
    if start >= 2**32:
        assert want.tolist() != wrapped.tolist()  # the test can fail
    w = bits_to_torch(bits, "BF16", device)
    apply(w, start, sgd, 2, 0, cpu_kernel.REPLAY, constants=step_constants(sgd, grads))
    assert torch_to_bits(w, "BF16").tolist() == want.tolist()


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_training_modes_chain_to_replay(kernel, dtype):
    """P1, P2, P3 launched one by one, as training runs them, land where one REPLAY launch does."""
    apply, device = kernel
    bits = random_bits(dtype, 777, seed=5)
    sgd = MezoSGD.create(lr=0.05, eps=1e-2, seed=11, weight_decay=0.1)
    grads = [rule.encode_grad(g) for g in (2.0, -1.5, 0.25, 9.0)]
    constants = step_constants(sgd, grads)
    a, b = bits_to_torch(bits, dtype, device), bits_to_torch(bits, dtype, device)
    for t, (c, d) in enumerate(constants):
        apply(a, 0, sgd, 1, t, cpu_kernel.PERTURB, scale=sgd.eps)
        apply(a, 0, sgd, 1, t, cpu_kernel.PERTURB, scale=-2.0 * sgd.eps)
        apply(a, 0, sgd, 1, t, cpu_kernel.RESTORE_UPDATE, constants=[(c, d)], decay=True)
    apply(b, 0, sgd, 1, 0, cpu_kernel.REPLAY, constants=constants, decay=True)
    assert torch_to_bits(a, dtype).tolist() == torch_to_bits(b, dtype).tolist()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_native_bf16_rounding_equals_the_spec_on_every_pattern():
    """The hardware conversion the kernel can use for bfloat16 (native_bf16) against the spec's
    integer rounding, on all 2^32 float32 patterns (NaN aside), through the real kernel once too."""
    for lo in range(0, 2**32, 2**28):
        x = torch.arange(lo, lo + 2**28, dtype=torch.int64, device="cuda").to(torch.int32).view(torch.float32)
        got = x.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
        b = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        want = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
        nan = torch.isnan(x)
        assert torch.equal(got[~nan], want.to(torch.int32)[~nan]), hex(lo)
    bits = random_bits("BF16", 4099, seed=1)
    sgd = MezoSGD.create(lr=0.02, eps=1e-3, seed=1, weight_decay=0.2)
    constants = step_constants(sgd, [rule.encode_grad(g) for g in (0.5, -3.0, 1e-30, 40.0)])
    a, b = bits_to_torch(bits, "BF16", "cuda"), bits_to_torch(bits, "BF16", "cuda")
    triton_kernels.apply_(a, 0, sgd, 0, 0, cpu_kernel.REPLAY, constants=constants, decay=True)
    triton_kernels.apply_(b, 0, sgd, 0, 0, cpu_kernel.REPLAY, constants=constants, decay=True, native_bf16=True)
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.skipif(not triton_kernels.available(), reason="Triton is not installed")
@pytest.mark.parametrize("every", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["covering", "every"])
def test_every_kernel_variant_compiles_for_hopper_without_flushing_subnormals(every):
    """Both kernels (per tensor, and grouped for training) compiled for sm_90 with Triton's own ptxas, in a
    process without TRITON_INTERPRET: the GPU build of each mode (the fused UPDATE_PERTURB too, and the
    variants reading c and go from device memory), dtype and noise works on a machine with no GPU, its PTX
    has no .ftz (which would flush subnormals to zero and break the spec on tiny weights), and bfloat16
    rounds by the hardware conversion there by default, by the integer formula when asked.
    The default run compiles a covering set (every mode, dtype, noise, flag value and launch shape at least
    once: about 20 of the 80 builds, a minute less on two cores); -m slow compiles all of them."""
    code = f"EVERY = {every}\n" + """
import torch
from mezo_replay.kernels import triton_kernels as T
variants = []
for dt in (torch.float32, torch.bfloat16, torch.float16):
    for mode in (T.REPLAY, T.PERTURB, T.RESTORE_UPDATE, T.UPDATE_PERTURB):
        for noise in T.NOISES:
            for decay in ((False, True) if mode != T.PERTURB else (False,)):  # PERTURB never decays
                for group in ((False, True) if mode != T.REPLAY else (False,)):
                    variants.append((dt, mode, dict(noise=noise, decay=decay, group=group)))
        if mode in (T.RESTORE_UPDATE, T.UPDATE_PERTURB):  # c (and go) read from device memory
            for group in (False, True):
                variants.append((dt, mode, dict(decay=True, group=group, c_on_device=True,
                                                go_on_device=mode == T.UPDATE_PERTURB)))
for mode in (T.REPLAY, T.UPDATE_PERTURB):  # bfloat16's integer rounding (the default before sm_80)
    variants.append((torch.bfloat16, mode, dict(decay=True, native_bf16=False)))
if not EVERY:  # a covering set, greedily: every (dtype, mode) pair and every option's every value once
    def features(dt, mode, kw):
        return {("pair", dt, mode), *((k, v) for k, v in kw.items())}
    left = set().union(*(features(*v) for v in variants))
    chosen = []
    while left:
        best = max(variants, key=lambda v: len(features(*v) & left))
        chosen.append(best)
        left -= features(*best)
    variants = chosen
print(len(variants), "variants")
for dt, mode, kw in variants:
    ptx = T.compile_for_gpu(dt, mode, **kw).asm["ptx"]
    assert ".ftz" not in ptx, (dt, mode, kw)
    assert "sm_90" in ptx
    native = dt == torch.bfloat16 and kw.get("native_bf16", True)
    assert ("cvt.rn.bf16.f32" in ptx) == native, (dt, mode, kw)
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_backend_auto_picks_the_kernel_for_each_device():
    from mezo_replay.kernels import steps

    steps.set_backend("auto")
    cpu = torch.zeros(3)
    assert steps._path(cpu) == ("compiled" if cpu_kernel.available() else "torch")
    assert steps._path(torch.zeros(3, dtype=torch.float64)) == "torch"
    steps.set_backend("torch")
    assert steps._path(cpu) == "torch"
    if torch.cuda.is_available():
        steps.set_backend("auto")
        assert steps._path(cpu.cuda()) == ("triton" if triton_kernels.available() else "torch")
    steps.set_backend("auto")


def test_dtypes_cover_the_spec():
    assert set(triton_kernels.DTYPES) == set(cpu_kernel.DTYPES) == set(TORCH_DTYPE.values())


@pytest.mark.parametrize("seed,first_step", [(2**64 - 1, 2**32 - 3), (2**63 + 2**31 + 7, 2**31 - 1), (2**31, 0)])
def test_seeds_and_steps_at_the_edges_of_32_bits(kernel, seed, first_step):
    """Key words and step counters at or beyond 2^31 (where a signed 32-bit argument would wrap)."""
    apply, device = kernel
    bits = random_bits("F32", 40, seed=7)
    sgd = MezoSGD.create(lr=0.01, eps=1e-3, seed=seed)
    grads = [rule.encode_grad(g) for g in (1.5, -2.0, 0.75)]
    constants = [(sgd.coefficient(first_step + j, g), 0.0) for j, g in enumerate(grads)]
    w = bits_to_torch(bits, "F32", device)
    apply(w, 2**31 + 3, sgd, 2**31 + 1, first_step, cpu_kernel.REPLAY, constants=constants)
    want = bits.copy()
    index = np.arange(2**31 + 3, 2**31 + 43, dtype=np.uint64)
    for j, (c, _) in enumerate(constants):
        z = R.noise(sgd.noise, seed, first_step + j, 2**31 + 1, index)
        want = R.phases(want, "F32", z, sgd.eps, c)[2]
    assert torch_to_bits(w, "F32").tolist() == want.tolist()


@pytest.mark.skipif(not triton_kernels.available() or not (triton_kernels.interpreting() or torch.cuda.is_available()),
                    reason="needs Triton on a GPU or interpreted")
def test_grouped_training_launch_equals_the_reference_per_tensor():
    """Training's grouped launch (all tensors of a dtype at once, mixed sizes and decay flags, a
    non-contiguous one left to the per-tensor path) lands where the reference does, tensor by tensor."""
    from mezo_replay.kernels import steps

    device = "cuda" if torch.cuda.is_available() else "cpu"
    specs = [("BF16", 1), ("F32", 1031), ("BF16", 4099), ("F16", 9), ("BF16", 0), ("F32", 2048)]
    decays = [True, False, True, True, False, True]
    bits = [random_bits(dt, max(n, 16), seed=i)[:n] for i, (dt, n) in enumerate(specs)]
    sgd = MezoSGD.create(lr=0.05, eps=1e-3, seed=2**33 + 1, weight_decay=0.2)
    grads = [rule.encode_grad(g) for g in (2.0, -1.5)]
    ts = [bits_to_torch(b, dt, device) for b, (dt, _) in zip(bits, specs)]
    ts[5] = ts[5].reshape(32, 64).t()  # non-contiguous: element order stays that of the logical tensor
    bits[5] = torch_to_bits(ts[5].contiguous(), "F32")
    steps.set_backend("triton")
    try:
        for t, g in enumerate(grads):
            steps.perturb_all_(ts, sgd, t, sgd.eps)
            steps.perturb_all_(ts, sgd, t, -2.0 * sgd.eps)
            steps.restore_update_all_(ts, sgd, t, sgd.coefficient(t, g), sgd.decay(t), decays)
    finally:
        steps.set_backend("auto")
    for k, ((dt, n), b) in enumerate(zip(specs, bits)):
        want = R.replay(b, dt, seed=sgd.seed, k=k, noise_name=sgd.noise, rule=sgd.header_fields()["rule"],
                        grads=grads, decayed=decays[k])
        assert torch_to_bits(ts[k].contiguous(), dt).tolist() == want.tolist(), k


def test_step_constants_are_the_rules_own_step_by_step():
    """The vectorised (c, d) of a replay plan equal MezoSGD.coefficient / .decay bit for bit, through a
    warmup and cosine schedule with decay; a step the rule refuses still raises the rule's error."""
    sgd = MezoSGD.create(lr=3e-4, eps=1e-3, seed=5, weight_decay=0.1,
                         schedule=rule.Schedule("cosine", warmup_steps=30, total_steps=900))
    grads = [rule.encode_grad(float(g)) for g in np.random.default_rng(4).standard_normal(1000) * 40]
    want = [(sgd.coefficient(11 + j, g), sgd.decay(11 + j)) for j, g in enumerate(grads)]
    assert step_constants(sgd, grads, first_step=11) == want
    assert step_constants(sgd, []) == []
    with pytest.raises(ValueError, match="step 1"):
        step_constants(sgd, [grads[0], 0x7F80])  # +inf


@pytest.mark.skipif(not cpu_kernel.available(), reason="the compiled kernel is not built")
def test_a_small_tensor_over_many_steps_is_split_across_threads_with_the_same_bits(monkeypatch):
    """A LoRA-sized tensor (16,384 elements) replayed over thousands of steps goes to several threads
    (else one core idles through a small adapter's whole rebuild), and gives the bits of one kernel call."""
    from mezo_replay.kernels import steps

    sgd = MezoSGD.create(lr=1e-3, eps=1e-3, seed=9)
    constants = step_constants(sgd, [rule.encode_grad(float(g)) for g in
                                     np.random.default_rng(1).standard_normal(4096)])
    w = torch.randn(16384, generator=torch.Generator().manual_seed(2))
    whole = w.clone()
    cpu_kernel.apply_(whole, 0, sgd, 3, 0, cpu_kernel.REPLAY, constants=constants)
    calls = []
    real = cpu_kernel.apply_
    monkeypatch.setattr(cpu_kernel, "apply_", lambda t, start, *a, **k: calls.append(start) or real(t, start, *a, **k))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        steps.replay_tensor_(w, sgd, 3, constants)
    finally:
        torch.set_num_threads(threads)
    assert sorted(calls) == [0, 8192]
    assert torch.equal(w.view(torch.int32), whole.view(torch.int32))
