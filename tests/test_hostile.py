"""Hostile files (issue 14, item 3): each class that once got through costs bounded time and memory and
fails with one TrajectoryError, never another exception. Files are crafted byte by byte."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import zstandard

from mezo_replay.errors import CorruptChunkError, LimitError, TrajectoryError
from mezo_replay.format.mzt import (BUDGET_BASE, JSON_BUDGET_BASE, MAX_EVAL_BYTES, TrajectoryWriter, _json_loads,
                             invalid_steps, read_trajectory)
from mezo_replay.arithmetic.rule import MezoSGD, Schedule
from tests.test_mzt import PREAMBLE, chunk, crafted, head_chunk, make_header, step_chunk, zframe

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def head_text(text: str | bytes) -> bytes:
    return chunk(b"HEAD", zframe(text.encode() if isinstance(text, str) else text))


def with_key(key: str, raw_json: str) -> bytes:
    """The sample header with one more top-level key whose value is the given raw JSON text."""
    return head_text(json.dumps(make_header())[:-1] + f', "{key}": {raw_json}}}')


def eval_chunk(raw_json: str | bytes) -> bytes:
    return chunk(b"eval", zframe(raw_json.encode() if isinstance(raw_json, str) else raw_json))


def cli_info(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mezo_replay", "info", str(path)], capture_output=True,
                          text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("raw, where", [
    ('{"lr": 1' + "0" * 400 + "}", "a 401-digit integer in an unknown key"),
    (str(2**64), "2^64"),
    ("-" + str(2**64), "-2^64"),
])
def test_huge_integers_in_head_are_refused(tmp_path: Path, raw: str, where: str) -> None:
    path = crafted(tmp_path, PREAMBLE, with_key("future", raw))
    with pytest.raises(CorruptChunkError, match="beyond 2\\^64"):
        read_trajectory(path)


def test_huge_integers_where_numbers_are_read(tmp_path: Path) -> None:
    """The rule's numbers and a shape: once an OverflowError traceback from float() or math.prod."""
    text = json.dumps(make_header()).replace('"lr": 9.5367431640625e-07', '"lr": ' + "9" * 30)
    assert text != json.dumps(make_header())
    with pytest.raises(CorruptChunkError, match="beyond 2\\^64"):
        read_trajectory(crafted(tmp_path, PREAMBLE, head_text(text)))
    assert _json_loads(str(2**64 - 1).encode()) == 2**64 - 1  # the largest accepted


def test_huge_integer_in_eval_metrics(tmp_path: Path) -> None:
    path = crafted(tmp_path, PREAMBLE, head_chunk(), step_chunk(0, [1]),
                   eval_chunk('{"step": 1, "split": "eval", "metrics": {"loss": 1' + "0" * 400 + "}}"))
    with pytest.raises(CorruptChunkError, match=r"chunk 2 \(eval\).*beyond 2\^64"):
        read_trajectory(path)
    traj = read_trajectory(path, strict=False)
    assert traj.steps == 1 and traj.corrupt is not None and traj.evals == []


@pytest.mark.parametrize("make", [
    lambda: head_text(json.dumps(make_header()).replace('"mezo-replay test"', '"bad \\udc80 creator"')),
    lambda: with_key("config", '{"architectures": ["\\ud800"]}'),
    lambda: with_key("future", '["\\udfff\\ud800"]'),  # a reversed pair is two lone surrogates
])
def test_lone_surrogates_are_refused(tmp_path: Path, make) -> None:
    path = crafted(tmp_path, PREAMBLE, make())
    with pytest.raises(CorruptChunkError, match="lone surrogate"):
        read_trajectory(path)
    assert json.loads('"\\ud83d\\ude00"') == _json_loads(b'"\\ud83d\\ude00"') == "\U0001F600"  # a pair is fine


def test_lone_surrogate_in_eval_and_cli_prints_one_line(tmp_path: Path) -> None:
    path = crafted(tmp_path, PREAMBLE, head_chunk(), step_chunk(0, [1]),
                   eval_chunk('{"step": 1, "split": "ev\\ud800al", "metrics": {}}'))
    r = cli_info(path)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "lone surrogate" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and "steps before it are recoverable" in lines[0]


def test_escaped_quotes_cost_linear_time(tmp_path: Path) -> None:
    """An unterminated string of escaped quotes took the old string pattern quadratic time (1.6 kB of
    zstd: 30 s). 4 MB of them would take hours that way; here it is one pass."""
    for text in (b'"' + b'\\"' * 2_000_000, b'{"a": "' + b'\\"\\\\' * 1_000_000, b'["\\' + b'"' * 10):
        path = crafted(tmp_path, PREAMBLE, head_text(text))
        with pytest.raises(CorruptChunkError, match="JSON"):
            read_trajectory(path)
    assert _json_loads(b'{"a": "\\\\", "b": "\\"[[[", "c": [[]]}') == {"a": "\\", "b": '"[[[', "c": [[]]}


def test_deep_nesting_is_measured_outside_strings() -> None:
    with pytest.raises(LimitError, match="deeper than 32"):
        _json_loads(b'{"a": "\\\\"' + b", " + b"[" * 33 + b"]" * 33 + b"}")
    assert _json_loads(b'["\\\\\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["]') == ['\\"' + "[" * 38]


def test_tiny_chunk_of_a_million_steps_is_vectorised(tmp_path: Path) -> None:
    """A 1 MiB-step STEP chunk compresses to a few hundred bytes. With a learning rate of 2^100 and a
    long warmup every step's coefficient must be computed (no shortcut applies); the once per-step Python
    loop made such a file cost minutes. The answer must equal the step-by-step rule."""
    header = make_header()
    header["rule"].update(lr=2.0**100, schedule={"name": "constant", "warmup_steps": 2**32 - 1,
                                                 "total_steps": 2**32 - 1})
    n = 1 << 20
    bits = [0x4000] * n  # gq = 2: valid while lr_t <= 2^99, i.e. for the first half of the warmup
    path = crafted(tmp_path, PREAMBLE, head_chunk(header), step_chunk(0, bits), step_chunk(n, bits[:3]))
    traj = read_trajectory(path)
    assert traj.steps == n + 3 and traj.losses is not None
    rule = MezoSGD.from_header(header)

    def valid(t: int) -> bool:
        try:
            rule.coefficient(t, 0x4000)
            return True
        except ValueError:
            return False

    lo, hi = 0, 2**32 - 1  # the last valid step, found by bisection with the step-by-step rule
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if valid(mid) else (lo, mid)
    assert 2**31 <= lo < 2**31 + 2**16 and valid(lo) and not valid(lo + 1)
    assert invalid_steps(np.full(4, 0x4000, np.uint16), rule, lo - 1).tolist() == [2, 3]


def test_decay_factor_over_one_is_found_per_step() -> None:
    rule = MezoSGD(lr=2.0**-4, eps=2.0**-10, seed=0, weight_decay=2.0**5,
                   schedule=Schedule("linear", warmup_steps=0, total_steps=8)).validated()
    got = invalid_steps(np.full(10, 0x3F80, np.uint16), rule, 0).tolist()
    want = []
    for t in range(10):
        try:
            rule.decay(t)
        except ValueError:
            want.append(t)
    assert got == want and want  # lr_t * wd >= 1 early, then the schedule brings it below 1


def _peak_of(read: Callable[[Path], T], path: Path) -> tuple[T, int]:
    """What `read(path)` returned, and the peak bytes Python allocated while it ran."""
    tracemalloc.start()
    try:
        got = read(path)
        return got, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _refused(path: Path) -> None:
    with pytest.raises(CorruptChunkError, match="JSON budget"):
        read_trajectory(path)


def test_many_eval_chunks_hit_the_json_budget(tmp_path: Path) -> None:
    """Thousands of eval chunks of highly compressible JSON once cost gigabytes of Python objects."""
    big = '{"step": 0, "split": "' + "x" * (MAX_EVAL_BYTES - 200) + '", "metrics": {}}'
    one = eval_chunk(big)
    count = JSON_BUDGET_BASE // len(big) + 16 * len(one) // len(big) + 10
    path = crafted(tmp_path, PREAMBLE, head_chunk(), *([one] * count))
    _, peak = _peak_of(_refused, path)
    assert peak < 16 << 20
    traj = read_trajectory(path, strict=False)
    assert 0 < len(traj.evals) < count and "JSON budget" in traj.corrupt.reason


def test_huge_head_list_hits_the_json_budget(tmp_path: Path) -> None:
    """A 48 MiB list of zeros (a 50 kB file) would become ~400 MB of Python objects."""
    text = json.dumps(make_header())[:-1] + ', "future": [' + "0," * (24 << 20) + "0]}"
    path = crafted(tmp_path, PREAMBLE, head_text(text))
    assert path.stat().st_size < 100_000
    _, peak = _peak_of(_refused, path)
    assert peak < 8 << 20


def test_zero_init_chunks_hit_the_budget(tmp_path: Path) -> None:
    """64 MiB INIT chunks of zeros compress to 2 kB each: a small file must not expand without bound."""
    n = 1 << 26
    header = make_header()
    header["tensors"].append({"name": "c.head", "dtype": "F32", "shape": [4 * n], "sha256": "55" * 32,
                              "init": True})
    from tests.test_mzt import rebase
    rebase(header)
    cctx = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True)
    zeros = bytes(n)
    inits = [chunk(b"INIT", cctx.compress(struct.pack("<IQ", 2, k * n) + zeros)) for k in range(4)]
    path = crafted(tmp_path, PREAMBLE, head_chunk(header), *inits)
    assert path.stat().st_size < BUDGET_BASE // 64
    with pytest.raises(CorruptChunkError, match=r"chunk 2 \(INIT\).*decompression budget"):
        read_trajectory(path)


def test_init_bytes_are_not_copied(tmp_path: Path) -> None:
    """One INIT chunk's data is kept as the decompressed buffer itself: peak memory about 1x the tensor."""
    n = 8 << 20
    data = np.random.default_rng(0).integers(0, 2**32, n // 4, dtype=np.uint32).tobytes()
    header = make_header()
    from mezo_replay.format.fingerprint import fingerprint_raw
    from tests.test_mzt import rebase
    header["tensors"].append({"name": "c.head", "dtype": "F32", "shape": [n // 4],
                              "sha256": fingerprint_raw("F32", [n // 4], data), "init": True})
    rebase(header)
    payload = zstandard.ZstdCompressor(level=1, write_checksum=True, write_content_size=True).compress(
        struct.pack("<IQ", 2, 0) + data)
    path = crafted(tmp_path, PREAMBLE, head_chunk(header), chunk(b"INIT", payload), step_chunk(0, [1]))
    del data, payload
    traj, peak = _peak_of(read_trajectory, path)
    assert len(traj.inits[2]) == n and peak < n + (n >> 1) + path.stat().st_size


def test_writer_refuses_what_the_reader_refuses(tmp_path: Path) -> None:
    header = make_header()
    header["future"] = 2**64
    with pytest.raises(TrajectoryError, match="beyond 2\\^64"):
        TrajectoryWriter(tmp_path / "w.mzt", header)
    header["future"] = "\ud800"
    with pytest.raises(TrajectoryError):
        TrajectoryWriter(tmp_path / "w.mzt", header)
    assert list(tmp_path.iterdir()) == []


def test_vectorised_coefficients_equal_the_rule_on_a_long_run() -> None:
    """step_coefficients: the (c, d) a replay needs, for a million steps without a Python loop per step."""
    from mezo_replay.format.mzt import step_coefficients
    from mezo_replay.arithmetic.rule import encode_grad

    rule = MezoSGD.create(lr=3e-4, eps=1e-3, seed=0, weight_decay=0.1,
                          schedule=Schedule("cosine", warmup_steps=50, total_steps=4000))
    rng = np.random.default_rng(3)
    bits = np.array([encode_grad(float(g)) for g in rng.standard_normal(5000) * 30], np.uint16)
    c, d = step_coefficients(rule, bits, 0)
    assert c.tolist() == [rule.coefficient(t, int(b)) for t, b in enumerate(bits)]
    assert d.tolist() == [rule.decay(t) for t in range(bits.size)]
    assert (d > 0).any() and (d == 0).any()  # warmup's first steps decay too little to count


@pytest.mark.parametrize("name", ["huge-int", "surrogate-head", "json-budget"])
def test_cli_prints_one_line_for_each_hostile_class(tmp_path: Path, name: str) -> None:
    parts = {
        "huge-int": [with_key("future", "1" * 500)],
        "surrogate-head": [with_key("creator2", '"\\udc00"')],
        "json-budget": [head_chunk(),
                        *[eval_chunk('{"step": 0, "split": "' + "y" * 60_000 + '", "metrics": {}}')] * 40],
    }[name]
    path = crafted(tmp_path, PREAMBLE, *parts)
    r = cli_info(path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("init, error, message, cli", [
    ('{"name": "kaiming_normal", "mode": "fan_in"}', "UnsupportedError", "initial value 'kaiming_normal'.*newer", True),
    ('{"name": "uniform16", "bound": 0.5, "seed": 3}', "UnsupportedError", "keys \\['seed'\\].*newer", False),
    ('{"name": "gaussian16", "std": 1e39}', "TrajectoryError", "binary32, not 1e\\+39", True),
    ('{"name": "gaussian16", "std": 18446744073709551615}', "TrajectoryError", "binary32", False),
    ('{"name": "uniform16", "bound": 1e-50}', "TrajectoryError", "binary32, not 1e-50", False),
])
def test_init_objects_refused_in_one_line(tmp_path: Path, init: str, error: str, message: str, cli: bool) -> None:
    """A generated initial value (spec/init.md) a reader cannot generate exactly: the file is refused,
    through the CLI in one line (no numpy overflow warning on stderr, no traceback)."""
    import re

    from mezo_replay import errors

    text = json.dumps(make_header()).replace('"sha256": "' + make_header()["tensors"][0]["sha256"] + '"',
                                             '"sha256": "' + make_header()["tensors"][0]["sha256"] + '", "init": '
                                             + init, 1)
    assert '"init"' in text
    path = crafted(tmp_path, PREAMBLE, head_text(text), step_chunk(0, [1]))
    with pytest.raises(getattr(errors, error), match=message) as err:
        read_trajectory(path)
    assert type(err.value).__name__ == error
    if not cli:
        return
    r = cli_info(path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert re.search(message, lines[0]) and "Warning" not in r.stderr


# --- fp8 and sign step records (rule.md, *Gradient encodings*) ------------------------------------------

def codec_header(encoding: str, scale: float = 1.0, losses: bool = False, **rule: object) -> dict:
    header = make_header(losses)
    header["rule"] = {**header["rule"], "grad_encoding": encoding, "grad_scale": scale, **rule}
    return header


def codec_step(first: int, count: int, body: bytes) -> bytes:
    return chunk(b"STEP", zframe(struct.pack("<II", first, count) + body))


@pytest.mark.parametrize("encoding, body", [("sign", b"\xff" * (1 << 17) + bytes(1 << 17)), ("fp8", b"\x38" * (1 << 20))])
def test_small_codec_files_cannot_decode_to_gigabytes(tmp_path: Path, encoding: str, body: bytes) -> None:
    """Found while fuzzing the codecs (a crafted file: random mutants stay too small): a 21 kB file of 262 sign chunks of 2^20 steps (each 262 kB decompressed, 70 bytes
    compressed) fitted the decompression budget counted in record bytes, then decoded to 550 MB of
    bfloat16 patterns (800 MB peak, 6 s); fp8 to twice its budget. STEP chunks are now charged 2 bytes a
    step they can hold (format.md, *Reading cost*): no encoding decodes to more steps than bf16 would."""
    n = 1 << 20
    cctx = zstandard.ZstdCompressor(level=19, write_checksum=True, write_content_size=True)
    steps = [chunk(b"STEP", cctx.compress(struct.pack("<II", k * n, n) + body)) for k in range(40)]
    path = crafted(tmp_path, PREAMBLE, head_chunk(codec_header(encoding)), *steps)
    assert path.stat().st_size < 8000

    def refused(p: Path) -> CorruptChunkError:
        with pytest.raises(CorruptChunkError, match="decoded to bfloat16 .* decompression budget") as e:
            read_trajectory(p)
        return e.value

    err, peak = _peak_of(refused, path)
    assert f"chunk {BUDGET_BASE // (2 * n) + 1} (STEP)" in str(err)  # 32 chunks of 2 MiB fit, not 33
    assert peak < BUDGET_BASE + (32 << 20)


@pytest.mark.parametrize("encoding", ["fp8", "sign"])
def test_writer_refuses_what_the_codec_cannot_hold_and_writes_no_half_chunk(tmp_path: Path, encoding: str) -> None:
    """Each refusal is one line, leaves the pending steps as they were, and the file is byte for byte the
    one written without the refused calls (chunks cut at the same steps). Also the gradients themselves:
    a non-finite g never becomes a record."""
    header = codec_header(encoding, 2.0**60, losses=True, lr=2.0**-41)
    rule = MezoSGD.from_header(header)
    good = [rule.encode_grad(g) for g in (1e20, -3e18, 0.0, 5e21, -1e-30, 2e17, 7.0)]
    off_grid = [0x3F80, 0x6300, 0x5F81] if encoding == "fp8" else [0x5D81, 0x8000, 0x5D00]  # 1, 2^71, 9 bits
    bad = [0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFFF, 0x7F00, 0xFF7F, *off_grid]
    with pytest.raises(ValueError) as e:
        rule.encode_grad(float("nan"))
    assert "\n" not in str(e.value)
    for g in (float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="not finite"):
            rule.encode_grad(g)

    def write(path: Path, refused: list[int]) -> bytes:
        with TrajectoryWriter(path, header, steps_per_chunk=3) as w:
            for t, b in enumerate(good):
                w.append_step(b, loss=float(t))
                for r in refused:
                    with pytest.raises(ValueError) as err:
                        w.append_step(r, loss=0.0)
                    assert "refusing to record the step" in str(err.value) and "\n" not in str(err.value)
                    assert w.steps == t + 1
        return path.read_bytes()

    assert write(tmp_path / "a.mzt", bad) == write(tmp_path / "b.mzt", [])
    assert read_trajectory(tmp_path / "a.mzt").grad_bits.tolist() == good
    # a coefficient beyond 2^100 (rule.md): |lr * gq| with gq = 2^60 and lr = 2^41
    big = codec_header(encoding, 2.0**60, lr=2.0**41)
    with TrajectoryWriter(tmp_path / "c.mzt", big) as w:
        with pytest.raises(ValueError, match="exceed 2\\^100"):
            w.append_step(MezoSGD.from_header(big).encode_grad(1e30))
    assert read_trajectory(tmp_path / "c.mzt").steps == 0
    for scale in (2.0**61, 2.0**-61, 3.0, float("inf")):
        with pytest.raises(TrajectoryError, match="grad_scale"):
            TrajectoryWriter(tmp_path / "d.mzt", codec_header(encoding, scale))
    assert not (tmp_path / "d.mzt").exists()


def test_repair_of_a_sign_file_torn_inside_a_step_chunk_cli(tmp_path: Path) -> None:
    """What a user runs after a crash mid-write: the tiny-sign vector's run recorded in two parts (3 steps
    and their fingerprint, then 3 more, as a resumed run writes it), torn inside its second STEP chunk;
    `repair`, `info` and `reconstruct` as subprocesses. The kept prefix ends at the first part's
    fingerprint, so the rebuild of it is verified."""
    from mezo_replay.format.fingerprint import tensor_fingerprint
    from mezo_replay.format.safetensors_io import BaseCheckpoint
    from tests.test_rebuild_cli import cli, inproc

    vector = ROOT / "spec" / "vectors" / "tiny-sign"
    want = read_trajectory(vector / "traj.mzt")
    names = [t["name"] for t in want.header["tensors"]]
    r = inproc("reconstruct", vector / "base.safetensors", vector / "traj.mzt", "--step", "3", "--unverified",
               "-o", tmp_path / "at3.safetensors", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    at3 = BaseCheckpoint.open(tmp_path / "at3.safetensors")
    with TrajectoryWriter(tmp_path / "run.mzt", want.header, steps_per_chunk=3) as w:
        for t in range(6):
            w.append_step(int(want.grad_bits[t]), loss=float(want.losses[t]))
            if t == 2:
                w.write_fingerprint([tensor_fingerprint(at3.read(n)) for n in names])
        w.write_fingerprint(want.final_fingerprint)
    data = (tmp_path / "run.mzt").read_bytes()
    fuzz = load_fuzzer()
    at, steps = 16, []
    for ctype, payload in fuzz.split_chunks(data)[1]:
        if ctype == b"STEP":
            steps.append((at, len(payload)))
        at += 12 + len(payload)
    assert len(steps) == 2
    (tmp_path / "torn.mzt").write_bytes(data[:steps[1][0] + 12 + steps[1][1] // 2])

    r = cli("repair", "torn.mzt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "repaired torn.mzt -> torn-repaired.mzt: kept 3 steps" in r.stdout and "torn write" in r.stdout
    assert "rebuilds from it are verified" in r.stdout
    assert (tmp_path / "torn-repaired.mzt").read_bytes() == data[:steps[1][0]]
    r = inproc("info", "torn-repaired.mzt", cwd=tmp_path)  # in process: a third interpreter adds nothing
    assert r.returncode == 0 and "gradient   sign records" in r.stdout, r.stdout + r.stderr
    assert "steps      3 (complete, final fingerprint recorded)" in r.stdout, r.stdout
    r = cli("reconstruct", vector / "base.safetensors", "torn-repaired.mzt", "-o", "out.safetensors", cwd=tmp_path)
    assert r.returncode == 0 and "verified against" in r.stdout, r.stdout + r.stderr
    out = BaseCheckpoint.open(tmp_path / "out.safetensors")
    assert [tensor_fingerprint(out.read(n)) for n in names] == [tensor_fingerprint(at3.read(n)) for n in names]


def load_fuzzer():
    from tests.test_fuzz import load_fuzzer as load
    return load()


def test_info_of_extreme_losses_prints_no_warning(tmp_path: Path) -> None:
    """Found by fuzzing `info` (tools/fuzz_mzt.py --cli): a sign file whose lsbf losses hold 0x7F7F
    (3.4e38) twice, or inf and -inf, made the loss summary's float32 mean print a numpy RuntimeWarning
    (overflow / invalid value in reduce) on stderr above the report."""
    import warnings

    from tests.test_rebuild_cli import inproc

    bits = [0x7F7F] * 2 + [0x3F80] * 16 + [0x7F80, 0xFF80]
    lsbf = struct.pack("<II", 0, 20) + bytes(b >> 8 for b in bits) + bytes(b & 0xFF for b in bits)
    path = crafted(tmp_path, PREAMBLE, head_chunk(codec_header("sign", losses=True)),
                   codec_step(0, 20, b"\xff\xff\x0f" + bytes(3)), chunk(b"lsbf", zframe(lsbf)))
    assert read_trajectory(path).losses[[0, 18, 19]].tolist() == [float(np.float32(3.3895313892515355e38)),
                                                                  float("inf"), float("-inf")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for args in (["info"], ["info", "--json"]):
            r = inproc(*args, path, cwd=tmp_path)
            assert r.returncode == 0 and r.stderr == "", r.stderr
        # --json stays JSON any parser reads: the non-finite summaries are null, never NaN or Infinity
        def no_constants(name: str) -> None:
            raise AssertionError(f"info --json wrote {name}")

        doc = json.loads(inproc("info", "--json", path, cwd=tmp_path).stdout, parse_constant=no_constants)
        assert doc["loss_first"] is None and doc["loss_last"] is None and doc["steps"] == 20
