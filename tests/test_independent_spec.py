"""A second implementation written from spec/*.md alone, held to spec/vectors.

The project's own code (reference, torch, C, Triton) is tested against the vectors, and the vectors
are made by that code: a bug shared by the writer of the vectors and every backend would pass. This
file was written by someone who read only spec/ (no mezo_replay import, numpy and zstandard only),
so it checks that the spec's text, not the code, determines the vectors: Philox, noise, generated
initial values, every rule's arithmetic (mezo-sgd, momentum, n-SPSA, Adam, layer-wise exponents),
the .mzt records and fingerprints, on every tiny-* trajectory and the host/element vectors.
A new tiny-* vector of a feature this file lacks fails here on purpose: extend it from the spec's
text, never from mezo_replay, or it stops being a second reading.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import zstandard

SPEC = Path(__file__).resolve().parent.parent / "spec"
VECTORS = SPEC / "vectors"
M32 = np.uint64(0xFFFFFFFF)
f32 = np.float32
TINY = sorted(p.name for p in VECTORS.glob("tiny*") if p.is_dir())


# ---------------------------------------------------------------- generator.md, noise.md
def philox(c: list, k0: int, k1: int) -> list:
    c0, c1, c2, c3 = (np.asarray(x, dtype=np.uint64) for x in c)
    key0, key1 = np.uint64(k0), np.uint64(k1)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ key0, p1 & M32, (p0 >> np.uint64(32)) ^ c3 ^ key1, p0 & M32
        key0, key1 = (key0 + np.uint64(0x9E3779B9)) & M32, (key1 + np.uint64(0xBB67AE85)) & M32
    return [c0, c1, c2, c3]


def bits16(seed: int, step: int, tensor: int, idx: np.ndarray) -> np.ndarray:
    idx = np.asarray(idx, dtype=np.uint64)
    b = idx >> np.uint64(3)
    words = np.stack(philox([b & M32, b >> np.uint64(32), np.full_like(b, tensor), np.full_like(b, step)],
                            seed & 0xFFFFFFFF, seed >> 32))
    j = (idx & np.uint64(7)).astype(np.int64)
    w = words[j >> 1, np.arange(len(idx))]
    return ((w >> (16 * (j & 1)).astype(np.uint64)) & np.uint64(0xFFFF)).astype(np.int64)


def gauss16() -> np.ndarray:
    raw = (SPEC / "gaussian16.bin").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == "33888ab6f4616c9a0d6bba520458612f7f70d5be5df01e655e1fe972d49d478b"
    return (np.frombuffer(raw, "<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)


GAUSS16 = gauss16()


def noise_of(seed: int, tensor: int, idx: np.ndarray, sampler: str) -> Callable[[int], np.ndarray]:
    def z(step: int) -> np.ndarray:
        u = bits16(seed, step, tensor, idx)
        return GAUSS16[u] if sampler == "gaussian16" else np.where(u < 32768, f32(-1), f32(1)).astype(f32)
    return z


# ---------------------------------------------------------------- rule.md host arithmetic
def RS(x: float, n: int) -> float:
    if x == 0 or not math.isfinite(x):
        return x
    m, e = math.frexp(x)
    return math.ldexp(round(m * 2.0 ** n), e - n)


def flush(x: float) -> float:
    return 0.0 if abs(x) < 2.0 ** -100 else x


COS_K = [float.fromhex(h) for h in (
    "0x1.0000000000000p+0 -0x1.3bd3cc9be45dep+2 0x1.03c1f081b5ac4p+2 -0x1.55d3c7e3cbffap+0 0x1.e1f506891babbp-3 "
    "-0x1.a6d1f2a204a8cp-6 0x1.f9d38a3763cc3p-10 -0x1.b6e24f44b128fp-14 0x1.20c62c2f2d7f5p-18 -0x1.2a0c591af8314p-23 "
    "0x1.ef6e308d6d1c4p-29 -0x1.52ae4120fde27p-34 0x1.838d8f4321800p-40").split()]


def cos_pi(p: float) -> float:
    def c(x: float) -> float:
        q, r = x * x, COS_K[12]
        for k in range(11, -1, -1):
            r = r * q + COS_K[k]
        return r
    return -c(1 - p) if p > 0.5 else c(p)


def lr_t(rule: dict, t: int) -> float:
    sch = rule["schedule"]
    W, T = sch.get("warmup_steps", 0), sch.get("total_steps", 0)
    if t < W:
        f = (t + 1) / (W + 1)
    else:
        p = min(1, (t - W) / max(1, T - W))
        f = {"constant": 1.0, "linear": 1 - p}.get(sch["name"]) if sch["name"] != "cosine" else 0.5 * (1 + cos_pi(p))
    x = RS(rule["lr"] * f, 24)
    return 0.0 if x < 2.0 ** -100 else x


def decay_factor(rule: dict, lrt: float) -> float:
    d = RS(lrt * rule.get("weight_decay", 0.0), 12)
    assert d < 1
    return 0.0 if d < 2.0 ** -40 else d


def powers(beta: float, K: int) -> list[float]:
    p = [1.0]
    for _ in range(1, K):
        x = RS(p[-1] * beta, 24)
        p.append(0.0 if x < 2.0 ** -100 else x)
    return p


def power(beta: float, n: int) -> float:
    P = 1.0
    for _ in range(n):
        P = P * beta
    return P


# ---------------------------------------------------------------- rule.md element arithmetic
def R_D(x: np.ndarray, dtype: str) -> np.ndarray:
    x = np.asarray(x, dtype=f32)
    if dtype == "F32":
        return x.copy()
    if dtype == "F16":
        return x.astype(np.float16).astype(f32)
    u = x.view(np.uint32).astype(np.uint64)
    r = (((u + np.uint64(0x7FFF) + ((u >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)) << np.uint64(16)) & M32
    return np.where(np.isnan(x), x, r.astype(np.uint32).view(f32)).astype(f32)


def DECAY(s: np.ndarray, d: float, on: bool) -> np.ndarray:
    if not on or d == 0:
        return s
    s = np.asarray(s, dtype=f32)
    hi = (s.view(np.uint32) & np.uint32(0xFFFFF000)).view(f32)
    out = (s - f32(d) * hi) - f32(d) * (s - hi)
    return np.where(np.isfinite(s) & (np.abs(s) >= f32(2.0 ** -60)), out, s).astype(f32)


def adam_p3(w, m, v, z, eps, alpha, h, delta, d, on, dtype):
    upd = (f32(alpha) * m) / ((np.sqrt(v) * f32(h)) + f32(delta))
    return R_D(DECAY(w + f32(eps) * z, d, on) - upd, dtype)


def adam_buffer_mv(m, v, z, gq, b1, b2):
    g = f32(flush(gq)) * z
    return f32(b1) * m + f32(1 - b1) * g, f32(b2) * v + f32(1 - b2) * (g * g)


def adam_window_mv(terms, n):
    m, v = np.zeros(n, f32), np.zeros(n, f32)
    for cm, cv, zj in terms:
        m = m + f32(cm) * zj
        v = v + f32(cv) * (zj * zj)
    return m, v


def adam_window_terms(rule: dict, gqs: list[float], t: int) -> list[list]:
    b1, b2, K = rule["beta1"], rule["beta2"], rule["window"]
    p1, p2, out = powers(b1, K), powers(b2, K), []
    for j in range(min(K, t + 1)):
        g = flush(gqs[t - j])
        cv = RS(RS((1 - b2) * p2[j], 24) * (g * g), 16)
        out.append([t - j, flush(RS(RS((1 - b1) * p1[j], 24) * g, 16)), 0.0 if cv < 2.0 ** -100 else cv])
    return out


def adam_host(rule: dict, t: int) -> tuple[float, float, float, float]:
    n = t + 1 if rule["name"] == "mezo-adam-buffer" else min(rule["window"], t + 1)
    B1, B2, lrt = power(rule["beta1"], n), power(rule["beta2"], n), lr_t(rule, t)
    return B1, B2, (0.0 if lrt == 0 else RS(lrt / (1 - B1), 24)), RS(1 / math.sqrt(1 - B2), 24)


def nspsa_terms(rule: dict, t: int, gqs: list[float]) -> tuple[float, list[list]]:
    N = rule["perturbations"]
    q = RS(lr_t(rule, t) / N, 24)
    return q, [[N * t + j, flush(RS(q * g, 16))] for j, g in enumerate(gqs)]


# ---------------------------------------------------------------- format.md
DT = {"F32": "<u4", "BF16": "<u2", "F16": "<u2"}


def to_f32(raw: bytes, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << np.uint32(16)).view(f32)
    return np.frombuffer(raw, "<f4" if dtype == "F32" else "<f2").astype(f32)


def to_bits(x: np.ndarray, dtype: str) -> np.ndarray:
    x = np.asarray(x, dtype=f32)
    if dtype == "F32":
        b = x.view(np.uint32).copy()
    elif dtype == "BF16":
        b = (x.view(np.uint32) >> np.uint32(16)).astype(np.uint16)
    else:
        b = x.astype(np.float16).view(np.uint16).copy()
    b[np.isnan(x)] = {"F32": 0x7FC00000, "BF16": 0x7FC0, "F16": 0x7E00}[dtype]
    return b.astype(DT[dtype])


def fingerprint(x: np.ndarray, dtype: str, shape: list[int]) -> str:
    h = hashlib.sha256(b"mzt-tensor\0" + dtype.encode() + b"\0" + struct.pack("<I", len(shape)))
    for d in shape:
        h.update(struct.pack("<Q", d))
    h.update(to_bits(x, dtype).tobytes())
    return h.hexdigest()


def fingerprint_of_list(names: list[str], fps: list[str]) -> str:
    h = hashlib.sha256()
    for n, f in zip(names, fps):
        h.update(n.encode() + b"\0" + bytes.fromhex(f))
    return h.hexdigest()


def decode_gq(rule: dict, recs: bytes, n: int) -> list[float]:
    enc, out = rule["grad_encoding"], []
    if enc == "bf16":
        assert len(recs) == 2 * n
        for j in range(n):
            b = recs[j] << 8 | recs[n + j]
            assert (b & 0x7FFF) < 0x7F00
            out.append(float(to_f32(struct.pack("<H", b), "BF16")[0]))
    elif enc == "fp8":
        assert len(recs) == n
        for c in recs:
            assert c & 0x7F != 0x7F
            e, m = c >> 3 & 15, c & 7
            v = (m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)) * rule["grad_scale"]
            out.append(-v if c >> 7 else v)
    else:
        nb = (n + 7) // 8
        assert len(recs) == 2 * nb
        for j in range(8 * nb):
            nz, neg = recs[j >> 3] >> (j & 7) & 1, recs[nb + (j >> 3)] >> (j & 7) & 1
            assert (nz, neg) != (0, 1) and (j < n or (nz, neg) == (0, 0))
            if j < n:
                out.append(0.0 if not nz else -rule["grad_scale"] if neg else rule["grad_scale"])
    return out


def read_mzt(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    assert data[:8] == b"\x89MZT\r\n\x1a\n" and struct.unpack_from("<II", data, 8) == (1, 0)
    pos, chunks = 16, []
    while pos < len(data):
        length, typ, crc = struct.unpack_from("<I4sI", data, pos)
        payload = data[pos + 12:pos + 12 + length]
        assert len(payload) == length and zlib.crc32(typ + payload) == crc
        chunks.append((typ.decode(), zstandard.ZstdDecompressor().decompress(payload)))
        pos += 12 + length
    assert chunks[0][0] == "HEAD"
    head = json.loads(chunks[0][1])
    N = head["rule"].get("perturbations", 1)
    out: dict[str, Any] = {"head": head, "steps": [], "fprt": {}, "ckpt": {}, "init": {}}
    for typ, p in chunks[1:]:
        if typ == "STEP":
            first, count = struct.unpack_from("<II", p)
            assert first == len(out["steps"])
            g = decode_gq(head["rule"], p[8:], count * N)
            out["steps"] += [g[s * N:(s + 1) * N] for s in range(count)]
        elif typ == "FPRT":
            o = json.loads(p)
            out["fprt"][o["step"]] = o["tensors"]
        elif typ == "ckpt":
            out["ckpt"][struct.unpack_from("<I", p)[0]] = p[4:].hex()
        elif typ == "INIT":
            k, off = struct.unpack_from("<IQ", p)
            buf = out["init"].setdefault(k, bytearray())
            assert off == len(buf)
            buf += p[12:]
        else:
            assert typ[0].islower(), typ
    return out


def read_safetensors(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    data = path.read_bytes()
    n = struct.unpack_from("<Q", data)[0]
    body = data[8 + n:]
    return {k: (e["dtype"], e["shape"], body[e["data_offsets"][0]:e["data_offsets"][1]])
            for k, e in json.loads(data[8:8 + n]).items() if k != "__metadata__"}


# ---------------------------------------------------------------- replay (every rule)
def initial(te: dict, k: int, seed: int, base: dict, inits: dict) -> np.ndarray:
    init, dt = te.get("init"), te["dtype"]
    n = int(np.prod(te["shape"], dtype=np.int64))
    if init is True:
        return to_f32(bytes(inits[k]), dt)
    if isinstance(init, dict):
        u = bits16(seed, 0xFFFFFFFF, k, np.arange(n, dtype=np.uint64))
        if init["name"] == "zeros":
            return np.zeros(n, f32)
        if init["name"] == "uniform16":
            return R_D(f32(init["bound"]) * ((2 * u - 65535).astype(f32) * f32(2.0 ** -16)), dt)
        return R_D(f32(init["std"]) * GAUSS16[u], dt)
    bdt, shape, raw = base[te["name"]]
    assert (bdt, shape) == (dt, te["shape"])
    return to_f32(raw, dt)


def replay_tensor(rule: dict, te: dict, k: int, w: np.ndarray, steps: list, z: Callable, fps: dict) -> np.ndarray:
    name, dt, on = rule["name"], te["dtype"], bool(te.get("decay", False))
    N = rule.get("perturbations", 1)
    scale = 2.0 ** (te.get("perturb_exp", 0) + te.get("step_exp", 0))
    eps = f32(rule["eps"] * 2.0 ** te.get("perturb_exp", 0))
    m, v = np.zeros_like(w), np.zeros_like(w)
    with np.errstate(all="ignore"):
        for t in range(len(steps)):
            lrt = lr_t(rule, t)
            d = decay_factor(rule, lrt)
            if N > 1:  # nspsa.md: N sub-steps, the last one subtracts every term
                _, terms = nspsa_terms(rule, t, steps[t])
                for j in range(N):
                    a = eps * z(N * t + j)
                    w = R_D(R_D(w + a, dt) - (a + a), dt)
                    if j < N - 1:
                        w = R_D(w + a, dt)
                    else:
                        s = DECAY(w + a, d, on)
                        for u, c in terms:
                            s = s - f32(c) * z(u)
                        w = R_D(s, dt)
                fps[t + 1] = fingerprint(w, dt, te["shape"])
                continue
            zt = z(t)
            a = eps * zt
            w = R_D(R_D(w + a, dt) - (a + a), dt)
            if name.startswith("mezo-adam"):
                B1, B2, alpha, h = adam_host(rule, t)
                if name == "mezo-adam-buffer":
                    m, v = adam_buffer_mv(m, v, zt, steps[t][0], rule["beta1"], rule["beta2"])
                else:
                    m, v = adam_window_mv([(cm, cv, z(u)) for u, cm, cv in adam_window_terms(
                        rule, [g[0] for g in steps], t)], len(w))
                w = adam_p3(w, m, v, zt, eps, alpha, h, rule["adam_eps"], d, on, dt)
            else:
                c0 = RS(lrt * steps[t][0], 16)
                assert abs(c0) <= 2.0 ** 100 and abs(c0 * scale) <= 2.0 ** 100
                s = DECAY(w + a, d, on)
                if name == "mezo-momentum-buffer":
                    m = f32(rule["momentum"]) * m + f32(flush(flush(c0) * scale)) * zt
                    s = s - m
                else:
                    K = rule.get("window", 1)
                    p = powers(rule.get("momentum", 0.5), K)
                    for j in range(min(K, t + 1)):
                        c = flush(RS(RS(lrt * p[j], 24) * steps[t - j][0], 16))
                        s = s - f32(flush(c * scale)) * z(t - j)
                w = R_D(s, dt)
            fps[t + 1] = fingerprint(w, dt, te["shape"])
    return w


@pytest.mark.parametrize("name", TINY)
def test_tiny_trajectory(name: str) -> None:
    folder = VECTORS / name
    traj = read_mzt(folder / "traj.mzt")
    head, rule = traj["head"], traj["head"]["rule"]
    seed = int(head["generator"]["seed"])
    base = read_safetensors(folder / "base.safetensors") if (folder / "base.safetensors").exists() else {}
    expected = json.loads((folder / "expected.json").read_text())
    names = [te["name"] for te in head["tensors"]]
    assert fingerprint_of_list(names, [te["sha256"] for te in head["tensors"]]) == head["base"]["fingerprint"]
    per_step: list[dict] = []
    finals = []
    for k, te in enumerate(head["tensors"]):
        w = initial(te, k, seed, base, traj["init"])
        assert fingerprint(w, te["dtype"], te["shape"]) == te["sha256"]
        idx = np.arange(len(w), dtype=np.uint64)
        fps: dict[int, str] = {}
        w = replay_tensor(rule, te, k, w, traj["steps"], noise_of(seed, k, idx, head["noise"]["name"]), fps)
        per_step.append(fps)
        finals.append(fingerprint(w, te["dtype"], te["shape"]))
        want = expected["tensors"][te["name"]]
        assert (finals[-1], hashlib.sha256(to_bits(w, te["dtype"]).tobytes()).hexdigest()) == \
            (want["fingerprint"], want["sha256"]), te["name"]
    assert expected["steps"] == len(traj["steps"]) and traj["fprt"][len(traj["steps"])] == finals
    for step, fp in traj["ckpt"].items():
        assert fingerprint_of_list(names, [f[step] for f in per_step]) == fp


# ---------------------------------------------------------------- host and element vectors
def load(name: str) -> dict:
    return json.loads((VECTORS / f"{name}.json").read_text())


def gq_of(bits: str) -> float:
    return float(to_f32(struct.pack("<H", int(bits, 16)), "BF16")[0])


def elems(hexes: list[str], dtype: str) -> np.ndarray:
    return to_f32(np.array([int(h, 16) for h in hexes], dtype=DT[dtype]).tobytes(), dtype)


def hexes(x: np.ndarray, dtype: str) -> list[str]:
    return ["0x%0*x" % (8 if dtype == "F32" else 4, int(b)) for b in to_bits(x, dtype)]


def vector_noise(e: dict, n: int) -> Callable[[int], np.ndarray]:
    start = int(e["start"])
    return noise_of(int(e["seed"]), e["tensor"], np.arange(start, start + n, dtype=np.uint64), e["noise"])


def test_philox_and_noise() -> None:
    for c in load("philox")["cases"]:
        out = philox([[int(x, 16)] for x in c["counter"]], *(int(x, 16) for x in c["key"]))
        assert ["0x%08x" % int(o[0]) for o in out] == c["output"]
    for c in load("noise")["cases"]:
        u = int(bits16(int(c["seed"]), c["step"], c["tensor"], np.array([int(c["element"])], np.uint64))[0])
        assert u == c["u"] and hexes(GAUSS16[[u]], "F32") == [c["gaussian16"]]


def test_adam_vectors() -> None:
    A = load("adam")
    for H in A["hosts"]:
        gqs = [gq_of(b) for b in H["grad_bits"]]
        for t, st in enumerate(H["steps"]):
            B1, B2, alpha, h = adam_host(H["rule"], t)
            terms = adam_window_terms(H["rule"], gqs, t) if H["rule"]["name"] == "mezo-adam" else None
            assert dict(B1=B1, B2=B2, alpha=alpha, h=h, terms=terms) == st
    with np.errstate(all="ignore"):
        for e in A["buffer_elements"] + A["shortcuts"]:
            z = elems([e["z"]], "F32")
            m, v = adam_buffer_mv(elems([e["m"]], "F32"), elems([e["v"]], "F32"), z, e["gq"], e["beta1"], e["beta2"])
            w = adam_p3(elems([e["w"]], e["dtype"]), m, v, z, e["eps"], e["alpha"], e["h"], e["adam_eps"], e["d"],
                        True, e["dtype"])
            assert (hexes(w, e["dtype"]), hexes(m, "F32"), hexes(v, "F32")) == ([e["p3"]], [e["m_after"]], [e["v_after"]])
        for e in A["window_elements"]:
            m, v = adam_window_mv([(cm, cv, elems([zj], "F32")) for cm, cv, zj in e["terms"]], 1)
            w = adam_p3(elems([e["w"]], e["dtype"]), m, v, elems([e["z"]], "F32"), e["eps"], e["alpha"], e["h"],
                        e["adam_eps"], e["d"], True, e["dtype"])
            assert hexes(w, e["dtype"]) == [e["p3"]]
        for e in A["tensors"]:
            w = elems(e["w"], e["dtype"])
            z = vector_noise(e, len(w))
            if "terms" in e:
                m, v = adam_window_mv([(cm, cv, z(u)) for u, cm, cv in e["terms"]], len(w))
            else:
                m, v = adam_buffer_mv(elems(e["m"], "F32"), elems(e["v"], "F32"), z(e["step"]), e["gq"],
                                      e["beta1"], e["beta2"])
                assert (hexes(m, "F32"), hexes(v, "F32")) == (e["m_after"], e["v_after"])
            w = adam_p3(w, m, v, z(e["step"]), e["eps"], e["alpha"], e["h"], e["adam_eps"], e["d"], True, e["dtype"])
            assert hexes(w, e["dtype"]) == e["p3"]
    for e in A["record_runs"]:  # whole replays whose records lie below 2^-100 (adam.md: applied as +0)
        assert hexes(run_vector(e), e["dtype"]) == e["after"], (e["rule"]["name"], e["dtype"], e["grad_bits"])
    assert all(abs(gq_of(b)) >= 2.0 ** 40 for b in A["invalid_grad_bits"])
    assert all(abs(gq_of(b)) < 2.0 ** 40 for b in A["valid_grad_bits"])


def run_vector(e: dict) -> np.ndarray:
    """A run vector (adam.json record_runs, layerwise.json runs): elements start.. of tensor `tensor`, its
    entry's exponents, replayed from step 0 over grad_bits (one bf16 record a step)."""
    w = elems(e["w"], e["dtype"])
    te = {"dtype": e["dtype"], "shape": [len(w)], "decay": e["decay"]}
    te.update({key: e[key] for key in ("perturb_exp", "step_exp") if key in e})
    return replay_tensor(dict(e["rule"]), te, e["tensor"], w, [[gq_of(b)] for b in e["grad_bits"]],
                         vector_noise(e, len(w)), {})


def test_layerwise_vectors() -> None:
    V = load("layerwise")
    for e in V["coefficients"]:
        c = flush(RS(e["lr"] * gq_of(e["grad_bits"]), 16))
        assert abs(c) <= 2.0 ** 100 and c == e["c"]
        ck = flush(c * 2.0 ** (e["perturb_exp"] + e["step_exp"]))
        assert (None if abs(ck) > 2.0 ** 100 else ck) == e["c_k"], e
    for e in V["runs"]:
        assert hexes(run_vector(e), e["dtype"]) == e["after"], (e["rule"]["name"], e["dtype"], e["perturb_exp"])


def test_nspsa_vectors() -> None:
    V = load("nspsa")
    for R in V["runs"]:
        got = [nspsa_terms(R, t, [gq_of(b) for b in row]) for t, row in enumerate(R["grad_bits"])]
        assert ([q for q, _ in got], [tm for _, tm in got]) == (R["q"], R["terms"])
    rule, plan = V["plan_rule"], []
    for t, row in enumerate(V["plan_grad_bits"]):
        terms = nspsa_terms(rule, t, [gq_of(b) for b in row])[1]
        plan += [[[], 0.0]] * (rule["perturbations"] - 1) + [[terms, decay_factor(rule, lr_t(rule, t))]]
    assert plan == V["plan"]
    for P in V["payloads"]:
        raw, N = bytes.fromhex(P["payload"]), P["perturbations"]
        rule = {"grad_encoding": P["grad_encoding"], "grad_scale": P["grad_scale"]}
        try:
            first, count = struct.unpack_from("<II", raw)
            assert 1 <= count and count * N <= 2 ** 20
            pats = ["0x%04x" % (int(np.float32(g).view(np.uint32)) >> 16) for g in decode_gq(rule, raw[8:], count * N)]
            got = (first, [pats[s * N:(s + 1) * N] for s in range(count)])
        except AssertionError:
            got = None
        assert got == (None if P["grad_bits"] is None else (P["first_step"], P["grad_bits"]))
    for e in V["tensors"]:
        rule = dict(e["rule"], grad_encoding="bf16")
        w = elems(e["w"], e["dtype"])
        w = replay_tensor(rule, {"dtype": e["dtype"], "shape": [len(w)], "decay": e["decay"]}, e["tensor"], w,
                          [[gq_of(b) for b in row] for row in e["grad_bits"]], vector_noise(e, len(w)), {})
        assert hexes(w, e["dtype"]) == e["after"]


def test_momentum_vectors() -> None:
    V = load("momentum")
    for P in V["powers"]:
        assert powers(P["momentum"], P["window"]) == P["p"]
    for R in V["runs"]:
        p, K = powers(R["momentum"], R["window"]), R["window"]
        assert [[[t - j, flush(RS(RS(lr_t(R, t) * p[j], 24) * gq_of(R["grad_bits"][t - j]), 16))]
                 for j in range(min(K, t + 1))] for t in range(len(R["grad_bits"]))] == R["terms"]
    with np.errstate(all="ignore"):
        for e in V["elements"]:
            s = DECAY(elems([e["w"]], e["dtype"]) + f32(e["eps"]) * elems([e["z"]], "F32"), e["d"], True)
            for c, zj in e["terms"]:
                s = s - f32(c) * elems([zj], "F32")
            assert hexes(R_D(s, e["dtype"]), e["dtype"]) == [e["p3"]]
        for e in V["tensors"]:
            w = elems(e["w"], e["dtype"])
            z = vector_noise(e, len(w))
            s = DECAY(w + f32(e["eps"]) * z(e["step"]), e["d"], True)
            for u, c in e["terms"]:
                s = s - f32(c) * z(u)
            assert hexes(R_D(s, e["dtype"]), e["dtype"]) == e["p3"]
        for e in V["buffer_elements"]:
            z = elems([e["z"]], "F32")
            m = f32(e["momentum"]) * elems([e["m"]], "F32") + f32(e["c"]) * z
            s = DECAY(elems([e["w"]], e["dtype"]) + f32(e["eps"]) * z, e["d"], True)
            assert (hexes(R_D(s - m, e["dtype"]), e["dtype"]), hexes(m, "F32")) == ([e["p3"]], [e["m_after"]])
