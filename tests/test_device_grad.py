"""device_coefficient against the host arithmetic it replaces (rule.encode_grad, rule.coefficient): the
same bits, coefficient and failure for every pair of losses, and no host synchronisation on the way."""
from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st

from mezo_replay.arithmetic.device_grad import device_coefficient
from mezo_replay.arithmetic.rule import MezoSGD, Schedule

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_BITS_DTYPE = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
               torch.float16: torch.int16}
SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def host(lp: torch.Tensor, lm: torch.Tensor, rule: MezoSGD, t: int) -> tuple[int, int, bool]:
    """What MeZO.step computes on the host: (bits, c's binary32 pattern, failed)."""
    try:
        bits = rule.encode_grad((float(lp) - float(lm)) / (2.0 * rule.eps))  # the rule's encoding
        c = rule.coefficient(t, bits)
    except ValueError:
        return 0, 0, True
    assert struct.unpack("<f", struct.pack("<f", c))[0] == c  # c is a binary32 value, so the pattern says it all
    return bits, struct.unpack("<I", struct.pack("<f", c))[0], False


def device(lp: torch.Tensor, lm: torch.Tensor, rule: MezoSGD, t: int) -> tuple[int, int, bool]:
    bits, c, failed = device_coefficient(lp, lm, rule, t)
    assert (bits.dtype, c.dtype, failed.dtype) == (torch.int32, torch.float32, torch.bool)
    assert bits.shape == c.shape == failed.shape == () and bits.device == c.device == failed.device == lp.device
    return int(bits), int(c.view(torch.int32)) & 0xFFFF_FFFF, bool(failed)


def check(lp: torch.Tensor, lm: torch.Tensor, rule: MezoSGD, t: int = 0) -> tuple[int, int, bool]:
    want = host(lp, lm, rule, t)
    assert device(lp, lm, rule, t) == want, (float(lp), float(lm), rule, t)
    return want


def f64(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def rule_of(lr: float, eps: float = 2.0**-10, schedule: Schedule | None = None) -> MezoSGD:
    return MezoSGD.create(lr=lr, eps=eps, seed=0, schedule=schedule)  # quantises lr and eps as a writer does


# -- strategies ------------------------------------------------------------------------------------

@st.composite
def losses(draw) -> torch.Tensor:
    """Any value of any loss dtype: raw bit patterns (subnormals, infinities, NaN payloads) or floats."""
    dtype = draw(st.sampled_from(DTYPES))
    if draw(st.booleans()):
        width = torch.finfo(dtype).bits
        raw = draw(st.integers(-(1 << (width - 1)), (1 << (width - 1)) - 1))
        x = torch.tensor(raw, dtype=_BITS_DTYPE[dtype]).view(dtype)
    else:
        x = torch.tensor(draw(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True)),
                         dtype=torch.float64).to(dtype)
    return x.reshape(1) if draw(st.booleans()) else x  # a 1-element loss works like a 0-dim one


def significant(bits: int, lo: int, hi: int):
    """Values with at most `bits` significant bits in [2^lo, 2^hi], the limits among them."""
    drawn = st.builds(lambda m, e: math.ldexp(m, e - bits + 1), st.integers(1 << (bits - 1), (1 << bits) - 1),
                      st.integers(lo, hi - 1))
    return st.one_of(st.sampled_from([2.0**lo, 2.0**hi]), drawn)


@st.composite
def rules(draw) -> tuple[MezoSGD, int]:
    """A valid rule (eps 16 bits in [2^-60, 2^60], lr 24 bits in [2^-100, 2^100], any schedule) and a step."""
    name = draw(st.sampled_from(["constant", "linear", "cosine"]))
    total = draw(st.integers(0 if name == "constant" else 1, 50))
    schedule = Schedule(name, draw(st.integers(0, total)), total)
    rule = rule_of(draw(significant(24, -100, 100)), draw(significant(16, -60, 60)), schedule)
    return rule, draw(st.integers(0, total + 3))


# -- property tests ----------------------------------------------------------------------------------

@SETTINGS
@given(losses(), losses(), rules())
def test_any_losses_and_rule_give_the_host_bits(lp, lm, rule_t):
    check(lp, lm, *rule_t)


@SETTINGS
@given(st.floats(-1e3, 1e3), st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=True,
                                        min_value=-1e-3, max_value=1e-3), rules())
def test_close_losses_give_the_host_bits(lm, delta, rule_t):
    """The usual case: two nearby losses, whose difference rounds in the subtraction."""
    check(f64(lm + delta), f64(lm), *rule_t)


@SETTINGS
@given(st.integers(256, 511).filter(lambda n: n % 2), st.integers(-110, 135), st.booleans(),
       significant(16, -60, 60), st.sampled_from([0.0, 1.0, -3.5, 1e6]))
@example(511, 118, False, 1.0, 0.0)  # 511 * 2^118 ties up to 2^127: beyond bf16's range
@example(511, -109, True, 1.0, 0.0)  # just under 2^-100 before rounding: recorded as 0
def test_ties_at_8_bits_round_to_even(n, k, negative, eps, lm):
    """g with 9 significant bits, the last one set: exactly halfway between two bf16 values."""
    g = math.ldexp(-n if negative else n, k)
    lp = lm + g * 2.0 * eps
    assume(math.isfinite(lp) and (lp - lm) / (2.0 * eps) == g)  # the pair really gives the tie
    check(f64(lp), f64(lm), rule_of(1.0, eps))


@SETTINGS
@given(st.integers(1 << 16, (1 << 17) - 1).filter(lambda n: n % 2), st.integers(-117, 83),
       st.integers(-20, 20), st.booleans())
def test_ties_at_16_bits_round_to_even(n, k, j, negative):
    """lr with 17 significant bits (odd) times a power-of-two gradient: c ties at 16 bits."""
    lr = math.ldexp(n, k)
    assume(2.0**-100 <= lr <= 2.0**100)
    g = -(2.0**j) if negative else 2.0**j
    eps = 2.0**-10
    check(f64(g * 2.0 * eps), f64(0.0), rule_of(lr, eps))


# -- edge cases ---------------------------------------------------------------------------------------

EDGES = [  # (loss+, loss-, lr, eps, what the host gives); with eps = 1/2, g = loss+ - loss-
    (1.0, 1.0, 1e-3, 2.0**-10, "zero"),
    (-0.0, 0.0, 1e-3, 2.0**-10, "zero"),
    (math.inf, 1.0, 1e-3, 2.0**-10, "fail"),
    (1.0, math.inf, 1e-3, 2.0**-10, "fail"),
    (math.inf, math.inf, 1e-3, 2.0**-10, "fail"),  # inf - inf is NaN
    (math.nan, 1.0, 1e-3, 2.0**-10, "fail"),
    (1e308, -1e308, 1e-3, 2.0**-10, "fail"),  # the difference overflows
    (1e30, 0.0, 1e-3, 2.0**-60, "fail"),  # a finite gradient beyond bf16's range
    (2.0**127 * (1 - 2.0**-9), 0.0, 1e-3, 0.5, "fail"),  # ties up to 2^127
    (2.0**127 * (1 - 2.0**-8), 0.0, 2.0**-100, 0.5, "ok"),  # the largest bf16 gradient, c tiny: 0
    (2.0**-100, 0.0, 1.0, 0.5, "ok"),  # g = 2^-100 exactly: kept
    (2.0**-100 * (1 - 2.0**-20), 0.0, 1.0, 0.5, "zero"),  # below 2^-100 before rounding: 0
    (5e-324, 0.0, 1.0, 2.0**-60, "zero"),  # a subnormal difference
    (1.0, 0.0, 2.0**100, 0.5, "ok"),  # g = 1: c = 2^100 exactly is allowed
    (1.0078125, 0.0, 2.0**100, 0.5, "fail"),  # c just beyond 2^100: diverged
    (0.99609375, 0.0, 2.0**-100 * (1 + 2.0**-8 + 2.0**-16), 0.5, "ok"),  # c = 2^-100 (1 - 2^-24) rounds up: kept
    (2.0, 0.0, 2.0**-100, 2.0**60, "ok"),  # g = 2^-60 recorded, c = 2^-160 is 0
    (-2.0**-1, 2.0**-1, 2.0**-100, 2.0**-60, "ok"),
]


@pytest.mark.parametrize("lp,lm,lr,eps,kind", EDGES)
def test_edge_cases(lp, lm, lr, eps, kind):
    bits, c, failed = check(f64(lp), f64(lm), rule_of(lr, eps))
    assert {"fail": failed, "zero": bits == 0 and not failed, "ok": bits != 0 and not failed}[kind]


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_loss_dtype_and_mixed_dtypes(dtype):
    rule = MezoSGD.create(lr=1e-3, eps=1e-3, seed=0)
    for a, b in [(2.3, 2.2999), (7.0, -1e-3), (65504.0, 1.0), (1e-5, 3e-8)]:
        check(torch.tensor(a).to(dtype), torch.tensor(b).to(dtype), rule)
        check(torch.tensor([a]).to(dtype), torch.tensor(b, dtype=torch.float32), rule)


def test_schedules_use_the_learning_rate_of_the_step():
    """Warmup, decay, and the end of a linear schedule where lr_t is 0 and so is c."""
    for name in ("linear", "cosine"):
        rule = rule_of(0.01, 2.0**-10, Schedule(name, 3, 10))
        results = [check(f64(1.5), f64(1.25), rule, t) for t in range(13)]
        assert len({c for _, c, _ in results}) > 5 and results[-1][1] == 0


# -- no host synchronisation ---------------------------------------------------------------------------

def test_runs_on_tensors_that_have_no_values():
    """On the meta device a tensor has a shape and a dtype but no values: anything that read one on the host
    (item, float, a branch on a comparison) would raise. So the function never waits for the device."""
    meta = torch.tensor(1.0, device="meta")
    bits, c, failed = device_coefficient(meta, meta.to(torch.bfloat16), rule_of(1e-3), 0)
    assert (bits.device.type, c.device.type, failed.device.type) == ("meta",) * 3


def test_reads_no_value_on_the_host(monkeypatch):
    """Every Python-level way to read a tensor's value raises during the call."""
    def refuse(*_a, **_k):
        raise AssertionError("device_coefficient read a tensor value on the host")

    lp, lm, rule = f64(2.5), torch.tensor(2.25, dtype=torch.bfloat16), rule_of(1e-3)
    want = host(lp, lm, rule, 0)
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__"):
            m.setattr(torch.Tensor, name, refuse)
        out = device_coefficient(lp, lm, rule, 0)
    assert (int(out[0]), int(out[1].view(torch.int32)) & 0xFFFF_FFFF, bool(out[2])) == want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_host_bits_without_synchronising():
    """On a GPU: CUDA's binary64 arithmetic gives the same bits, for every gradient encoding, and torch's
    sync debug mode sees no sync."""
    import random

    rng = random.Random(11)
    rules = [MezoSGD.create(lr=1e-3, eps=1e-3, seed=0),
             MezoSGD.create(lr=1e-3, eps=1e-3, seed=0, grad_encoding="fp8", grad_scale=2.0**-3),
             MezoSGD.create(lr=1e-3, eps=1e-3, seed=0, grad_encoding="sign", grad_scale=4.0)]
    cases = [(rng.gauss(2.0, 1.0), rng.gauss(2.0, 1.0)) for _ in range(300)] + [(lp, lm) for lp, lm, *_ in EDGES]
    for dtype, rule in ((d, r) for d in DTYPES for r in rules):
        for lp, lm in cases:
            a, b = torch.tensor(lp).to(dtype), torch.tensor(lm).to(dtype)
            want = host(a, b, rule, 0)
            a, b = a.cuda(), b.cuda()
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = device_coefficient(a, b, rule, 0)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            got = (int(out[0]), int(out[1].view(torch.int32)) & 0xFFFF_FFFF, bool(out[2]))
            assert got == want, (dtype, rule.grad_encoding, lp, lm)
