"""Data-parallel `mezo-replay train` under torchrun: what train.py adds on top of distributed.py.

Every rank holds the whole model, runs the same MeZO (same seed, same z) and takes its share of each
batch; the closure returns the loss of the whole batch, combined identically on every rank, so every rank
records the same projected gradient and the replicas never drift apart. What is left is keeping the ranks
in step outside the steps: a failure on one rank must stop all of them at the same point with one line
(`all_or_none`), a signal must stop all of them after the same step (`any_stop`), and a rank that dies must
end the others' runs cleanly, not in a hang (`PeerLost`, raised where a collective fails).
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from ..errors import MezoReplayError
from .data import Batch
from .distributed import World, combine
from .tasks import Task, macro_f1_of_counts

# The CLI prints an error carrying this attribute from rank 0 only: rank 0 raises the same failure (or
# names the rank that had it), so one line reaches the user instead of one per rank.
SHOWN_BY_RANK0 = "shown_by_rank0"


class PeerLost(MezoReplayError):
    """A collective failed mid-run: another rank died, was killed, failed on its own, or stopped answering
    (distributed.TIMEOUT)."""


def everywhere(error: BaseException) -> BaseException:
    """Marks an error that every rank raises alike, so that only rank 0 prints it."""
    setattr(error, SHOWN_BY_RANK0, True)
    return error


def _why(e: BaseException) -> str:
    """torch's message, its first sentence: gloo's starts with a source path ('[.../pair.cc:537] Read error
    ...: Connection reset by peer. This is typically caused by ...')."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0]


def lost(e: BaseException) -> PeerLost:
    return PeerLost(f"lost contact with another rank ({_why(e)})")


_CONTROL: dict[int, Any] = {}


def _control() -> Any:
    """The group for small host-side collectives (flags, error messages): the default group when it is
    gloo; under nccl a gloo group beside it, so that a flag never makes the host wait for a GPU's queue."""
    world_group = dist.group.WORLD
    if dist.get_backend() == "gloo":
        return None
    key = id(world_group)
    if key not in _CONTROL:
        _CONTROL.clear()
        _CONTROL[key] = dist.new_group(backend="gloo")
    return _CONTROL[key]


@contextmanager
def talking() -> Iterator[None]:
    """Turns the failure of a collective (torch raises RuntimeError, e.g. gloo's 'Connection reset by
    peer' when a rank dies) into PeerLost, one line."""
    try:
        yield
    except RuntimeError as e:
        raise lost(e) from None


@contextmanager
def all_or_none(world: World) -> Iterator[None]:
    """Runs the block on every rank, then raises on every rank if it raised on any: the failing rank its
    own error, the others one naming it. For the phases before the first step (loading, checks, resume),
    where otherwise one rank's refusal would leave the others waiting in their next collective."""
    if not world.distributed:
        yield
        return
    error: Exception | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - any failure here must reach the other ranks before they wait
        error = e
    messages: list[str | None] = [None] * world.size
    with talking():
        dist.all_gather_object(messages, None if error is None else str(error) or type(error).__name__,
                               group=_control())
    if error is not None:
        raise everywhere(error)
    for rank, message in enumerate(messages):
        if message is not None:
            raise everywhere(MezoReplayError(f"rank {rank}: {message}"))


def gather_object(value: Any, world: World) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (host-side)."""
    if not world.distributed:
        return [value]
    out: list[Any] = [None] * world.size
    with talking():
        dist.all_gather_object(out, value, group=_control())
    return out


def any_stop(flag: bool, world: World) -> bool:
    """Whether any rank was asked to stop (SIGINT, SIGTERM): every rank gets the same answer after the
    same step, so rank 0's file ends on a step every rank took. One small host-side all-reduce a step."""
    if not world.distributed:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    with talking():
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control())
    return bool(t.item())


def batch_loss(task: Task, model: Any, batch: Batch, objective: str, world: World) -> torch.Tensor:
    """The objective of the whole batch from this rank's part of it, the same bits on every rank.

    Sums over rows or tokens (ce, accuracy) go through distributed.combine: (sum, count) of each rank,
    added in rank order in binary64. Macro-F1 is not such a sum: the ranks add up their class counts
    (integers, exact in any order) and every rank computes F1 from the totals, as one process would."""
    if objective == "f1":
        counts = task.objective_counts(model, batch)
        parts = [torch.empty_like(counts) for _ in range(world.size)]
        with talking():
            dist.all_gather(parts, counts)
        return 1 - macro_f1_of_counts(torch.stack(parts).sum(0))
    loss_sum, count = task.objective_sum(model, batch, objective)
    with talking():
        return combine(loss_sum, count, world)
