"""The command line on real files: happy paths, and every bad input failing cleanly with nothing written."""
from __future__ import annotations

import json
import shutil
import struct
import tracemalloc
import zlib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mezo_replay.cli import main
from mezo_replay.format.mzt import read_trajectory
from mezo_replay.format.safetensors_io import BaseCheckpoint
from tests.test_roundtrip import tensor_bytes, tiny_model, train_steps


def run(*args: str | Path) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.output


def chunks(path: Path) -> list[tuple[int, str, int]]:
    """(offset, type, length) of every chunk, walking the layout of spec/format.md."""
    data = path.read_bytes()
    out, off = [], 16
    while off + 12 <= len(data):
        length, ctype = struct.unpack_from("<I4s", data, off)
        out.append((off, ctype.decode(), length))
        off += 12 + length
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("trained")
    model = tiny_model("llama-tied", torch.bfloat16)
    model.save_pretrained(d / "base")
    opt, _ = train_steps(model, d / "t.mzt", steps=10)
    tuned = {n: p.detach().clone() for n, p in zip(opt.names, opt.params)}
    return d, tuned


@pytest.fixture
def work(trained, tmp_path):
    d, tuned = trained
    shutil.copytree(d / "base", tmp_path / "base")
    shutil.copy(d / "t.mzt", tmp_path / "t.mzt")
    return tmp_path, tuned


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") or "tmp" in p.name)


def test_reconstruct_verify_info(work):
    d, tuned = work
    code, out = run("reconstruct", d / "base", d / "t.mzt", "-o", d / "out", "-q")
    assert code == 0, out
    assert "verified" in out and "NOT" not in out
    got = BaseCheckpoint.open(d / "out")
    for name, t in tuned.items():
        assert tensor_bytes(got.read(name)) == tensor_bytes(t)
    assert (d / "out" / "config.json").read_bytes() == (d / "base" / "config.json").read_bytes()
    assert run("verify", d / "base", d / "t.mzt", "-q")[0] == 0
    assert run("verify", d / "base", d / "t.mzt", d / "out", "-q")[0] == 0
    code, out = run("info", d / "t.mzt", "--json")
    s = json.loads(out)
    assert code == 0 and s["steps"] == 10 and s["complete"] is True
    assert s["file_bytes"] == (d / "t.mzt").stat().st_size
    assert s["bytes_per_step"] == s["step_bytes"] / 10
    assert s["base"]["source"] == "test" and len(s["base"]["fingerprint"]) == 64
    code, out = run("info", d / "t.mzt")
    assert code == 0 and "10 (complete" in out and "bytes/step" in out


def test_existing_output_refused_unless_overwrite(work):
    d, _ = work
    (d / "out").mkdir()
    (d / "out" / "config.json").write_text("{}")
    code, out = run("reconstruct", d / "base", d / "t.mzt", "-o", d / "out", "-q")
    assert code == 1 and "--overwrite" in out
    assert [p.name for p in (d / "out").iterdir()] == ["config.json"]
    assert run("reconstruct", d / "base", d / "t.mzt", "-o", d / "out", "-q", "--overwrite")[0] == 0
    assert (d / "out" / "model.safetensors").exists()
    assert leftovers(d) == []


def test_wrong_base_names_the_tensor_and_writes_nothing(work):
    d, _ = work
    other = tiny_model("llama-tied", torch.bfloat16)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if name == "model.layers.1.mlp.up_proj.weight":
                p.add_(1.0)
    other.save_pretrained(d / "other")
    shutil.copy(d / "base" / "model.safetensors", d / "other" / "model.safetensors.orig")
    code, out = run("reconstruct", d / "other", d / "t.mzt", "-o", d / "out", "-q")
    assert code == 1 and "wrong base" in out and "model.layers.1.mlp.up_proj.weight" in out
    assert not (d / "out").exists() and leftovers(d) == []
    assert run("verify", d / "other", d / "t.mzt", "-q")[0] == 1
    gpt2 = tiny_model("gpt2", torch.bfloat16)
    gpt2.save_pretrained(d / "gpt2")
    code, out = run("reconstruct", d / "gpt2", d / "t.mzt", "-o", d / "out2", "-q")
    assert code == 1 and "wrong base" in out and not (d / "out2").exists()


def test_verify_detects_altered_tuned_weights(work):
    d, _ = work
    assert run("reconstruct", d / "base", d / "t.mzt", "-o", d / "out", "-q")[0] == 0
    f = d / "out" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor
    f.write_bytes(bytes(data))
    code, out = run("verify", d / "base", d / "t.mzt", d / "out", "-q")
    assert code == 1 and "does not match" in out


def test_truncated_file_uses_complete_frames(work):
    d, tuned = work
    step_chunks = [c for c in chunks(d / "t.mzt") if c[1] == "STEP"]
    assert len(step_chunks) >= 3  # steps_per_chunk=3 in train_steps
    off, _, length = step_chunks[2]
    data = (d / "t.mzt").read_bytes()
    (d / "cut.mzt").write_bytes(data[: off + 12 + length // 2])  # cut inside the third STEP chunk
    code, out = run("info", d / "cut.mzt", "--json")
    s = json.loads(out)
    assert code == 0 and s["truncated"] is True and s["steps"] == 6 and s["complete"] is False
    code, out = run("info", d / "cut.mzt")
    assert "truncated: 6 steps recoverable" in out
    code, out = run("reconstruct", d / "base", d / "cut.mzt", "-o", d / "six", "-q")
    assert code == 1 and "no fingerprint for step 6" in out and "--unverified" in out and not (d / "six").exists()
    code, out = run("reconstruct", d / "base", d / "cut.mzt", "-o", d / "six", "-q", "--unverified")
    assert code == 0 and "truncated" in out and "NOT verified" in out
    code, out = run("reconstruct", d / "base", d / "cut.mzt", "-o", d / "seven", "-q", "--step", "7")
    assert code == 1 and "beyond the 6 steps" in out and not (d / "seven").exists()


def test_corrupt_chunk_is_named(work):
    d, _ = work
    off, ctype, length = [c for c in chunks(d / "t.mzt") if c[1] == "STEP"][1]
    index = [c[0] for c in chunks(d / "t.mzt")].index(off)
    data = bytearray((d / "t.mzt").read_bytes())
    data[off + 12 + length - 1] ^= 0x40
    (d / "bad.mzt").write_bytes(bytes(data))
    code, out = run("reconstruct", d / "base", d / "bad.mzt", "-o", d / "out", "-q")
    assert code == 1 and f"chunk {index} (STEP)" in out and f"offset {off}" in out
    assert not (d / "out").exists()
    code, out = run("info", d / "bad.mzt")
    assert code == 1 and f"chunk {index} (STEP)" in out and "recoverable" in out


def test_newer_version_and_hostile_sizes(work):
    d, _ = work
    data = bytearray((d / "t.mzt").read_bytes())
    newer = bytearray(data)
    newer[8:12] = struct.pack("<I", 2)
    (d / "v2.mzt").write_bytes(bytes(newer))
    code, out = run("info", d / "v2.mzt")
    assert code == 1 and "version 2" in out
    # a chunk that declares a 2 GiB payload: refused before anything of that size is allocated
    huge = bytes(data) + struct.pack("<I4sI", 2**31, b"STEP", 0) + b"\0" * 64
    (d / "huge.mzt").write_bytes(huge)
    tracemalloc.start()
    code, out = run("info", d / "huge.mzt")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * 2**20
    assert code == 1 and "over the limit" in out and "10 steps before it are recoverable" in out
    # not an mzt file at all
    (d / "junk.mzt").write_bytes(b"PK\x03\x04 definitely a zip")
    code, out = run("reconstruct", d / "base", d / "junk.mzt", "-o", d / "out", "-q")
    assert code == 1 and "Error" in out and not (d / "out").exists()


def test_unknown_rule_is_refused_not_misreplayed(work):
    """A header naming a rule this version does not know: refused with a clear message."""
    import zstandard

    d, _ = work
    data = (d / "t.mzt").read_bytes()
    off, ctype, length = chunks(d / "t.mzt")[0]
    header = json.loads(zstandard.ZstdDecompressor().decompress(data[off + 12: off + 12 + length]))
    header["rule"]["name"] = "mezo-lion"
    payload = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(
        json.dumps(header).encode())
    head = struct.pack("<I4sI", len(payload), b"HEAD", zlib.crc32(b"HEAD" + payload))
    (d / "adam.mzt").write_bytes(data[:16] + head + payload + data[off + 12 + length:])
    code, out = run("reconstruct", d / "base", d / "adam.mzt", "-o", d / "out", "-q")
    assert code == 1 and "mezo-lion" in out and not (d / "out").exists()


def test_help_teaches():
    code, out = run("--help")
    assert code == 0 and "reconstruct" in out and "tour" in out.lower()
    for cmd in ("train", "reconstruct", "info", "verify"):
        code, out = run(cmd, "--help")
        assert code == 0 and "Usage" in out


def test_info_counts_every_byte_of_the_file(work):
    """Sizes are whole-file: each kind of content with its chunk heads, adding up to the file's size,
    the bytes after a torn last chunk included."""
    d, _ = work
    size = (d / "t.mzt").stat().st_size
    code, out = run("info", d / "t.mzt", "--json")
    s = json.loads(out)
    kinds = {ctype: sum(12 + n for _, c, n in chunks(d / "t.mzt") if c == ctype) for ctype in ("STEP", "loss", "lsbf", "FPRT")}
    assert code == 0 and sum(s["stored"]["by_kind"].values()) == size
    assert s["stored"]["by_kind"]["steps"] == kinds["STEP"] == s["step_bytes"]
    assert s["stored"]["by_kind"]["losses"] == kinds["loss"] + kinds["lsbf"] and s["stored"]["by_kind"]["fingerprints"] == kinds["FPRT"]
    assert s["file_bytes_per_step"] == size / 10 and s["stored"]["losses_recorded"] is True
    code, out = run("info", d / "t.mzt")
    assert f"{size:,} bytes = {size / 10:.2f} bytes/step; step records" in out
    assert f"step records {kinds['STEP']:,}, losses {kinds['loss'] + kinds['lsbf']:,}" in out
    with open(d / "t.mzt", "ab") as f:  # a torn chunk after the last complete one
        f.write(struct.pack("<I4sI", 1000, b"STEP", 0) + b"x" * 10)
    code, out = run("info", d / "t.mzt", "--json")
    s = json.loads(out)
    assert s["truncated"] and s["stored"]["by_kind"]["unread"] == 22
    assert sum(s["stored"]["by_kind"].values()) == size + 22


@pytest.mark.parametrize("source", ["mezo-replay:embedded/tiny-llama", "/home/alice/models/secret-llama"])
def test_model_card_names_no_local_path_and_counts_whole_file(tmp_path, source):
    from mezo_replay.hub.publish import model_card
    from tests.test_publish import make_trajectory

    traj = read_trajectory(make_trajectory(tmp_path / "r.mzt", base_source=source, base_revision=None,
                                           evals=False, metadata={}))
    text = model_card(traj, path_in_repo="r.mzt", repo_id="alice/runs").text
    assert "/home/alice" not in text
    assert f"{traj.file_bytes / 3:.2f} for the whole file; {traj.bytes_per_step:.2f} of step records" in text
    if source.startswith("mezo-replay:"):
        assert "mezo-replay reconstruct mezo-replay:embedded/tiny-llama hf://alice/runs/r.mzt -o tuned" in text
    else:
        assert "`secret-llama` (not a Hub repo)" in text
