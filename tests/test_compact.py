"""Compaction of a cleanly finished trajectory (format/compact.py): fewer chunks, the same records."""
from __future__ import annotations

import errno
import os
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from mezo_replay.format import compact
from mezo_replay.format.filelock import FileLock
from mezo_replay.format.mzt import StepCodec, TrajectoryWriter, read_trajectory
from mezo_replay.arithmetic.rule import MezoSGD
from tests.test_mzt import FINAL, FPS, chunk, chunk_offsets, make_header, zframe

CLI = [sys.executable, "-m", "mezo_replay"]


def header(encoding: str, n: int = 1, losses: bool = True) -> dict:
    h = make_header(losses)
    h["rule"] = {**h["rule"], "grad_encoding": encoding, **({} if encoding == "bf16" else {"grad_scale": 0.5}),
                 **({"perturbations": n} if n > 1 else {})}
    return h


def records(h: dict, steps: int, seed: int = 0) -> np.ndarray:
    """Valid records of the header's encoding: (steps, N) bf16 patterns."""
    rule = MezoSGD.from_header(h)
    codec, rng = StepCodec(rule), np.random.default_rng(seed)
    n = rule.perturbations
    if rule.grad_encoding == "bf16":
        g = rng.normal(0, 10, steps * n).astype(np.float32)
        bits = (g.view(np.uint32) >> 16).astype(np.uint16)
    elif rule.grad_encoding == "fp8":
        bits = codec.to_bits[rng.choice(np.flatnonzero(codec.valid), steps * n)]
    else:
        bits = codec.to_bits[rng.choice([0, 1, 3], steps * n, p=[0.05, 0.5, 0.45])]
    return bits.reshape(steps, n)


def write(path: Path, h: dict, bits: np.ndarray, *, compact_it: bool, spc: int = 4, start: int = 0,
          stop: int | None = None, resume: bool = False, extra: bytes = b"") -> None:
    """Steps start..stop of `bits`, with evals, checkpoints, a mid-run fingerprint and losses (NaN too)."""
    stop = len(bits) if stop is None else stop
    w = TrajectoryWriter.open_append(path, steps_per_chunk=spc, compact=compact_it) if resume else \
        TrajectoryWriter(path, h, steps_per_chunk=spc, compact=compact_it)
    losses = h["records"]["losses"]
    for t in range(start, stop):
        row = [int(b) for b in bits[t]]
        w.append_step(row if len(row) > 1 else row[0],
                      loss=(float("nan") if t == 3 else t / 7) if losses else None)
        if t % 5 == 4:
            w.add_eval(t + 1, "eval", {"loss": t / 3})
            w.add_checkpoint(t + 1, f"{t + 1:064x}")
        if t == stop - 4 and extra:
            w.flush()
            w._write(extra)  # an ancillary chunk this code does not know: it keeps its place
    w.write_fingerprint(FINAL if stop == len(bits) else FPS)
    w.close()


def same_content(a: Path, b: Path) -> None:
    ta, tb = read_trajectory(a), read_trajectory(b)
    assert ta.header == tb.header and np.array_equal(ta.grad_bits, tb.grad_bits)
    assert (ta.losses is None) == (tb.losses is None)
    if ta.losses is not None:
        assert ta.losses.view(np.uint32).tolist() == tb.losses.view(np.uint32).tolist()
    assert ta.fingerprints == tb.fingerprints and ta.evals == tb.evals and ta.checkpoints == tb.checkpoints
    assert not (tb.truncated or tb.corrupt)


def types(path: Path) -> list[bytes]:
    return [t for _, t, _ in chunk_offsets(path.read_bytes())]


@pytest.mark.parametrize("encoding,n,losses", [("bf16", 1, True), ("fp8", 1, True), ("sign", 1, True),
                                               ("sign", 1, False), ("bf16", 3, True), ("sign", 5, False)])
def test_same_records_fewer_chunks(tmp_path: Path, encoding: str, n: int, losses: bool) -> None:
    h = header(encoding, n, losses)
    bits = records(h, 203)
    unknown = chunk(b"zzzz", zframe(b"unknown"))
    for name, on in (("raw.mzt", False), ("small.mzt", True)):
        write(tmp_path / name, h, bits, compact_it=on, stop=150, extra=unknown)  # a stop at 150 ...
        write(tmp_path / name, h, bits, compact_it=on, start=150, resume=True)   # ... then a resume
    raw, small = tmp_path / "raw.mzt", tmp_path / "small.mzt"
    same_content(raw, small)
    assert small.stat().st_size < raw.stat().st_size
    got = types(small)
    # the unknown chunk (after step 147) and each FPRT keep their places in step terms; losses merge across
    assert got[:1] == [b"HEAD"] and got.count(b"zzzz") == 1
    steps_before = [read_trajectory(_prefix(small, tmp_path, i)).steps for i, t in enumerate(got)
                    if t in (b"zzzz", b"FPRT")]
    assert steps_before == [147, 150, 203]
    assert got.count(b"STEP") == 3 and got.count(b"lsbf") == (1 if losses else 0)
    assert got.count(b"eval") == types(raw).count(b"eval") == 40
    assert not list(tmp_path.glob(".*tmp"))
    FileLock.acquire(small).release()  # closed: unlocked


def _prefix(path: Path, tmp_path: Path, index: int) -> Path:
    """The file cut just before chunk `index` (0 = HEAD)."""
    data = path.read_bytes()
    end = chunk_offsets(data)[index][0]
    out = tmp_path / f"prefix{index}.mzt"
    out.write_bytes(data[:end])
    return out


def test_limit_splits_long_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """More steps than a chunk may hold (a lowered limit stands for 2^20): several merged chunks."""
    monkeypatch.setattr(compact, "MAX_MERGED", 7)
    for n, step_chunks in ((1, 5), (3, 16)):  # 31 steps: 7 a chunk; with 3 records a step, 2 steps a chunk
        h = header("fp8", n)
        bits = records(h, 31, seed=n)
        write(tmp_path / f"raw{n}.mzt", h, bits, compact_it=False, spc=2)
        write(tmp_path / f"small{n}.mzt", h, bits, compact_it=True, spc=2)
        same_content(tmp_path / f"raw{n}.mzt", tmp_path / f"small{n}.mzt")
        got = types(tmp_path / f"small{n}.mzt")
        assert got.count(b"STEP") == step_chunks and got.count(b"lsbf") == 5


def test_resume_after_compaction(tmp_path: Path) -> None:
    h = header("sign")
    bits = records(h, 60)
    write(tmp_path / "raw.mzt", h, bits, compact_it=False, stop=30)
    write(tmp_path / "raw.mzt", h, bits, compact_it=False, start=30, resume=True)
    path = tmp_path / "run.mzt"
    write(path, h, bits, compact_it=True, stop=30)
    assert types(path).count(b"STEP") == 1
    write(path, h, bits, compact_it=True, start=30, resume=True)  # appends to the compacted file
    same_content(tmp_path / "raw.mzt", path)
    got = types(path)
    assert got.count(b"STEP") == 2 and got.count(b"lsbf") == 1 and got.count(b"FPRT") == 2


def test_killed_run_is_not_compacted(tmp_path: Path) -> None:
    path = tmp_path / "killed.mzt"
    code = ("import sys, os; sys.path.insert(0, sys.argv[2]); from tests.test_compact import *; "
            "h = header('fp8'); bits = records(h, 40); "
            "w = TrajectoryWriter(sys.argv[1], h, steps_per_chunk=4, compact=True)\n"
            "for t in range(40): w.append_step(int(bits[t, 0]), loss=1.0)\n"
            "w.flush(); os._exit(0)")
    root = str(Path(__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "-c", code, str(path), root], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert types(path).count(b"STEP") == 10 and read_trajectory(path).steps == 40


def test_full_disk_keeps_the_original(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(path: Path, data: bytes) -> None:
        path.write_bytes(data[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    h = header("bf16")
    bits = records(h, 30)
    write(tmp_path / "raw.mzt", h, bits, compact_it=False)
    monkeypatch.setattr(compact, "_write_new", no_space)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write(tmp_path / "run.mzt", h, bits, compact_it=True)
    assert [str(w.message).count("\n") for w in caught if w.category is compact.CompactionWarning] == [0]
    assert any("No space left on device" in str(w.message) for w in caught)
    assert (tmp_path / "run.mzt").read_bytes() == (tmp_path / "raw.mzt").read_bytes()
    assert not list(tmp_path.glob(".*tmp"))
    FileLock.acquire(tmp_path / "run.mzt").release()


def test_exception_in_the_run_does_not_compact(tmp_path: Path) -> None:
    h = header("fp8")
    bits = records(h, 20)
    with pytest.raises(RuntimeError):
        with TrajectoryWriter(tmp_path / "e.mzt", h, steps_per_chunk=4, compact=True) as w:
            for t in range(20):
                w.append_step(int(bits[t, 0]), loss=1.0)
            raise RuntimeError("the run failed")
    assert types(tmp_path / "e.mzt").count(b"STEP") == 5


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def test_cli_train_compacts_then_reconstructs_and_resumes(tmp_path: Path) -> None:
    common = ("train", "--steps", "24", "--flush-every", "4", "--eval-every", "8", "--grad-codec", "fp8", "-q")
    r = cli(*common, "-o", "run.mzt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r0 = cli(*common, "--no-compact", "-o", "raw.mzt", cwd=tmp_path)
    assert r0.returncode == 0, r0.stderr
    run, raw = tmp_path / "run.mzt", tmp_path / "raw.mzt"
    same_content(raw, run)
    assert run.stat().st_size < raw.stat().st_size
    assert types(run).count(b"STEP") == 1 and types(raw).count(b"STEP") == 6
    args = shlex.split(r.stdout.strip().splitlines()[-1])[1:]
    assert args[0] == "reconstruct"
    r2 = cli(*args, "-q", cwd=tmp_path)
    assert r2.returncode == 0 and "verified against" in r2.stdout, r2.stderr
    r3 = cli("train", "--resume", "run.mzt", "--steps", "30", "--flush-every", "4", "--eval-every", "8",
             "--grad-codec", "fp8", "-q", cwd=tmp_path)
    assert r3.returncode == 0, r3.stderr
    traj = read_trajectory(run)
    assert traj.steps == 30 and sorted(traj.fingerprints) == [24, 30] and types(run).count(b"STEP") == 2
    r4 = cli(*args, "--overwrite", "-q", cwd=tmp_path)
    assert r4.returncode == 0 and "verified against" in r4.stdout, r4.stderr


def test_cli_full_disk_during_compaction_warns_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run succeeded: exit status 0, one `warning:` line, the file as flushed (in process: the failure is
    injected where the compacted copy is written)."""
    from click.testing import CliRunner

    from mezo_replay.cli import main

    def no_space(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(compact, "_write_new", no_space)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["train", "--steps", "8", "--flush-every", "2", "--eval-every", "0", "-q",
                                  "-o", "run.mzt"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "compacted" in line]
    assert lines == ["warning: run.mzt: not compacted (No space left on device); the file is complete and "
                     "keeps its per-flush chunks"], r.stderr
    assert types(tmp_path / "run.mzt").count(b"STEP") == 4 and read_trajectory(tmp_path / "run.mzt").steps == 8


def test_the_lock_is_held_throughout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another writer finds the file busy while the copy is written and right after it took the name."""
    path, seen = tmp_path / "run.mzt", []
    write_new, replace = compact._write_new, os.replace

    def spy_write(p: Path, data: bytes) -> None:
        seen.append(FileLock.probe(path))
        write_new(p, data)

    def spy_replace(a: Path, b: Path) -> None:
        replace(a, b)
        seen.append(FileLock.probe(path))

    monkeypatch.setattr(compact, "_write_new", spy_write)
    monkeypatch.setattr(compact.os, "replace", spy_replace)
    h = header("sign")
    write(path, h, records(h, 30), compact_it=True)
    assert len(seen) == 2 and all(e is not None for e in seen)  # FileBusyError both times
    assert types(path).count(b"STEP") == 1 and FileLock.probe(path) is None
