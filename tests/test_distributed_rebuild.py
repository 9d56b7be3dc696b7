"""Rebuilds split across devices: over torchrun's ranks (rank 0 writes) and over a list of local devices
(`--device cuda:all`, one thread per device). Every split must write the bytes one process writes, and a
failure anywhere must end every rank with the same one line and leave nothing behind.

The ranks are real `torch.distributed.run` processes with gloo on the CPU. The local-device split runs
on a list of CPU devices here (the same threads and ordering a GPU list takes; no GPU in CI).
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mezo_replay import embedded
from mezo_replay.format.mzt import read_trajectory
from mezo_replay.format.safetensors_io import BaseCheckpoint
from mezo_replay.rebuild import replay, spread
from mezo_replay.training.optimizer import MeZO

BASE = Path(embedded.MODEL_DIR)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-step trajectory over every floating tensor of the embedded tiny Llama (a synthetic loss: the
    rebuild does not care where the losses came from)."""
    folder = tmp_path_factory.mktemp("run")
    base = BaseCheckpoint.open(BASE)
    params = [(n, base.read(n).requires_grad_(True)) for n, e in base.entries.items() if e.dtype in ("F32", "BF16")]
    opt = MeZO(params, lr=1e-3, eps=1e-3, seed=7)
    opt.record(folder / "run.mzt")
    g = torch.Generator().manual_seed(3)
    for _ in range(6):
        opt.step(lambda: float(torch.randn(1, generator=g)))
    opt.close()
    return folder / "run.mzt"


@pytest.fixture(scope="module")
def one(run: Path) -> Path:
    """The one-process rebuild, the bytes every split must give."""
    return replay.reconstruct(replay.plan(BASE, run), run.parent / "one")


def files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def torchrun(n: int, *args: str | Path, cwd: Path, prefix: tuple[str, ...] = ("-m", "mezo_replay")
             ) -> tuple[subprocess.CompletedProcess[str], list[str], list[str]]:
    """`torchrun --nproc-per-node n ... ARGS`, each rank's stdout and each rank's stderr (rank order)."""
    logs = cwd / f"logs-{len(list(cwd.glob('logs-*')))}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
           "--log-dir", str(logs), "--redirects", "3", *prefix, *map(str, args)]
    r = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    out, err = ([next(logs.glob(f"*/attempt_0/{rank}/{what}.log")).read_text() for rank in range(n)]
                for what in ("stdout", "stderr"))
    return r, out, err


def owned_by(run: Path, parts: int, part: int, last: bool = False) -> str:
    """The first (or last) tensor in write order that `part` replays in a split over `parts`."""
    tensors = read_trajectory(run).header["tensors"]
    cost = spread.costs([t["shape"] for t in tensors])
    owner = spread.assign(cost, parts)
    mine = [tensors[k]["name"] for k in spread.write_order(cost, owner) if owner[k] == part]
    return mine[-1] if last else mine[0]


def corrupt(folder: Path, names: list[str]) -> Path:
    """A copy of the embedded base with one byte of each named tensor flipped."""
    folder.mkdir()
    for f in BASE.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    b = BaseCheckpoint.open(folder)
    for name in names:
        e = b.entries[name]
        with open(folder / e.file.name, "r+b") as fh:
            fh.seek(e.start)
            x = fh.read(1)[0]
            fh.seek(e.start)
            fh.write(bytes([x ^ 1]))
    return folder


def leftovers(folder: Path, name: str) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith((name, f".{name}"))]


# --- the split: pure functions ----------------------------------------------------------------------

def test_assign_and_write_order_on_a_worked_example() -> None:
    """Largest first to the least loaded part (ties: lower part); then by each part's cost so far."""
    cost = [5, 1, 4, 2, 3]
    owner = spread.assign(cost, 2)
    assert owner == [0, 0, 1, 0, 1]  # loads 8 and 7
    assert spread.write_order(cost, owner) == [2, 0, 1, 4, 3]  # ready at 4, 5, 6, 7, 8


def test_assign_balances_and_is_deterministic() -> None:
    rng = random.Random(0)
    llama = [32000 * 4096] + [4096, 4096 * 4096, 4096 * 1024, 4096 * 1024, 4096 * 4096,
                              4096, 4096 * 11008, 4096 * 11008, 11008 * 4096] * 32 + [4096, 32000 * 4096]
    cases = [llama, [1] * 7, [0, 0, 5], [rng.randrange(1, 10**6) for _ in range(200)],
             [rng.choice([1, 10, 10**5]) for _ in range(50)]]
    for sizes in cases:
        cost = spread.costs([[s] for s in sizes])
        for parts in range(1, 6):
            owner = spread.assign(cost, parts)
            assert owner == spread.assign(list(cost), parts)  # a pure function of the shapes and the count
            assert all(0 <= g < parts for g in owner) and len(owner) == len(cost)
            loads = [sum(c for c, g in zip(cost, owner) if g == part) for part in range(parts)]
            best = max(-(-sum(cost) // parts), max(cost))  # no split does better than this
            assert max(loads) * 3 <= best * 4, (parts, loads, best)  # the longest-processing-time bound
            order = spread.write_order(cost, owner)
            assert sorted(order) == list(range(len(cost)))
            for part in range(parts):  # each part's results are taken in the order it makes them
                mine = [k for k in order if owner[k] == part]
                assert mine == sorted(mine)
    assert spread.assign(spread.costs([[4096]] * 8), 4) == [0, 1, 2, 3, 0, 1, 2, 3]  # equal sizes: round robin


def test_cuda_all_without_cuda_is_one_line(run: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from click.testing import CliRunner

    from mezo_replay.cli import main

    for command in (["reconstruct", str(BASE), str(run), "-o", str(tmp_path / "out")], ["verify", str(BASE), str(run)]):
        r = CliRunner().invoke(main, [*command, "--device", "cuda:all"])
        assert r.exit_code == 1
        assert r.output.strip().splitlines() == ["Error: --device cuda:all: torch sees no CUDA device here"]
    assert not list(tmp_path.iterdir())


def test_cuda_all_under_torchrun_is_one_line(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused before the ranks meet: every rank gets the same line from the same command."""
    from click.testing import CliRunner

    from mezo_replay.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    r = CliRunner().invoke(main, ["reconstruct", str(BASE), str(run), "-o", str(tmp_path / "out"), "--device",
                                  "cuda:all"])
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        "Error: --device cuda:all splits over the local GPUs in one process; under torchrun give --device cuda "
        "(each rank takes cuda:LOCAL_RANK) or cpu"]


# --- the split over local devices (threads), on CPU devices here ------------------------------------

@pytest.mark.parametrize("parts", [2, 3])
def test_a_split_over_devices_writes_the_bytes_of_one(run: Path, one: Path, tmp_path: Path, parts: int) -> None:
    p = replay.plan(BASE, run)
    seen: list[int] = []
    out = replay.reconstruct(p, tmp_path / "split", device=["cpu"] * parts, progress=seen.append)
    assert files(out) == files(one)
    assert sum(seen) == p.element_steps
    replay.verify(p, device=["cpu"] * parts)


def test_a_split_reports_the_first_failure_in_write_order(run: Path, tmp_path: Path) -> None:
    """Two wrong tensors on two parts: the one the writer takes first is named, whatever thread ran first;
    the output never appears."""
    first, second = owned_by(run, 2, 1), owned_by(run, 2, 0)
    tensors = [t["name"] for t in read_trajectory(run).header["tensors"]]
    cost = spread.costs([t["shape"] for t in read_trajectory(run).header["tensors"]])
    order = [tensors[k] for k in spread.write_order(cost, spread.assign(cost, 2))]
    first, second = sorted([first, second], key=order.index)
    bad = corrupt(tmp_path / "bad", [first, second])
    for _ in range(3):
        with pytest.raises(replay.BaseMismatchError, match=f"tensor '{first}'"):
            replay.reconstruct(replay.plan(bad, run), tmp_path / "out", device=["cpu", "cpu"])
        assert leftovers(tmp_path, "out") == []


# --- the split over torchrun's ranks ----------------------------------------------------------------

def test_two_ranks_write_the_bytes_of_one_process(run: Path, one: Path, tmp_path: Path) -> None:
    r, out, err = torchrun(2, "reconstruct", BASE, run, "-o", tmp_path / "two", cwd=tmp_path)
    assert r.returncode == 0, err
    assert files(tmp_path / "two") == files(one)
    assert "split over 2 ranks" in out[0] and "each of the" in out[0] and out[1] == ""  # only rank 0 speaks


def test_an_error_on_one_rank_ends_every_rank_with_one_line(run: Path, tmp_path: Path) -> None:
    """Rank 1's tensor is wrong in the base: rank 1 sees it, and every rank says so in the same line."""
    name = owned_by(run, 2, 1)
    bad = corrupt(tmp_path / "bad", [name])
    r, out, err = torchrun(2, "reconstruct", bad, run, "-o", tmp_path / "out", "-q", cwd=tmp_path)
    assert r.returncode != 0
    line = f"Error: wrong base: tensor '{name}' in {bad} differs from the one the trajectory was trained from " \
           f"(fingerprint mismatch)"
    assert [e.strip().splitlines() for e in err] == [[line], [line]]
    assert leftovers(tmp_path, "out") == []


@pytest.mark.slow
def test_three_ranks_reconstruct_and_verify(run: Path, one: Path, tmp_path: Path) -> None:
    r, out, err = torchrun(3, "reconstruct", BASE, run, "-o", tmp_path / "three", cwd=tmp_path)
    assert r.returncode == 0, err
    assert files(tmp_path / "three") == files(one)
    r, out, err = torchrun(3, "verify", BASE, run, cwd=tmp_path)
    assert r.returncode == 0, err
    assert out[0].startswith("OK: the replay after 6 steps, split over 3 ranks") and out[1:] == ["", ""]


@pytest.mark.slow
def test_rank_zeros_own_errors_reach_every_rank(run: Path, one: Path, tmp_path: Path) -> None:
    """Rank 0's last tensor is wrong (verify and reconstruct: rank 1 is then most likely done and waiting for
    the end); then rank 0's writer refuses an existing output before any work."""
    name = owned_by(run, 2, 0, last=True)
    bad = corrupt(tmp_path / "bad", [name])
    for command in (["reconstruct", bad, run, "-o", tmp_path / "out", "-q"], ["verify", bad, run, "-q"]):
        r, out, err = torchrun(2, *command, cwd=tmp_path)
        assert r.returncode != 0
        assert len({e for e in err}) == 1 and err[0].startswith(f"Error: wrong base: tensor '{name}'"), err
        assert len(err[0].strip().splitlines()) == 1
    assert leftovers(tmp_path, "out") == []
    r, out, err = torchrun(2, "reconstruct", BASE, run, "-o", one, "-q", cwd=tmp_path)
    assert [e.strip() for e in err] == [f"Error: {one} already exists; pass --overwrite to replace it"] * 2


@pytest.mark.slow
def test_a_rank_that_cannot_start_stops_every_rank(run: Path, tmp_path: Path) -> None:
    """Only rank 1 is given a base that does not exist: every rank reports rank 1's error before any work."""
    script = f'b={BASE}; [ "$RANK" = 1 ] && b=missing-base; exec {sys.executable} -m mezo_replay reconstruct ' \
             f'"$b" {run} -o {tmp_path / "out"}'
    r, out, err = torchrun(2, script, cwd=tmp_path, prefix=("--no-python", "sh", "-c"))
    assert r.returncode != 0
    assert [e.strip() for e in err] == [
        "Error: missing-base: no such file or folder (a Hub base is written hf://org/name)"] * 2
    assert leftovers(tmp_path, "out") == []
    r, out, err = torchrun(2, "verify", BASE, run, BASE, cwd=tmp_path)  # a given output: one process's job
    assert r.returncode != 0 and [e.strip() for e in err] == [
        "Error: under torchrun, verify replays and splits the work; checking a given output (TUNED) replays "
        "nothing: run it as one process"] * 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_split_over_gpus_writes_the_bytes_of_one(run: Path, one: Path, tmp_path: Path) -> None:
    """Two threads with a stream each on every GPU (on one GPU too: the threads and streams are what is
    tested), then `--device cuda:all` itself in a real process."""
    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] * 2
    out = replay.reconstruct(replay.plan(BASE, run), tmp_path / "gpus", device=devices)
    assert files(out) == files(one)
    r = subprocess.run([sys.executable, "-m", "mezo_replay", "reconstruct", str(BASE), str(run), "-o",
                        str(tmp_path / "all"), "--device", "cuda:all", "-q"], env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert files(tmp_path / "all") == files(one)
