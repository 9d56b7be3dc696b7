"""The `.mzt` writer and reader against spec/format.md, with files crafted byte by byte where it matters."""

import copy
import json
import math
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import zstandard

from mezo_replay.errors import (CorruptChunkError, LimitError, MezoReplayError, OutputExistsError, TrajectoryError,
                                UnsupportedError)
from mezo_replay.format.fingerprint import base_fingerprint
from mezo_replay.format.mzt import (MAGIC, MAX_TENSORS, TrajectoryWriter, read_trajectory, validate_header)

PREAMBLE = b"\x89MZT\r\n\x1a\n" + b"\x01\x00\x00\x00" + b"\x00\x00\x00\x00"
FPS = ["11" * 32, "22" * 32]
FINAL = ["33" * 32, "44" * 32]


def make_header(losses: bool = True) -> dict:
    tensors = [{"name": "a.weight", "dtype": "F32", "shape": [2, 3], "sha256": FPS[0]},
               {"name": "b.bias", "dtype": "BF16", "shape": [4], "sha256": FPS[1]}]
    return {
        "creator": "mezo-replay test",
        "generator": {"name": "philox4x32-10", "seed": str(2**64 - 1)},
        "noise": {"name": "gaussian16",
                  "table_sha256": "33888ab6f4616c9a0d6bba520458612f7f70d5be5df01e655e1fe972d49d478b"},
        "rule": {"name": "mezo-sgd", "eps": 0.0009999871253967285, "lr": 2.0**-20,
                 "schedule": {"name": "constant"}, "grad_encoding": "bf16"},
        "tensors": tensors,
        "base": {"fingerprint": base_fingerprint(["a.weight", "b.bias"], FPS), "source": "gpt2", "revision": None},
        "records": {"losses": losses},
        "metadata": {"task": "sst2", "ünïcode": "✓"},
        "future_key": {"ignored": [1, 2, 3]},
    }


def grad_bits(n: int, seed: int = 0) -> np.ndarray:
    """Valid bfloat16 patterns of plausible projected gradients."""
    g = np.random.default_rng(seed).normal(0, 10, n).astype(np.float32)
    return (g.view(np.uint32) >> 16).astype(np.uint16)


# --- crafting files by hand (independent of the implementation) ------------------------------------

def zframe(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(data)


def chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack("<I", len(payload)) + ctype + struct.pack("<I", zlib.crc32(ctype + payload)) + payload


def head_chunk(header: dict | None = None) -> bytes:
    return chunk(b"HEAD", zframe(json.dumps(make_header() if header is None else header).encode()))


def step_payload(first: int, bits: list[int]) -> bytes:
    return struct.pack("<II", first, len(bits)) + bytes(b >> 8 for b in bits) + bytes(b & 0xFF for b in bits)


def step_chunk(first: int, bits: list[int]) -> bytes:
    return chunk(b"STEP", zframe(step_payload(first, bits)))


def crafted(tmp_path: Path, *parts: bytes, name: str = "crafted.mzt") -> Path:
    path = tmp_path / name
    path.write_bytes(b"".join(parts))
    return path


def raw_frame(fhd: int, window: bytes, content_size: bytes, body: bytes = b"") -> bytes:
    """A zstd frame header written field by field (RFC 8878 3.1.1.1), then one RLE block of 5 bytes."""
    block = struct.pack("<I", 1 | (1 << 1) | (5 << 3))[:3] + b"A"
    return b"\x28\xb5\x2f\xfd" + bytes([fhd]) + window + content_size + (body or block) + b"\0\0\0\0"


def chunk_offsets(data: bytes) -> list[tuple[int, bytes, int]]:
    """(offset, type, end) of every complete chunk, by walking the file by hand."""
    out, offset = [], 16
    while offset + 12 <= len(data):
        length, ctype = struct.unpack_from("<I4s", data, offset)
        if offset + 12 + length > len(data):
            break
        out.append((offset, ctype, offset + 12 + length))
        offset += 12 + length
    return out


def write_sample(path: Path, steps: int = 10, *, losses: bool = True, steps_per_chunk: int = 4) -> np.ndarray:
    bits = grad_bits(steps)
    with TrajectoryWriter(path, make_header(losses), steps_per_chunk=steps_per_chunk) as w:
        for t, b in enumerate(bits):
            w.append_step(int(b), loss=float(t) / 3 if losses else None)
            if t == 5:
                w.write_fingerprint(FPS)
        w.write_fingerprint(FINAL)
    return bits


# --- round trip and exact bytes ----------------------------------------------------------------------

def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "run.mzt"
    bits = grad_bits(10)
    header = make_header()
    with TrajectoryWriter(path, header, steps_per_chunk=3) as w:
        for t, b in enumerate(bits):
            w.append_step(int(b), loss=[0.1, -0.0, math.inf, math.nan][t % 4])
            if t == 4:
                w.write_fingerprint(FPS)
                assert w.steps == 5
        w.write_fingerprint(FINAL)
    traj = read_trajectory(path)
    assert traj.header == header
    assert traj.grad_bits.dtype == np.uint16 and np.array_equal(traj.grad_bits, bits)
    # bfloat16 (format.md lsbf): 0.1 = 0x3DCCCCCD rounds to 0x3DCD; -0.0, inf and the canonical NaN stay
    want_losses = np.array([[0x3DCD0000, 0x80000000, 0x7F800000, 0x7FC00000][t % 4] for t in range(10)], np.uint32)
    assert traj.losses is not None and np.array_equal(traj.losses.view(np.uint32), want_losses)
    assert traj.fingerprints == {5: FPS, 10: FINAL}
    assert traj.final_fingerprint == FINAL and traj.steps == 10
    assert not traj.truncated and traj.corrupt is None
    data = path.read_bytes()
    assert traj.file_bytes == traj.valid_bytes == len(data)
    step_chunks = [(o, e) for o, t, e in chunk_offsets(data) if t == b"STEP"]
    assert len(step_chunks) == 4  # 3 + 2 (flushed by the fingerprint) + 3 + 2
    assert traj.step_bytes == sum(e - o for o, e in step_chunks)
    assert traj.bytes_per_step == traj.step_bytes / 10


def test_no_losses(tmp_path: Path) -> None:
    path = tmp_path / "run.mzt"
    bits = write_sample(path, losses=False)
    traj = read_trajectory(path)
    assert traj.losses is None and np.array_equal(traj.grad_bits, bits)
    assert b"loss" not in {t for _, t, _ in chunk_offsets(path.read_bytes())}


def test_exact_bytes(tmp_path: Path) -> None:
    path = tmp_path / "run.mzt"
    header = make_header()
    with TrajectoryWriter(path, header, steps_per_chunk=2) as w:
        w.append_step(0x3F80, loss=1.5)
        w.append_step(0xC0A1, loss=-2.0)
    data = path.read_bytes()
    assert data[:16] == PREAMBLE == MAGIC + b"\x01\0\0\0\0\0\0\0"
    types = []
    for offset, ctype, end in chunk_offsets(data):
        length, crc = struct.unpack_from("<I", data, offset)[0], struct.unpack_from("<I", data, offset + 8)[0]
        payload = data[offset + 12:end]
        assert len(payload) == length and crc == zlib.crc32(ctype + payload)
        params = zstandard.get_frame_parameters(payload)
        assert params.has_checksum and params.content_size != zstandard.CONTENTSIZE_UNKNOWN
        dobj = zstandard.ZstdDecompressor().decompressobj()
        content = dobj.decompress(payload)
        assert dobj.eof and dobj.unused_data == b"" and len(content) == params.content_size
        types.append(ctype)
        if ctype == b"HEAD":
            assert json.loads(content) == header
        elif ctype == b"STEP":
            assert content == struct.pack("<II", 0, 2) + b"\x3f\xc0" + b"\x80\xa1"
        elif ctype == b"lsbf":  # 1.5 = 0x3FC0, -2.0 = 0xC000 in bfloat16: hi plane, then lo plane
            assert content == struct.pack("<II", 0, 2) + b"\x3f\xc0" + b"\xc0\x00"
    assert types == [b"HEAD", b"STEP", b"lsbf"] and chunk_offsets(data)[-1][2] == len(data)


def test_reads_a_hand_crafted_file(tmp_path: Path) -> None:
    fprt = chunk(b"FPRT", zframe(json.dumps({"step": 3, "tensors": FINAL}).encode()))
    path = crafted(tmp_path, PREAMBLE, head_chunk(), step_chunk(0, [1, 2]), step_chunk(2, [0xBF80]), fprt)
    traj = read_trajectory(path)
    assert traj.grad_bits.tolist() == [1, 2, 0xBF80] and traj.final_fingerprint == FINAL
    assert traj.losses is not None and np.isnan(traj.losses).all()


# --- damage ----------------------------------------------------------------------------------------

def test_crc_mismatch_is_named(tmp_path: Path) -> None:
    path = tmp_path / "run.mzt"
    write_sample(path)
    data = bytearray(path.read_bytes())
    offsets = chunk_offsets(bytes(data))
    index = [t for _, t, _ in offsets].index(b"STEP", 2)  # the second STEP chunk
    offset = offsets[index][0]
    data[offset + 20] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptChunkError) as err:
        read_trajectory(path)
    e = err.value
    assert (e.index, e.type, e.offset) == (index, "STEP", offset)
    assert f"chunk {index} (STEP) at byte offset {offset}" in str(e) and "CRC" in str(e) and str(path) in str(e)
    assert "4 steps before it are intact" in str(e)
    traj = read_trajectory(path, strict=False)
    assert traj.steps == 4 and traj.corrupt is not None and not traj.truncated
    assert (traj.corrupt.index, traj.corrupt.type, traj.corrupt.offset) == (index, "STEP", offset)


def test_zstd_checksum_mismatch(tmp_path: Path) -> None:
    frame = bytearray(zframe(step_payload(0, [1, 2, 3])))
    frame[-1] ^= 0xFF  # the frame's XXH64 content checksum; the chunk CRC is recomputed over it
    path = crafted(tmp_path, PREAMBLE, head_chunk(), step_chunk(0, [7]), chunk(b"STEP", bytes(frame)))
    with pytest.raises(CorruptChunkError, match=r"chunk 2 \(STEP\) at byte offset \d+ .*checksum"):
        read_trajectory(path)


def test_truncation_at_every_byte(tmp_path: Path) -> None:
    path = tmp_path / "run.mzt"
    bits = grad_bits(7)
    ends = []  # (file size, steps recoverable) after each flush
    with TrajectoryWriter(path, make_header(), steps_per_chunk=3) as w:
        ends.append((path.stat().st_size, 0))
        for t, b in enumerate(bits):
            w.append_step(int(b), loss=float(t))
            if w.steps % 3 == 0:
                ends.append((path.stat().st_size, w.steps))
        w.write_fingerprint(FINAL)
        ends.append((path.stat().st_size, 7))
    data = path.read_bytes()
    head_end = ends[0][0]
    boundaries = {o for o, _, _ in chunk_offsets(data)} | {len(data)}
    cut_path = tmp_path / "cut.mzt"
    for cut in range(len(data)):
        cut_path.write_bytes(data[:cut])
        if cut < head_end:
            with pytest.raises(TrajectoryError, match="truncated|empty") as err:
                read_trajectory(cut_path)
            assert not isinstance(err.value, CorruptChunkError)
            continue
        traj = read_trajectory(cut_path)
        # the steps held by the complete STEP chunks before the cut, counted by walking the bytes by hand
        steps = sum(int.from_bytes(zstandard.ZstdDecompressor().decompress(data[o + 12:e])[4:8], "little")
                    for o, t, e in chunk_offsets(data[:cut]) if t == b"STEP")
        assert traj.steps == steps, cut
        assert np.array_equal(traj.grad_bits, bits[:steps])
        assert traj.truncated == (cut not in boundaries), cut
        assert traj.valid_bytes == max(b for b in boundaries if b <= cut)
        assert traj.final_fingerprint == (FINAL if cut == len(data) else None)
        if any(cut == size for size, _ in ends):
            assert steps == dict(ends)[cut]


@pytest.mark.parametrize("preamble, error, message", [
    (MAGIC + struct.pack("<II", 2, 0), UnsupportedError, "version 2; this mezo-replay reads version 1"),
    (MAGIC + struct.pack("<II", 0, 0), UnsupportedError, "version 0"),
    (MAGIC + struct.pack("<II", 1, 4), UnsupportedError, "flags 0x00000004"),
    (b"\x89MZT\n\x1a\n" + struct.pack("<II", 1, 0) + b"\0", TrajectoryError, "binary mode"),
    (b"PK\x03\x04" + bytes(12), TrajectoryError, "not a .mzt"),
])
def test_bad_preamble(tmp_path: Path, preamble: bytes, error: type, message: str) -> None:
    path = crafted(tmp_path, preamble, head_chunk())
    with pytest.raises(error, match=message):
        read_trajectory(path)


def test_unknown_critical_chunk_refused(tmp_path: Path) -> None:
    path = crafted(tmp_path, PREAMBLE, head_chunk(), step_chunk(0, [1]), chunk(b"XTRA", zframe(b"{}")))
    with pytest.raises(UnsupportedError, match="chunk 2 at byte offset .* 'XTRA'.*newer"):
        read_trajectory(path, strict=False)


def test_unknown_ancillary_chunk_skipped(tmp_path: Path) -> None:
    path = crafted(tmp_path, PREAMBLE, head_chunk(), step_chunk(0, [1]), chunk(b"xtRa", b"not even zstd"),
                   step_chunk(1, [2, 3]))
    traj = read_trajectory(path)
    assert traj.grad_bits.tolist() == [1, 2, 3] and traj.corrupt is None


@pytest.mark.parametrize("first", [0, 2])
def test_step_gap_or_overlap(tmp_path: Path, first: int) -> None:
    path = crafted(tmp_path, PREAMBLE, head_chunk(), step_chunk(0, [1]), step_chunk(first, [2]))
    with pytest.raises(CorruptChunkError, match=f"first_step is {first}, but 1 steps precede it"):
        read_trajectory(path)
    assert read_trajectory(path, strict=False).steps == 1


@pytest.mark.parametrize("payload, message", [
    (step_payload(0, [1, 2])[:-1], "needs 12"),
    (struct.pack("<II", 0, 0), "count 0"),
    (b"\0\0\0", "shorter than its 8-byte prefix"),
])
def test_step_structure(tmp_path: Path, payload: bytes, message: str) -> None:
    path = crafted(tmp_path, PREAMBLE, head_chunk(), chunk(b"STEP", zframe(payload)))
    with pytest.raises(CorruptChunkError, match=message):
        read_trajectory(path)


@pytest.mark.parametrize("bits", [0x7F80, 0xFFC0, 0x7F00])  # inf, NaN, 2^127
def test_forbidden_gradients(tmp_path: Path, bits: int) -> None:
    path = crafted(tmp_path, PREAMBLE, head_chunk(), step_chunk(0, [0x3F80, bits]))
    with pytest.raises(CorruptChunkError, match=f"step 1 records gradient bits 0x{bits:04x}"):
        read_trajectory(path)
    with TrajectoryWriter(tmp_path / "w.mzt", make_header(losses=False)) as w:
        with pytest.raises(ValueError, match="refusing"):
            w.append_step(bits)
        assert w.steps == 0


def test_coefficient_over_2_100_refused(tmp_path: Path) -> None:
    header = make_header()
    header["rule"]["lr"] = 2.0**100
    ok, too_big = 0x3F80, 0x4000  # c = 2^100 * 1 is allowed, 2^100 * 2 is not
    path = crafted(tmp_path, PREAMBLE, head_chunk(header), step_chunk(0, [ok, too_big]))
    with pytest.raises(CorruptChunkError, match="step 1"):
        read_trajectory(path)


def test_loss_and_fprt_must_follow_their_steps(tmp_path: Path) -> None:
    loss = chunk(b"loss", zframe(struct.pack("<II", 0, 2) + bytes(8)))
    path = crafted(tmp_path, PREAMBLE, head_chunk(), step_chunk(0, [1]), loss)
    with pytest.raises(CorruptChunkError, match="covers steps 0..1, but only 1 are recorded"):
        read_trajectory(path)
    overlap = chunk(b"loss", zframe(struct.pack("<II", 0, 1) + bytes(4)))
    path = crafted(tmp_path, PREAMBLE, head_chunk(), step_chunk(0, [1, 2]), overlap, overlap)
    with pytest.raises(CorruptChunkError, match=r"chunk 3 \(loss\).*steps before 1 already have losses"):
        read_trajectory(path)
    fprt = chunk(b"FPRT", zframe(json.dumps({"step": 2, "tensors": FINAL}).encode()))
    path = crafted(tmp_path, PREAMBLE, head_chunk(), step_chunk(0, [1]), fprt)
    with pytest.raises(CorruptChunkError, match=r"chunk 2 \(FPRT\).*step is 2, but 1"):
        read_trajectory(path)
    fprt = chunk(b"FPRT", zframe(json.dumps({"step": 1, "tensors": FINAL[:1]}).encode()))
    path = crafted(tmp_path, PREAMBLE, head_chunk(), step_chunk(0, [1]), fprt)
    with pytest.raises(CorruptChunkError, match="one per tuned tensor"):
        read_trajectory(path)


def test_float32_loss_chunks_still_read_and_mix_with_lsbf(tmp_path: Path) -> None:
    """Files written before lsbf hold binary32 `loss` chunks: read exactly. Both kinds share one
    sequence of disjoint, increasing step ranges."""
    f32 = struct.pack("<II", 0, 2) + b"\x3d\x3f" + b"\xcc\xc0" + b"\xcc\0" + b"\xcd\0"  # 0.1, 1.5
    bf = struct.pack("<II", 2, 1) + b"\xc0" + b"\x00"  # -2.0
    path = crafted(tmp_path, PREAMBLE, head_chunk(), step_chunk(0, [1, 2, 3]), chunk(b"loss", zframe(f32)),
                   chunk(b"lsbf", zframe(bf)))
    traj = read_trajectory(path)
    assert traj.losses.tolist() == [np.float32(0.1), 1.5, -2.0] and traj.loss_bytes == path.stat().st_size - \
        chunk_offsets(path.read_bytes())[2][0]
    again = crafted(tmp_path, PREAMBLE, head_chunk(), step_chunk(0, [1, 2, 3]), chunk(b"loss", zframe(f32)),
                    chunk(b"lsbf", zframe(struct.pack("<II", 1, 1) + b"\xc0\x00")), name="overlap.mzt")
    with pytest.raises(CorruptChunkError, match=r"\(lsbf\).*steps before 2 already have losses"):
        read_trajectory(again)
    with pytest.raises(CorruptChunkError, match="needs 10"):  # an lsbf payload has 2 bytes per value
        read_trajectory(crafted(tmp_path, PREAMBLE, head_chunk(), step_chunk(0, [1]),
                                chunk(b"lsbf", zframe(struct.pack("<II", 0, 1) + bytes(4))), name="w.mzt"))


def test_loss_rounding_to_bfloat16() -> None:
    from mezo_replay.format.mzt import losses_to_bf16

    cases = {0x3F808000: 0x3F80, 0x3F818000: 0x3F82, 0x3F808001: 0x3F81,  # ties to even; above the tie
             0x7F7FFFFF: 0x7F80, 0xFF800000: 0xFF80, 0x00000001: 0x0000, 0x7FA00001: 0x7FC0, 0xFFC12345: 0x7FC0}
    got = losses_to_bf16(np.array(list(cases), np.uint32).view(np.float32))
    assert got.tolist() == list(cases.values())


def test_oversized_length_refused_without_allocating(tmp_path: Path) -> None:
    huge = struct.pack("<I", 2**31) + b"STEP" + b"\0\0\0\0" + bytes(100)
    path = crafted(tmp_path, PREAMBLE, head_chunk(), step_chunk(0, [1]), huge)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptChunkError, match="2147483648-byte payload, over the limit of 67108864"):
            read_trajectory(path)
        # within the limit but beyond the end of the file: a torn write, not an allocation
        data = path.read_bytes()
        path.write_bytes(data.replace(struct.pack("<I", 2**31) + b"STEP", struct.pack("<I", 60 << 20) + b"STEP"))
        traj = read_trajectory(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert traj.truncated and traj.steps == 1
    assert peak < 8 << 20


@pytest.mark.parametrize("frame, message", [
    (raw_frame(0xC4, b"\x00", struct.pack("<Q", 2**40)), "declares 1099511627776 bytes of content, over"),
    (raw_frame(0x84, bytes([18 << 3]), struct.pack("<I", 5)), "window of 268435456 bytes"),
    (raw_frame(0x04, b"\x00", b""), "does not declare its content size"),
    (raw_frame(0x80, b"\x00", struct.pack("<I", 5)), "lacks a content checksum"),
    (b"\x50\x2a\x4d\x18" + struct.pack("<I", 4) + b"skip", "not a zstd frame"),  # a skippable frame
    (zframe(step_payload(0, [1])) + b"junk", "4 bytes follow the zstd frame"),
    (zframe(step_payload(0, [1])) + zframe(step_payload(1, [2])), "bytes follow the zstd frame"),
    (zframe(step_payload(0, [1]))[:-6], "incomplete"),
])
def test_bad_zstd_frames(tmp_path: Path, frame: bytes, message: str) -> None:
    path = crafted(tmp_path, PREAMBLE, head_chunk(), chunk(b"STEP", frame))
    with pytest.raises(CorruptChunkError, match=message):
        read_trajectory(path)


def test_zstd_content_size_lie(tmp_path: Path) -> None:
    frame = bytearray(zframe(step_payload(0, list(range(1000)))))
    fhd = frame[4]
    assert fhd >> 6 == 1 and fhd & 0x20  # single segment, 2-byte content size field right after FHD
    frame[5:7] = struct.pack("<H", 300 - 256)  # declares 300 bytes; the blocks hold 2008
    path = crafted(tmp_path, PREAMBLE, head_chunk(), chunk(b"STEP", bytes(frame)))
    with pytest.raises(CorruptChunkError, match="zstd"):
        read_trajectory(path)


def test_head_problems(tmp_path: Path) -> None:
    with pytest.raises(CorruptChunkError, match=r"chunk 0 \(HEAD\) at byte offset 16 .*JSON"):
        read_trajectory(crafted(tmp_path, PREAMBLE, chunk(b"HEAD", zframe(b'{"creator": "a", "creator": "b"}'))))
    with pytest.raises(CorruptChunkError, match="JSON"):
        read_trajectory(crafted(tmp_path, PREAMBLE, chunk(b"HEAD", zframe(b'{"x": NaN}'))), strict=False)
    with pytest.raises(CorruptChunkError, match="first chunk must be HEAD"):
        read_trajectory(crafted(tmp_path, PREAMBLE, step_chunk(0, [1])))
    with pytest.raises(CorruptChunkError, match=r"chunk 1 \(HEAD\).*only the first"):
        read_trajectory(crafted(tmp_path, PREAMBLE, head_chunk(), head_chunk()))
    header = make_header()
    header["rule"]["name"] = "mezo-lion"
    path = crafted(tmp_path, PREAMBLE, head_chunk(header))
    with pytest.raises(UnsupportedError, match=f"{path}: HEAD: unknown rule 'mezo-lion'.*newer"):
        read_trajectory(path)


def nested(depth: int) -> object:
    obj: object = "leaf"
    for i in range(depth):
        obj = [obj] if i % 2 else {"k": obj}
    return obj


def test_json_depth(tmp_path: Path) -> None:
    header = make_header()
    header["future_key"] = nested(31)  # 32 with the top-level object
    TrajectoryWriter(tmp_path / "ok.mzt", header).close()
    assert read_trajectory(tmp_path / "ok.mzt").header == header
    header["future_key"] = nested(32)
    with pytest.raises(LimitError, match="deeper than 32"):
        TrajectoryWriter(tmp_path / "deep.mzt", header)
    assert not (tmp_path / "deep.mzt").exists()
    text = json.dumps(make_header())[:-1] + ', "deep": ' + '[' * 100_000 + ']' * 100_000 + "}"
    path = crafted(tmp_path, PREAMBLE, chunk(b"HEAD", zframe(text.encode())))
    with pytest.raises(LimitError, match=f"{path}: HEAD: JSON nested deeper than 32"):
        read_trajectory(path)
    # brackets inside strings do not count
    header["future_key"] = "[[[[{{{{" * 20 + '\\"]]"'
    TrajectoryWriter(tmp_path / "strings.mzt", header).close()
    assert read_trajectory(tmp_path / "strings.mzt").header == header


# --- header rules ------------------------------------------------------------------------------------

def set_path(h: dict, path: str, value: object) -> None:
    *parents, last = path.split(".")
    for p in parents:
        h = h[int(p)] if isinstance(h, list) else h[p]
    if value is KeyError:
        del h[int(last) if isinstance(h, list) else last]
    elif isinstance(h, list):
        h[int(last)] = value
    else:
        h[last] = value


def rebase(h: dict) -> None:
    """Keep base.fingerprint consistent with the tensors, so each case tests one rule."""
    ts = h["tensors"]
    try:
        h["base"]["fingerprint"] = base_fingerprint([t["name"] for t in ts], [t["sha256"] for t in ts])
    except ValueError:  # a bad name or fingerprint: the case is about that
        pass


TENSOR = {"name": "z", "dtype": "F32", "shape": [1], "sha256": FPS[0]}
BAD_HEADERS = [
    ("tensors", [TENSOR] * (MAX_TENSORS + 1), LimitError, "1048577 tensors, over the limit of 1048576"),
    ("tensors.0.name", "c", TrajectoryError, "not sorted by UTF-8 bytes: tensors\\[1\\] 'b.bias' comes after 'c'"),
    ("tensors.0.name", "b.bias", TrajectoryError, "'b.bias' is listed twice"),
    ("tensors.0.name", "", TrajectoryError, "non-empty"),
    ("tensors.0.name", "a" * 1025, LimitError, "1025 bytes, over the limit of 1024"),
    ("tensors.0.name", "a\ud800", TrajectoryError, "not valid UTF-8"),
    ("tensors.0.dtype", "F64", UnsupportedError, "dtype 'F64'"),
    ("tensors.0.dtype", 32, TrajectoryError, "dtype 32"),
    ("tensors.0.shape", [1] * 9, LimitError, "rank 9, over the limit of 8"),
    ("tensors.0.shape", [2**24, 2**24], LimitError, "281474976710656 elements"),
    ("tensors.0.shape", [2, -1], TrajectoryError, "non-negative integers"),
    ("tensors.0.shape", [2, True], TrajectoryError, "non-negative integers"),
    ("tensors.0.sha256", "AB" * 32, TrajectoryError, "64 lowercase hex"),
    ("rule.name", "mezo-lion", UnsupportedError, "unknown rule 'mezo-lion'.*newer mezo-replay"),
    ("rule.momentum", 0.9, UnsupportedError, "keys \\['momentum'\\] .*newer mezo-replay"),
    ("rule.eps", KeyError, TrajectoryError, "lacks the keys \\['eps'\\]"),
    ("rule.eps", 1e-3, TrajectoryError, "at most 16 significant bits"),
    ("rule.eps", 2.0**61, TrajectoryError, "eps"),
    ("rule.eps", True, TrajectoryError, "eps"),
    ("rule.lr", 0.0, TrajectoryError, "lr must be in .*got 0.0"),
    ("rule.lr", 1e-6, TrajectoryError, "24 significant bits"),
    ("rule.schedule", {"name": "polynomial"}, UnsupportedError, "unknown schedule 'polynomial'"),
    ("rule.schedule", {"name": "cosine"}, TrajectoryError, "cosine schedule needs total_steps"),
    ("rule.schedule", {"name": "linear", "warmup_steps": 5, "total_steps": 4}, TrajectoryError, "warmup_steps"),
    ("rule.weight_decay", -0.1, TrajectoryError, "weight_decay must be in"),
    ("rule.weight_decay", 0.1, TrajectoryError, "24 significant bits"),
    ("rule.weight_decay", 0.25, TrajectoryError, "needs a boolean 'decay'"),
    ("tensors.0.decay", "yes", TrajectoryError, "decay must be a boolean"),
    ("tensors.0.init", 1, TrajectoryError, "init must be a boolean"),
    # generated initial values (spec/init.md): unknown kinds and keys need a newer reader; bad scales are invalid
    ("tensors.0.init", "zeros", TrajectoryError, "init must be a boolean or an object with a name"),
    ("tensors.0.init", None, TrajectoryError, "init must be a boolean or an object with a name"),
    ("tensors.0.init", {"bound": 1.0}, TrajectoryError, "init must be a boolean or an object with a name"),
    ("tensors.0.init", {"name": 3}, TrajectoryError, "init must be a boolean or an object with a name"),
    ("tensors.0.init", {"name": "xavier"}, UnsupportedError, "initial value 'xavier'.*newer mezo-replay"),
    ("tensors.0.init", {"name": "zeros", "std": 1.0}, UnsupportedError, "keys \\['std'\\].*newer mezo-replay"),
    ("tensors.0.init", {"name": "uniform16", "bound": 0.5, "mode": "fan_out"}, UnsupportedError,
     "keys \\['mode'\\].*newer mezo-replay"),
    ("tensors.0.init", {"name": "uniform16"}, TrajectoryError, "lacks \\['bound'\\]"),
    ("tensors.0.init", {"name": "gaussian16", "std": 0.1}, TrajectoryError,
     "exactly representable in binary32, not 0.1"),
    ("tensors.0.init", {"name": "gaussian16", "std": 0.0}, TrajectoryError, "positive finite"),
    ("tensors.0.init", {"name": "gaussian16", "std": -1.0}, TrajectoryError, "positive finite"),
    ("tensors.0.init", {"name": "uniform16", "bound": float("inf")}, TrajectoryError, "positive finite"),
    ("tensors.0.init", {"name": "uniform16", "bound": float("nan")}, TrajectoryError, "positive finite"),
    ("tensors.0.init", {"name": "uniform16", "bound": 1e39}, TrajectoryError, "binary32, not 1e\\+39"),
    ("tensors.0.init", {"name": "uniform16", "bound": 2**200}, TrajectoryError, "binary32"),
    ("tensors.0.init", {"name": "uniform16", "bound": 10**400}, TrajectoryError, "binary32"),
    ("tensors.0.init", {"name": "uniform16", "bound": 2**24 + 1}, TrajectoryError, "binary32, not 16777217"),
    ("tensors.0.init", {"name": "uniform16", "bound": True}, TrajectoryError, "binary32, not True"),
    ("tensors.0.init", {"name": "uniform16", "bound": "0.5"}, TrajectoryError, "binary32, not '0.5'"),
    ("rule.schedule", {"name": "constant", "warmup_steps": 10}, TrajectoryError, "warmup_steps"),
    ("rule.schedule", {"name": "constant", "warmup": 10}, UnsupportedError, "schedule"),
    ("rule.grad_encoding", "f32", UnsupportedError, "grad_encoding 'f32'"),
    ("generator.name", "mt19937", UnsupportedError, "unknown generator 'mt19937'"),
    ("generator.offset", 1, UnsupportedError, "keys \\['offset'\\]"),
    ("generator.seed", 5, TrajectoryError, "seed 5"),
    ("generator.seed", "05", TrajectoryError, "seed '05'"),
    ("generator.seed", str(2**64), TrajectoryError, "seed"),
    ("noise.name", "uniform", UnsupportedError, "unknown noise"),
    ("noise.table_sha256", "00" * 32, UnsupportedError, "not the spec's gaussian16 table"),
    ("noise", {"name": "rademacher16", "table_sha256": "00" * 32}, UnsupportedError, "keys \\['table_sha256'\\]"),
    ("metadata", {str(i): "" for i in range(4097)}, LimitError, "4097 pairs, over the limit of 4096"),
    ("metadata", {"k" * 257: "v"}, LimitError, "over 256 bytes"),
    ("metadata", {"k": "é" * 32769}, LimitError, "over 65536 bytes"),
    ("metadata", {"k": 1}, TrajectoryError, "metadata 'k'"),
    ("metadata", {"": "v"}, TrajectoryError, "non-empty"),
    ("records.losses", "yes", TrajectoryError, "boolean 'losses'"),
    ("base.source", 3, TrajectoryError, "base source"),
    ("base.fingerprint", "00" * 32, TrajectoryError, "base fingerprint does not match"),
    ("creator", KeyError, TrajectoryError, "lacks the required keys \\['creator'\\]"),
]


@pytest.mark.parametrize("where, value, error, message", BAD_HEADERS, ids=[b[0] + ":" + b[3][:20] for b in BAD_HEADERS])
def test_header_rules(tmp_path: Path, where: str, value: object, error: type, message: str) -> None:
    header = make_header()
    set_path(header, where, copy.deepcopy(value) if where != "tensors" else value)
    if not where.startswith("base"):
        rebase(header)
    with pytest.raises(error, match=message) as err:
        validate_header(header)
    assert type(err.value) is error
    with pytest.raises(error, match=message):
        TrajectoryWriter(tmp_path / "out.mzt", header)
    assert list(tmp_path.iterdir()) == []


def test_good_header_variants() -> None:
    header = make_header()
    header["noise"] = {"name": "rademacher16"}
    header["rule"].update(eps=1, lr=2.0**100)  # integers are numbers too
    header["tensors"][0]["shape"] = []
    header["generator"]["seed"] = "0"
    header["tensors"][1]["decay"] = True  # allowed without a weight decay, and does nothing
    header["tensors"].insert(0, {"name": "Z", "dtype": "F16", "shape": [0], "sha256": FPS[0]})  # 'Z' < 'a'
    rebase(header)
    validate_header(header)


# --- writer ------------------------------------------------------------------------------------------

def test_existing_output_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.mzt"
    path.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="already exists.*--overwrite") as err:
        TrajectoryWriter(path, make_header())
    assert isinstance(err.value, MezoReplayError) and isinstance(err.value, FileExistsError)
    assert path.read_bytes() == b"precious" and sorted(p.name for p in tmp_path.iterdir()) == ["run.mzt"]
    with TrajectoryWriter(path, make_header(losses=False), overwrite=True) as w:
        w.append_step(1)
    assert read_trajectory(path).steps == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["run.mzt"]


def test_failed_create_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "a_directory"
    (target / "inside").mkdir(parents=True)
    with pytest.raises(OSError):
        TrajectoryWriter(target, make_header(), overwrite=True)  # the final rename fails
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_directory"]


def test_writer_argument_checks(tmp_path: Path) -> None:
    with TrajectoryWriter(tmp_path / "l.mzt", make_header(losses=True)) as w:
        with pytest.raises(ValueError, match="loss is required"):
            w.append_step(1)
        for bad in (-1, 65536, 1.0, True):
            with pytest.raises(ValueError, match="0..65535"):
                w.append_step(bad, loss=0.0)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="one per tuned tensor"):
            w.write_fingerprint(FPS[:1])
    with TrajectoryWriter(tmp_path / "n.mzt", make_header(losses=False)) as w:
        with pytest.raises(ValueError, match="pass no loss"):
            w.append_step(1, loss=0.0)
    with pytest.raises(ValueError, match="steps_per_chunk"):
        TrajectoryWriter(tmp_path / "x.mzt", make_header(), steps_per_chunk=0)
    assert not (tmp_path / "x.mzt").exists()
    w.close()  # closing twice is harmless
    with pytest.raises(ValueError, match="closed"):
        w.append_step(1)


def test_flush_makes_a_complete_file_and_exceptions_keep_steps(tmp_path: Path) -> None:
    path = tmp_path / "run.mzt"
    bits = grad_bits(5)
    with pytest.raises(RuntimeError):
        with TrajectoryWriter(path, make_header(), steps_per_chunk=100) as w:
            for b in bits[:3]:
                w.append_step(int(b), loss=1.0)
            w.flush()
            w.flush()  # nothing pending: no empty chunk
            assert read_trajectory(path).steps == 3
            for b in bits[3:]:
                w.append_step(int(b), loss=2.0)
            assert read_trajectory(path).steps == 3  # still buffered
            raise RuntimeError("training crashed")
    traj = read_trajectory(path)
    assert np.array_equal(traj.grad_bits, bits) and not traj.truncated
    assert [t for _, t, _ in chunk_offsets(path.read_bytes())] == [b"HEAD", b"STEP", b"lsbf", b"STEP", b"lsbf"]


def test_open_append_after_torn_write(tmp_path: Path) -> None:
    path = tmp_path / "run.mzt"
    bits = grad_bits(9)
    with TrajectoryWriter(path, make_header(), steps_per_chunk=5) as w:
        for b in bits[:5]:
            w.append_step(int(b), loss=0.5)
    complete = path.read_bytes()
    torn = step_chunk(5, [1, 2, 3])
    path.write_bytes(complete + torn[:len(torn) - 2])  # a crash in the middle of the next chunk
    assert read_trajectory(path).truncated
    with TrajectoryWriter.open_append(path, steps_per_chunk=2) as w:
        assert w.steps == 5 and path.read_bytes() == complete
        for b in bits[5:]:
            w.append_step(int(b), loss=0.25)
        w.write_fingerprint(FINAL)
    traj = read_trajectory(path)
    assert np.array_equal(traj.grad_bits, bits) and not traj.truncated and traj.final_fingerprint == FINAL
    assert traj.losses is not None and traj.losses.tolist() == [0.5] * 5 + [0.25] * 4
    assert path.read_bytes().startswith(complete)


def test_open_append_refuses_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "run.mzt"
    write_sample(path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptChunkError):
        TrajectoryWriter.open_append(path)
    assert path.read_bytes() == bytes(data)


def test_zero_filled_tail_after_a_crash_is_truncation(tmp_path):
    """Some filesystems leave zero blocks past the last write after a crash: recoverable, appendable."""
    from mezo_replay.format.mzt import TrajectoryWriter, read_trajectory
    from tests.test_roundtrip import tiny_model, train_steps
    import torch

    train_steps(tiny_model("gpt2", torch.float32), tmp_path / "t.mzt", steps=4)
    data = (tmp_path / "t.mzt").read_bytes()
    (tmp_path / "z.mzt").write_bytes(data + bytes(4096))
    traj = read_trajectory(tmp_path / "z.mzt")
    assert traj.truncated and traj.steps == 4 and traj.final_fingerprint is not None
    w = TrajectoryWriter.open_append(tmp_path / "z.mzt")
    w.close()
    assert (tmp_path / "z.mzt").read_bytes() == data
    (tmp_path / "nz.mzt").write_bytes(data + bytes(4000) + b"\x01" + bytes(95))
    with pytest.raises(Exception, match="corrupt"):
        read_trajectory(tmp_path / "nz.mzt")


def test_nul_in_tensor_name_is_refused():
    from mezo_replay.errors import TrajectoryError
    from mezo_replay.format.mzt import validate_header

    header = make_header()
    header["tensors"][0]["name"] = "a\0b"
    with pytest.raises(TrajectoryError, match="NUL"):
        validate_header(header)


def test_step_records_cost_at_most_two_bytes_per_step(tmp_path):
    """The MeZO paper's figure: projected gradients drawn as MeZO's are (Gaussian, one scale), at the
    default flush interval. (The embedded training run's own figure is printed by `train` and `info`.)"""
    from mezo_replay.format.mzt import TrajectoryWriter, read_trajectory
    from mezo_replay.arithmetic.rule import encode_grad

    rng = np.random.default_rng(0)
    with TrajectoryWriter(tmp_path / "g.mzt", make_header(losses=False)) as w:
        for g in rng.standard_normal(20_000) * 3.7:
            w.append_step(encode_grad(float(g)))
    traj = read_trajectory(tmp_path / "g.mzt")
    assert traj.steps == 20_000
    print(f"bytes/step: {traj.bytes_per_step:.3f}")
    assert traj.bytes_per_step <= 2.0


def test_eval_records_ride_with_the_next_flush(tmp_path):
    from mezo_replay.format.mzt import TrajectoryWriter, read_trajectory

    with TrajectoryWriter(tmp_path / "e.mzt", make_header(losses=False), steps_per_chunk=8) as w:
        w.add_eval(0, "eval", {"loss": 2.5})
        for i in range(10):
            w.append_step(0x3F80)
            if i == 4:
                w.add_eval(5, "eval", {"loss": 1.25, "accuracy": 0.5})
        with pytest.raises(ValueError, match="step 11"):
            w.add_eval(11, "eval", {"loss": 1.0})
        with pytest.raises(ValueError, match="finite"):
            w.add_eval(3, "eval", {"loss": float("nan")})
    traj = read_trajectory(tmp_path / "e.mzt")
    assert traj.evals == [{"step": 0, "split": "eval", "metrics": {"loss": 2.5}},
                          {"step": 5, "split": "eval", "metrics": {"loss": 1.25, "accuracy": 0.5}}]
    types = [c[1] for c in chunk_offsets((tmp_path / "e.mzt").read_bytes())]
    assert types == [b"HEAD", b"STEP", b"eval", b"eval", b"STEP"]  # evals did not split the step records
