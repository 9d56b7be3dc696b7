"""Element passes and fingerprints on shards: a rank holding a contiguous run of a tensor's row-major
elements (FSDP2's dim-0 Shard: rows r0..r1) must get, with the global index of its first element, exactly
the bytes the whole tensor gets there, in every backend; and the fingerprint of a tensor streamed shard by
shard must be the whole tensor's. Raw bit patterns are compared (torch.equal on integer views).
"""
from __future__ import annotations

import functools
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mezo_replay.arithmetic import rule
from mezo_replay.arithmetic.rule import MezoSGD
from mezo_replay.format.fingerprint import ShardedFingerprint, fingerprint_chunks, tensor_fingerprint
from mezo_replay.kernels import cpu_kernel, steps, triton_kernels
from mezo_replay.training.shards import chunk_rows

from .test_spec_vectors import bits_to_torch, random_bits

ROOT = Path(__file__).resolve().parent.parent
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
SGD = MezoSGD.create(lr=0.05, eps=1e-3, seed=2**33 + 7, weight_decay=0.2)


def _backends() -> list:
    """torch, the compiled kernel with every instruction set this CPU runs, Triton interpreted."""
    out = [pytest.param(("torch", None), id="torch")]
    out += [pytest.param(("compiled", isa), id=f"compiled-{isa}") for isa in cpu_kernel.isas()]
    if triton_kernels.available() and triton_kernels.interpreting():
        out.append(pytest.param(("triton", None), id="triton-interpreted"))
    return out


def _use(request, monkeypatch, name: str, isa: str | None):
    if isa is not None:  # steps picks the widest build: pin the one under test
        monkeypatch.setattr(cpu_kernel, "apply_", functools.partial(cpu_kernel.apply_, isa=isa))
    steps.set_backend(name)
    request.addfinalizer(lambda: steps.set_backend("auto"))
    return name


@pytest.fixture(params=_backends())
def backend(request, monkeypatch):
    return _use(request, monkeypatch, *request.param)


def _with_worlds() -> list:
    """Every backend x (world size, flat buffer views); under Triton's interpreter (about 20 s a case) only
    2 ranks run by default, the rest with -m slow."""
    out = []
    for b in _backends():
        for world, flat in ((2, True), (3, False), (4, False)):
            slow = b.values[0][0] == "triton" and world != 2
            out.append(pytest.param(b.values[0], world, flat, id=f"{b.id}-{world}-{'flat' if flat else 'copies'}",
                                    marks=[pytest.mark.slow] if slow else []))
    return out


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    n = math.prod(shape)
    return bits_to_torch(random_bits(NAMES[dtype], max(n, 16), seed=seed)[:n], NAMES[dtype], "cpu").reshape(shape)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype]).reshape(-1)


def test_chunk_rows_is_torch_chunk():
    for rows in (0, 1, 3, 7, 23, 64):
        for world in (1, 2, 3, 4, 8):
            got = [chunk_rows(rows, world, r) for r in range(world)]
            sizes = [c.shape[0] for c in torch.chunk(torch.empty(rows, 1), world)] if rows else []
            assert [r1 - r0 for r0, r1 in got] == sizes + [0] * (world - len(sizes)), (rows, world)
            assert got[0][0] == 0 and all(a[1] == b[0] for a, b in zip(got, got[1:])) and got[-1][1] == rows
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        chunk_rows(4, 2, 2)


# Odd row sizes put shard boundaries off the 8-element Philox blocks; 3 rows over 4 ranks leaves one empty.
PARAMS = [(torch.float32, (37, 13)), (torch.bfloat16, (3, 11)), (torch.float16, (50, 7)), (torch.bfloat16, (9,)),
          (torch.float32, (1, 5)), (torch.bfloat16, (23, 3, 5))]
DECAYS = [True, False, True, True, False, True]


def _shards(whole: list[torch.Tensor], world: int, rank: int, flat: bool) -> tuple[list[torch.Tensor], list[int]]:
    """Rank `rank`'s local tensors (copies, or views into one flat buffer per dtype when `flat`, as FSDP2's
    all-gather buffers hold them) and their global element starts."""
    local, starts = [], []
    for t in whole:
        r0, r1 = chunk_rows(t.shape[0], world, rank)
        row = math.prod(t.shape[1:])
        local.append(t[r0:r1].clone())
        starts.append(r0 * row)
    if flat:
        buffer = {dt: torch.empty(sum(x.numel() for x in local if x.dtype == dt) + 5, dtype=dt) for dt in INT_VIEW}
        used = {dt: 3 for dt in INT_VIEW}  # views start off any alignment
        views = []
        for x in local:
            v = buffer[x.dtype][used[x.dtype]:used[x.dtype] + x.numel()].view(x.shape)
            v.copy_(x)
            used[x.dtype] += x.numel()
            views.append(v)
        local = views
    return local, starts


def _training_step(tensors, t: int, starts, c, go=None) -> None:
    """What the optimizer runs for one step, fused into the next one's P1."""
    steps.perturb_all_(tensors, SGD, t, SGD.eps, starts=starts)
    steps.perturb_all_(tensors, SGD, t, -2.0 * SGD.eps, starts=starts)
    steps.update_perturb_all_(tensors, SGD, t, c, SGD.decay(t), DECAYS, go=go, starts=starts)
    steps.perturb_all_(tensors, SGD, t + 1, -2.0 * SGD.eps, starts=starts)
    steps.restore_update_all_(tensors, SGD, t + 1, c, SGD.decay(t + 1), DECAYS, starts=starts)


@pytest.mark.parametrize("kind,world,flat", _with_worlds())
def test_training_passes_on_shards_give_the_whole_tensors_bytes(request, monkeypatch, kind, world, flat):
    name = _use(request, monkeypatch, *kind)
    whole = [_tensor(dt, shape, seed=i) for i, (dt, shape) in enumerate(PARAMS)]
    c = SGD.coefficient(0, rule.encode_grad(1.5))
    c_dev = torch.tensor(c, dtype=torch.float32)  # the optimizer's 0-dim c on the weights' device
    plan = [(0, c, None), (2, c_dev, torch.tensor(False))]
    if name == "triton":  # the interpreter's time: one step, c and go both read by the kernel
        plan = [(2, c_dev, torch.tensor(True))]
    want = [t.clone() for t in whole]
    for t, cc, go in plan:
        _training_step(want, t, None, cc, go)
    got = []
    for rank in range(world):
        local, starts = _shards(whole, world, rank, flat)
        for t, cc, go in plan:
            _training_step(local, t, starts, cc, go)
        got.append(local)
    for k, w in enumerate(want):
        assert torch.equal(_bits(torch.cat([g[k] for g in got])), _bits(w)), (k, PARAMS[k])


@pytest.mark.parametrize("kind", [pytest.param(b.values[0], id=b.id, marks=[pytest.mark.slow] if b.id.startswith("triton")
                                                else []) for b in _backends()])
def test_starts_default_to_whole_tensors(request, monkeypatch, kind):
    """starts=None and starts of zeros are the same pass: the unsharded path is unchanged."""
    _use(request, monkeypatch, *kind)
    a = [_tensor(dt, shape, seed=i) for i, (dt, shape) in enumerate(PARAMS)]
    b = [t.clone() for t in a]
    _training_step(a, 5, None, 0.25)
    _training_step(b, 5, [0] * len(b), 0.25)
    assert all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_replay_of_shards_gives_the_whole_tensors_bytes(backend, dtype):
    """A rebuild split by rows (odd boundaries, one shard empty) lands where the whole tensor's does."""
    whole = _tensor(dtype, (29, 7), seed=3)
    constants = steps.step_constants(SGD, [rule.encode_grad(g) for g in (2.0, -1.5, 0.75)], first_step=4)
    want = whole.clone()
    steps.replay_tensor_(want, SGD, 2, constants, decay=True, first_step=4)
    cuts = [0, 3, 3, 10, 17, 29]  # rows; 3..3 is an empty shard
    for r0, r1 in zip(cuts, cuts[1:]):
        part = whole[r0:r1].clone()
        steps.replay_tensor_(part, SGD, 2, constants, decay=True, first_step=4, start=r0 * 7)
        assert torch.equal(_bits(part), _bits(want[r0:r1])), (r0, r1)


def test_single_tensor_passes_take_a_start(backend):
    whole = _tensor(torch.bfloat16, (31,), seed=9)
    want = whole.clone()
    steps.perturb_tensor_(want, SGD, 1, 4, SGD.eps)
    steps.restore_update_tensor_(want, SGD, 1, 4, 0.5, SGD.decay(1))
    got = [whole[:13].clone(), whole[13:].clone()]
    for part, start in zip(got, (0, 13)):
        steps.perturb_tensor_(part, SGD, 1, 4, SGD.eps, start=start)
        steps.restore_update_tensor_(part, SGD, 1, 4, 0.5, SGD.decay(1), start=start)
    assert torch.equal(_bits(torch.cat(got)), _bits(want))


@pytest.mark.parametrize("kind", [pytest.param(b.values[0], id=b.id) for b in _backends() if not b.id.startswith("triton")])
def test_a_shard_split_into_many_slices_keeps_its_offset(request, monkeypatch, kind):
    """Shards big enough to be cut into slices (the torch path's 2^18 elements, the compiled kernel's per
    thread): each slice adds its own offset to the shard's start."""
    _use(request, monkeypatch, *kind)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # the compiled path: three threaded slices
    whole = _tensor(torch.float32, (700_001,), seed=5)
    want = whole.clone()
    steps.update_perturb_all_([want], SGD, 6, 0.125, SGD.decay(6), [True])
    cut = 12_345
    parts = [whole[:cut].clone(), whole[cut:].clone()]
    for part, start in zip(parts, (0, cut)):
        steps.update_perturb_all_([part], SGD, 6, 0.125, SGD.decay(6), [True], starts=[start])
    assert torch.equal(_bits(torch.cat(parts)), _bits(want))


def test_bad_starts_fail_before_any_tensor_is_touched():
    ts = [_tensor(torch.float32, (4,), seed=1), _tensor(torch.float32, (4,), seed=2)]
    before = [t.clone() for t in ts]
    with pytest.raises(ValueError, match="2 tensors but 1 shard starts"):
        steps.perturb_all_(ts, SGD, 0, SGD.eps, starts=[0])
    with pytest.raises(ValueError, match="non-negative"):
        steps.perturb_all_(ts, SGD, 0, SGD.eps, starts=[0, -8])
    with pytest.raises(ValueError, match="non-negative"):
        steps.replay_tensor_(ts[0], SGD, 0, [(0.5, 0.0)], start=-1)
    assert all(torch.equal(x, y) for x, y in zip(ts, before))


@pytest.mark.skipif(not triton_kernels.available() or not triton_kernels.interpreting(),
                    reason="needs Triton's interpreter")
def test_grouped_launch_tiles_a_shard_that_starts_mid_block():
    """The grouped kernel counts a shard's tiles from its start's place in its Philox block: a shard of
    BLOCK elements starting at element 8b+5 spans two tiles, and its last 5 elements must be reached."""
    block = 64
    whole = _tensor(torch.float32, (3 * block,), seed=4)
    want = whole.clone()
    triton_kernels.apply_group_([want], [0], [False], SGD, 0, triton_kernels.PERTURB, scale=SGD.eps, block=block)
    part = whole[5:5 + block].clone()
    triton_kernels.apply_group_([part], [0], [False], SGD, 0, triton_kernels.PERTURB, scale=SGD.eps, block=block,
                                starts=[5])
    assert torch.equal(_bits(part), _bits(want[5:5 + block]))


# --- fingerprints of a tensor held in shards ---------------------------------------------------------------

def _nan_payloads(t: torch.Tensor) -> torch.Tensor:
    """t with NaNs of several payloads and signs: canonicalised, they hash as one."""
    ints = t.clone().view(INT_VIEW[t.dtype]).reshape(-1)
    nans = {torch.float32: [0x7FC00001, -0x00400001, 0x7F800001, 0x7FFFFFFF],
            torch.bfloat16: [0x7F81, -0x003F, 0x7FFF, 0x7FC1],
            torch.float16: [0x7C01, -0x01FF, 0x7FFF, 0x7E01]}[t.dtype]
    for i, v in zip((0, 7, 8, ints.numel() - 1), nans):
        ints[i] = v
    return ints.view(t.dtype).reshape(t.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sharded_fingerprint_equals_the_whole_tensors(dtype):
    whole = _nan_payloads(_tensor(dtype, (23, 7), seed=11))
    want = tensor_fingerprint(whole)
    flat = whole.reshape(-1)
    n = flat.numel()
    for world in (1, 2, 3, 4, 23, 30):  # FSDP-like dim-0 chunks, empty ones included
        parts = [whole[slice(*chunk_rows(23, world, r))] for r in range(world)]
        assert fingerprint_chunks(dtype, whole.shape, parts) == want, world
    for cuts in ([0, 1, n], [0, 7, 8, 9, 16, n], [0, 0, n, n], [0, n - 1, n]):  # off and on word blocks, empties
        assert fingerprint_chunks(NAMES[dtype], whole.shape, [flat[a:b] for a, b in zip(cuts, cuts[1:])]) == want
    raw = whole.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()  # little-endian host
    for cuts in ([0, 1, len(raw)], [0, 3, 5, 6, len(raw) - 1, len(raw)], list(range(0, len(raw) + 1, 5)) + [len(raw)]):
        assert fingerprint_chunks(dtype, whole.shape, [raw[a:b] for a, b in zip(cuts, cuts[1:])]) == want, cuts
    fp = ShardedFingerprint(dtype, whole.shape)  # tensors and whole-word byte runs mixed; non-contiguous shard
    fp.update(whole[:4].t().contiguous().t())
    fp.update(np.frombuffer(whole[4:9].contiguous().view(torch.uint8).numpy().tobytes(), np.uint8))
    fp.update(memoryview(whole[9:].contiguous().view(torch.uint8).numpy().tobytes()))
    assert fp.hexdigest() == want


def test_sharded_fingerprint_of_scalars_and_empty_tensors():
    for t in (torch.tensor(1.5), torch.empty(0, 4), torch.empty(0)):
        assert fingerprint_chunks(t.dtype, t.shape, [t]) == tensor_fingerprint(t)
        assert fingerprint_chunks(t.dtype, t.shape, [t, t.reshape(-1)[:0]]) == tensor_fingerprint(t)


def test_sharded_fingerprint_refuses_too_few_or_too_many_elements():
    whole = _tensor(torch.bfloat16, (4, 3), seed=1)
    with pytest.raises(ValueError, match="holds 12 elements; the shards streamed hold 6 elements"):
        fingerprint_chunks("BF16", (4, 3), [whole[:2]])
    with pytest.raises(ValueError, match="holds 12 elements; the shards streamed so far hold 15"):
        fingerprint_chunks("BF16", (4, 3), [whole, whole[:1]])
    with pytest.raises(ValueError, match="stray bytes"):
        fingerprint_chunks("BF16", (4, 3), [whole.view(torch.uint8).reshape(-1).numpy().tobytes()[:-1]])
    with pytest.raises(ValueError, match="float16 shard in a BF16"):
        fingerprint_chunks("BF16", (4, 3), [whole.to(torch.float16)])
    with pytest.raises(ValueError, match="unsupported"):
        ShardedFingerprint(torch.float64, (2,))


# --- real DTensors and FSDP2 under torchrun (gloo, CPU) ----------------------------------------------------

WORKER = r'''
import math, os, sys
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.fsdp import fully_shard
from mezo_replay.arithmetic.rule import MezoSGD
from mezo_replay.format.fingerprint import tensor_fingerprint
from mezo_replay.kernels import steps
from mezo_replay.training import distributed, shards

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))
sgd = MezoSGD.create(lr=0.05, eps=1e-3, seed=2**33 + 7, weight_decay=0.2)
torch.manual_seed(0)  # the same whole tensors on every rank
wholes = [torch.randn(37, 13).to(torch.bfloat16), torch.randn(1, 5), torch.randn(9).to(torch.float16)]
wholes[0].view(torch.int16)[5, 3] = 0x7F81  # a NaN with a payload: fingerprints canonicalise it
params = [distribute_tensor(w.clone(), mesh, [Shard(0)]) for w in wholes]
params.append(distribute_tensor(torch.randn(6, 2), mesh, [Replicate()]))
wholes.append(params[-1].to_local().clone())
starts, local = zip(*(shards.local_shard_offset(p) for p in params))
for w, s, l in zip(wholes, starts, local):
    assert torch.equal(l.reshape(-1).view(torch.uint8), w.reshape(-1)[s:s + l.numel()].view(torch.uint8)), rank
decays = [True, False, True, True]
for ts, ss in ((wholes, None), (list(local), list(starts))):  # the same step, whole here and sharded
    steps.perturb_all_(ts, sgd, 3, sgd.eps, starts=ss)
    steps.update_perturb_all_(ts, sgd, 3, 0.5, sgd.decay(3), decays, starts=ss)
    steps.restore_update_all_(ts, sgd, 4, torch.tensor(-0.25), sgd.decay(4), decays, starts=ss)
for w, p in zip(wholes, params):  # the DTensors changed through their local storage
    assert torch.equal(p.full_tensor().view(torch.uint8), w.view(torch.uint8)), rank
    fp = shards.sharded_fingerprint(p)
    assert fp == (tensor_fingerprint(w) if rank == 0 or p.placements[0].is_replicate() else None), rank

model = torch.nn.Sequential(torch.nn.Linear(13, 37), torch.nn.Linear(37, 3))  # FSDP2's own sharding
full = [p.detach().clone() for p in model.parameters()]
fully_shard(model, mesh=mesh)
laid = [shards.local_shard_offset(p) for p in model.parameters()]
steps.perturb_all_([l for _, l in laid], sgd, 0, sgd.eps, starts=[s for s, _ in laid])
steps.perturb_all_(full, sgd, 0, sgd.eps)
for w, p in zip(full, model.parameters()):
    assert torch.equal(p.full_tensor().view(torch.uint8), w.view(torch.uint8)), rank
    fp = shards.sharded_fingerprint(p)
    assert fp == (tensor_fingerprint(w) if rank == 0 else None)
open(f"ok-{rank}", "w").close()  # a file per rank: two ranks' stdout lines can interleave
distributed.finish()  # not dist.destroy_process_group alone: see distributed._let_workers_finish
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_dtensor_and_fsdp2_shards_under_torchrun(tmp_path, world):
    """Real processes: DTensors sharded Shard(0) (uneven rows, an empty shard at 3 ranks, a replicated one)
    and FSDP2's fully_shard parameters take a step through their local shards with local_shard_offset's
    starts and gather to the whole tensors' bytes; sharded_fingerprint on rank 0 is the whole's."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
                          "--master-addr=127.0.0.1", f"--master-port={_free_port()}", str(script)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("ok-*")) == [f"ok-{r}" for r in range(world)]
