"""One writer per trajectory, atomic creation, refused writes (disk full) and `repair`.

In-process tests inject the failures (a link that loses a race, a filesystem without hard links, a
write that fails half way with ENOSPC); the CLI tests use real processes started together, a real
file size limit (RLIMIT_FSIZE, which makes write(2) fail with EFBIG), and the embedded model.
"""
from __future__ import annotations

import builtins
import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mezo_replay.format import mzt
from mezo_replay.errors import CorruptChunkError, MezoReplayError, OutputExistsError
from mezo_replay.format.filelock import FileBusyError, FileLock
from mezo_replay.format.mzt import TrajectoryWriteError, TrajectoryWriter, read_trajectory
from mezo_replay.format.repair import repair
from tests.test_mzt import FINAL, chunk_offsets, grad_bits, make_header

LINUX = sys.platform.startswith("linux")
CLI = [sys.executable, "-m", "mezo_replay"]


def write_steps(w: TrajectoryWriter, bits: np.ndarray, first: int = 0) -> None:
    for t, b in enumerate(bits[first:], first):
        w.append_step(int(b), loss=t / 8)


def reference(path: Path, n: int = 10, spc: int = 3) -> bytes:
    with TrajectoryWriter(path, make_header(), steps_per_chunk=spc) as w:
        write_steps(w, grad_bits(n))
        w.write_fingerprint(FINAL)
    return path.read_bytes()


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# --- one writer at a time ------------------------------------------------------------------------------

def test_a_second_writer_is_refused_while_the_first_writes(tmp_path: Path) -> None:
    path = tmp_path / "run.mzt"
    w = TrajectoryWriter(path, make_header(), steps_per_chunk=2)
    write_steps(w, grad_bits(4))
    before = path.read_bytes()
    for second in (lambda: TrajectoryWriter.open_append(path),
                   lambda: TrajectoryWriter(path, make_header(), overwrite=True),
                   lambda: TrajectoryWriter(path, make_header())):  # rather than "exists": the cause
        with pytest.raises(FileBusyError, match="is being written by another process") as err:
            second()
        if LINUX:
            assert f"(pid {os.getpid()})" in str(err.value)  # flock is per open file: this process too
        assert path.read_bytes() == before
    assert leftovers(tmp_path) == ["run.mzt"]  # the refused overwrite left no temporary file
    w.close()
    with pytest.raises(OutputExistsError):
        TrajectoryWriter(path, make_header())
    with TrajectoryWriter.open_append(path, steps_per_chunk=2) as w2:  # free again once closed
        assert w2.steps == 4
    assert FileLock.probe(path) is None


def test_the_lock_follows_the_file_not_the_name(tmp_path: Path, monkeypatch) -> None:
    """A lock taken on a file that was then replaced under its name would guard nothing: acquire checks."""
    path = tmp_path / "run.mzt"
    reference(path)
    real_open = open
    swapped = []

    def swap_after_open(file, *args, **kwargs):  # the name moves to a new file just after we open it
        f = real_open(file, *args, **kwargs)
        if not swapped and Path(file) == path:
            swapped.append(True)
            (tmp_path / "new").write_bytes(path.read_bytes())
            os.replace(tmp_path / "new", path)
        return f

    monkeypatch.setattr(builtins, "open", swap_after_open)
    lock = FileLock.acquire(path)
    monkeypatch.undo()
    try:
        assert swapped and os.path.samestat(os.fstat(lock._handle.fileno()), os.stat(path))  # type: ignore
    finally:
        lock.release()


def test_creation_that_loses_the_race_replaces_nothing(tmp_path: Path, monkeypatch) -> None:
    """The exists check passes, then another writer creates the file before ours gets its name."""
    path = tmp_path / "run.mzt"
    real_link = os.link

    def rival_first(src, dst):
        Path(dst).write_bytes(b"the other writer's file")
        return real_link(src, dst)

    monkeypatch.setattr(os, "link", rival_first)
    with pytest.raises(OutputExistsError, match="already exists"):
        TrajectoryWriter(path, make_header())
    assert path.read_bytes() == b"the other writer's file" and leftovers(tmp_path) == ["run.mzt"]


def test_filesystem_without_hard_links(tmp_path: Path, monkeypatch) -> None:
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    want = reference(tmp_path / "want.mzt")
    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "run.mzt"
    w = TrajectoryWriter(path, make_header(), steps_per_chunk=3)
    with pytest.raises(FileBusyError):
        TrajectoryWriter.open_append(path)  # locked from its creation on
    write_steps(w, grad_bits(10))
    w.write_fingerprint(FINAL)
    w.close()
    assert path.read_bytes() == want and leftovers(tmp_path) == ["run.mzt", "want.mzt"]
    with pytest.raises(OutputExistsError):
        TrajectoryWriter(path, make_header())


# --- refused writes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "no space left on device"),
                                          (errno.EDQUOT, "disk quota exceeded"),
                                          (errno.EFBIG, "file too large (a file size limit was reached)"),
                                          (errno.EIO, "Input/output error (errno 5)")])
def test_a_refused_write_keeps_a_file_that_resumes_exactly(tmp_path: Path, monkeypatch, code, reason) -> None:
    want = reference(tmp_path / "want.mzt")
    path = tmp_path / "run.mzt"
    bits = grad_bits(10)
    real_write_all = mzt._write_all
    writes = []

    def fail_third(f, data):  # the third chunk group: half of it reaches the disk, then the error
        writes.append(len(data))
        if len(writes) == 3:
            f.write(bytes(data)[:len(data) // 2])
            raise OSError(code, os.strerror(code))
        real_write_all(f, data)

    monkeypatch.setattr(mzt, "_write_all", fail_third)
    w = TrajectoryWriter(path, make_header(), steps_per_chunk=3)
    with pytest.raises(TrajectoryWriteError) as err:
        write_steps(w, bits)
    monkeypatch.setattr(mzt, "_write_all", real_write_all)
    assert str(err.value) == (f"{reason} while writing {path} after step 3: the file holds its first 3 steps, "
                              f"intact, and `mezo-replay train --resume {path}` with the same options continues "
                              f"it exactly")
    traj = read_trajectory(path)
    assert traj.steps == 3 and not traj.truncated  # the torn half chunk was cut off
    for later in (lambda: w.append_step(1, loss=0.0), lambda: w.write_fingerprint(FINAL), w.flush):
        with pytest.raises(TrajectoryWriteError) as again:
            later()
        assert again.value is err.value  # the same one line, not "write to closed file"
    w.close()  # harmless
    with TrajectoryWriter.open_append(path, steps_per_chunk=3) as w2:  # the lock was released
        write_steps(w2, bits, first=3)
        w2.write_fingerprint(FINAL)
    assert path.read_bytes() == want


def test_a_refused_write_at_creation_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    def full(f, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mzt, "_write_all", full)
    with pytest.raises(TrajectoryWriteError, match=r"^no space left on device while creating .*: nothing was "
                                                   r"written$"):
        TrajectoryWriter(tmp_path / "run.mzt", make_header())
    assert leftovers(tmp_path) == []


def test_a_refused_write_before_the_first_step(tmp_path: Path, monkeypatch) -> None:
    w = TrajectoryWriter(tmp_path / "run.mzt", make_header())
    w.add_eval(0, "eval", {"loss": 1.0})

    def full(f, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mzt, "_write_all", full)
    with pytest.raises(TrajectoryWriteError, match="before its first step was recorded.*--overwrite"):
        w.close()
    assert read_trajectory(tmp_path / "run.mzt").steps == 0


def test_a_full_directory_refusing_the_name(tmp_path: Path, monkeypatch) -> None:
    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", full)
    monkeypatch.setattr(mzt, "_create_in_place", lambda path, fill: full(None, path))
    with pytest.raises(TrajectoryWriteError, match="^no space left on device while creating"):
        TrajectoryWriter(tmp_path / "run.mzt", make_header())
    assert leftovers(tmp_path) == []


# --- repair ------------------------------------------------------------------------------------------

def test_repair_keeps_the_valid_prefix_byte_for_byte(tmp_path: Path) -> None:
    data = reference(tmp_path / "want.mzt")
    chunks = chunk_offsets(data)
    step_chunks = [(o, e) for o, t, e in chunks if t == b"STEP"]
    cut = step_chunks[2][0]  # the third STEP chunk (steps 6..8) goes bad
    bad = bytearray(data)
    bad[cut + 14] ^= 0x01
    (tmp_path / "bad.mzt").write_bytes(bytes(bad))
    r = repair(tmp_path / "bad.mzt")
    assert r.out == tmp_path / "bad-repaired.mzt" and r.steps == 6 and r.kept_bytes == cut
    assert r.dropped_bytes == len(data) - cut and "chunk 5 (STEP)" in r.damage and "CRC mismatch" in r.damage
    assert r.out.read_bytes() == data[:cut] and (tmp_path / "bad.mzt").read_bytes() == bytes(bad)
    assert not r.verifiable
    with pytest.raises(OutputExistsError):
        repair(tmp_path / "bad.mzt")
    with TrajectoryWriter.open_append(r.out, steps_per_chunk=3) as w:  # and it continues exactly
        write_steps(w, grad_bits(10), first=6)
        w.write_fingerprint(FINAL)
    assert r.out.read_bytes() == data


def test_repair_after_two_writers_interleaved(tmp_path: Path) -> None:
    """What two unlocked resumes made: the same steps appended twice. Nothing after the overlap is used."""
    data = reference(tmp_path / "want.mzt")
    chunks = chunk_offsets(data)
    head_end = chunks[0][2]
    first_group = data[head_end:chunks[3][0]]  # STEP 0..2 + loss, then STEP 3..5 starts at chunks[3]
    (tmp_path / "mixed.mzt").write_bytes(data[:chunks[5][0]] + first_group + data[chunks[5][0]:])
    with pytest.raises(CorruptChunkError, match="first_step is 0"):
        read_trajectory(tmp_path / "mixed.mzt")
    r = repair(tmp_path / "mixed.mzt", tmp_path / "fixed.mzt")
    assert r.steps == 6 and r.out.read_bytes() == data[:chunks[5][0]]


def test_repair_of_a_torn_file_in_place(tmp_path: Path) -> None:
    data = reference(tmp_path / "want.mzt")
    end = chunk_offsets(data)[-1][0]  # cut inside the final fingerprint
    path = tmp_path / "torn.mzt"
    path.write_bytes(data[:end + 20])
    r = repair(path, in_place=True)
    assert r.out == path and r.steps == 10 and "torn write" in r.damage
    assert path.read_bytes() == data[:end] and leftovers(tmp_path) == ["torn.mzt", "want.mzt"]


def test_repair_refuses(tmp_path: Path) -> None:
    data = reference(tmp_path / "ok.mzt")
    with pytest.raises(MezoReplayError, match="intact .10 steps, every chunk valid.: nothing to repair$"):
        repair(tmp_path / "ok.mzt")
    (tmp_path / "torn.mzt").write_bytes(data[:-5])
    with pytest.raises(MezoReplayError, match="is the damaged file itself: pass --in-place"):
        repair(tmp_path / "torn.mzt", tmp_path / "torn.mzt")
    with FileLock.acquire(tmp_path / "torn.mzt"):  # a writer holds it: its tail is not damage
        with pytest.raises(FileBusyError):
            repair(tmp_path / "torn.mzt")
    assert leftovers(tmp_path) == ["ok.mzt", "torn.mzt"]


# --- the command line, real processes ----------------------------------------------------------------

def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def test_repair_command(tmp_path: Path) -> None:
    data = reference(tmp_path / "want.mzt")
    (tmp_path / "torn.mzt").write_bytes(data[:-7])
    r = cli("repair", "torn.mzt", "-o", "fixed.mzt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("repaired torn.mzt -> fixed.mzt: kept 10 steps (")
    assert "torn write" in r.stdout and "--resume fixed.mzt" in r.stdout
    assert (tmp_path / "fixed.mzt").read_bytes() == data[:chunk_offsets(data)[-1][0]]
    for args, message in ((["want.mzt"], "nothing to repair"), (["torn.mzt", "-o", "fixed.mzt"], "already exists"),
                          (["torn.mzt", "-o", "x.mzt", "--in-place"], "not both")):
        r = cli("repair", *args, cwd=tmp_path)
        assert r.returncode == 1 and message in one_error_line(r.stderr), (args, r.stderr)
    assert (tmp_path / "torn.mzt").read_bytes() == data[:-7]


def test_train_refuses_a_file_another_process_writes(tmp_path: Path) -> None:
    """Before loading anything, --resume and --overwrite fail in one line that names the writer."""
    data = reference(tmp_path / "run.mzt")
    with FileLock.acquire(tmp_path / "run.mzt"):
        for args in (["--resume", "run.mzt"], ["-o", "run.mzt", "--overwrite"]):
            r = cli("train", "--steps", "12", "-q", *args, cwd=tmp_path)
            line = one_error_line(r.stderr)
            assert r.returncode == 1 and "run.mzt is being written by another process" in line, (args, line)
            if LINUX:
                assert f"(pid {os.getpid()})" in line
    assert (tmp_path / "run.mzt").read_bytes() == data


STEPS, FLUSH = 12, 4
# --no-compact: the races compare whole files with an uninterrupted run's and its flush-by-flush prefixes
ARGS = ["train", "--steps", str(STEPS), "--flush-every", str(FLUSH), "--batch-size", "4", "--eval-every", "0",
        "--lr", "2e-4", "--no-compact", "-q"]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> bytes:
    """The bytes of one uninterrupted run, the reference for every race below."""
    d = tmp_path_factory.mktemp("single")
    r = cli(*ARGS, "-o", "run.mzt", cwd=d)
    assert r.returncode == 0, r.stderr
    return (d / "run.mzt").read_bytes()


def prefix_after(data: bytes, steps: int) -> bytes:
    """The file a run killed after `steps` steps leaves: the chunks up to that STEP chunk's loss chunk."""
    ends = [e for _, t, e in chunk_offsets(data) if t in (b"loss", b"lsbf")]
    return data[:ends[steps // FLUSH - 1]]


def race(cwd: Path, *argv: list[str]) -> list[subprocess.CompletedProcess[str]]:
    procs = [subprocess.Popen([*CLI, *a], cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for a in argv]
    outs = [p.communicate(timeout=600) for p in procs]
    done = [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(procs, outs)]
    for cp, p in zip(done, procs):
        cp.pid = p.pid  # type: ignore[attr-defined]
    return done


def check_loser(runs: list[subprocess.CompletedProcess[str]]) -> str:
    """Exactly one run won; the other failed in one line, naming the winner if it lost to the lock."""
    assert sorted(r.returncode for r in runs) == [0, 1], [r.stderr for r in runs]
    winner, loser = sorted(runs, key=lambda r: r.returncode)
    line = one_error_line(loser.stderr)
    assert "run.mzt" in line and any(m in line for m in LOSER), line
    if LINUX and LOSER[0] in line:
        assert f"(pid {winner.pid})" in line, line  # type: ignore[attr-defined]
    return line


LOSER = ("is being written by another process", "already exists", "exists: pass --overwrite", "already holds")


@pytest.mark.slow
def test_two_trains_to_one_file_at_once(tmp_path: Path, single: bytes) -> None:
    print(check_loser(race(tmp_path, [*ARGS, "-o", "run.mzt"], [*ARGS, "-o", "run.mzt"])))
    assert (tmp_path / "run.mzt").read_bytes() == single  # one whole run, not a mixture or a replacement
    assert leftovers(tmp_path) == ["run.mzt"]


@pytest.mark.slow
def test_resuming_a_finished_run_changes_nothing(tmp_path: Path, single: bytes) -> None:
    """What the later of two resumes meets when the first has finished: a refusal, and not one byte added."""
    (tmp_path / "run.mzt").write_bytes(single)
    r = cli(*ARGS, "--resume", "run.mzt", cwd=tmp_path)
    assert r.returncode == 1 and "already holds 12 steps" in one_error_line(r.stderr)
    assert (tmp_path / "run.mzt").read_bytes() == single


@pytest.mark.slow
def test_two_resumes_of_one_file_at_once(tmp_path: Path, single: bytes) -> None:
    (tmp_path / "run.mzt").write_bytes(prefix_after(single, 8))
    print(check_loser(race(tmp_path, [*ARGS, "--resume", "run.mzt"], [*ARGS, "--resume", "run.mzt"])))
    assert (tmp_path / "run.mzt").read_bytes() == single


def _limit_file_size(limit: int):
    def preexec() -> None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write(2) then fails with EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_full_disk_says_so_and_resume_finishes_exactly(tmp_path: Path, single: bytes) -> None:
    kept = prefix_after(single, 8)
    limit = len(kept) + 20  # the chunks of steps 8..11 cross it
    r = subprocess.run([*CLI, *ARGS, "-o", "run.mzt"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       preexec_fn=_limit_file_size(limit))
    assert r.returncode == 1
    assert one_error_line(r.stderr) == (
        "Error: file too large (a file size limit was reached) while writing run.mzt after step 8: the file holds "
        "its first 8 steps, intact, and `mezo-replay train --resume run.mzt` with the same options continues it "
        "exactly")
    assert (tmp_path / "run.mzt").read_bytes() == kept and leftovers(tmp_path) == ["run.mzt"]
    r = cli(*ARGS, "--resume", "run.mzt", cwd=tmp_path)
    assert r.returncode == 0 and "resumed at step 8" in r.stdout, r.stderr
    assert (tmp_path / "run.mzt").read_bytes() == single  # what was promised: exactly


@pytest.mark.slow
def test_repaired_file_resumes_to_the_uninterrupted_bytes(tmp_path: Path, single: bytes) -> None:
    bad = bytearray(single)
    third_step = [o for o, t, _ in chunk_offsets(single) if t == b"STEP"][2]
    bad[third_step + 20] ^= 0xFF
    (tmp_path / "run.mzt").write_bytes(bytes(bad))
    r = cli(*ARGS, "--resume", "run.mzt", cwd=tmp_path)
    line = one_error_line(r.stderr)
    assert r.returncode == 1 and "corrupt" in line and "the 8 steps before it are intact" in line
    assert "`mezo-replay repair run.mzt`" in line and (tmp_path / "run.mzt").read_bytes() == bytes(bad)
    r = cli("repair", "run.mzt", cwd=tmp_path)
    assert r.returncode == 0 and "kept 8 steps" in r.stdout, r.stderr
    r = cli(*ARGS, "--resume", "run-repaired.mzt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run-repaired.mzt").read_bytes() == single

