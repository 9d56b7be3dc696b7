"""grad_encoding fp8 and sign (spec/rule.md, *Gradient encodings*): the host, device and reference arithmetic
agree, files round-trip and refuse invalid records in one line, and training with each codec rebuilds bit
for bit (the CLI as a user runs it, --resume, reconstruct --step, and fp32/bf16/fp16 models)."""
from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st

from mezo_replay import embedded
from mezo_replay.arithmetic import grad_codec, reference as R
from mezo_replay.arithmetic.device_grad import device_coefficient
from mezo_replay.arithmetic.rule import MezoSGD, Schedule
from mezo_replay.errors import CorruptChunkError, TrajectoryError, UnsupportedError
from mezo_replay.format.mzt import TrajectoryWriter, read_trajectory
from mezo_replay.training.optimizer import MeZO
from mezo_replay.training.train import TrainConfig, train
from tests.test_mzt import chunk, head_chunk, make_header, PREAMBLE, zframe
from tests.test_rebuild_cli import cli, inproc, one_line_error, printed_command
from tests.test_train_cli import assert_rebuild_is_training

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CODECS = ("fp8", "sign")


def codec_header(encoding: str, scale: float | None = 1.0, **rule) -> dict:
    h = make_header(losses=False)
    h["rule"] = {**h["rule"], "grad_encoding": encoding, **({} if scale is None else {"grad_scale": scale}), **rule}
    return h


# -- arithmetic ------------------------------------------------------------------------------------

def gradients():
    """Any binary64 value, ties of the fp8 grid, and values around its edges."""
    return st.one_of(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
                     st.builds(lambda m, e: math.ldexp(m, e), st.integers(-(1 << 12), 1 << 12), st.integers(-80, 80)))


@SETTINGS
@given(g=gradients(), k=st.integers(-60, 60))
@example(g=464.0, k=0).via("the tie above 448 saturates")
@example(g=2.0**-10, k=0).via("half the smallest subnormal: a tie to 0")
@example(g=3 * 2.0**-10, k=0).via("a subnormal tie to even")
def test_fp8_encoding_equals_the_exhaustive_reference(g, k):
    scale = 2.0**k
    if not math.isfinite(g):
        with pytest.raises(ValueError):
            grad_codec.quantize(g, "fp8", scale)
        return
    gq = grad_codec.quantize(g, "fp8", scale)
    code = R.fp8_encode(g, scale)
    assert gq == R.fp8_decode(code, scale) and code != 0x80
    assert grad_codec.bf16_value(grad_codec.bf16_bits(gq)) == gq  # every gq is a bfloat16 value
    if gq:
        assert math.copysign(1, gq) == math.copysign(1, g)
    else:
        assert math.copysign(1, gq) == 1  # zero is always +0 (code 0x00)


@st.composite
def codec_rules(draw) -> tuple[MezoSGD, int]:
    name = draw(st.sampled_from(["constant", "linear", "cosine"]))
    total = draw(st.integers(0 if name == "constant" else 1, 50))
    schedule = Schedule(name, draw(st.integers(0, total)), total)
    lr = math.ldexp(draw(st.integers(1, (1 << 24) - 1)), draw(st.integers(-124, 76)))
    eps = math.ldexp(draw(st.integers(1, (1 << 16) - 1)), draw(st.integers(-75, 44)))
    lr, eps = min(max(lr, 2.0**-100), 2.0**100), min(max(eps, 2.0**-60), 2.0**60)
    rule = MezoSGD.create(lr=lr, eps=eps, seed=0, schedule=schedule, grad_encoding=draw(st.sampled_from(CODECS)),
                          grad_scale=2.0 ** draw(st.integers(-60, 60)))
    return rule, draw(st.integers(0, 60))


def _host(lp: float, lm: float, rule: MezoSGD, t: int) -> tuple[int, float, bool]:
    try:
        bits = rule.encode_grad((lp - lm) / (2.0 * rule.eps))
        return bits, rule.coefficient(t, bits), False
    except ValueError:
        return 0, 0.0, True


@SETTINGS
@given(lp=st.floats(allow_nan=True, allow_infinity=True), lm=st.floats(allow_nan=True, allow_infinity=True),
       rt=codec_rules())
@example(lp=1.0, lm=1.0, rt=(MezoSGD.create(lr=1e-3, eps=1e-3, seed=0, grad_encoding="sign"), 0)).via("equal losses")
@example(lp=1e300, lm=-1e300, rt=(MezoSGD.create(lr=1e-3, eps=1e-3, seed=0, grad_encoding="fp8"), 0)).via("saturates")
def test_device_equals_host_for_each_codec(lp, lm, rt):
    """device_grad.py's fp8 and sign paths give the host's bits, coefficient and failure (queued steps)."""
    rule, t = rt
    bits, c, failed = device_coefficient(torch.tensor(lp, dtype=torch.float64), torch.tensor(lm, dtype=torch.float64),
                                         rule, t)
    want_bits, want_c, want_failed = _host(lp, lm, rule, t)
    assert (int(bits), bool(failed)) == (want_bits, want_failed)
    assert struct.pack("<f", float(c)) == struct.pack("<f", want_c)


def test_device_path_reads_no_value_on_the_host():
    for encoding in CODECS:
        rule = MezoSGD.create(lr=1e-3, eps=1e-3, seed=0, grad_encoding=encoding)
        meta = torch.empty((), device="meta")
        bits, c, failed = device_coefficient(meta, meta, rule, 3)
        assert bits.device.type == c.device.type == failed.device.type == "meta"


# -- files -----------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(encoding=st.sampled_from(CODECS), k=st.integers(-8, 8),
       gs=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=40), spc=st.integers(1, 17))
def test_writer_reader_round_trip(tmp_path_factory, encoding, k, gs, spc):
    rule = MezoSGD.create(lr=2.0**-20, eps=1e-3, seed=0, grad_encoding=encoding, grad_scale=2.0**k)
    path = tmp_path_factory.mktemp("rt") / "t.mzt"
    h = codec_header(encoding, 2.0**k)
    bits = [rule.encode_grad(g) for g in gs]
    with TrajectoryWriter(path, h, steps_per_chunk=spc) as w:
        for b in bits:
            w.append_step(b)
    traj = read_trajectory(path)
    assert traj.grad_bits.tolist() == bits


def test_writer_refuses_values_the_codec_cannot_hold(tmp_path):
    with TrajectoryWriter(tmp_path / "f.mzt", codec_header("fp8", 1.0)) as w:
        w.append_step(0x3F80)  # 1.0
        w.append_step(0x8000)  # -0: code 0x80
        for bad in (0x3F81, 0x43E8, 0x7F80):  # 9 significant bits, 464 (beyond 448), inf
            with pytest.raises(ValueError):
                w.append_step(bad)
    assert read_trajectory(tmp_path / "f.mzt").grad_bits.tolist() == [0x3F80, 0x8000]
    with TrajectoryWriter(tmp_path / "s.mzt", codec_header("sign", 0.5)) as w:
        for ok in (0x3F00, 0xBF00, 0x0000):
            w.append_step(ok)
        for bad in (0x3F80, 0x8000):
            with pytest.raises(ValueError):
                w.append_step(bad)
    assert read_trajectory(tmp_path / "s.mzt").grad_bits.tolist() == [0x3F00, 0xBF00, 0x0000]


@pytest.mark.parametrize("encoding, body, count, message", [
    ("fp8", bytes([0x38, 0x7F]), 2, "fp8 code 0x7f"),
    ("fp8", bytes([0xFF]), 1, "fp8 code 0xff"),
    ("fp8", bytes([0x38, 0x38]), 3, "needs 11"),
    ("sign", bytes([0b01, 0b10]), 2, "negative sign for a zero"),
    ("sign", bytes([0b111, 0]), 2, "after the last step"),
    ("sign", bytes([0b11, 0, 0]), 2, "needs 10"),
])
def test_invalid_records_are_refused_in_one_line(tmp_path, encoding, body, count, message):
    path = tmp_path / "bad.mzt"
    path.write_bytes(PREAMBLE + head_chunk(codec_header(encoding, 1.0)) +
                     chunk(b"STEP", zframe(struct.pack("<II", 0, count) + body)))
    with pytest.raises(CorruptChunkError, match=message):
        read_trajectory(path)
    assert message in one_line_error(inproc("info", path, cwd=tmp_path))


@pytest.mark.parametrize("rule, error, message", [
    ({"grad_encoding": "fp4"}, UnsupportedError, "grad_encoding 'fp4'"),
    ({"grad_encoding": "fp8"}, TrajectoryError, "grad_scale must be a power of two"),
    ({"grad_encoding": "sign", "grad_scale": 0.3}, TrajectoryError, "grad_scale must be a power of two"),
    ({"grad_encoding": "sign", "grad_scale": 2.0**61}, TrajectoryError, "grad_scale must be a power of two"),
    ({"grad_encoding": "bf16", "grad_scale": 1.0}, TrajectoryError, "grad_scale is only for"),
    ({"grad_encoding": "fp8", "grad_scale": True}, TrajectoryError, "grad_scale must be a number"),
])
def test_header_values_are_refused(tmp_path, rule, error, message):
    h = make_header(losses=False)
    h["rule"] = {**h["rule"], **rule}
    path = tmp_path / "h.mzt"
    path.write_bytes(PREAMBLE + head_chunk(h))
    with pytest.raises(error, match=message):
        read_trajectory(path)


def test_old_bf16_files_read_unchanged():
    """A bf16 file's header has no grad_scale, and its records are the two byte planes, as before."""
    traj = read_trajectory(Path(__file__).parent.parent / "spec" / "vectors" / "tiny" / "traj.mzt")
    assert "grad_scale" not in traj.header["rule"] and traj.steps == 6


# -- training --------------------------------------------------------------------------------------

@pytest.mark.parametrize("codec", CODECS)
def test_train_cli_then_the_printed_reconstruct(tmp_path, codec):
    """What a user runs: train with the codec, then the command train prints; the rebuild is verified
    against training's own fingerprint, and `info` names the codec."""
    r = cli("train", "--steps", "4", "--eval-every", "0", "--grad-codec", codec, "--grad-scale", "2", "-q",
            "-o", "run.mzt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    args = printed_command(r.stdout)
    r2 = cli(*args, "-q", cwd=tmp_path)
    assert r2.returncode == 0 and "verified against" in r2.stdout, r2.stderr
    traj = read_trajectory(tmp_path / "run.mzt")
    assert traj.header["rule"]["grad_encoding"] == codec and traj.header["rule"]["grad_scale"] == 2.0
    info = inproc("info", "run.mzt", cwd=tmp_path)
    assert f"gradient   {codec} records" in info.stdout, info.stdout


def _config(tmp_path: Path, codec: str, dtype: str = "fp32", steps: int = 4, **kw) -> TrainConfig:
    tr, ev = embedded.load_task()
    return TrainConfig(model=embedded.MODEL_DIR, train_examples=tr[:32], eval_examples=ev[:8],
                       out=tmp_path / "t.mzt", steps=steps, lr=embedded.DEFAULTS["lr"], eps=1e-3, batch_size=4,
                       dtype=dtype, grad_codec=codec, **kw)




@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("codec", CODECS)
def test_training_bytes_equal_reconstruction(tmp_path, codec, dtype):
    """train() in process with each codec and model dtype: its final in-memory weights against reconstruct."""
    assert_rebuild_is_training(train(_config(tmp_path, codec, dtype)), tmp_path / "out")


@pytest.mark.parametrize("name, other", [("fp8", "sign"), ("sign", "bf16")])
def test_resume_with_a_codec_and_reconstruct_step(tmp_path, name, other):
    """A stopped run resumed with the same codec continues the same file (its steps replayed and checked);
    one resumed with another codec is refused in one line naming --grad-codec; reconstruct --step works
    mid-run, and the end rebuilds verified. The CLI in process (click's runner), as a user types it."""
    codec = ("--grad-codec", name, "--grad-scale", "0.5")
    common = ("--eval-every", "0", "-q")
    r = inproc("train", "--steps", "3", *codec, *common, "-o", "run.mzt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    base = printed_command(r.stdout)[1]
    wrong = inproc("train", "--resume", "run.mzt", "--steps", "5", "--grad-codec", other,
                   *(("--grad-scale", "0.5") if other != "bf16" else ()), *common, cwd=tmp_path)
    assert f"--grad-codec {name} there, {other} now" in one_line_error(wrong)
    r = inproc("train", "--resume", "run.mzt", "--steps", "5", *codec, *common, cwd=tmp_path)
    assert r.returncode == 0 and "resumed at step 3" in r.stdout, r.stderr
    traj = read_trajectory(tmp_path / "run.mzt")
    assert traj.steps == 5 and sorted(traj.fingerprints) == [3, 5]
    for step, out in (("3", "at3"), ("5", "at5")):
        r = inproc("reconstruct", base, "run.mzt", "--step", step, "-o", out, cwd=tmp_path)
        assert r.returncode == 0 and "verified against" in r.stdout, r.stderr


@pytest.mark.parametrize("codec", CODECS)
def test_queued_steps_write_the_settled_file(tmp_path, codec):
    """fit's queued steps (the device computes the record, device_grad.py) write, with each codec, the
    file that settled steps write (the host computes it), byte for byte."""
    from unittest import mock

    from mezo_replay.training import train as train_module
    from mezo_replay.training.train import fit
    from tests.test_step_pipeline import N, make_closure_for, tiny_model

    def go(queued: set[str], name: str) -> bytes:
        model = tiny_model("bf16")
        opt = MeZO(model.named_parameters(), lr=2e-2, eps=1e-2, seed=7, grad_codec=codec, grad_scale=2.0**-3)
        opt.record(tmp_path / name)
        with mock.patch.object(train_module, "QUEUED_DEVICES", queued):
            fit(opt, N, make_closure_for(model), reads_weights=False)
        opt.close()
        return (tmp_path / name).read_bytes()

    settled = go(set(), "settled.mzt")
    assert go({"cpu"}, "queued.mzt") == settled
    assert read_trajectory(tmp_path / "settled.mzt").header["rule"]["grad_encoding"] == codec
