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


@pytest.fixture(params=_backends())
def backend(request, monkeypatch):
    name, isa = request.param
    if isa is not None:  # steps picks the widest build: pin the one under test
        monkeypatch.setattr(cpu_kernel, "apply_", functools.partial(cpu_kernel.apply_, isa=isa))
    steps.set_backend(name)
    yield name
    steps.set_backend("auto")


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    n = math.prod(shape)
    return bits_to_torch(random_bits(NAMES[dtype], max(n, 16), seed=seed)[:n], NAMES[dtype], "cpu").reshape(shape)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype]).reshape(-1)


def chunk_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """Rows [r0, r1) rank `rank` holds under torch.chunk on dim 0 (FSDP2's Shard(0)): ceil-sized chunks,
    the last ones short or empty."""
    size = -(-rows // world) if rows else 0
    return min(rows, rank * size), min(rows, (rank + 1) * size)


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


@pytest.mark.parametrize("world,flat", [(2, False), (3, True), (4, False)])
def test_training_passes_on_shards_give_the_whole_tensors_bytes(backend, world, flat):
    whole = [_tensor(dt, shape, seed=i) for i, (dt, shape) in enumerate(PARAMS)]
    c = SGD.coefficient(0, rule.encode_grad(1.5))
    c_dev = torch.tensor(c, dtype=torch.float32)  # the optimizer's 0-dim c on the weights' device
    go = torch.tensor(False)
    want = [t.clone() for t in whole]
    _training_step(want, 0, None, c)
    _training_step(want, 2, None, c_dev, go)
    got = []
    for rank in range(world):
        local, starts = _shards(whole, world, rank, flat)
        _training_step(local, 0, starts, c)
        _training_step(local, 2, starts, c_dev, go)
        got.append(local)
    for k, w in enumerate(want):
        assert torch.equal(_bits(torch.cat([g[k] for g in got])), _bits(w)), (k, PARAMS[k])


def test_starts_default_to_whole_tensors(backend):
    """starts=None and starts of zeros are the same pass: the unsharded path is unchanged."""
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
