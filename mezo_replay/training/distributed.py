"""Several processes, one trajectory: the pieces of torch.distributed that MeZO needs, and nothing more.

Why so little: a MeZO step moves every replica by the same scalar along the same z, and z is a function of
(seed, step, tensor, element index). So data parallelism needs no gradient traffic at all, only that every
rank derives the same projected gradient from the two losses: each rank computes its share of the batch,
the (loss sum, count) pairs are all-gathered and added in rank order in binary64, and every rank reads the
same bits. Everything else (which rank writes the file, agreeing on settings) is a few small collectives.
The process group is torch's own (torchrun sets the environment; gloo on CPUs, nccl on GPUs).
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import MezoReplayError

# How long a collective may wait for a rank that stopped answering before it fails (torch's default is 30
# minutes for gloo): long enough for the slowest step of a big model, short enough for a user to see why.
TIMEOUT = timedelta(seconds=float(os.environ.get("MEZO_REPLAY_DIST_TIMEOUT", "600")))


@dataclass(frozen=True)
class World:
    """This process's place among the ranks; World() is the one-process world."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and draws progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched() -> bool:
    """Whether torchrun (or another launcher with its environment) started this process among others."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str) -> tuple[World, str]:
    """Joins the launcher's process group when there is one, and returns the world and this rank's device
    (`cuda` becomes `cuda:LOCAL_RANK`). Without a launcher: the one-process world, the device unchanged."""
    if not launched():
        return World(), device
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    kind = torch.device(device).type
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise MezoReplayError("--device cuda, but torch sees no CUDA device on this rank")
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", timeout=TIMEOUT,
                                **({"device_id": torch.device(device)} if kind == "cuda" else {}))
    guard_exit()
    return World(rank, size, local), device


def current() -> World:
    """The world of an initialised process group, else the one-process world."""
    if dist.is_available() and dist.is_initialized():
        guard_exit()  # a group someone else joined (Trainer, accelerate) carries the same exit hazard
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return World()


def finish() -> None:
    """Leaves the process group (idempotent), so that torchrun sees a clean exit."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _let_workers_finish()


# Why the process must not finalize right after a collective: a gloo worker thread marks a collective done and
# only then drops its own reference to the collective's tensors; dropping the last one releases their Python
# objects, which takes the GIL. If the main thread has meanwhile run to the end of the program, the interpreter
# is finalizing, a thread that asks for the GIL is made to exit, and unwinding the C++ destructor aborts the
# whole process ("terminate called without an active exception", SIGABRT) after all of its work was done and
# checked. Releasing the GIL for a moment before finalization lets the worker threads finish their drops.
# destroy_process_group alone cannot do it: the group lives on while anything (a DeviceMesh, FSDP) holds it.
_WORKERS_GRACE_S = 0.05
_guarded = False


def _let_workers_finish() -> None:
    time.sleep(_WORKERS_GRACE_S)  # sleeping releases the GIL to the threads waiting for it


def guard_exit() -> None:
    """Makes interpreter exit wait a moment for torch.distributed's worker threads (see above): called by
    whatever joins or uses a process group in this process, once."""
    global _guarded
    if not _guarded:
        _guarded = True
        atexit.register(_let_workers_finish)


def share(n: int, world: World) -> slice:
    """This rank's rows of an n-row batch: contiguous, in rank order, sizes differing by at most one."""
    return slice(world.rank * n // world.size, (world.rank + 1) * n // world.size)


def combine(loss_sum: torch.Tensor, count: float, world: World) -> torch.Tensor:
    """The mean loss of the whole batch, identical on every rank: every rank's (sum, count) gathered, then
    added in rank order in binary64 (a fixed order; an all-reduce may add in any). 0-dim float64 on the
    loss's device. One rank: loss_sum / count, in binary64."""
    pair = torch.stack((loss_sum.detach().reshape(()).to(torch.float64),
                        torch.tensor(float(count), dtype=torch.float64, device=loss_sum.device)))
    if not world.distributed:
        return pair[0] / pair[1]
    parts = [torch.empty_like(pair) for _ in range(world.size)]
    dist.all_gather(parts, pair)
    total, n = parts[0][0], parts[0][1]
    for p in parts[1:]:
        total, n = total + p[0], n + p[1]
    return total / n


def agree(what: str, value: Any, world: World) -> None:
    """Refuses to go on unless every rank holds the same JSON-able `value` (settings, a fingerprint): one
    line naming the first rank that differs from rank 0, raised on every rank."""
    if not world.distributed:
        return
    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
    digests: list[str | None] = [None] * world.size
    dist.all_gather_object(digests, digest)
    for rank, d in enumerate(digests):
        if d != digests[0]:
            raise MezoReplayError(f"rank {rank} has other {what} than rank 0: every rank must start the same run "
                                  "(same command, files and environment)")


def broadcast(value: Any, world: World) -> Any:
    """Rank 0's value of a picklable object, on every rank (e.g. the step a resume starts from)."""
    if not world.distributed:
        return value
    box = [value if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
