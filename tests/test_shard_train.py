"""`torchrun ... -m mezo_replay train --shard`: FSDP2-sharded training in real processes (gloo on the CPU).

What must hold: the weights the ranks hold in shards, gathered, are exactly what a one-process `reconstruct` of
rank 0's trajectory writes; the trajectory is the one data parallel writes on the same settings (only the
metadata's `parallel` differs), with or without --offload cpu and across a --resume; what is not supported is
refused in one line.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mezo_replay.format.fingerprint import tensor_fingerprint
from mezo_replay.format.mzt import read_trajectory
from mezo_replay.format.safetensors_io import BaseCheckpoint

from .test_distributed_train import CLI, ENV, _kill_rank, _steps_in, bits, cli, errors, rebuild, torchrun

# A rank under torchrun that joins the group itself (so the CLI's train leaves it open), runs the real CLI in
# process, then gathers every tuned parameter tensor by tensor (full_tensor, a collective) and saves them from
# rank 0 (gathered.safetensors): the bytes the ranks hold in shards, held against the rebuild.
WORKER = """
import os, sys
import torch.distributed as dist
from safetensors.torch import save_file
import mezo_replay.cli as cli
import mezo_replay.training.train as t
dist.init_process_group("gloo")
held = []
real = t.train
t.train = lambda *a, **k: held.append(real(*a, **k)) or held[-1]
cli.main.main(sys.argv[2:], prog_name="mezo-replay", standalone_mode=False)
(r,) = held
assert r.optimizer.sharded and all(type(p).__name__ == "DTensor" for p in r.optimizer.params)
gathered = {n: p.full_tensor().detach().clone().contiguous() for n, p in zip(r.optimizer.names, r.optimizer.params)}
local = sum(p.to_local().numel() for p in r.optimizer.params)
whole = sum(p.numel() for p in r.optimizer.params)
with open(f"{sys.argv[1]}/holds.{r.world.rank}", "w") as f:  # a file: stderr lines of two ranks may interleave
    f.write(f"{local} {whole}")
if r.world.rank == 0:
    save_file(gathered, f"{sys.argv[1]}/gathered.safetensors")
dist.destroy_process_group()
"""


def _run(tmp_path: Path, n: int, *args: str, worker: bool = False) -> subprocess.CompletedProcess[str]:
    if worker:
        (tmp_path / "worker.py").write_text(WORKER)
        return torchrun(n, "worker.py", str(tmp_path), "train", *args, cwd=tmp_path)
    return torchrun(n, "-m", "mezo_replay", "train", *args, cwd=tmp_path)


def _same_run(a: Path, b: Path, *, parallel: tuple[str, str]) -> None:
    """Two trajectories that record the same steps from the same base: equal in everything but the metadata's
    `parallel` (header, step records, losses, evaluations, checkpoints, final fingerprint)."""
    x, y = read_trajectory(a), read_trajectory(b)
    hx, hy = json.loads(json.dumps(x.header)), json.loads(json.dumps(y.header))
    assert (hx["metadata"].pop("parallel"), hy["metadata"].pop("parallel")) == parallel
    assert hx == hy
    assert x.grad_bits.tobytes() == y.grad_bits.tobytes() and x.steps == y.steps
    assert x.losses.tobytes() == y.losses.tobytes()
    assert x.evals == y.evals and x.checkpoints == y.checkpoints
    assert x.final_fingerprint == y.final_fingerprint is not None


def test_two_ranks_train_sharded_and_rebuild_to_the_gathered_bytes(tmp_path):
    r = _run(tmp_path, 2, "--shard", "--steps", "4", "--eval-every", "2", "-q", "-o", "run.mzt", worker=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("rebuild the tuned weights with:") == 1  # rank 0 alone reports
    counts = [tuple(map(int, (tmp_path / f"holds.{rank}").read_text().split())) for rank in (0, 1)]
    assert len(counts) == 2 and sum(c[0] for c in counts) == counts[0][1] and all(c[0] < c[1] for c in counts)
    traj = read_trajectory(tmp_path / "run.mzt")
    assert traj.steps == 4 and traj.final_fingerprint is not None and sorted(traj.checkpoints) == [2]
    assert (traj.header["metadata"]["world_size"], traj.header["metadata"]["parallel"]) == ("2", "shard")
    assert [e["step"] for e in traj.evals] == [0, 2, 4]
    rebuilt = rebuild(r.stdout, tmp_path)
    gathered = BaseCheckpoint.open(tmp_path / "gathered.safetensors")
    names = [t["name"] for t in traj.header["tensors"]]
    assert sorted(gathered.entries) == sorted(names)
    for name in names:
        assert bits(gathered.read(name)) == bits(rebuilt.read(name)), name
    assert [tensor_fingerprint(gathered.read(n)) for n in names] == traj.final_fingerprint
    text = cli("info", "run.mzt", cwd=tmp_path).stdout
    assert "parallel   shard, world_size 2" in text


def test_shard_and_offload_without_torchrun_are_refused_in_one_line(tmp_path):
    r = cli("train", "--shard", "-q", "-o", "run.mzt", cwd=tmp_path)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        "Error: --shard splits the model over several processes: launch with torchrun, e.g. torchrun "
        "--nproc-per-node 2 -m mezo_replay train --shard ..."]
    r = cli("train", "--offload", "cpu", "-q", "-o", "run.mzt", cwd=tmp_path)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        "Error: --offload cpu offloads FSDP2's shards: it needs --shard (under torchrun)"]
    assert not (tmp_path / "run.mzt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("world,dtype", [(2, "bf16"), (4, "fp32")])
def test_sharded_and_data_parallel_runs_record_the_same_trajectory(tmp_path, world, dtype):
    """Sharding changes where the weights live, not one bit of what is recorded; bf16 also writes the cast
    base copy beside the trajectory, from rank 0."""
    common = ["--steps", "3", "--eval-every", "3", "--dtype", dtype, "-q"]
    (tmp_path / "dp").mkdir()
    dp = torchrun(world, "-m", "mezo_replay", "train", *common, "-o", "run.mzt", cwd=tmp_path / "dp")
    assert dp.returncode == 0, dp.stderr
    r = _run(tmp_path, world, "--shard", *common, "-o", "run.mzt", worker=True)
    assert r.returncode == 0, r.stderr
    _same_run(tmp_path / "run.mzt", tmp_path / "dp" / "run.mzt", parallel=("shard", "data"))
    if dtype == "bf16":
        assert (tmp_path / "run.base-bf16" / "model.safetensors").is_file()
    rebuilt = rebuild(r.stdout, tmp_path)
    gathered = BaseCheckpoint.open(tmp_path / "gathered.safetensors")
    for name in gathered.entries:
        assert bits(gathered.read(name)) == bits(rebuilt.read(name)), name


@pytest.mark.slow
def test_offload_cpu_writes_the_same_bytes(tmp_path):
    common = ["--shard", "--steps", "3", "--eval-every", "0", "-q"]
    a = _run(tmp_path, 2, *common, "-o", "plain.mzt")
    assert a.returncode == 0, a.stderr
    b = _run(tmp_path, 2, *common, "--offload", "cpu", "-o", "offload.mzt")
    assert b.returncode == 0, b.stderr
    assert (tmp_path / "plain.mzt").read_bytes() == (tmp_path / "offload.mzt").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("first", ["--shard", "data-parallel"])
def test_a_sharded_resume_ends_on_the_bytes_of_an_uninterrupted_run(tmp_path, first):
    """The resume replays the recorded steps onto each rank's shards of the base and checks them against the
    file; the first part may have been data parallel (the file is the same kind either way)."""
    common = ["--steps", "5", "--eval-every", "0", "--checkpoint-every", "2", "-q"]
    ref = _run(tmp_path, 2, "--shard", *common, "-o", "ref.mzt")
    assert ref.returncode == 0, ref.stderr
    head = ["--shard"] if first == "--shard" else []
    part = _run(tmp_path, 2, *head, "--steps", "3", "--eval-every", "0", "--checkpoint-every", "2", "-q",
                "-o", "run.mzt")  # a constant schedule: a run of 3 steps is the first 3 of 5
    assert part.returncode == 0, part.stderr
    r = _run(tmp_path, 2, "--shard", *common, "--resume", "run.mzt")
    assert r.returncode == 0, r.stderr
    assert "resumed at step 3" in r.stdout
    a, b = read_trajectory(tmp_path / "ref.mzt"), read_trajectory(tmp_path / "run.mzt")
    assert a.grad_bits.tobytes() == b.grad_bits.tobytes()
    assert a.final_fingerprint == b.final_fingerprint and a.checkpoints == b.checkpoints
    rebuild(r.stdout, tmp_path)


@pytest.mark.slow
def test_refusals_under_torchrun_are_one_line(tmp_path):
    r = _run(tmp_path, 2, "--shard", "--peft", "lora", "-q", "-o", "run.mzt")
    assert r.returncode != 0
    assert errors(r.stderr) == ["Error: --shard with --peft lora is not supported: an adapter is small, so train "
                                "it data parallel (without --shard)"]
    port = str(_free_port())
    procs = []
    for rank, extra in ((0, ["--shard"]), (1, [])):
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "MEZO_REPLAY_DIST_TIMEOUT": "120"}
        procs.append(subprocess.Popen([*CLI, "train", *extra, "--steps", "2", "-q", "-o", "run.mzt"], cwd=tmp_path,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [1, 1]
    assert outs[1][1] == ""
    assert outs[0][1].strip().splitlines() == [
        "Error: rank 1 was started differently from rank 0: --shard on rank 0, no --shard on rank 1: every "
        "process must run the same command on the same model and data"]
    assert not (tmp_path / "run.mzt").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the rank's process through /proc")
def test_a_killed_rank_stops_a_sharded_run_with_the_resume_line(tmp_path):
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                 "2", "-m", "mezo_replay", "train", "--shard", "--steps", "5000", "--eval-every", "0",
                                 "--flush-every", "1", "-q", "-o", "run.mzt"], cwd=tmp_path,
                                env={**ENV, "MEZO_REPLAY_DIST_TIMEOUT": "120"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while _steps_in(tmp_path / "run.mzt") < 2 and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    _kill_rank(launcher, 1)
    _, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode != 0
    lost = [line for line in errors(stderr) if line.startswith("Error: rank 0:")]
    assert len(lost) == 1 and "lost contact with another rank" in lost[0] and "--resume" in lost[0], stderr
    cut = read_trajectory(tmp_path / "run.mzt")
    assert cut.steps >= 2 and cut.final_fingerprint is None



@pytest.mark.slow
def test_bench_distributed_shard_smoke(tmp_path):
    bench = Path(__file__).resolve().parent.parent / "tools" / "bench_distributed.py"
    r = subprocess.run([sys.executable, str(bench), "--shard", "--worlds", "1,2", "--steps", "3", "--warmup", "0",
                        "--json"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert [(row["world_size"], row["parallel"]) for row in rows] == [(1, "none"), (2, "shard")]
    assert rows[1]["held_mib"][0] < rows[0]["held_mib"][0] and len(rows[1]["now_mib"]) == 2
