"""Writes the spec's test vectors (spec/vectors/{philox,noise,rule,init}.json and the tiny* trajectories)
from the literal reference implementation and the real optimizer. Run after any change to the spec's
arithmetic; tests hold every implementation to these files, and the diff shows what a change moved
(unchanged vectors come out byte for byte the same).

    python tools/make_vectors.py
"""
from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import numpy as np

from mezo_replay.arithmetic import reference as R

SPEC = Path(__file__).resolve().parent.parent / "spec" / "vectors"

# Random123's published known answers (kat_vectors, philox4x32 10 rounds).
PHILOX_KAT = [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
]


def hx(v: int, width: int) -> str:
    return f"0x{v:0{width}x}"


def f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def philox() -> dict:
    cases = []
    for ctr, key, out in PHILOX_KAT:
        assert list(R.philox4x32_10(tuple(ctr), tuple(key))) == out, "reference fails Random123's KAT"
        cases.append({"counter": [hx(c, 8) for c in ctr], "key": [hx(k, 8) for k in key],
                      "output": [hx(o, 8) for o in out]})
    return {"about": "Philox4x32-10 known answers from Random123 (counter, key -> output words)",
            "cases": cases}


def noise() -> dict:
    coords = [(0, 0, 0, i) for i in range(16)]
    coords += [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (42, 7, 3, 1000)]
    coords += [(2**32 + 1, 5, 2, 2**32 - 1), (2**32 + 1, 5, 2, 2**32), (2**32 + 1, 5, 2, 2**35 + 9),
               (2**64 - 1, 2**32 - 1, 2**32 - 1, 2**64 - 1), (123456789, 19999, 300, 7 * 2**40 + 3)]
    cases = []
    for seed, t, k, i in coords:
        idx = np.array([i], dtype=np.uint64)
        u = int(R.random_u16(seed, t, k, idx)[0])
        g = float(R.noise("gaussian16", seed, t, k, idx)[0])
        r = float(R.noise("rademacher16", seed, t, k, idx)[0])
        cases.append({"seed": str(seed), "step": t, "tensor": k, "element": str(i), "u": u,
                      "gaussian16": hx(f32_bits(g), 8), "rademacher16": r})
    return {"about": "16-bit draws and noise values (binary32 bits) for (seed, step, tensor, element); "
                     "seed and element are decimal strings", "cases": cases}


def rule() -> dict:
    table = R.gauss16_table()
    zs = [float(table[32768]), float(table[65535]), float(table[0]), float(table[40000]), 1.0, -1.0]
    eps_values = [R.round_significant(1e-3, 16), 0.5, 2.0**-60, 2.0**60, R.round_significant(0.1, 16)]
    c_values = [0.0, R.round_significant(3.3e-5, 16), -R.round_significant(1e-7, 16), 2.0**-100, -2.0**100]
    special = {
        "F32": [0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x3F800000, 0x7F7FFFFF, 0xFF7FFFFF,
                0x7F800000, 0xFF800000, 0x7FC00000, 0xFFA00001, 0x3A83126F],
        "BF16": [0x0000, 0x8000, 0x0001, 0x807F, 0x3F80, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80, 0x7FC0, 0xFFA1,
                 0x3A83],
        "F16": [0x0000, 0x8000, 0x0001, 0x83FF, 0x3C00, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00, 0x7E00, 0xFE01,
                0x1419],
    }
    rng = np.random.default_rng(20261123)
    cases = []
    for dtype, ws in special.items():
        width = 8 if dtype == "F32" else 4
        pool = ws + [int(v) for v in rng.integers(0, 2**(4 * width), size=12)]
        for n, w in enumerate(pool):
            z = zs[n % len(zs)]
            eps = eps_values[n % len(eps_values)]
            c = c_values[(n // 2) % len(c_values)]
            bits = np.array([w], dtype=R.BITS_DTYPE[dtype])
            out = R.phases(bits, dtype, np.array([z], dtype=np.float32), eps, c)
            cases.append({"dtype": dtype, "w": hx(w, width), "z": hx(f32_bits(z), 8), "eps": eps, "c": c,
                          "p1": hx(int(out[0][0]), width), "p2": hx(int(out[1][0]), width),
                          "p3": hx(int(out[2][0]), width)})
    # Near-ties: w one half-ulp (of D) away from w + a, so P1 hits a rounding tie of D exactly.
    for dtype, w in (("BF16", 0x3F80), ("F16", 0x3C00)):
        width = 4
        half_ulp = 2.0**-8 if dtype == "BF16" else 2.0**-11
        for z, eps in ((1.0, half_ulp), (-1.0, half_ulp), (1.0, 3 * half_ulp)):
            bits = np.array([w], dtype=np.uint16)
            out = R.phases(bits, dtype, np.array([z], dtype=np.float32), eps, 0.0)
            cases.append({"dtype": dtype, "w": hx(w, width), "z": hx(f32_bits(z), 8), "eps": eps, "c": 0.0,
                          "p1": hx(int(out[0][0]), width), "p2": hx(int(out[1][0]), width),
                          "p3": hx(int(out[2][0]), width)})
    # Decay: the same special values through P3 with a decay factor (rule.md DECAY).
    for dtype, ws in special.items():
        width = 8 if dtype == "F32" else 4
        for n, w in enumerate(ws[:10] + [int(v) for v in rng.integers(0, 2**(4 * width), size=6)]):
            z, eps = zs[n % len(zs)], eps_values[n % 2]
            c, d = c_values[1 + n % 2], [2.0**-40, R.round_significant(1e-3, 12), 0.75][n % 3]
            bits = np.array([w], dtype=R.BITS_DTYPE[dtype])
            out = R.phases(bits, dtype, np.array([z], dtype=np.float32), eps, c, d)
            cases.append({"dtype": dtype, "w": hx(w, width), "z": hx(f32_bits(z), 8), "eps": eps, "c": c, "d": d,
                          "p1": hx(int(out[0][0]), width), "p2": hx(int(out[1][0]), width),
                          "p3": hx(int(out[2][0]), width)})
    schedules = []
    for sched in ({"name": "constant"}, {"name": "constant", "warmup_steps": 3, "total_steps": 10},
                  {"name": "linear", "warmup_steps": 2, "total_steps": 10},
                  {"name": "cosine", "warmup_steps": 0, "total_steps": 7},
                  {"name": "cosine", "warmup_steps": 100, "total_steps": 20000}):
        rule = {"lr": R.round_significant(3e-4, 24), "weight_decay": R.round_significant(0.1, 24), "schedule": sched}
        ts = sorted({0, 1, 2, 3, 5, 6, 7, 9, 10, 11, 99, 100, 101, 5000, 10050, 19999, 20000})
        schedules.append({"lr": rule["lr"], "weight_decay": rule["weight_decay"], "schedule": sched,
                          "steps": [{"t": t, "lr_t": R.lr_at(rule, t), "d": R.decay_factor(rule, t)} for t in ts]})
    host_rs = [(1e-3, 16), (1e-6, 24), (0.1, 8), (-2.5, 1), (1.5, 1), (3.0, 1), (2.0**-1074, 8), (1e300, 16)]
    grads = [0.0, -0.0, 1.0, -1.2345, 1e-31, -1e-31, 7.7e-30, 1.0e38, 123.456, 0.0078125 * 1.00390625]
    coeff = [(1e-6, 0x3F80), (R.round_significant(1e-3, 24), 0xC2F7), (2.0**-100, 0x0001), (1.0, 0x0000),
             (1e-30, 0x7EFF)]  # 0x7EFF: the largest valid |gq|, (2 - 2^-7) 2^126
    host = {
        "round_significant": [{"x": x, "bits": b, "result": R.round_significant(x, b)} for x, b in host_rs],
        "grad_bits": [{"g": g, "bits": hx(R.grad_bits(g), 4)} for g in grads],
        "coefficient": [{"lr": R.round_significant(lr, 24), "grad_bits": hx(b, 4),
                         "c": R.coefficient(R.round_significant(lr, 24), b)} for lr, b in coeff],
        "cos_pi": [{"p": p, "result": R.cos_pi(p)} for p in (0.0, 1e-9, 0.1, 0.25, 1 / 3, 0.5, 0.5 + 2**-53, 0.75, 0.9,
                                                              1.0)],
        "schedules": schedules,
        "invalid_grad": [float("inf"), float("nan"), 3.0e38],
        "invalid_grad_bits": ["0x7f80", "0xff80", "0x7fc0", "0xffa1", "0x7f81", "0x7f00", "0x7f7f", "0xff00",
                              "0xff7f"],
        "invalid_coefficient": [{"lr": R.round_significant(1e-7, 24), "grad_bits": "0x7eff"}],
    }
    return {"about": "rule.md: element phases (bits of D after P1, P2, P3 for w, z, eps, c and the decay factor "
                     "d, 0 if absent; z as binary32 bits; NaN results canonical) and host arithmetic (binary64 "
                     "values, exact repr): RS, gradient encoding, coefficient, COS_PI, lr_t and d per schedule",
            "elements": cases, "host": host}


def grad_codecs() -> dict:
    """spec/vectors/grad_codecs.json: the fp8 and sign encodings of rule.md, from the numpy reference."""
    import struct

    def b16(gq: float) -> str:
        return hx(f32_bits(gq) >> 16, 4)

    k_small = 2.0**-20
    grads = [0.0, -0.0, 1e-31, -1e-31, 2.0**-101, 1.0, -1.0, 1.0625, 1.1875, 1.0625 + 2.0**-40, 15.5, -15.75,
             0.1, 3.3, -27.0, 447.0, 448.0, 460.0, 464.0, 464.1, -1e30, 1.7976931348623157e308,
             2.0**-9, 2.0**-10, 3 * 2.0**-10, 5 * 2.0**-10, 2.0**-6 - 2.0**-12, 0.015625, -0.0068359375]
    fp8 = []
    for scale in (1.0, k_small):
        for g0 in grads:
            g = g0 * scale if abs(g0) < 1e300 else g0
            code = R.fp8_encode(g, scale)
            fp8.append({"scale": scale, "g": g, "code": hx(code, 2), "gq_bits": b16(R.fp8_decode(code, scale))})
    decode = [None if R.fp8_decode(c, 1.0) is None else b16(R.fp8_decode(c, 1.0)) for c in range(256)]
    sign = []
    for scale in (1.0, 2.0**-3):
        for g in (0.0, -0.0, 2.0**-101, -2.0**-101, 2.0**-100, -2.0**-100, 0.5, -3.0, 1e300):
            nz, neg = R.sign_encode(g)
            sign.append({"scale": scale, "g": g, "nonzero": nz, "negative": neg,
                         "gq_bits": b16(-scale if neg else scale) if nz else "0x0000"})

    def payload(first: int, body: bytes, count: int) -> str:
        return (struct.pack("<II", first, count) + body).hex()

    payloads = []
    for encoding, scale, first, count, body in (
            ("fp8", 1.0, 0, 4, bytes([0x00, 0x38, 0xB8, 0x7E])),
            ("fp8", 2.0**-3, 256, 3, bytes([0x80, 0x01, 0xFE])),
            ("fp8", 1.0, 0, 2, bytes([0x38, 0x7F])),        # a NaN code
            ("fp8", 1.0, 0, 2, bytes([0x38, 0xFF])),        # a NaN code
            ("fp8", 1.0, 0, 3, bytes([0x38, 0x38])),        # too short
            ("sign", 1.0, 0, 10, bytes([0b11111011, 0b10, 0b00001010, 0b10])),
            ("sign", 2.0**-3, 8, 8, bytes([0xFF, 0x0F])),
            ("sign", 1.0, 0, 10, bytes([0xFF, 0b110, 0, 0])),   # a padding bit set in nonzero
            ("sign", 1.0, 0, 10, bytes([0xFF, 0b11, 0, 0b100])),  # a padding bit set in negative
            ("sign", 1.0, 0, 3, bytes([0b101, 0b010])),      # negative zero (nonzero 0, negative 1)
            ("sign", 1.0, 0, 9, bytes([0xFF, 0x01, 0x00])),  # too short
            ("bf16", None, 0, 2, bytes([0x3F, 0xBF, 0x80, 0x80]))):
        data = payload(first, body, count)
        try:
            f, records = R.decode_step_payload(encoding, bytes.fromhex(data))
            gq = [hx(R.record_bf16_bits(encoding, scale, r), 4) for r in records]
        except ValueError:
            f, gq = None, None
        payloads.append({"grad_encoding": encoding, "grad_scale": scale, "payload": data, "first_step": f,
                         "gq_bits": gq})
    return {"about": "rule.md gradient encodings fp8 and sign: what a writer records for g (code, or the sign "
                     "record's nonzero/negative bits) and gq as a bfloat16 pattern; fp8 decode of all 256 codes "
                     "at grad_scale 1 (null: invalid); decompressed STEP payloads (format.md) with each step's "
                     "gq pattern, or null where a reader refuses the chunk",
            "fp8": {"encode": fp8, "decode": decode}, "sign": {"encode": sign}, "payloads": payloads}


def _f32(x: float) -> float:
    return float(np.float32(x))


# Initial values (init.md): each kind; scales whose binary32 product is inexact, lands on dtype ties,
# goes subnormal in F32, BF16 or F16, or overflows F16 (or even binary32) to infinity.
INIT_SPECS = [
    {"name": "zeros"},
    {"name": "uniform16", "bound": 1.0},  # v has at most 16 significant bits: many BF16 and F16 ties
    {"name": "uniform16", "bound": _f32(1 / np.sqrt(5))},  # LoRA A with in_features 5 (kaiming bound)
    {"name": "uniform16", "bound": 0.015625},  # in_features 4096: the bound is exact
    {"name": "uniform16", "bound": _f32(1e-5)},  # F16 subnormals
    {"name": "uniform16", "bound": 2.0**-130},  # F32 and BF16 subnormals
    {"name": "uniform16", "bound": 2.0**-149},  # the smallest subnormal: v is 0 or +-2^-149
    {"name": "uniform16", "bound": 65536.0},  # F16 overflows to infinity beyond 65504
    {"name": "gaussian16", "std": 1.0},  # prefix embeddings (nn.Embedding's N(0, 1)): exact
    {"name": "gaussian16", "std": _f32(0.02)},
    {"name": "gaussian16", "std": 2.0**-24},  # F16 subnormals
    {"name": "gaussian16", "std": 2.0**-140},  # F32 subnormals, BF16 too
    {"name": "gaussian16", "std": _f32(3e38)},  # the binary32 product itself overflows for |z| > 1.13
]
INIT_COORDS = [(2**40 + 11, 1, i) for i in range(16)] + [
    (0, 0, 0), (1, 0, 0), (0, 1, 0), (2**32 + 1, 2, 2**32 - 1), (2**32 + 1, 2, 2**32), (2**32 + 1, 2, 2**35 + 9),
    (2**64 - 1, 1048575, 2**48 - 1), (123456789, 300, 7 * 2**40 + 3)]


def _nearest(x: float, dtype: str, near: int) -> int:
    """The dtype bits nearest to the exact value x (ties to even), among near's neighbours."""
    best = None
    for b in (near - 1, near, near + 1):
        v = float(R.to_f32(np.array([b], R.BITS_DTYPE[dtype]), dtype)[0])
        key = (abs(v - x), b & 1)
        if best is None or key < best[0]:
            best = (key, b)
    return best[1]


def double_roundings(spec: dict, seed: int, k: int, n: int, dtype: str, want: int) -> list[int]:
    """Elements whose R_D(RN32(s * unit)) differs from rounding the exact product straight to dtype:
    the cases that catch an implementation computing in binary64 (or fusing) instead of binary32."""
    idx = np.arange(n, dtype=np.uint64)
    u = R.random_u16(seed, R.INIT_STREAM, k, idx).astype(np.float64)
    scale = next(v for key, v in spec.items() if key != "name")
    unit = (2 * u - 65535) * 2.0**-16 if spec["name"] == "uniform16" else R.gauss16_table()[u.astype(np.int64)]
    exact = scale * unit.astype(np.float64)  # exact: 24 + 16 significant bits fit in binary64
    bits = R.initial_elements(spec, seed, k, idx, dtype).astype(np.int64)
    v32 = R.initial_elements(spec, seed, k, idx, "F32").astype(np.int64)
    tie = (v32 & 0xFFFF) == 0x8000 if dtype == "BF16" else (v32 & 0x1FFF) == 0x1000  # RN32 on a tie of D
    found, seen = [], set()
    for i in np.flatnonzero(tie & (np.abs(exact) > 2.0**-14)):  # normal range of every dtype: neighbours +-1
        if int(u[i]) not in seen and _nearest(float(exact[i]), dtype, int(bits[i])) != bits[i]:
            found.append(int(i))
            seen.add(int(u[i]))
            if len(found) == want:
                break
    return found


def init() -> dict:
    from mezo_replay.format.fingerprint import fingerprint_raw

    def element(spec: dict, seed: int, k: int, i: int) -> dict:
        idx = np.array([i], dtype=np.uint64)
        v = R.initial_binary32(spec, seed, k, idx)
        case = {"init": spec, "seed": str(seed), "tensor": k, "element": str(i),
                "binary32": hx(int(v.view(np.uint32)[0]), 8)}
        if spec["name"] != "zeros":
            case["u"] = int(R.random_u16(seed, R.INIT_STREAM, k, idx)[0])
        for dtype in ("F32", "BF16", "F16"):
            case[dtype] = hx(int(R.initial_elements(spec, seed, k, idx, dtype)[0]), 8 if dtype == "F32" else 4)
        return case

    elements = [element(spec, *c) for spec in INIT_SPECS for c in INIT_COORDS]
    doubles = []
    for spec in (INIT_SPECS[2], INIT_SPECS[9]):
        for dtype in ("BF16", "F16"):
            for i in double_roundings(spec, 2**40 + 11, 1, 1 << 20, dtype, 3):
                doubles.append({**element(spec, 2**40 + 11, 1, i), "dtype": dtype})
    tensors = []
    for n, spec in enumerate(INIT_SPECS):
        for dtype, shape in (("F32", [3, 5]), ("BF16", [19]), ("F16", [2, 2, 3])):
            seed, k = [(0, 0), (2**40 + 11, 1), (2**64 - 1, 7)][n % 3]
            bits = R.initial_value(spec, seed, k, shape, dtype)
            tensors.append({"init": spec, "seed": str(seed), "tensor": k, "dtype": dtype, "shape": shape,
                            "bits": [hx(int(b), 8 if dtype == "F32" else 4) for b in bits],
                            "fingerprint": fingerprint_raw(dtype, shape,
                                                           bits.astype("<" + bits.dtype.str[1:]).tobytes())})
    return {"about": "init.md: generated initial values. elements: for (init, seed, tensor index, element index) "
                     "the 16 random bits u (step index 2^32-1), the binary32 value v (bits) and its bits in each "
                     "dtype; double_rounding: elements where rounding the exact product straight to `dtype` "
                     "would differ (R_D(RN32(x)) is the definition); tensors: whole values with their "
                     "fingerprints. seed and element are decimal strings",
            "elements": elements, "double_rounding": doubles, "tensors": tensors}


def tiny(name: str = "tiny", *, schedule=None, weight_decay: float = 0.0, new_tensor: bool = False,
         nan_payloads: bool = False, checkpoints: tuple[int, ...] = (), grad_codec: str = "bf16",
         grad_scale: float | None = None, loss_values: tuple[float, ...] | None = None,
         rule: str = "mezo-sgd", momentum: float = 0.9, window: int = 16, perturbations: int = 1,
         beta2: float = 0.999, adam_eps: float = 1e-8,
         layerwise: dict[str, tuple[int, int]] | None = None) -> None:
    """spec/vectors/tiny: a base with one tensor per dtype (special values included) and a frozen one,
    a trajectory recorded by the real optimizer from a fixed loss sequence, and the expected result.
    With nan_payloads the base's NaNs have signs, payloads and signalling bits that every output must
    replace by the canonical NaN (rule.md, *Special values*)."""
    import hashlib

    import torch
    from safetensors.torch import save_file

    from mezo_replay.format.fingerprint import canonicalize_nan_, checkpoint_fingerprint, tensor_fingerprint
    from mezo_replay.training.optimizer import MeZO

    out = SPEC / name
    out.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(5)
    base = {
        "a.weight": (torch.randn(3, 5, generator=g) * 0.1),
        "b.bias": (torch.randn(19, generator=g) * 0.01).to(torch.bfloat16),
        "c.scale": (torch.randn(2, 2, 3, generator=g) * 0.1).to(torch.float16),
        "d.frozen": torch.arange(4, dtype=torch.float32),
    }
    base["a.weight"][0, :4] = torch.tensor([0.0, -0.0, 1e-45, float("inf")])
    base["b.bias"][:3] = torch.tensor([-0.0, 1e-40, float("nan")], dtype=torch.bfloat16)
    base["c.scale"][0, 0] = torch.tensor([6e-8, -65504.0, 0.0], dtype=torch.float16)
    if nan_payloads:  # set through integer views: no arithmetic may quiet or canonicalise them first
        base["a.weight"].view(torch.int32)[1, :3] = torch.tensor([0xFFA00001 - 2**32, 0x7F800001, 0x7FC12345],
                                                                dtype=torch.int32)
        base["b.bias"].view(torch.int16)[3:6] = torch.tensor([0xFFA1 - 2**16, 0x7F81, 0xFFC0 - 2**16],
                                                            dtype=torch.int16)
        base["c.scale"].view(torch.int16)[1, 0] = torch.tensor([0xFE01 - 2**16, 0x7C01, 0x7D55], dtype=torch.int16)
    save_file(base, str(out / "base.safetensors"), metadata={"format": "pt"})
    params = {n: t.clone().requires_grad_(n != "d.frozen") for n, t in base.items()}
    if new_tensor:  # a tensor the base lacks (like a classifier head): its initial value goes in INIT
        params["e.head"] = (torch.randn(2, 3, generator=g) * 0.5).requires_grad_(True)
    losses = iter(loss_values or [2.0, 1.9, 1.7, 1.75, 1.5, 1.52, 1.4, 1.3, 1.2, 1.201, 1.0, 1.1])
    opt = MeZO(params.items(), lr=0.05, eps=1e-3, seed=2**40 + 11, schedule=schedule, weight_decay=weight_decay,
               grad_codec=grad_codec, grad_scale=grad_scale, rule=rule, momentum=momentum, momentum_window=window,
               perturbations=perturbations,
               **({"beta2": beta2, "adam_eps": adam_eps} if rule.startswith("mezo-adam") else {}),
               **({"layerwise": layerwise} if layerwise else {}))
    (out / "traj.mzt").unlink(missing_ok=True)
    # compact=False: the vectors keep the per-flush layout (several STEP/lsbf chunks) they test readers on
    opt.record(out / "traj.mzt", base_source="base.safetensors", steps_per_chunk=4, compact=False,
               metadata={"purpose": "spec test vector"}, new_tensors=["e.head"] if new_tensor else ())
    at: dict[str, str] = {}
    for _ in range(6):
        opt.step(lambda: next(losses))
        if opt.step_count in checkpoints:  # format.md ckpt
            at[str(opt.step_count)] = checkpoint_fingerprint(opt.names, opt.fingerprints())
            opt.writer.add_checkpoint(opt.step_count, at[str(opt.step_count)])
    opt.close()
    expected = {"about": "tuned tensors after all steps of traj.mzt on base.safetensors: fingerprint "
                         "(format.md) and SHA-256 of the raw little-endian bytes, NaNs canonical",
                "steps": 6,
                "tensors": {n: {"fingerprint": tensor_fingerprint(p.detach()),
                                "sha256": hashlib.sha256(canonicalize_nan_(p.detach().clone()).contiguous()
                                                         .view(torch.uint8).numpy()).hexdigest()}
                            for n, p in zip(opt.names, opt.params)}}
    if checkpoints:
        expected["checkpoints"] = at  # step -> checkpoint fingerprint (format.md ckpt)
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print("wrote", out)


def tiny_lora(name: str = "tiny-lora") -> None:
    """spec/vectors/tiny-lora: a trajectory that needs no base (format.md *Trajectories without a base*).
    Every tensor starts from the file: LoRA-style A (uniform16 at the kaiming bound) and B (zeros) and
    prefix-style embeddings (gaussian16) in each dtype, generated from the seed (init.md), and one head
    stored in INIT chunks. A synthetic mix, so that one small file covers every kind in every dtype."""
    import hashlib

    import torch

    from mezo_replay.arithmetic import initial
    from mezo_replay.format.fingerprint import DTYPE_NAMES, canonicalize_nan_, tensor_fingerprint
    from mezo_replay.training.optimizer import MeZO
    from mezo_replay.format.safetensors_io import BaseCheckpoint

    out = SPEC / name
    out.mkdir(exist_ok=True)
    seed = 2**33 + 5
    lora_a = initial.uniform16(initial.kaiming_uniform_bound(5))
    specs = {  # name -> (dtype, shape, init)
        "base_model.model.layers.0.q_proj.lora_A.weight": ("F32", [2, 5], lora_a),
        "base_model.model.layers.0.q_proj.lora_B.weight": ("F32", [3, 2], initial.zeros()),
        "base_model.model.layers.0.v_proj.lora_A.weight": ("BF16", [2, 5], lora_a),
        "base_model.model.layers.0.v_proj.lora_B.weight": ("BF16", [3, 2], initial.zeros()),
        "base_model.model.layers.1.q_proj.lora_A.weight": ("F16", [2, 5], lora_a),
        "base_model.model.layers.1.q_proj.lora_B.weight": ("F16", [3, 2], initial.zeros()),
        "base_model.model.score.weight": ("F32", [2, 3], True),
        "prompt_embeddings": ("F32", [3, 4], initial.gaussian16(1.0)),
        "prompt_embeddings.bf16": ("BF16", [3, 4], initial.gaussian16(1.0)),
        "prompt_embeddings.f16": ("F16", [3, 4], initial.gaussian16(0.5)),
    }
    names = sorted(specs, key=lambda n: n.encode("utf-8"))
    g = torch.Generator().manual_seed(7)
    params = {}
    for k, n in enumerate(names):
        dtype, shape, init = specs[n]
        if init is True:  # a head trained whole: its value travels in INIT chunks
            params[n] = (torch.randn(*shape, generator=g) * 0.5).to(DTYPE_NAMES[dtype])
        else:
            params[n] = initial.generate(init, seed, k, shape, DTYPE_NAMES[dtype])
        params[n].requires_grad_(True)
    initial_fps = {n: tensor_fingerprint(p.detach()) for n, p in params.items()}
    initial_bytes = {n: p.detach().contiguous().view(torch.uint8).numpy().tobytes().hex() for n, p in params.items()}
    adapter_config = {"base_model_name_or_path": None, "bias": "none", "fan_in_fan_out": False,
                      "inference_mode": True, "lora_alpha": 4, "lora_dropout": 0.0, "modules_to_save": ["score"],
                      "peft_type": "LORA", "r": 2, "revision": None, "target_modules": ["q_proj", "v_proj"],
                      "task_type": "SEQ_CLS"}
    peft = {"adapter_config": adapter_config,
            "base_weights": BaseCheckpoint.open(SPEC / "tiny" / "base.safetensors").weights_fingerprint()}
    losses = iter([2.0, 1.9, 1.7, 1.75, 1.5, 1.52, 1.4, 1.3, 1.2, 1.201, 1.0, 1.1])
    opt = MeZO(params.items(), lr=1e-3, eps=1e-3, seed=seed)
    (out / "traj.mzt").unlink(missing_ok=True)
    opt.record(out / "traj.mzt", steps_per_chunk=4, compact=False, metadata={"purpose": "spec test vector", "peft": "lora"},
               new_tensors={n: specs[n][2] for n in names}, extra={"peft": peft})
    for _ in range(6):
        opt.step(lambda: next(losses))
    opt.close()

    def raw(p: torch.Tensor) -> bytes:
        return canonicalize_nan_(p.detach().clone()).contiguous().view(torch.uint8).numpy().tobytes()

    expected = {"about": "traj.mzt needs no base: each tensor's value before step 0 (generated from the seed "
                         "as init.md defines, or from INIT) and after all steps: fingerprint (format.md), "
                         "SHA-256 of the raw little-endian bytes, and the bytes (hex)",
                "steps": 6,
                "initial": {n: {"fingerprint": initial_fps[n], "bytes": initial_bytes[n]} for n in names},
                "tensors": {n: {"fingerprint": tensor_fingerprint(p.detach()),
                                "sha256": hashlib.sha256(raw(p)).hexdigest(), "bytes": raw(p).hex()}
                            for n, p in zip(opt.names, opt.params)}}
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print("wrote", out)


MOMENTUM_SPECIAL = {
    "F32": [0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x3F800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000,
            0xFF800000, 0x7FC00000, 0x3A83126F, 0xB3800000],
    "BF16": [0x0000, 0x8000, 0x0001, 0x807F, 0x3F80, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80, 0x7FC0, 0x3A83, 0xB380],
    "F16": [0x0000, 0x8000, 0x0001, 0x83FF, 0x3C00, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00, 0x7E00, 0x1419, 0x8400],
}


def momentum() -> dict:
    """momentum.md: the powers p_k, the terms c_(t,k) of steps, the multi-term P3 on elements with given z,
    and on whole runs of elements whose z come from the generator (what a kernel must produce)."""
    table = R.gauss16_table()
    zs = [float(table[32768]), float(table[65535]), float(table[0]), float(table[40000]), 1.0, -1.0]
    eps_values = [R.round_significant(1e-3, 16), 0.5, 2.0**-60]
    c_values = [0.0, R.round_significant(3.3e-5, 16), -R.round_significant(1e-7, 16), 2.0**-100, -2.0**100,
                R.round_significant(0.37, 16)]
    powers = [{"momentum": b, "window": k, "p": R.momentum_powers(b, k)}
              for b, k in ((R.round_significant(0.9, 16), 16), (0.5, 8), (2.0**-16, 64),
                           (1.0 - 2.0**-16, 64), (R.round_significant(0.99, 16), 3))]
    grads = [0x3F80, 0xC2F7, 0x0000, 0x8000, 0x0001, 0x4049, 0xBE00, 0x5F00, 0x3C23, 0xC000]
    runs = []
    for name, sched, lr in (("constant", {"name": "constant"}, R.round_significant(1e-3, 24)),
                            ("cosine", {"name": "cosine", "warmup_steps": 2, "total_steps": 9},
                             R.round_significant(3e-4, 24))):
        for b, k in ((R.round_significant(0.9, 16), 4), (2.0**-16, 3), (1.0 - 2.0**-16, 16)):
            rule = {"name": "mezo-momentum", "lr": lr, "schedule": sched, "momentum": b, "window": k}
            g = grads
            runs.append({"lr": lr, "schedule": sched, "momentum": b, "window": k, "grad_bits": [hx(x, 4) for x in g],
                         "terms": [[[s, c] for s, c in R.momentum_terms(rule, t, g)] for t in range(len(g))]})
    rng = np.random.default_rng(20261201)
    elements = []
    for dtype, ws in MOMENTUM_SPECIAL.items():
        width = 8 if dtype == "F32" else 4
        for n, w in enumerate(ws + [int(v) for v in rng.integers(0, 2**(4 * width), size=8)]):
            z = zs[n % len(zs)]
            eps = eps_values[n % len(eps_values)]
            d = [0.0, R.round_significant(1e-3, 12), 0.75][n % 3]
            terms = [(c_values[(n + j) % len(c_values)], zs[(n + 2 * j + 1) % len(zs)]) for j in range(1 + n % 4)]
            bits = np.array([w], dtype=R.BITS_DTYPE[dtype])
            out = R.multi_term_update(bits, dtype, np.array([z], dtype=np.float32), eps,
                                      [(c, np.array([zj], dtype=np.float32)) for c, zj in terms], d)
            elements.append({"dtype": dtype, "w": hx(w, width), "z": hx(f32_bits(z), 8), "eps": eps, "d": d,
                             "terms": [[c, hx(f32_bits(zj), 8)] for c, zj in terms], "p3": hx(int(out[0]), width)})
    tensors = []
    for n, (dtype, ws) in enumerate(MOMENTUM_SPECIAL.items()):
        width = 8 if dtype == "F32" else 4
        seed, k, start = [(0, 0, 0), (2**40 + 11, 3, 2**33 + 5), (2**64 - 1, 7, 1000)][n]
        w = np.array(ws + [int(v) for v in rng.integers(0, 2**(4 * width), size=36)], dtype=R.BITS_DTYPE[dtype])
        index = np.arange(start, start + w.size, dtype=np.uint64)
        for t, eps, d, terms in ((7, R.round_significant(1e-3, 16), 0.0,
                                  [(7, c_values[1]), (6, 0.0), (5, c_values[2]), (4, c_values[5])]),
                                 (3, 0.5, R.round_significant(1e-3, 12),
                                  [(3, c_values[3]), (2, c_values[4]), (1, -c_values[1])]),
                                 (0, 2.0**-60, 0.75, [(0, c_values[5])])):
            for noise_name in ("gaussian16", "rademacher16"):
                z = R.noise(noise_name, seed, t, k, index)
                out = R.multi_term_update(w, dtype, z, eps, [(c, R.noise(noise_name, seed, s, k, index))
                                                             for s, c in terms], d)
                tensors.append({"dtype": dtype, "noise": noise_name, "seed": str(seed), "tensor": k,
                                "start": str(start), "step": t, "eps": eps, "d": d, "terms": [[s, c] for s, c in terms],
                                "w": [hx(int(x), width) for x in w], "p3": [hx(int(x), width) for x in out]})
    buffer_elements = []
    betas = [R.round_significant(0.9, 16), 2.0**-16, 1.0 - 2.0**-16, 0.5]
    ms = [0.0, -0.0, 1e-45, -3.5e-39, 1.0, -2.5e-3, 3.0e37, R.round_significant(0.3, 24)]
    for dtype, ws in MOMENTUM_SPECIAL.items():
        width = 8 if dtype == "F32" else 4
        for n, w in enumerate(ws + [int(v) for v in rng.integers(0, 2**(4 * width), size=8)]):
            z, eps = zs[n % len(zs)], eps_values[n % len(eps_values)]
            c, beta = c_values[(n + 1) % len(c_values)], betas[n % len(betas)]
            d = [0.0, R.round_significant(1e-3, 12), 0.75][n % 3]
            m = np.array([ms[n % len(ms)]], dtype=np.float32)
            out, m2 = R.buffer_update(np.array([w], dtype=R.BITS_DTYPE[dtype]), m, dtype,
                                      np.array([z], dtype=np.float32), eps, c, beta, d)
            buffer_elements.append({"dtype": dtype, "w": hx(w, width), "m": hx(int(m.view(np.uint32)[0]), 8),
                                    "z": hx(f32_bits(z), 8), "eps": eps, "c": c, "momentum": beta, "d": d,
                                    "p3": hx(int(out[0]), width), "m_after": hx(int(m2.view(np.uint32)[0]), 8)})
    # beta*m inexact: a case where fusing it with + b (one rounding) gives another m
    beta, z = R.round_significant(0.9, 16), 1.0
    for m, c in ((R.round_significant(x / 7.0, 24), R.round_significant(y * 2.0**-27, 16))
                 for x in range(1, 200) for y in range(1, 50)):
        mm = np.array([m], dtype=np.float32)
        out, m2 = R.buffer_update(np.array([0x3F800000], dtype=np.uint32), mm, "F32", np.array([z], dtype=np.float32),
                                  2.0**-10, c, beta)
        # exact in binary64 here (at most 47 significant bits), then one rounding: what an FMA would give
        fused = np.float32(beta * float(mm[0]) + c * z)
        if fused != m2[0]:
            break
    else:
        raise AssertionError("no case where a fused multiply-add changes m")
    buffer_elements.append({"dtype": "F32", "w": "0x3f800000", "m": hx(int(mm.view(np.uint32)[0]), 8),
                            "z": hx(f32_bits(z), 8), "eps": 2.0**-10, "c": c, "momentum": beta, "d": 0.0,
                            "p3": hx(int(out[0]), 8), "m_after": hx(int(m2.view(np.uint32)[0]), 8),
                            "fused_m_after": hx(int(np.array([fused]).view(np.uint32)[0]), 8)})
    return {"about": "momentum.md: powers p_k for (momentum, window); runs: the terms [noise step, c] of each step "
                     "t for the records grad_bits (bf16 patterns) under lr and schedule; elements: the multi-term "
                     "P3 of one element (bits of D) for w, z (binary32 bits), eps, d and terms [c, z_j]; tensors: "
                     "the multi-term P3 of step `step` on elements start.. of tensor `tensor` with the generator's "
                     "noise (seed and start decimal strings); buffer_elements: mezo-momentum-buffer's P3 on one element "
                     "(bits of D, and its state m before and after as binary32 bits) for z, eps, c, momentum and d; "
                     "fused_m_after: what a fused multiply-add would wrongly give. NaN results canonical",
            "powers": powers, "runs": runs, "elements": elements, "tensors": tensors,
            "buffer_elements": buffer_elements}


def momentum_vectors() -> None:
    (SPEC / "momentum.json").write_text(json.dumps(momentum(), indent=1) + "\n")
    print("wrote", SPEC / "momentum.json")
    # window 3 over 6 steps, cosine schedule with warmup, decay, and a step with equal losses (gq 0)
    from mezo_replay.arithmetic.rule import Schedule

    tiny("tiny-momentum", schedule=Schedule("cosine", warmup_steps=1, total_steps=6), weight_decay=0.5,
         rule="mezo-momentum", momentum=0.75, window=3,
         loss_values=(2.0, 1.9, 1.7, 1.75, 1.5, 1.5, 1.4, 1.3, 1.2, 1.201, 1.0, 1.1))
    tiny("tiny-momentum-buffer", schedule=Schedule("cosine", warmup_steps=1, total_steps=6), weight_decay=0.5,
         rule="mezo-momentum-buffer", momentum=0.75,
         loss_values=(2.0, 1.9, 1.7, 1.75, 1.5, 1.5, 1.4, 1.3, 1.2, 1.201, 1.0, 1.1))


def nspsa() -> dict:
    """nspsa.md: q and the c_j of steps, the sub-step plan of a small file, STEP payloads of N records a
    step, and whole steps on runs of elements with the generator's noise (what a replay must produce)."""
    grads = [0x3F80, 0xC2F7, 0x0000, 0x8000, 0x0001, 0x4049, 0xBE00, 0x5F00, 0x3C23, 0xC000, 0x7EFF, 0x3F81]
    runs = []
    for sched, lr in (({"name": "constant"}, R.round_significant(1e-3, 24)),
                      ({"name": "cosine", "warmup_steps": 1, "total_steps": 3}, R.round_significant(3e-4, 24)),
                      ({"name": "constant"}, 2.0**-100), ({"name": "linear", "total_steps": 4}, 0.75)):
        for n in (2, 3, 4):
            rule = {"name": "mezo-sgd", "lr": lr, "schedule": sched, "perturbations": n}
            records = [grads[(t * n + j) % len(grads)] for t in range(3) for j in range(n)]
            if lr > 2.0**-90:  # 0x7EFF (about 2^127) is valid only with the smallest lr: 2^97 instead
                records = [0x7000 if x == 0x7EFF else x for x in records]
            rows = [records[t * n:(t + 1) * n] for t in range(3)]
            runs.append({"lr": lr, "schedule": sched, "perturbations": n,
                         "grad_bits": [[hx(x, 4) for x in row] for row in rows],
                         "q": [R.round_significant(R.lr_at(rule, t) / n, 24) for t in range(3)],
                         "terms": [[[u, c] for u, c in R.nspsa_terms(rule, t, row)] for t, row in enumerate(rows)]})
    lr3 = R.round_significant(1e-3, 24)
    assert lr3 / 3 != R.round_significant(lr3 / 3, 24)  # the division rounds: q is not lr / 3 exactly
    plan_rule = {"name": "mezo-sgd", "lr": lr3, "schedule": {"name": "constant"}, "weight_decay": 0.5,
                 "perturbations": 3}
    plan_rows = [[0x3F80, 0x0000, 0xC2F7], [0x4049, 0xBE00, 0x3C23]]
    plan = []
    for t, row in enumerate(plan_rows):
        plan += [[[], 0.0]] * 2 + [[[[u, c] for u, c in R.nspsa_terms(plan_rule, t, row)], R.decay_factor(plan_rule, t)]]

    def payload(first: int, count: int, body: bytes) -> str:
        return (struct.pack("<II", first, count) + body).hex()

    payloads = []
    for encoding, scale, n, first, body, count in (
            ("bf16", None, 2, 7, bytes([0x3F, 0xC2, 0x00, 0x80, 0x80, 0xF7, 0x00, 0x00]), 2),
            ("bf16", None, 3, 0, bytes([0x3F, 0xC2, 0x00, 0x80, 0xF7, 0x00]), 1),
            ("bf16", None, 3, 0, bytes([0x3F, 0xC2, 0x00, 0x80, 0xF7, 0x00]), 2),        # length: 2 x 3 needs 12
            ("fp8", 0.25, 3, 4, bytes([0x38, 0xB8, 0x00, 0x7E, 0x01, 0x80]), 2),
            ("fp8", 0.25, 3, 4, bytes([0x38, 0xB8, 0x00, 0x7E, 0x01]), 2),              # length: 5, not 6
            ("fp8", 0.25, 2, 0, bytes([0x38, 0x7F]), 1),                                # a NaN code
            ("sign", 0.125, 3, 1, bytes([0b00111011, 0b00000001, 0b00001010, 0b00000000]), 3),  # 9 values
            ("sign", 0.125, 2, 0, bytes([0b00001011, 0b00000010]), 2),
            ("sign", 0.125, 2, 0, bytes([0b00011011, 0b00000010]), 2),                  # a padding bit
            ("sign", 0.125, 4, 0, bytes([0b00000001]), 1)):                             # length: 4 values need 2 bytes
        data = payload(first, count, body)
        try:
            f, records = R.decode_step_payload(encoding, bytes.fromhex(data), n)
            rows = [[hx(R.record_bf16_bits(encoding, scale, r), 4) for r in row] for row in records]
        except ValueError:
            f, rows = None, None
        payloads.append({"grad_encoding": encoding, "grad_scale": scale, "perturbations": n, "payload": data,
                         "first_step": f, "grad_bits": rows})
    assert sum(p["grad_bits"] is None for p in payloads) == 5
    rng = np.random.default_rng(20261202)
    tensors = []
    for m, (dtype, ws) in enumerate(MOMENTUM_SPECIAL.items()):
        width = 8 if dtype == "F32" else 4
        seed, k, start = [(0, 0, 0), (2**40 + 11, 3, 2**33 + 5), (2**64 - 1, 7, 1000)][m]
        w = np.array(ws + [int(v) for v in rng.integers(0, 2**(4 * width), size=36)], dtype=R.BITS_DTYPE[dtype])
        for n, decayed, noise_name in ((2, False, "gaussian16"), (3, True, "gaussian16"), (4, True, "rademacher16")):
            rule = {"name": "mezo-sgd", "eps": R.round_significant(1e-3, 16), "lr": R.round_significant(3e-3, 24),
                    "schedule": {"name": "cosine", "warmup_steps": 1, "total_steps": 3}, "weight_decay": 0.25,
                    "perturbations": n}
            rows = [[grads[(7 * t + 5 * j + m) % len(grads)] if grads[(7 * t + 5 * j + m) % len(grads)] != 0x7EFF
                     else 0x3F00 for j in range(n)] for t in range(3)]
            out = R.replay(w, dtype, seed=seed, k=k, noise_name=noise_name, rule=rule, grads=rows, decayed=decayed,
                           start=start)
            tensors.append({"dtype": dtype, "noise": noise_name, "seed": str(seed), "tensor": k, "start": str(start),
                            "rule": rule, "decay": decayed, "grad_bits": [[hx(x, 4) for x in row] for row in rows],
                            "w": [hx(int(x), width) for x in w], "after": [hx(int(x), width) for x in out]})
    return {"about": "nspsa.md: runs: for records grad_bits (bf16 patterns, a row per step) under lr, schedule and "
                     "perturbations N, each step's q and its terms [noise step N t + j, c_j]; plan: the sub-steps "
                     "[terms, d] of the 2 steps plan_grad_bits under plan_rule; payloads: decompressed STEP payloads "
                     "(hex) with N records a step, their first_step and gq patterns a row per step, or null for "
                     "the corrupt ones; tensors: elements start.. of tensor `tensor` after all steps of grad_bits "
                     "under `rule` (decay: whether the tensor takes weight decay), generator noise, NaNs canonical",
            "runs": runs, "plan_rule": plan_rule, "plan_grad_bits": [[hx(x, 4) for x in r] for r in plan_rows],
            "plan": plan, "payloads": payloads, "tensors": tensors}


def nspsa_vectors() -> None:
    (SPEC / "nspsa.json").write_text(json.dumps(nspsa(), indent=1) + "\n")
    print("wrote", SPEC / "nspsa.json")
    from mezo_replay.arithmetic.rule import Schedule

    # 6 steps of 3 perturbations: cosine schedule with warmup, decay, perturbation 1 of step 1 with equal losses
    losses = [round(2.0 - 0.02 * i + 0.013 * ((i * 7) % 5) * (-1) ** i, 6) for i in range(36)]
    losses[9] = losses[8]
    tiny("tiny-nspsa", schedule=Schedule("cosine", warmup_steps=1, total_steps=6), weight_decay=0.5,
         perturbations=3, loss_values=tuple(losses))
    # sign records, 2 perturbations: 6 steps, 12 values a chunk of 4 steps
    tiny("tiny-nspsa-sign", grad_codec="sign", grad_scale=0.125, perturbations=2,
         loss_values=tuple(losses[:24]))
    # sign records of 3 perturbations with every sign: chunk 0 holds 12 values (two bytes a bit field), chunk 1
    # six; records (a row a step) + - 0 / - - + / + 0 - / - + + / 0 - + / - - -
    signs = [1, -1, 0, -1, -1, 1, 1, 0, -1, -1, 1, 1, 0, -1, 1, -1, -1, -1]
    neg = []
    for i, sgn in enumerate(signs):
        plus = round(1.5 - 0.01 * i, 6)
        neg += [plus, plus if sgn == 0 else round(plus - 0.002 * sgn, 6)]
    tiny("tiny-nspsa-sign-neg", schedule=Schedule("cosine", warmup_steps=1, total_steps=6), weight_decay=0.5,
         grad_codec="sign", grad_scale=0.125, perturbations=3, loss_values=tuple(neg))


def adam() -> dict:
    """adam.md: host values (B_t, alpha_t, h_t, window terms), refusals, and Adam's P3 on single elements
    (given z, m, v) and on runs of elements (the generator's z), with the cases where a fused multiply-add,
    an approximate square root or an approximate division would give other bits."""
    import math

    import torch

    from mezo_replay.arithmetic.rule import adam_beta

    table = R.gauss16_table()
    zs = [float(table[32768]), float(table[65535]), float(table[0]), float(table[40000]), 1.0, -1.0, float(table[20000])]
    b9, b999 = adam_beta(0.9), adam_beta(0.999)
    hosts = []
    grads = [0x3F80, 0xC2F7, 0x0000, 0x8000, 0x0001, 0x4049, 0xBE00, 0x537F, 0x3C23, 0xC000]
    for sched, lr in (({"name": "constant"}, R.round_significant(1e-3, 24)),
                      ({"name": "cosine", "warmup_steps": 2, "total_steps": 9}, R.round_significant(3e-4, 24))):
        for b1, b2, window in ((b9, b999, 0), (b9, b999, 4), (2.0**-24, 1.0 - 2.0**-24, 3),
                               (1.0 - 2.0**-24, 2.0**-24, 0), (0.5, 0.75, 16)):
            rule = {"name": "mezo-adam" if window else "mezo-adam-buffer", "lr": lr, "schedule": sched,
                    "beta1": b1, "beta2": b2, "adam_eps": R.round_significant(1e-8, 24)}
            if window:
                rule["window"] = window
            steps_out = []
            for t in range(len(grads)):
                terms, alpha, h = R.adam_host(rule, t, grads)
                n = min(window, t + 1) if window else t + 1
                steps_out.append({"B1": R.adam_power(b1, n), "B2": R.adam_power(b2, n), "alpha": alpha, "h": h,
                                  "terms": [list(x) for x in terms] if window else None})
            hosts.append({"rule": rule, "grad_bits": [hx(x, 4) for x in grads], "steps": steps_out})
    refused_headers = [
        ({"beta1": 0.9}, "beta1 not a multiple of 2^-24"), ({"beta1": 0.0}, "beta1 0"), ({"beta2": 1.0}, "beta2 1"),
        ({"beta2": True}, "beta2 a boolean"), ({"adam_eps": 0.0}, "adam_eps 0"),
        ({"adam_eps": 2.0**-101}, "adam_eps below 2^-100"), ({"adam_eps": 2.0}, "adam_eps above 1"),
        ({"adam_eps": 1.0 + 2.0**-30}, "adam_eps with 31 significant bits"), ({"window": 4}, "a window (buffer form)"),
        ({"momentum": b9}, "a momentum key"), ({"lr": 2.0**60, "adam_eps": 2.0**-100}, "lr / (1 - beta1) > 2^80 delta"),
    ]
    refusals = [{"rule": {"name": "mezo-adam-buffer", "eps": 2.0**-10, "lr": 2.0**-10, "schedule": {"name": "constant"},
                          "grad_encoding": "bf16", "beta1": b9, "beta2": b999, "adam_eps": 2.0**-27, **change},
                 "why": why} for change, why in refused_headers]
    for w, why in ((0, "mezo-adam: window 0"), (65, "mezo-adam: window 65"), (None, "mezo-adam: no window")):
        r = {"name": "mezo-adam", "eps": 2.0**-10, "lr": 2.0**-10, "schedule": {"name": "constant"},
             "grad_encoding": "bf16", "beta1": b9, "beta2": b999, "adam_eps": 2.0**-27}
        if w is not None:
            r["window"] = w
        refusals.append({"rule": r, "why": why})
    rng = np.random.default_rng(20261202)
    f = np.float32
    ms = [0.0, -0.0, 1e-45, -3.5e-39, 1.0, -2.5e-3, 3.0e12, R.round_significant(0.3, 24)]
    vs = [0.0, 1e-45, 2.5e-39, 1.0, 7.5e-6, 6.0e25, R.round_significant(0.09, 24), 4.0]
    gqs = [0.0, 1.0, -R.grad_value(0xC2F7), R.grad_value(0x537F), -R.grad_value(0x1E80), R.grad_value(0x3C23)]
    alphas = [0.0, R.round_significant(1e-3 / 0.1, 24), R.round_significant(3e-4, 24), 2.0**-100]
    hs = [1.0, R.round_significant(1 / math.sqrt(1 - 0.999), 24), 4096.0]
    deltas = [R.round_significant(1e-8, 24), 2.0**-100, 1.0]
    specials = {"F32": [0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x7F800000, 0xFF800000, 0x7FC00000,
                        0x7F7FFFFF, 0x3F800000],
                "BF16": [0x0000, 0x8000, 0x0001, 0x7F80, 0xFF80, 0x7FC0, 0x7F7F, 0x3F80],
                "F16": [0x0000, 0x8000, 0x0001, 0x7C00, 0xFC00, 0x7E00, 0x7BFF, 0x3C00]}
    buffer_elements, window_elements = [], []
    for dtype, ws in specials.items():
        width = 8 if dtype == "F32" else 4
        for n, w in enumerate(ws + [int(v) for v in rng.integers(0, 2**(4 * width), size=8)]):
            z, eps = zs[n % len(zs)], [R.round_significant(1e-3, 16), 0.5, 2.0**-60][n % 3]
            b1, b2 = [(b9, b999), (2.0**-24, 1 - 2.0**-24), (1 - 2.0**-24, 0.5)][n % 3]
            rule = {"eps": eps, "beta1": b1, "beta2": b2, "adam_eps": deltas[n % 3]}
            alpha, h, d = alphas[n % 4], hs[n % 3], [0.0, R.round_significant(1e-3, 12), 0.75][n % 3]
            m, v = np.array([ms[n % 8]], dtype=f), np.array([vs[(n + 3) % 8]], dtype=f)
            out, m2, v2 = R.adam_buffer_p3(np.array([w], dtype=R.BITS_DTYPE[dtype]), m, v, dtype,
                                           np.array([z], dtype=f), rule, gqs[n % 6], alpha, h, d)
            buffer_elements.append({"dtype": dtype, "w": hx(w, width), "m": hx(f32_bits(float(m[0])), 8),
                                    "v": hx(f32_bits(float(v[0])), 8), "z": hx(f32_bits(z), 8), "eps": eps,
                                    "gq": gqs[n % 6], "beta1": b1, "beta2": b2, "adam_eps": rule["adam_eps"],
                                    "alpha": alpha, "h": h, "d": d, "p3": hx(int(out[0]), width),
                                    "m_after": hx(f32_bits(float(m2[0])), 8), "v_after": hx(f32_bits(float(v2[0])), 8)})
            terms = [(R.round_significant(R.round_significant(0.1 * 0.9**j, 24) * gqs[(n + j) % 6], 16),
                      R.round_significant(R.round_significant(0.001 * 0.999**j, 24) * gqs[(n + j) % 6]**2, 16),
                      zs[(n + 2 * j + 1) % len(zs)]) for j in range(1 + n % 4)]
            out = R.adam_window_p3(np.array([w], dtype=R.BITS_DTYPE[dtype]), dtype, np.array([z], dtype=f), rule,
                                   [(cm, cv, np.array([zj], dtype=f)) for cm, cv, zj in terms], alpha, h, d)
            window_elements.append({"dtype": dtype, "w": hx(w, width), "z": hx(f32_bits(z), 8), "eps": eps,
                                    "adam_eps": rule["adam_eps"], "alpha": alpha, "h": h, "d": d,
                                    "terms": [[cm, cv, hx(f32_bits(zj), 8)] for cm, cv, zj in terms],
                                    "p3": hx(int(out[0]), width)})
    # Cases where the shortcuts an implementation must not take give other bits (F32, w = +0, eps 2^-60: the
    # weight after P3 is -upd rounded with a negligible s, so a wrong upd shows in the weight's bits).
    rule = {"eps": 2.0**-60, "beta1": b9, "beta2": b999, "adam_eps": R.round_significant(1e-8, 24)}
    alpha, h = R.round_significant(1e-3 / 0.1, 24), R.round_significant(1 / math.sqrt(1 - 0.999), 24)
    found: dict[str, dict] = {}
    for x in range(1, 20000):
        m = np.array([R.round_significant(x / 7.0, 24) * 2.0**-10], dtype=f)
        v = np.array([R.round_significant(x / 3.0, 24) * 2.0**-20], dtype=f)
        z, gq = np.array([zs[x % len(zs)]], dtype=f), R.grad_value(0x3F80 + x % 127)
        out, m2, v2 = R.adam_buffer_p3(np.array([0], dtype=np.uint32), m, v, "F32", z, rule, gq, alpha, h)
        g = float(z[0]) * gq
        fused_m = f(b9 * float(m[0]) + float(f((1 - b9) * g)))  # binary64 exact here: one rounding, as an FMA
        fused_v = f(b999 * float(v[0]) + float(f((1 - b999) * float(f(g * g)))))
        r = np.sqrt(v2)[0]
        # torch 2.13's CPU float32 sqrt (vectorised: 16 lanes), not correctly rounded
        approx_r = torch.sqrt(torch.from_numpy(np.repeat(v2, 16))).numpy()[0]
        den = f(f(r * f(h)) + f(rule["adam_eps"]))
        am = f(f(alpha) * m2[0])
        approx_div = f(am * f(f(1.0) / den))  # a reciprocal, then a product
        s = f(f(0.0) + f(2.0**-60) * z[0])
        cases = {"fused_m_after": (fused_m, m2[0]), "fused_v_after": (fused_v, v2[0]),
                 "approx_sqrt": (approx_r, r), "reciprocal_division": (approx_div, f(am / den))}
        for key, (bad, good) in cases.items():
            upd_bad = {"approx_sqrt": lambda: f(am / f(f(approx_r * f(h)) + f(rule["adam_eps"]))),
                       "reciprocal_division": lambda: approx_div}.get(key, lambda: None)()
            if key not in found and f32_bits(float(bad)) != f32_bits(float(good)) and \
                    (upd_bad is None or f32_bits(float(f(s - upd_bad))) != int(out[0])):
                found[key] = {"dtype": "F32", "w": "0x00000000", "m": hx(f32_bits(float(m[0])), 8),
                              "v": hx(f32_bits(float(v[0])), 8), "z": hx(f32_bits(float(z[0])), 8),
                              "eps": 2.0**-60, "gq": gq, "beta1": b9, "beta2": b999, "adam_eps": rule["adam_eps"],
                              "alpha": alpha, "h": h, "d": 0.0, "p3": hx(int(out[0]), 8),
                              "m_after": hx(f32_bits(float(m2[0])), 8), "v_after": hx(f32_bits(float(v2[0])), 8),
                              "shortcut": key, "shortcut_value": hx(f32_bits(float(bad)), 8),
                              "shortcut_p3": None if upd_bad is None else hx(f32_bits(float(f(s - upd_bad))), 8)}
        if len(found) == len(cases):
            break
    if len(found) != 4:
        raise AssertionError(f"shortcut cases not all found: {sorted(found)}")
    wrong = [found[k] for k in sorted(found)]
    tensors = []
    for n, (dtype, ws) in enumerate(specials.items()):
        width = 8 if dtype == "F32" else 4
        seed, k, start = [(0, 0, 0), (2**40 + 11, 3, 2**33 + 5), (2**64 - 1, 7, 1000)][n]
        w = np.array(ws + [int(v) for v in rng.integers(0, 2**(4 * width), size=36)], dtype=R.BITS_DTYPE[dtype])
        index = np.arange(start, start + w.size, dtype=np.uint64)
        m = (rng.standard_normal(w.size) * 1e-3).astype(f)
        v = (rng.standard_normal(w.size) ** 2 * 1e-6).astype(f)
        for noise_name in ("gaussian16", "rademacher16"):
            for t, eps, d, window, terms_spec in ((7, R.round_significant(1e-3, 16), 0.0, 0, None),
                                                  (3, 0.5, R.round_significant(1e-3, 12), 3, None)):
                rule = {"eps": eps, "beta1": b9, "beta2": b999, "adam_eps": R.round_significant(1e-8, 24)}
                z = R.noise(noise_name, seed, t, k, index)
                alpha, h = R.round_significant(1e-3 / 0.1, 24), R.round_significant(1 / math.sqrt(1 - 0.999), 24)
                case = {"dtype": dtype, "noise": noise_name, "seed": str(seed), "tensor": k, "start": str(start),
                        "step": t, "eps": eps, "d": d, "beta1": b9, "beta2": b999, "adam_eps": rule["adam_eps"],
                        "alpha": alpha, "h": h, "w": [hx(int(x), width) for x in w]}
                if window:
                    terms = [(t - j, R.round_significant(R.round_significant(0.1 * 0.9**j, 24) * gqs[j + 1], 16),
                              R.round_significant(R.round_significant(0.001 * 0.999**j, 24) * gqs[j + 1]**2, 16))
                             for j in range(window)]
                    out = R.adam_window_p3(w, dtype, z, rule, [(cm, cv, R.noise(noise_name, seed, s, k, index))
                                                               for s, cm, cv in terms], alpha, h, d)
                    case |= {"terms": [list(x) for x in terms], "p3": [hx(int(x), width) for x in out]}
                else:
                    out, m2, v2 = R.adam_buffer_p3(w, m, v, dtype, z, rule, gqs[2], alpha, h, d)
                    case |= {"gq": gqs[2], "m": [hx(int(x), 8) for x in m.view(np.uint32)],
                             "v": [hx(int(x), 8) for x in v.view(np.uint32)], "p3": [hx(int(x), width) for x in out],
                             "m_after": [hx(int(x), 8) for x in m2.view(np.uint32)],
                             "v_after": [hx(int(x), 8) for x in v2.view(np.uint32)]}
                tensors.append(case)
    return {"about": "adam.md: hosts: for a rule and records grad_bits (bf16 patterns), each step's B1, B2 "
                     "(power(beta, n), n = t + 1 or K'), alpha, h and (mezo-adam) terms [noise step, cm, cv]; "
                     "refusals: rule objects a reader refuses (with generator/noise of any valid file) and why; "
                     "invalid_grad_bits: records an Adam reader rejects (|gq| >= 2^40); buffer_elements: "
                     "mezo-adam-buffer's P3 on one element (bits of D; m, v before and after as binary32 bits) for "
                     "z, eps, gq, beta1, beta2, adam_eps, alpha, h, d; window_elements: mezo-adam's P3 for terms "
                     "[cm, cv, z_j]; shortcuts: buffer elements where a fused multiply-add (m or v), torch's "
                     "approximate CPU float32 sqrt or a reciprocal-then-multiply division gives another value "
                     "(shortcut_value) and, for the last two, other weight bits (shortcut_p3); tensors: the P3 of "
                     "step `step` on elements start.. of tensor `tensor` with the generator's noise (buffer form "
                     "with m, v; window form with terms); record_runs: elements start.. of tensor `tensor` after "
                     "every step of grad_bits (records below 2^-100 but not zero, applied as +0) under `rule`, "
                     "from step 0 (m = v = +0); unflushed_differs: whether applying them unflushed changes "
                     "`after`. NaN results canonical",
            "hosts": hosts, "refusals": refusals, "invalid_grad_bits": ["0x5380", "0xd380", "0x5f00", "0x7f7f"],
            "valid_grad_bits": ["0x537f", "0xd37f", "0x0001", "0x8000"],
            "buffer_elements": buffer_elements, "window_elements": window_elements, "shortcuts": wrong,
            "tensors": tensors, "record_runs": adam_record_runs()}


# Zeros and subnormals first: an F32 (or, with rademacher16, a BF16) zero weight comes back from P1 and P2 as
# exactly +0 before P3, so a P3 term far below the weights' scale still lands in its bytes.
RUN_WEIGHTS = {"F32": [0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x00000000, 0x3F800000, 0x0D000000,
                       0x8D000000],
               "BF16": [0x0000, 0x8000, 0x0001, 0x8001, 0x0000, 0x3F80, 0x0D00, 0x8D00],
               "F16": [0x0000, 0x8000, 0x0001, 0x8001, 0x0000, 0x3C00, 0x0400, 0x8400]}


def _run_weights(dtype: str, rng: np.random.Generator, n: int = 24) -> np.ndarray:
    width = 8 if dtype == "F32" else 4
    extra = [int(v) for v in rng.integers(0, 2**(4 * width), size=n)]
    return np.array(RUN_WEIGHTS[dtype] + extra, dtype=R.BITS_DTYPE[dtype])


def _differs_unflushed(patch: str, fn) -> bool:
    """Whether `fn()` (a replay) gives other bits when R.<patch> keeps values below 2^-100 (the wrong
    reading a vector must catch)."""
    keep = getattr(R, patch)
    wrong = {"adam_flush": lambda bits: R.grad_value(bits),
             "layerwise_coefficient": lambda c, e, f: math.ldexp(c, e + f)}[patch]
    good = fn()
    setattr(R, patch, wrong)
    try:
        bad = fn()
    finally:
        setattr(R, patch, keep)
    return bad.tolist() != good.tolist()


def adam_record_runs() -> list[dict]:
    """adam.md: whole replays whose records are bf16 patterns below 2^-100 but not zero (a subnormal 0x0001,
    a normal 0x8d00 = -2^-101): applied as +0. In mezo-adam-buffer applying them unflushed gives other bits
    (m, v and upd nonzero on a weight P1 and P2 bring back to exactly +0); mezo-adam's window terms are
    flushed below 2^-100 anyway, so its runs only show that such records are valid."""
    from mezo_replay.arithmetic.rule import adam_beta

    rng = np.random.default_rng(20261204)
    b9, b999 = adam_beta(0.9), adam_beta(0.999)
    runs = []
    for n, (dtype, noise_name) in enumerate((("F32", "gaussian16"), ("BF16", "rademacher16"), ("F16", "gaussian16"))):
        seed, k, start = [(0, 0, 0), (2**40 + 11, 3, 2**33 + 5), (2**64 - 1, 7, 1000)][n]
        w = _run_weights(dtype, rng)
        for name, grads in (("mezo-adam-buffer", [0x0001]), ("mezo-adam-buffer", [0x0000, 0x8d00, 0x0001]),
                            ("mezo-adam", [0x0001, 0x8d00, 0x3f80])):
            rule = {"name": name, "eps": 2.0**-60, "lr": 2.0**-4, "schedule": {"name": "constant"},
                    "grad_encoding": "bf16", "beta1": b9, "beta2": b999, "adam_eps": 2.0**-60}
            if name == "mezo-adam":
                rule["window"] = 2

            def run(rule=rule, grads=grads, w=w):
                return R.replay(w.copy(), dtype, seed=seed, k=k, noise_name=noise_name, rule=rule, grads=grads,
                                decayed=False, start=start)
            shows = _differs_unflushed("adam_flush", run)
            if name == "mezo-adam-buffer" and dtype != "F16":
                assert shows, (dtype, grads)  # what these runs are for
            assert not (name == "mezo-adam" and shows)
            width = 8 if dtype == "F32" else 4
            runs.append({"dtype": dtype, "noise": noise_name, "seed": str(seed), "tensor": k, "start": str(start),
                         "rule": rule, "decay": False, "grad_bits": [hx(x, 4) for x in grads],
                         "w": [hx(int(x), width) for x in w], "after": [hx(int(x), width) for x in run()],
                         "unflushed_differs": shows})
    return runs


def adam_vectors() -> None:
    (SPEC / "adam.json").write_text(json.dumps(adam(), indent=1) + "\n")
    print("wrote", SPEC / "adam.json")
    from mezo_replay.arithmetic.rule import Schedule

    # window 3 over 6 steps, cosine schedule with warmup, decay, and a step with equal losses (gq 0)
    for name, rule in (("tiny-adam", "mezo-adam"), ("tiny-adam-buffer", "mezo-adam-buffer")):
        tiny(name, schedule=Schedule("cosine", warmup_steps=1, total_steps=6), weight_decay=0.5, rule=rule,
             momentum=0.75, window=3, beta2=0.875, adam_eps=2.0**-20,
             loss_values=(2.0, 1.9, 1.7, 1.75, 1.5, 1.5, 1.4, 1.3, 1.2, 1.201, 1.0, 1.1))


# spec/layerwise.md: a positive, a zero-and-positive and a most-negative tensor. b.bias's e + f = -80 makes
# every c_k tiny, and step 2's c (equal losses but for 2^-40: c about 2^-35) fall below 2^-100 to +0.
LAYERWISE_EXPONENTS = {"a.weight": (3, -2), "b.bias": (-40, -40), "c.scale": (0, 5)}
LAYERWISE_LOSSES = (2.0, 1.9, 1.7, 1.75, 1.0, 1.0 + 2.0**-40, 1.4, 1.3, 1.2, 1.201, 1.0, 1.1)


def layerwise() -> dict:
    """layerwise.md: c_k from c and the exponents (the flush below 2^-100, the 2^100 limit), and whole
    replays of runs of elements under each rule the exponents apply to, with steps whose c is kept while
    c_k falls below 2^-100: on the zero weights of an F32 run (and of a BF16 run with rademacher16 noise,
    whose eps_k z is a power of two) P1 and P2 give back exactly +0, so an unflushed c_k z shows in the bits."""
    coefficients = []
    for lr, bits, e, f in ((2.0**-10, 0x3F80, -40, -40),    # c 2^-10: c_k 2^-90
                           (2.0**-10, 0x3300, -40, -40),    # c 2^-35: c_k 2^-115, +0
                           (2.0**-10, 0xA400, 0, -40),      # c -2^-65: c_k -2^-105, +0 (step_exp alone)
                           (2.0**-10, 0x3A80, -40, -40),    # c 2^-20: c_k exactly 2^-100, kept
                           (2.0**-10, 0xBAC0, -40, -40),    # c -1.5 2^-20: c_k -1.5 2^-100, kept
                           (2.0**-10, 0x3A7F, -40, -40),    # just below: c_k (2 - 2^-7) 2^-101, +0
                           (2.0**-10, 0x0D80, 40, 40),      # c 2^-110 is +0 before the scaling: c_k +0
                           (1.0, 0x0D80, 3, -2),            # c exactly 2^-100: c_k 2^-99
                           (1.0, 0x0D80, 0, -1),            # c exactly 2^-100: c_k 2^-101, +0
                           (2.0**-20, 0x3F80, 3, 5),        # c_k 2^-12
                           (1.0, 0x7100, 5, 5),             # c 2^99 (valid): c_k 2^109, the step is invalid
                           (1.0, 0x70FF, 1, 0),             # c (2 - 2^-7) 2^98: c_k just below 2^100, valid
                           (1.0, 0x7180, -40, -40)):        # c 2^100 exactly, valid: c_k 2^20
        c = R.coefficient(lr, bits)
        try:
            ck = R.layerwise_coefficient(c, e, f)
        except ValueError:
            ck = None
        coefficients.append({"lr": lr, "grad_bits": hx(bits, 4), "perturb_exp": e, "step_exp": f, "c": c, "c_k": ck})
    rng = np.random.default_rng(20261205)
    runs = []
    # records: 0x3300 at lr 2^-10 gives c = 2^-35; with e + f = -80, c_k = 2^-115 is +0
    for n, (dtype, noise_name) in enumerate((("F32", "gaussian16"), ("BF16", "rademacher16"), ("F16", "gaussian16"))):
        seed, k, start = [(0, 0, 0), (2**40 + 11, 3, 2**33 + 5), (2**64 - 1, 7, 1000)][n]
        w = _run_weights(dtype, rng)
        width = 8 if dtype == "F32" else 4
        for name, e, f, grads, sched, wd in (
                ("mezo-sgd", -40, -40, [0x3F80, 0xC000, 0x3300], {"name": "constant"}, 0.0),
                ("mezo-sgd", 0, -40, [0xA400], {"name": "constant"}, 0.0),
                ("mezo-sgd", 3, -2, [0x3F80, 0xC2F7, 0x0000, 0x4049], {"name": "cosine", "warmup_steps": 1,
                                                                       "total_steps": 4}, 0.5),
                ("mezo-momentum", -40, -40, [0x3300, 0xB300, 0x3380], {"name": "constant"}, 0.0),
                ("mezo-momentum", 0, 5, [0x3F80, 0xC2F7, 0x0000, 0x4049], {"name": "cosine", "warmup_steps": 1,
                                                                           "total_steps": 4}, 0.5),
                ("mezo-momentum-buffer", -40, -40, [0x3300, 0xB300, 0x3380], {"name": "constant"}, 0.0),
                ("mezo-momentum-buffer", 3, -2, [0x3F80, 0xC2F7, 0x0000, 0x4049], {"name": "cosine",
                                                                                   "warmup_steps": 1,
                                                                                   "total_steps": 4}, 0.5),
                ("mezo-momentum-buffer", -40, 40, [0x3F80, 0xC000, 0x3300], {"name": "constant"}, 0.25)):
            rule = {"name": name, "eps": 2.0**-20, "lr": 2.0**-10, "schedule": sched, "grad_encoding": "bf16",
                    "layerwise": True}
            if wd:
                rule["weight_decay"] = wd
            if name != "mezo-sgd":
                rule["momentum"] = 0.75
            if name == "mezo-momentum":
                rule["window"] = 3

            def run(rule=rule, grads=grads, w=w, e=e, f=f):
                return R.replay(w.copy(), dtype, seed=seed, k=k, noise_name=noise_name, rule=rule, grads=grads,
                                decayed=bool(wd), start=start, perturb_exp=e, step_exp=f)
            shows = _differs_unflushed("layerwise_coefficient", run)
            if (e + f == -80 or grads == [0xA400]) and dtype != "F16":  # the last step's c_k is +0
                assert shows, (name, dtype, e, f)  # what these runs are for
            runs.append({"dtype": dtype, "noise": noise_name, "seed": str(seed), "tensor": k, "start": str(start),
                         "rule": rule, "perturb_exp": e, "step_exp": f, "decay": bool(wd),
                         "grad_bits": [hx(x, 4) for x in grads], "w": [hx(int(x), width) for x in w],
                         "after": [hx(int(x), width) for x in run()],
                         "unscaled_after": [hx(int(x), width) for x in R.replay(
                             w.copy(), dtype, seed=seed, k=k, noise_name=noise_name, rule=rule, grads=grads,
                             decayed=bool(wd), start=start)],
                         "unflushed_differs": shows})
    return {"about": "layerwise.md: coefficients: c (rule.md's, from lr_t and the record grad_bits) and c_k = c * "
                     "2^(perturb_exp + step_exp), +0 below 2^-100, null where |c_k| > 2^100 makes the step "
                     "invalid; runs: elements start.. of tensor `tensor` (a tensor entry with perturb_exp, "
                     "step_exp) after every step of grad_bits under `rule`, from step 0 (mezo-momentum-buffer: "
                     "m = +0), with the generator's noise; decay: whether the tensor takes weight decay; "
                     "unscaled_after: the same without the exponents (a replay that ignores them); "
                     "unflushed_differs: whether keeping a c_k below 2^-100 changes `after`. NaN results canonical",
            "coefficients": coefficients, "runs": runs}


def layerwise_vectors() -> None:
    from mezo_replay.arithmetic.rule import Schedule

    (SPEC / "layerwise.json").write_text(json.dumps(layerwise(), indent=1) + "\n")
    print("wrote", SPEC / "layerwise.json")
    tiny("tiny-layerwise", schedule=Schedule("cosine", warmup_steps=1, total_steps=6), weight_decay=0.5,
         layerwise=LAYERWISE_EXPONENTS, loss_values=LAYERWISE_LOSSES)
    tiny("tiny-layerwise-momentum", rule="mezo-momentum", momentum=0.75, window=3,
         layerwise=LAYERWISE_EXPONENTS, loss_values=LAYERWISE_LOSSES)
    tiny("tiny-layerwise-buffer", schedule=Schedule("cosine", warmup_steps=1, total_steps=6), weight_decay=0.5,
         rule="mezo-momentum-buffer", momentum=0.75, layerwise=LAYERWISE_EXPONENTS, loss_values=LAYERWISE_LOSSES)


def main() -> None:
    if sys.argv[1:] == ["momentum"]:  # only spec/vectors/momentum.json and tiny-momentum
        momentum_vectors()
        return
    if sys.argv[1:] == ["nspsa"]:  # only spec/vectors/nspsa.json and tiny-nspsa*
        nspsa_vectors()
        return
    if sys.argv[1:] == ["adam"]:  # only spec/vectors/adam.json, tiny-adam and tiny-adam-buffer
        adam_vectors()
        return
    if sys.argv[1:] == ["layerwise"]:  # only spec/vectors/layerwise.json and tiny-layerwise*
        layerwise_vectors()
        return
    SPEC.mkdir(parents=True, exist_ok=True)
    for name, fn in (("philox", philox), ("noise", noise), ("rule", rule), ("init", init),
                     ("grad_codecs", grad_codecs)):
        (SPEC / f"{name}.json").write_text(json.dumps(fn(), indent=1) + "\n")
        print("wrote", SPEC / f"{name}.json")
    tiny()
    from mezo_replay.arithmetic.rule import Schedule

    tiny("tiny-cosine-decay", schedule=Schedule("cosine", warmup_steps=2, total_steps=6), weight_decay=0.5)
    tiny("tiny-new-tensor", new_tensor=True)
    tiny("tiny-nan", nan_payloads=True)
    tiny("tiny-checkpoints", checkpoints=(2, 4))
    # gq: -26, 112 (saturated: g is 150), -4, 52, -0.25, -26 at grad_scale 2^-2
    tiny("tiny-fp8", grad_codec="fp8", grad_scale=0.25,
         loss_values=(2.0, 2.05, 2.0, 1.7, 1.5, 1.508, 1.4, 1.3, 1.2, 1.2005, 1.0, 1.05))
    # gq: +-1/8 and a step with equal losses (gq 0, no update)
    tiny("tiny-sign", grad_codec="sign", grad_scale=0.125,
         loss_values=(2.0, 1.9, 1.7, 1.75, 1.5, 1.5, 1.4, 1.3, 1.2, 1.201, 1.0, 1.1))
    tiny_lora()
    momentum_vectors()
    nspsa_vectors()
    adam_vectors()
    layerwise_vectors()


if __name__ == "__main__":
    main()
