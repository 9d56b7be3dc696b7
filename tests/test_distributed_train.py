"""`torchrun ... -m mezo_replay train`: data parallel training in real processes (gloo on the CPU).

What must hold: every rank ends on the same weights, rank 0's trajectory is an ordinary one that rebuilds in
one process to exactly those bytes, ranks started differently refuse in one line, and a run that loses a
rank can be resumed to the bytes of a run that never did.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mezo_replay.format.fingerprint import tensor_fingerprint
from mezo_replay.format.mzt import read_trajectory
from mezo_replay.format.safetensors_io import BaseCheckpoint
from mezo_replay.training.tasks import class_counts, macro_f1, macro_f1_of_counts

CLI = [sys.executable, "-m", "mezo_replay"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ROOT = Path(__file__).resolve().parent.parent

# A rank under torchrun that runs the real CLI in process, then saves the weights it holds (rank{r}.safetensors),
# so the test can hold every rank's weights against the rebuild, not only rank 0's fingerprint.
WORKER = """
import os, sys
from safetensors.torch import save_file
import mezo_replay.cli as cli
import mezo_replay.training.train as t
if os.environ.get("QUEUED"):
    t.QUEUED_DEVICES.add("cpu")  # the GPU's loop (queue_step), on the CPU
held = []
real = t.train
t.train = lambda *a, **k: held.append(real(*a, **k)) or held[-1]
try:
    cli.main.main(sys.argv[2:], prog_name="mezo-replay", standalone_mode=False)
finally:
    for r in held:
        save_file({n: p.detach().clone().contiguous() for n, p in zip(r.optimizer.names, r.optimizer.params)},
                  f"{sys.argv[1]}/rank{r.world.rank}.safetensors")
"""


def torchrun(n: int, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(n), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def printed_command(stdout: str) -> list[str]:
    line = stdout.strip().splitlines()[-1].strip()
    assert line.startswith("mezo-replay reconstruct "), stdout
    return shlex.split(line)[1:]


def errors(stderr: str) -> list[str]:
    """Our lines, without torchrun's own report of the failed processes."""
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def rebuild(stdout: str, cwd: Path) -> BaseCheckpoint:
    """Runs the reconstruct command `train` printed, in one process; returns what it wrote."""
    args = printed_command(stdout)
    r = cli(*args, "-q", cwd=cwd)
    assert r.returncode == 0, r.stderr
    out = cwd / args[args.index("-o") + 1]
    return BaseCheckpoint.open(out)


@pytest.mark.parametrize("queued", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_two_ranks_train_data_parallel_and_rebuild_to_every_ranks_bytes(tmp_path, monkeypatch, queued):
    (tmp_path / "worker.py").write_text(WORKER)
    if queued:
        monkeypatch.setitem(ENV, "QUEUED", "1")
    r = torchrun(2, "worker.py", str(tmp_path), "train", "--steps", "4", "--eval-every", "2", "-q", "-o", "run.mzt",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("rebuild the tuned weights with:") == 1  # rank 0 alone reports
    traj = read_trajectory(tmp_path / "run.mzt")
    assert traj.steps == 4 and traj.final_fingerprint is not None
    assert traj.header["metadata"]["world_size"] == "2" and traj.header["metadata"]["parallel"] == "data"
    assert [e["step"] for e in traj.evals] == [0, 2, 4]
    rebuilt = rebuild(r.stdout, tmp_path)
    ranks = [BaseCheckpoint.open(tmp_path / f"rank{k}.safetensors") for k in (0, 1)]
    names = sorted(ranks[0].entries)
    assert names == sorted(ranks[1].entries) and len(names) == len(traj.header["tensors"])
    for name in names:
        want = bits(rebuilt.read(name))
        assert bits(ranks[0].read(name)) == want and bits(ranks[1].read(name)) == want, name
    assert [tensor_fingerprint(rebuilt.read(t["name"])) for t in traj.header["tensors"]] == traj.final_fingerprint
    info = json.loads(cli("info", "--json", "run.mzt", cwd=tmp_path).stdout)
    assert (info["world_size"], info["parallel"]) == (2, "data")
    text = cli("info", "run.mzt", cwd=tmp_path).stdout
    assert "parallel   data, world_size 2" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_started_with_other_settings_refuse_in_one_line(tmp_path):
    """Two processes launched by hand, as torchrun would, but with another --lr on rank 1."""
    port = str(_free_port())
    procs = []
    for rank, lr in ((0, "1e-4"), (1, "2e-4")):
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "MEZO_REPLAY_DIST_TIMEOUT": "120"}
        procs.append(subprocess.Popen([*CLI, "train", "--steps", "2", "--lr", lr, "-q", "-o", "run.mzt"],
                                      cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [1, 1]
    assert outs[1][1] == ""  # rank 1 leaves the line to rank 0
    assert outs[0][1].strip().splitlines() == [
        "Error: rank 1 was started differently from rank 0: --lr 0.0001 on rank 0, 0.0002 on rank 1: every "
        "process must run the same command on the same model and data"]
    assert not (tmp_path / "run.mzt").exists()


def test_info_of_a_one_process_file_shows_world_size_1(tmp_path):
    from mezo_replay.cli import summary
    from mezo_replay.training.optimizer import MeZO

    w = torch.zeros(8, requires_grad=True)
    opt = MeZO([("w", w)], lr=1e-3)
    opt.record(tmp_path / "t.mzt")
    opt.step(lambda: (w.detach() - 1).square().sum())
    opt.close()
    s = summary(read_trajectory(tmp_path / "t.mzt"))
    assert (s["world_size"], s["parallel"]) == (1, "none")


def test_f1_of_a_split_batch_is_the_f1_of_the_whole_batch():
    """Macro-F1 is not a sum over rows; the class counts ranks add up give the whole batch's F1 bit for bit."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randint(0, 3, (17,), generator=g), torch.randint(0, 3, (17,), generator=g)
    parts = [class_counts(pred[s], target[s], 3) for s in (slice(0, 5), slice(5, 11), slice(11, 17))]
    whole = macro_f1(pred, target, 3)
    assert bits(macro_f1_of_counts(sum(parts))) == bits(whole)
    assert torch.equal(sum(parts), class_counts(pred, target, 3))


@pytest.mark.slow
def test_batch_smaller_than_the_world_is_refused(tmp_path):
    r = torchrun(2, "-m", "mezo_replay", "train", "--batch-size", "1", "-q", "-o", "run.mzt", cwd=tmp_path)
    assert r.returncode != 0
    assert errors(r.stderr) == ["Error: --batch-size 1 is less than the 2 processes: data parallel training gives "
                                "each process at least one example of every batch"]


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_world_size_gives_a_trajectory_that_rebuilds_exactly(tmp_path, world):
    """torchrun with one process is an ordinary run (no metadata); 2 and 4 differ from it only in g."""
    r = torchrun(world, "-m", "mezo_replay", "train", "--steps", "3", "--eval-every", "0", "-q", "-o", "run.mzt",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    meta = read_trajectory(tmp_path / "run.mzt").header["metadata"]
    assert meta.get("world_size") == (None if world == 1 else str(world))
    rebuild(r.stdout, tmp_path)  # reconstruct checks the final fingerprint
    v = cli("verify", "mezo-replay:embedded/tiny-llama", "run.mzt", "run-tuned", "-q", cwd=tmp_path)
    assert v.returncode == 0, v.stderr


def _steps_in(path: Path) -> int:
    try:
        return read_trajectory(path, strict=False).steps
    except Exception:  # noqa: BLE001 - not written yet
        return 0


def _kill_rank(launcher: subprocess.Popen[str], rank: int) -> None:
    for pid in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            os.kill(int(pid), signal.SIGKILL)
            return
    raise AssertionError(f"no process of rank {rank} under torchrun {launcher.pid}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the rank's process through /proc")
def test_a_killed_rank_stops_the_others_and_resume_finishes_like_an_uninterrupted_run(tmp_path):
    steps = ["--steps", "30", "--eval-every", "0", "--flush-every", "1", "-q"]
    ref = torchrun(4, "-m", "mezo_replay", "train", *steps, "-o", "ref.mzt", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                 "4", "-m", "mezo_replay", "train", *steps, "-o", "run.mzt"], cwd=tmp_path, env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while _steps_in(tmp_path / "run.mzt") < 3 and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    _kill_rank(launcher, 2)
    _, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode != 0
    lost = [line for line in errors(stderr) if line.startswith("Error: rank 0:")]
    assert len(lost) == 1 and "lost contact with another rank" in lost[0] and "--resume" in lost[0], stderr
    cut = read_trajectory(tmp_path / "run.mzt")  # readable, complete chunks, no final fingerprint
    assert 3 <= cut.steps < 30 and cut.final_fingerprint is None
    r = torchrun(4, "-m", "mezo_replay", "train", "--resume", "run.mzt", *steps, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"resumed at step {cut.steps}" in r.stdout
    a, b = read_trajectory(tmp_path / "ref.mzt"), read_trajectory(tmp_path / "run.mzt")
    assert a.grad_bits.tobytes() == b.grad_bits.tobytes()
    assert a.final_fingerprint == b.final_fingerprint


@pytest.mark.slow
def test_a_resume_with_another_world_size_continues_the_file(tmp_path):
    r = torchrun(2, "-m", "mezo_replay", "train", "--steps", "3", "--eval-every", "0", "-q", "-o", "run.mzt",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = torchrun(3, "-m", "mezo_replay", "train", "--resume", "run.mzt", "--steps", "5", "--eval-every", "0", "-q",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert read_trajectory(tmp_path / "run.mzt").steps == 5
    rebuild(r.stdout, tmp_path)


@pytest.mark.slow
def test_sigterm_stops_every_rank_after_the_same_step(tmp_path):
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                 "2", "-m", "mezo_replay", "train", "--steps", "5000", "--eval-every", "0",
                                 "--flush-every", "1", "-q", "-o", "run.mzt"], cwd=tmp_path, env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while _steps_in(tmp_path / "run.mzt") < 2 and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)  # torchrun passes it on to every rank
    stdout, stderr = launcher.communicate(timeout=300)
    assert "stopped: the trajectory holds the" in stdout, stderr
    assert errors(stderr) == []  # in particular no rank disagrees about the final weights
    traj = read_trajectory(tmp_path / "run.mzt")
    assert traj.final_fingerprint is not None and traj.steps < 5000
    rebuild(stdout, tmp_path)


@pytest.mark.slow
def test_bench_distributed_smoke(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_distributed.py"), "--worlds", "1,2", "--steps",
                        "3", "--warmup", "0", "--json"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert [row["world_size"] for row in rows] == [1, 2]
    assert all(row["step_s"] > 0 and len(row["peak_mib"]) == row["world_size"] for row in rows)


def test_using_a_process_group_makes_exit_wait_for_its_worker_threads(tmp_path, monkeypatch):
    """gloo's worker threads drop a finished collective's tensors a moment after it returns, under the GIL; a
    process that finalizes meanwhile aborts after its work is done (distributed._let_workers_finish). So
    whatever uses a group, ours or a launcher's, registers the wait at exit, once."""
    import torch.distributed as dist

    from mezo_replay.training import distributed

    registered: list[object] = []
    monkeypatch.setattr(distributed, "_guarded", False)
    monkeypatch.setattr(distributed.atexit, "register", registered.append)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert distributed.current().size == 1
        distributed.current()
    finally:
        distributed.finish()
    assert registered == [distributed._let_workers_finish]
    assert not dist.is_initialized()
