"""reconstruct and verify overlap reading, the kernel and writing across tensors (rebuild/pipeline.py);
they must give the bytes, the errors and the cleanup of the one-tensor-at-a-time loop they replaced.

The reference here is that loop, spelled out with the public pieces (replay_named, CheckpointWriter).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mezo_replay.format.fingerprint import canonicalize_nan_, tensor_fingerprint
from mezo_replay.format.safetensors_io import BaseCheckpoint, CheckpointWriter
from mezo_replay.rebuild import pipeline, replay
from mezo_replay.training.optimizer import MeZO

REPO = Path(__file__).resolve().parents[1]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _mix(kind: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(base tensors, the names MeZO tunes): dtypes mixed, tiny and large (own-mapping reads), frozen ones."""
    g = torch.Generator().manual_seed(0)

    def r(n: int, dtype: torch.dtype) -> torch.Tensor:
        return (torch.randn(n, generator=g) * 0.05).to(dtype)

    if kind == "mixed":
        a = r(3000, torch.bfloat16).reshape(3, 1000)
        a.view(torch.int16)[0, 0] = 0x7FC1  # a NaN that is not the canonical one: the output canonicalises it
        base = {"a.bf16": a, "b.f16": r(700, torch.float16), "c.big": r(1 << 19, torch.float32),
                "d.tiny": r(1, torch.float32), "e.one": r(1, torch.bfloat16), "f.frozen": r(50, torch.float32),
                "g.int": torch.arange(4, dtype=torch.int64), "h.big16": r(1 << 20, torch.bfloat16)}
        tuned = ["a.bf16", "b.f16", "c.big", "d.tiny", "e.one", "h.big16"]
    elif kind == "many-small":
        base = {f"layer{i:02d}": r(17 + i, torch.float32) for i in range(24)}
        tuned = list(base)[::2]  # every other one frozen, interleaved in the file
    else:  # one large tensor alone
        base = {"w": r(3 << 19, torch.bfloat16)}
        tuned = ["w"]
    return base, tuned


def _make(folder: Path, kind: str, steps: int = 3) -> tuple[Path, Path, dict[str, bytes]]:
    """A base file, a trajectory of `steps` steps over `kind`'s tuned tensors, and the trained bytes."""
    base, tuned = _mix(kind)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(base, str(folder / "base.safetensors"))
    params = [(n, base[n].clone().requires_grad_(True)) for n in tuned]
    opt = MeZO(params, lr=1e-3, eps=1e-3, seed=5)
    opt.record(folder / "t.mzt")
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.step(lambda: float(torch.randn(1, generator=g)))
    opt.close()
    trained = {n: canonicalize_nan_(p.detach().clone()).view(torch.uint8).numpy().tobytes() for n, p in params}
    return folder / "base.safetensors", folder / "t.mzt", trained


def _sequential(p: replay.ReplayPlan, out: Path) -> Path:
    """The loop reconstruct ran before the pipeline: one tensor read, replayed, checked and written at a time."""
    metadata = {"mezo_replay.steps": str(p.steps),
                "mezo_replay.base_fingerprint": p.trajectory.header["base"]["fingerprint"]}
    assert p.base is not None
    with CheckpointWriter(p.base, out, metadata=metadata, config=p.trajectory.header.get("config")) as writer:
        for index, name in enumerate(p.names):
            w = replay.replay_named(p, index)
            assert p.expected is None or tensor_fingerprint(w) == p.expected[index]
            writer.write(name, w)
        for name in p.base.entries:
            if name not in p.names:
                writer.copy_from_base(name)
        return writer.commit()


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("mezo-replay-")]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or p.name.startswith("out"))


@pytest.mark.parametrize("in_flight", [1, 3, 8])
@pytest.mark.parametrize("kind", ["mixed", "many-small", "large"])
def test_same_bytes_as_the_sequential_loop(tmp_path: Path, kind: str, in_flight: int,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    base, traj, trained = _make(tmp_path, kind)
    monkeypatch.setattr(pipeline, "IN_FLIGHT", in_flight)
    monkeypatch.setattr(replay, "SYNC_EVERY", 1 if in_flight == 8 else replay.SYNC_EVERY)  # a sync per tensor
    calls: list[tuple[int, bool]] = []
    p = replay.plan(base, traj)
    on_main = threading.main_thread
    got = replay.reconstruct(p, tmp_path / "new.safetensors",
                             progress=lambda n: calls.append((n, threading.current_thread() is on_main())))
    want = _sequential(replay.plan(base, traj), tmp_path / "old.safetensors")
    assert got.read_bytes() == want.read_bytes()
    out = BaseCheckpoint.open(got)
    for name, raw in trained.items():
        assert bytes(out.read_bytes(name)) == raw, name
    if kind == "mixed":  # the base's odd NaN comes out as the canonical one
        assert bytes(out.read_bytes("a.bf16")[:2]) == bytes.fromhex("c07f")
    # the progress bar sees every element-step, from the caller's thread (where tqdm runs)
    assert sum(n for n, _ in calls) == p.element_steps and all(main for _, main in calls)
    assert not _workers()
    replay.verify(replay.plan(base, traj))  # the pipelined verify accepts it too
    replay.verify(replay.plan(base, traj), got)


def test_step_and_unverified_give_the_sequential_bytes(tmp_path: Path) -> None:
    base, traj, _ = _make(tmp_path, "mixed", steps=4)
    p = replay.plan(base, traj, step=2)
    with pytest.raises(replay.VerificationError, match="no fingerprint for step 2"):
        replay.reconstruct(p, tmp_path / "out.safetensors")
    assert _leftovers(tmp_path) == []
    got = replay.reconstruct(p, tmp_path / "out.safetensors", unverified=True)
    assert got.read_bytes() == _sequential(replay.plan(base, traj, step=2), tmp_path / "old.safetensors").read_bytes()
    # step 0 is the base itself: no kernel touches its odd NaN, which must still come out canonical
    got = replay.reconstruct(replay.plan(base, traj, step=0), tmp_path / "out0.safetensors")
    assert bytes(BaseCheckpoint.open(got).read_bytes("a.bf16")[:2]) == bytes.fromhex("c07f")
    assert got.read_bytes() == _sequential(replay.plan(base, traj, step=0), tmp_path / "old0.safetensors").read_bytes()


def _fail_at(index: int, error: BaseException, real, delay: float = 0.0):
    def fake(p, i, *a, **k):
        if i == index:
            time.sleep(delay)
            raise error
        return real(p, i, *a, **k)
    return fake


@pytest.mark.parametrize("stage", ["reader", "kernel", "writer", "interrupt"])
def test_a_failure_mid_run_leaves_nothing_behind(tmp_path: Path, stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    base, traj, _ = _make(tmp_path, "many-small")
    boom = replay.VerificationError(f"boom in the {stage}")
    if stage == "reader":
        monkeypatch.setattr(replay, "read_base", _fail_at(5, boom, replay.read_base))
    elif stage == "writer":
        monkeypatch.setattr(replay, "_check", _fail_at(5, boom, replay._check))
    else:
        real, error = replay.replay_tensor_, boom if stage == "kernel" else KeyboardInterrupt()

        def kernel(w, rule, i, *a, **k):
            if i == 5:
                raise error
            real(w, rule, i, *a, **k)
        monkeypatch.setattr(replay, "replay_tensor_", kernel)
    expected = KeyboardInterrupt if stage == "interrupt" else replay.VerificationError
    with pytest.raises(expected) as e:
        replay.reconstruct(replay.plan(base, traj), tmp_path / "out.safetensors")
    assert e.value is boom or stage == "interrupt"
    assert _leftovers(tmp_path) == [] and not _workers()


def test_the_earliest_tensors_error_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensor 3's result check fails slowly while the reader, ahead, already failed on tensor 4: the
    sequential loop would have reported tensor 3, so that is what is raised."""
    base, traj, _ = _make(tmp_path, "many-small")
    late = replay.VerificationError("tensor 3's result")
    monkeypatch.setattr(replay, "_check", _fail_at(3, late, replay._check, delay=0.3))
    monkeypatch.setattr(replay, "read_base", _fail_at(4, replay.BaseMismatchError("tensor 4's base"), replay.read_base))
    with pytest.raises(replay.VerificationError) as e:
        replay.reconstruct(replay.plan(base, traj), tmp_path / "out.safetensors")
    assert e.value is late and _leftovers(tmp_path) == [] and not _workers()


def _corrupt(base: Path, name: str) -> None:
    e = BaseCheckpoint.open(base).entries[name]
    with open(base, "r+b") as f:
        f.seek(e.start + e.nbytes // 2)
        b = f.read(1)
        f.seek(e.start + e.nbytes // 2)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("which", [0, -1])
def test_a_corrupted_base_tensor_is_refused_before_its_kernel(tmp_path: Path, which: int,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    base, traj, _ = _make(tmp_path, "mixed")
    name = replay.plan(base, traj).names[which]
    _corrupt(base, name)
    ran: list[int] = []
    real = replay.replay_tensor_
    monkeypatch.setattr(replay, "replay_tensor_",
                        lambda w, rule, i, *a, **k: ran.append(i) or real(w, rule, i, *a, **k))
    with pytest.raises(replay.BaseMismatchError, match=f"wrong base: tensor '{name}'.*fingerprint mismatch"):
        replay.reconstruct(replay.plan(base, traj), tmp_path / "out.safetensors")
    n = len(replay.plan(base, traj).names)
    assert which % n not in ran and all(i < which % n for i in ran)
    with pytest.raises(replay.BaseMismatchError, match="wrong base"):
        replay.verify(replay.plan(base, traj))
    assert _leftovers(tmp_path) == [] and not _workers()


def test_the_cli_writes_the_sequential_bytes_and_refuses_a_corrupted_base(tmp_path: Path) -> None:
    base, traj, _ = _make(tmp_path, "mixed")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "mezo_replay", "reconstruct", str(base), str(traj), "-q"]
    run = subprocess.run([*cmd, "-o", str(tmp_path / "cli.safetensors")], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    want = _sequential(replay.plan(base, traj), tmp_path / "old.safetensors")
    assert (tmp_path / "cli.safetensors").read_bytes() == want.read_bytes()
    _corrupt(base, "h.big16")
    run = subprocess.run([*cmd, "-o", str(tmp_path / "bad.safetensors")], capture_output=True, text=True, env=env,
                         timeout=300)
    lines = run.stderr.strip().splitlines()
    assert run.returncode != 0 and len(lines) == 1 and "wrong base: tensor 'h.big16'" in lines[0], run.stderr
    assert not (tmp_path / "bad.safetensors").exists() and not any(".tmp-" in p.name for p in tmp_path.iterdir())


@CUDA
@pytest.mark.parametrize("kind", ["mixed", "many-small", "large"])
def test_cuda_pipeline_gives_the_cpu_bytes(tmp_path: Path, kind: str) -> None:
    base, traj, _ = _make(tmp_path, kind, steps=5)
    got = replay.reconstruct(replay.plan(base, traj), tmp_path / "gpu.safetensors", device="cuda")
    want = _sequential(replay.plan(base, traj), tmp_path / "cpu.safetensors")
    assert got.read_bytes() == want.read_bytes() and not _workers()
    replay.verify(replay.plan(base, traj), device="cuda")


@CUDA
def test_cuda_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, traj, _ = _make(tmp_path, "many-small")
    boom = replay.VerificationError("boom")
    monkeypatch.setattr(replay, "_check", _fail_at(7, boom, replay._check))
    with pytest.raises(replay.VerificationError):
        replay.reconstruct(replay.plan(base, traj), tmp_path / "out.safetensors", device="cuda")
    assert _leftovers(tmp_path) == [] and not _workers()


@pytest.mark.parametrize("in_flight", ["1", "3"])
def test_bench_prints_the_stages_and_the_ratio_to_the_kernel(tmp_path: Path, in_flight: str,
                                                             capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    monkeypatch.setattr(pipeline, "IN_FLIGHT", pipeline.IN_FLIGHT)  # the bench sets it; restored after
    import bench_reconstruct

    bench_reconstruct.main(["--params", "70000", "--steps", "3", "--repeats", "2", "--warmup", "1", "--stages",
                            "--in-flight", in_flight, "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"{in_flight} tensor(s) in flight" in out and "run 2 == run 1" in out and "== torch path" in out
    assert "stages, one after the other: " in out and "x kernel-only" in out
    assert pipeline.IN_FLIGHT == int(in_flight)


def _old_fingerprint(name: str, t: torch.Tensor) -> str:
    """The NaN scan as it was (five passes), as the oracle for the two-pass one."""
    import numpy as np

    from mezo_replay.format import fingerprint as F
    word, exp, man, canon = F._BITS[name]
    h = F._start(name, t.shape)
    words = t.detach().contiguous().reshape(-1).view(F._INT_VIEW[name]).numpy().view(word)
    nan = ((words & word(exp)) == word(exp)) & ((words & word(man)) != 0)
    h.update(np.where(nan, word(canon), words).astype(np.dtype(word).newbyteorder("<")).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", ["BF16", "F16", "F32"])
def test_the_faster_nan_scan_gives_the_same_fingerprints_and_bytes(name: str) -> None:
    from mezo_replay.format import fingerprint as F

    dtype, bits = F.DTYPE_NAMES[name], F._INT_VIEW[name]
    if name == "F32":  # every exponent/mantissa edge with both signs, and random words
        edges = [0, 1, 0x7F800000, 0x7F800001, 0x7FC00000, 0x7FFFFFFF, 0x7F7FFFFF, 0x3F800000, 0x00800000]
        edges += [e | 0x80000000 for e in edges]
        g = torch.Generator().manual_seed(3)
        words = torch.cat([torch.tensor(edges, dtype=torch.int64),
                           torch.randint(0, 1 << 32, (1 << 21,), generator=g, dtype=torch.int64)]).to(torch.int32)
    else:  # every pattern, then again past a 4 MiB slice boundary
        words = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
        words = torch.cat([words, torch.zeros((4 << 20) // 2 - 1000, dtype=torch.int16), words])
    t = words.view(dtype)
    want = _old_fingerprint(name, t)
    assert F.tensor_fingerprint(t) == want
    assert F.fingerprint_raw(name, t.shape, t.view(torch.uint8).numpy().tobytes()) == want
    fixed = t.clone()
    assert F.canonical_fingerprint_(fixed) == want
    assert torch.equal(fixed.view(bits), F.canonicalize_nan_(t.clone()).view(bits))
    assert not torch.equal(fixed.view(bits), t.view(bits))  # there were NaNs to canonicalise: the test can fail
