"""Every implementation against spec/vectors, bit for bit, and the torch path against the reference."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from mezo_replay.arithmetic import philox, reference as R, rule
from mezo_replay.kernels import steps
from mezo_replay.arithmetic.noise import GAUSS16_SHA256, noise
from mezo_replay.arithmetic.rule import MezoSGD

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TORCH_DTYPE = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
INT_VIEW = {"F32": torch.int32, "BF16": torch.int16, "F16": torch.int16}


def load(name: str) -> dict:
    return json.loads((VECTORS / f"{name}.json").read_text())


def bits_to_torch(bits: np.ndarray, dtype: str, device: str) -> torch.Tensor:
    ints = torch.from_numpy(bits.astype(R.BITS_DTYPE[dtype]).view(np.int32 if dtype == "F32" else np.int16))
    return ints.view(TORCH_DTYPE[dtype]).to(device)


def torch_to_bits(t: torch.Tensor, dtype: str) -> np.ndarray:
    x = t.detach().cpu().contiguous()
    nan = torch.isnan(x).numpy().reshape(-1)
    bits = x.view(INT_VIEW[dtype]).numpy().reshape(-1).view(R.BITS_DTYPE[dtype]).copy()
    bits[nan] = R.CANONICAL_NAN[dtype]
    return bits


def test_table_files_match_the_spec_hash():
    spec_table = (ROOT / "spec" / "gaussian16.bin").read_bytes()
    pkg_table = (ROOT / "mezo_replay" / "arithmetic" / "gaussian16.bin").read_bytes()
    assert hashlib.sha256(spec_table).hexdigest() == GAUSS16_SHA256 == R.GAUSS16_SHA256
    assert spec_table == pkg_table
    assert GAUSS16_SHA256 in (ROOT / "spec" / "noise.md").read_text()


def test_table_properties_stated_in_noise_md():
    z = R.gauss16_table()
    assert np.array_equal(z[::-1], -z)
    assert (z[:32768] < 0).all() and (z[32768:] > 0).all()
    assert float(z[32768]) == 1.9073486328125e-05 and float(z[65535]) == 4.3125
    assert ((z.view(np.uint32) & 0xFFFF) == 0).all()  # 8 significant bits: bfloat16 values
    assert f"{float(np.var(z.astype(np.float64))):.8f}" == "0.99998565"


@pytest.mark.parametrize("device", DEVICES)
def test_philox_known_answers(device):
    for case in load("philox")["cases"]:
        ctr = [int(c, 16) for c in case["counter"]]
        key = tuple(int(k, 16) for k in case["key"])
        out = [int(o, 16) for o in case["output"]]
        assert list(R.philox4x32_10(tuple(ctr), key)) == out
        got = philox.philox4x32_10(*(torch.tensor([c], dtype=torch.int64, device=device) for c in ctr), key)
        assert [int(w.item()) for w in got] == out


@pytest.mark.parametrize("device", DEVICES)
def test_noise_vectors(device):
    for case in load("noise")["cases"]:
        seed, t, k, i = int(case["seed"]), case["step"], case["tensor"], int(case["element"])
        idx = np.array([i], dtype=np.uint64)
        assert int(R.random_u16(seed, t, k, idx)[0]) == case["u"]
        assert int(philox.random_u16(seed, t, k, i, 1, device).item()) == case["u"]
        g = noise("gaussian16", seed, t, k, i, 1, device).item()
        assert struct.unpack("<I", struct.pack("<f", g))[0] == int(case["gaussian16"], 16)
        assert float(R.noise("gaussian16", seed, t, k, idx)[0]) == g
        assert noise("rademacher16", seed, t, k, i, 1, device).item() == case["rademacher16"]


def test_noise_ranges_agree_with_reference_across_block_boundaries():
    for start, count in [(0, 1), (3, 5), (7, 2), (5, 37), (2**32 - 5, 19), (2**40 + 1, 8)]:
        idx = np.arange(start, start + count, dtype=np.uint64)
        for name in ("gaussian16", "rademacher16"):
            want = R.noise(name, 99, 3, 4, idx)
            got = noise(name, 99, 3, 4, start, count).numpy()
            assert want.view(np.uint32).tolist() == got.view(np.uint32).tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_rule_element_vectors(device):
    cases = load("rule")["elements"]
    assert len(cases) > 70
    for case in cases:
        dtype = case["dtype"]
        w = np.array([int(case["w"], 16)], dtype=R.BITS_DTYPE[dtype])
        z = np.array([int(case["z"], 16)], dtype=np.uint32).view(np.float32)
        want = [int(case[p], 16) for p in ("p1", "p2", "p3")]
        d = case.get("d", 0.0)
        assert [int(b[0]) for b in R.phases(w, dtype, z, case["eps"], case["c"], d)] == want, case
        t = bits_to_torch(w, dtype, device)
        zt = torch.from_numpy(z.copy()).to(device)
        steps.perturb_(t, zt, case["eps"])
        assert int(torch_to_bits(t, dtype)[0]) == want[0], case
        steps.perturb_(t, zt, -2.0 * case["eps"])
        assert int(torch_to_bits(t, dtype)[0]) == want[1], case
        steps.restore_update_(t, zt, case["eps"], case["c"], d)
        assert int(torch_to_bits(t, dtype)[0]) == want[2], case


def test_rule_host_vectors():
    host = load("rule")["host"]
    for case in host["round_significant"]:
        assert R.round_significant(case["x"], case["bits"]) == case["result"]
        assert rule.round_significant(case["x"], case["bits"]) == case["result"]
    for case in host["grad_bits"]:
        assert R.grad_bits(case["g"]) == int(case["bits"], 16) == rule.encode_grad(case["g"])
    for case in host["coefficient"]:
        sgd = MezoSGD(lr=case["lr"], eps=2.0**-10, seed=0)
        assert R.coefficient(case["lr"], int(case["grad_bits"], 16)) == case["c"]
        assert sgd.coefficient(0, int(case["grad_bits"], 16)) == case["c"]
    for case in host["cos_pi"]:
        assert R.cos_pi(case["p"]) == case["result"] == rule.cos_pi(case["p"])
    for case in host["schedules"]:
        sgd = MezoSGD(lr=case["lr"], eps=2.0**-10, seed=0, schedule=rule.Schedule.from_header(case["schedule"]),
                      weight_decay=case["weight_decay"]).validated()
        for st in case["steps"]:
            assert (sgd.lr_at(st["t"]), sgd.decay(st["t"])) == (st["lr_t"], st["d"]), (case["schedule"], st)
            ref_rule = {"lr": case["lr"], "weight_decay": case["weight_decay"], "schedule": case["schedule"]}
            assert (R.lr_at(ref_rule, st["t"]), R.decay_factor(ref_rule, st["t"])) == (st["lr_t"], st["d"])
    for g in host["invalid_grad"]:
        with pytest.raises(ValueError):
            rule.encode_grad(g)
    from mezo_replay.format.mzt import invalid_steps

    for bits in host["invalid_grad_bits"]:  # what a reader refuses (rule.md), whatever the rule
        assert invalid_steps(np.array([0x3F80, int(bits, 16)], np.uint16), MezoSGD(lr=2.0**-100, eps=1.0, seed=0)
                             ).tolist() == [1], bits
    for case in host["coefficient"]:  # every coefficient case holds valid bits: a reader accepts them
        assert invalid_steps(np.array([int(case["grad_bits"], 16)], np.uint16),
                             MezoSGD(lr=case["lr"], eps=2.0**-10, seed=0)).size == 0
    for case in host["invalid_coefficient"]:
        with pytest.raises(ValueError, match="2\\^100"):
            MezoSGD(lr=case["lr"], eps=2.0**-10, seed=0).coefficient(0, int(case["grad_bits"], 16))


def _codec_rule(encoding: str, scale: float) -> MezoSGD:
    return MezoSGD(lr=2.0**-10, eps=0.5, seed=0, grad_encoding=encoding, grad_scale=scale).validated()


def test_grad_codec_vectors():
    """vectors/grad_codecs.json: the numpy reference, rule.py and device_grad.py all give its records and gq;
    mzt decodes its STEP payloads to its gq patterns and refuses the corrupt ones."""
    from mezo_replay.arithmetic import grad_codec
    from mezo_replay.arithmetic.device_grad import device_coefficient
    from mezo_replay.format.mzt import StepCodec, _Corrupt

    v = load("grad_codecs")
    for case in v["fp8"]["encode"]:
        g, scale, want = case["g"], case["scale"], int(case["gq_bits"], 16)
        assert R.fp8_encode(g, scale) == int(case["code"], 16), case
        assert R.record_bf16_bits("fp8", scale, int(case["code"], 16)) == want, case
        assert grad_codec.encode(g, "fp8", scale) == want, case
        sgd = _codec_rule("fp8", scale)  # eps 0.5: g = (g - 0) / 1 exactly on the device
        bits, _, failed = device_coefficient(torch.tensor(g, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64),
                                             sgd, 0)
        assert (int(bits), bool(failed)) == (want, False), case
    for code, want in enumerate(v["fp8"]["decode"]):
        gq = R.fp8_decode(code, 1.0)
        assert (None if gq is None else f"0x{R.record_bf16_bits('fp8', 1.0, code):04x}") == want, code
        value = grad_codec.fp8_value(code)
        assert (want is None and value != value) or f"0x{grad_codec.bf16_bits(value):04x}" == want, code
    for case in v["sign"]["encode"]:
        assert R.sign_encode(case["g"]) == (case["nonzero"], case["negative"]), case
        want = int(case["gq_bits"], 16)
        assert grad_codec.encode(case["g"], "sign", case["scale"]) == want, case
        bits, _, failed = device_coefficient(torch.tensor(case["g"], dtype=torch.float64),
                                             torch.tensor(0.0, dtype=torch.float64), _codec_rule("sign", case["scale"]), 0)
        assert (int(bits), bool(failed)) == (want, False), case
    for g in (float("inf"), float("-inf"), float("nan")):
        for encoding in ("fp8", "sign"):
            with pytest.raises(ValueError):
                grad_codec.encode(g, encoding, 1.0)
    for case in v["payloads"]:
        payload = bytes.fromhex(case["payload"])
        scale = case["grad_scale"]
        sgd = MezoSGD(lr=2.0**-10, eps=0.5, seed=0, grad_encoding=case["grad_encoding"], grad_scale=scale).validated()
        codec = StepCodec(sgd)
        if case["gq_bits"] is None:
            with pytest.raises(ValueError):
                for r in R.decode_step_payload(case["grad_encoding"], payload)[1]:
                    R.record_bf16_bits(case["grad_encoding"], scale, r)
            with pytest.raises(_Corrupt):
                codec.decode(payload)
            continue
        first, bits = codec.decode(payload)
        assert first == case["first_step"] and [f"0x{b:04x}" for b in bits.tolist()] == case["gq_bits"]
        assert codec.encode(first, bits) == payload  # the writer's records are these bytes


def test_quantised_hyperparameters_round_trip_through_json():
    sgd = MezoSGD.create(lr=1e-6, eps=1e-3, seed=2**63 + 5)
    assert sgd.eps == rule.round_significant(1e-3, 16) and sgd.eps != 1e-3
    again = MezoSGD.from_header(json.loads(json.dumps(sgd.header_fields())))
    assert again == sgd
    for bad in (dict(lr=1e-6, eps=0.0), dict(lr=0.0, eps=1e-3), dict(lr=1e-6, eps=float("inf"))):
        with pytest.raises(ValueError):
            MezoSGD.create(seed=0, **bad)


def random_bits(dtype: str, n: int, seed: int) -> np.ndarray:
    """Values a model holds, plus the awkward ones: zeros, subnormals, huge, inf, NaN."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32) * np.float32(0.05)
    bits = R.round_to(x, dtype)
    specials = {"F32": [0, 0x80000000, 1, 0x80000005, 0x7F7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0x00400000],
                "BF16": [0, 0x8000, 1, 0x8005, 0x7F7F, 0x7F80, 0xFF80, 0x7FC0, 0x0040],
                "F16": [0, 0x8000, 1, 0x8005, 0x7BFF, 0x7C00, 0xFC00, 0x7E00, 0x0200]}[dtype]
    bits[: len(specials)] = specials
    return bits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
@pytest.mark.parametrize("noise_name", ["gaussian16", "rademacher16"])
def test_torch_replay_equals_reference(device, dtype, noise_name, backend):
    """Odd sizes and odd slice sizes, so slices and Philox blocks never line up."""
    n = 1237
    bits = random_bits(dtype, n, seed=n)
    sgd = MezoSGD.create(lr=2e-3, eps=1e-3, seed=77, noise=noise_name)
    grads = [rule.encode_grad(g) for g in (0.5, -3.25, 1e-35, 40.0, -0.001, 0.0, 7.0)]
    want = R.replay(bits, dtype, seed=sgd.seed, k=5, noise_name=noise_name, rule=sgd.header_fields()["rule"], grads=grads)
    t = bits_to_torch(bits, dtype, device).reshape(1, n)
    steps.replay_tensor_(t, sgd, 5, steps.step_constants(sgd, grads), slice_size=100)
    assert torch_to_bits(t, dtype).tolist() == want.tolist()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_torch_replay_with_schedule_and_decay_equals_reference(device, dtype, backend):
    n = 997
    bits = random_bits(dtype, n, seed=3)
    sgd = MezoSGD.create(lr=0.02, eps=1e-3, seed=5, weight_decay=0.3,
                         schedule=rule.Schedule("cosine", warmup_steps=2, total_steps=9))
    grads = [rule.encode_grad(g) for g in (0.5, -3.25, 2.0, 40.0, -0.001, 0.0, 7.0, -1.0, 0.3)]
    want = R.replay(bits, dtype, seed=sgd.seed, k=1, noise_name=sgd.noise, rule=sgd.header_fields()["rule"],
                    grads=grads, decayed=True)
    t = bits_to_torch(bits, dtype, device)
    steps.replay_tensor_(t, sgd, 1, steps.step_constants(sgd, grads), decay=True, slice_size=128)
    assert torch_to_bits(t, dtype).tolist() == want.tolist()
    plain = R.replay(bits, dtype, seed=sgd.seed, k=1, noise_name=sgd.noise, rule=sgd.header_fields()["rule"],
                     grads=grads)
    assert plain.tolist() != want.tolist()  # decay changed something: the test can fail


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_training_phases_equal_replay(dtype, backend):
    """Phase by phase (as training runs them) and fused (as replay runs them) agree, for any slicing."""
    bits = random_bits(dtype, 531, seed=1)
    sgd = MezoSGD.create(lr=1e-2, eps=1e-3, seed=3)
    grads = [rule.encode_grad(g) for g in (2.0, -1.5, 0.25)]
    a = bits_to_torch(bits, dtype, "cpu")
    b = a.clone().reshape(9, 59).t()  # non-contiguous view: indices stay row-major of the logical tensor
    b_ref = a.clone().reshape(9, 59)
    for t, g in enumerate(grads):
        c = sgd.coefficient(t, g)
        steps.perturb_tensor_(a, sgd, t, 2, sgd.eps, slice_size=64)
        steps.perturb_tensor_(a, sgd, t, 2, -2.0 * sgd.eps, slice_size=64)
        steps.restore_update_tensor_(a, sgd, t, 2, c, slice_size=64)
    steps.replay_tensor_(b_ref, sgd, 2, steps.step_constants(sgd, grads), slice_size=50)
    assert torch_to_bits(a, dtype).tolist() == torch_to_bits(b_ref, dtype).tolist()
    c = bits_to_torch(bits, dtype, "cpu").reshape(9, 59).t().contiguous().t()  # same logical tensor, other strides
    steps.replay_tensor_(c, sgd, 2, steps.step_constants(sgd, grads))
    assert torch_to_bits(c.contiguous(), dtype).tolist() == torch_to_bits(b_ref, dtype).tolist()
    del b


@pytest.mark.parametrize("name", ["tiny", "tiny-cosine-decay", "tiny-new-tensor", "tiny-nan",
                                  "tiny-checkpoints", "tiny-fp8", "tiny-sign", "tiny-momentum",
                                  "tiny-momentum-buffer", "tiny-nspsa", "tiny-nspsa-sign", "tiny-adam",
                                  "tiny-adam-buffer", "tiny-layerwise", "tiny-layerwise-momentum",
                                  "tiny-layerwise-buffer", "tiny-nspsa-sign-neg"])
def test_tiny_end_to_end_vector(tmp_path, name, backend):
    """spec/vectors/tiny*: the numpy reference and the torch reconstruct both land on expected.json."""
    import hashlib

    from mezo_replay.rebuild import replay
    from mezo_replay.format.mzt import read_trajectory
    from mezo_replay.format.safetensors_io import BaseCheckpoint

    tiny = VECTORS / name
    expected = json.loads((tiny / "expected.json").read_text())
    traj = read_trajectory(tiny / "traj.mzt")
    h = traj.header
    assert traj.steps == expected["steps"] and traj.final_fingerprint is not None
    base = BaseCheckpoint.open(tiny / "base.safetensors")
    for k, t in enumerate(h["tensors"]):
        bits = traj.inits[k] if t.get("init") else base.read_bytes(t["name"])
        w = np.frombuffer(bits, dtype=R.BITS_DTYPE[t["dtype"]]).copy()
        got = R.replay(w, t["dtype"], seed=int(h["generator"]["seed"]), k=k, noise_name=h["noise"]["name"],
                       rule=h["rule"], grads=traj.grad_bits.tolist(), decayed=bool(t.get("decay")),
                       perturb_exp=t.get("perturb_exp", 0), step_exp=t.get("step_exp", 0))
        assert hashlib.sha256(got.tobytes()).hexdigest() == expected["tensors"][t["name"]]["sha256"], t["name"]
    out = replay.reconstruct(replay.plan(tiny / "base.safetensors", tiny / "traj.mzt"), tmp_path / "o.safetensors")
    result = BaseCheckpoint.open(out)
    for name, want in expected["tensors"].items():
        assert hashlib.sha256(bytes(result.read_bytes(name))).hexdigest() == want["sha256"], name
    assert bytes(result.read_bytes("d.frozen")) == bytes(base.read_bytes("d.frozen"))


def test_nan_vector_starts_from_non_canonical_nans():
    """tiny-nan exercises canonicalisation: its base holds NaNs of every sign, payload and signalling
    kind, which the expected outputs (and every fingerprint) hold as the one canonical NaN."""
    from mezo_replay.format.fingerprint import fingerprint_raw
    from mezo_replay.format.mzt import read_trajectory
    from mezo_replay.format.safetensors_io import BaseCheckpoint

    base = BaseCheckpoint.open(VECTORS / "tiny-nan" / "base.safetensors")
    header = read_trajectory(VECTORS / "tiny-nan" / "traj.mzt").header
    odd = 0
    for t in header["tensors"]:
        raw = bytes(base.read_bytes(t["name"]))
        bits = np.frombuffer(raw, dtype=R.BITS_DTYPE[t["dtype"]])
        nan = np.isnan(bits.view({"F32": np.float32, "BF16": np.uint16, "F16": np.float16}[t["dtype"]])) \
            if t["dtype"] != "BF16" else ((bits & 0x7F80) == 0x7F80) & ((bits & 0x7F) != 0)
        odd += int((nan & (bits != R.CANONICAL_NAN[t["dtype"]])).sum())
        assert fingerprint_raw(t["dtype"], t["shape"], raw) == t["sha256"]  # NaNs canonical in the fingerprint
    assert odd >= 9


def _torch_initial_bits(spec: dict, seed: int, k: int, n: int, dtype: str, device: str) -> np.ndarray:
    from mezo_replay.arithmetic.initial import generate

    return torch_to_bits(generate(spec, seed, k, [n], TORCH_DTYPE[dtype], device), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_init_element_vectors(device):
    """init.json's elements: the reference for every case (elements beyond 2^32 included); torch's
    generate() for those inside a tensor small enough to build whole (it starts at element 0)."""
    data = load("init")
    cases = data["elements"] + data["double_rounding"]
    assert len(cases) > 300 and len(data["double_rounding"]) >= 4
    kinds = {c["init"]["name"] for c in cases}
    assert kinds == {"zeros", "uniform16", "gaussian16"}
    assert max(int(c["element"]) for c in cases) >= 2**40 and max(int(c["seed"]) for c in cases) >= 2**63
    small: dict[tuple, list[dict]] = {}
    for case in cases:
        seed, k, i = int(case["seed"]), case["tensor"], int(case["element"])
        idx = np.array([i], dtype=np.uint64)
        if "u" in case:
            assert int(R.random_u16(seed, R.INIT_STREAM, k, idx)[0]) == case["u"]
        assert int(R.initial_binary32(case["init"], seed, k, idx).view(np.uint32)[0]) == int(case["binary32"], 16)
        for dtype in ("F32", "BF16", "F16"):
            assert int(R.initial_elements(case["init"], seed, k, idx, dtype)[0]) == int(case[dtype], 16), case
        if i < 2**17:
            small.setdefault((json.dumps(case["init"]), seed, k), []).append(case)
    for (spec, seed, k), group in small.items():
        n = max(int(c["element"]) for c in group) + 1
        for dtype in ("F32", "BF16", "F16"):
            got = _torch_initial_bits(json.loads(spec), seed, k, n, dtype, device)
            for case in group:
                assert int(got[int(case["element"])]) == int(case[dtype], 16), (case, dtype)


def test_init_double_rounding_cases_are_what_they_say():
    """Each double_rounding case: rounding the exact product straight to the dtype gives other bits
    than the defined R_D(RN32(product)), so an implementation that skips the binary32 step fails it."""
    from fractions import Fraction

    table = R.gauss16_table()
    for case in load("init")["double_rounding"]:
        spec, u, dtype = case["init"], case["u"], case["dtype"]
        exact = Fraction(spec["bound"]) * Fraction(2 * u - 65535, 65536) if spec["name"] == "uniform16" \
            else Fraction(spec["std"]) * Fraction(float(table[u]))
        want = int(case[dtype], 16)
        values = {b: Fraction(float(R.to_f32(np.array([b], np.uint16), dtype)[0])) for b in (want - 1, want, want + 1)}
        nearest = min(values, key=lambda b: (abs(values[b] - exact), b & 1))
        assert nearest != want, case


@pytest.mark.parametrize("device", DEVICES)
def test_init_tensor_vectors(device):
    from mezo_replay.format.fingerprint import fingerprint_raw
    from mezo_replay.arithmetic.initial import generate

    for case in load("init")["tensors"]:
        seed, k, dtype, shape = int(case["seed"]), case["tensor"], case["dtype"], case["shape"]
        want = [int(b, 16) for b in case["bits"]]
        ref = R.initial_value(case["init"], seed, k, shape, dtype)
        assert ref.tolist() == want, case
        assert fingerprint_raw(dtype, shape, ref.astype("<" + ref.dtype.str[1:]).tobytes()) == case["fingerprint"]
        got = generate(case["init"], seed, k, shape, TORCH_DTYPE[dtype], device)
        assert list(got.shape) == shape and torch_to_bits(got, dtype).tolist() == want, case


def test_tiny_lora_vector_needs_no_base(backend):
    """spec/vectors/tiny-lora rebuilds from the file alone: the reference from its generated and INIT
    starting values, and every torch backend through replay.plan(None, ...), land on expected.json."""
    import hashlib

    from mezo_replay.rebuild import replay
    from mezo_replay.format.mzt import read_trajectory

    tiny = VECTORS / "tiny-lora"
    expected = json.loads((tiny / "expected.json").read_text())
    traj = read_trajectory(tiny / "traj.mzt")
    h = traj.header
    assert traj.steps == expected["steps"] and traj.final_fingerprint is not None
    assert not replay.needs_base(traj) and set(h["peft"]) == {"adapter_config", "base_weights"}
    kinds = {(t["init"]["name"] if isinstance(t["init"], dict) else "stored", t["dtype"]) for t in h["tensors"]}
    assert {(n, d) for n in ("zeros", "uniform16", "gaussian16") for d in ("F32", "BF16", "F16")} <= kinds
    assert ("stored", "F32") in kinds
    seed = int(h["generator"]["seed"])
    for k, t in enumerate(h["tensors"]):
        start = R.starting_bits(t, seed, k, traj.inits.get(k))
        assert start.tobytes().hex() == expected["initial"][t["name"]]["bytes"], t["name"]
        got = R.replay(start, t["dtype"], seed=seed, k=k, noise_name=h["noise"]["name"], rule=h["rule"],
                       grads=[int(b) for b in traj.grad_bits])
        assert got.tobytes().hex() == expected["tensors"][t["name"]]["bytes"], t["name"]
        assert hashlib.sha256(got.tobytes()).hexdigest() == expected["tensors"][t["name"]]["sha256"]
    p = replay.plan(None, tiny / "traj.mzt")
    for k, name in enumerate(p.names):
        assert torch_to_bits(replay.read_base(p, k), h["tensors"][k]["dtype"]).tobytes().hex() == \
            expected["initial"][name]["bytes"], name
    seen = []
    for name, w in replay.replayed(p):
        assert torch_to_bits(w, h["tensors"][len(seen)]["dtype"]).tobytes().hex() == \
            expected["tensors"][name]["bytes"], name
        seen.append(name)
    assert seen == list(expected["tensors"])


def test_init_element_vectors_far_into_a_tensor(monkeypatch):
    """generate() has no start offset (it builds whole tensors); shifting its draws by the element
    index runs its arithmetic on init.json's elements beyond 2^32 too."""
    from mezo_replay.arithmetic import initial

    far = [c for c in load("init")["elements"] if int(c["element"]) >= 2**32]
    assert len(far) >= 30
    real = initial.random_u16
    for case in far:
        at = int(case["element"])
        monkeypatch.setattr(initial, "random_u16",
                            lambda s, t, k, start, n, device, at=at: real(s, t, k, at + start, n, device))
        for dtype in ("F32", "BF16", "F16"):
            got = _torch_initial_bits(case["init"], int(case["seed"]), case["tensor"], 1, dtype, "cpu")
            assert int(got[0]) == int(case[dtype], 16), (case, dtype)
