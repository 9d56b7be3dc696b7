"""A rebuild split over several workers (the local GPUs' threads, or torchrun's ranks): who replays which
tensor, in which order the one writer takes the results, and the threaded engine for local devices.

Why a split is exact: every tuned tensor replays on its own (its noise is keyed by the tensor's index and
its elements' indices, never by where it runs), so any assignment gives the bytes of one device; only the
time and the memory depend on it.

The assignment (`assign`) balances element-steps: a step costs the same for every tensor, so a tensor's
cost is its element count (plus one, so that empty tensors are spread too). Tensors are taken largest first
(ties: lower index first) and each goes to the part with the least cost so far (ties: the lower part): the
longest-processing-time rule, within 4/3 of the best split, and a pure function of the shapes and the part
count, so every rank computes the same one. Each part replays its tensors in index order.

The write order (`write_order`) is the order in which the results would be ready if every part ran at
the same speed: by the cost of the part up to and including the tensor (ties: lower index). The writer
takes them in that order, so no part waits for the writer for long and none holds more than a few results:
memory stays a few tensors per part, as in one process. Errors are reported as the first failing tensor in
write order, so the same inputs always give the same message.
"""
from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack

import torch

from ..errors import MezoReplayError
from . import pipeline

HANDOFF = 2  # results a local part may have ready ahead of the writer, besides its pipeline's own
_POLL = 0.05


def costs(shapes: Sequence[Sequence[int]]) -> list[int]:
    """The replay cost of each tensor, in element-steps per step."""
    return [math.prod(s) + 1 for s in shapes]


def assign(cost: Sequence[int], parts: int) -> list[int]:
    """The part (0..parts-1) that replays each tensor: largest first to the least loaded part."""
    if parts < 1:
        raise ValueError("a split needs at least one part")
    load = [0] * parts
    owner = [0] * len(cost)
    for k in sorted(range(len(cost)), key=lambda k: (-cost[k], k)):
        g = min(range(parts), key=lambda g: (load[g], g))
        owner[k] = g
        load[g] += cost[k]
    return owner


def write_order(cost: Sequence[int], owner: Sequence[int]) -> list[int]:
    """Every tensor index once, in the order the writer takes them (see the module's docstring)."""
    done: dict[int, int] = {}
    finish = []
    for k, g in enumerate(owner):
        done[g] = done.get(g, 0) + cost[k]
        finish.append(done[g])
    return sorted(range(len(owner)), key=lambda k: (finish[k], k))


def local_devices(spec: str) -> list[str]:
    """`cuda:all` as the list of local GPUs; refused in one line where torch sees none."""
    if spec != "cuda:all":
        raise ValueError(f"{spec}: not a device list")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise MezoReplayError("--device cuda:all: torch sees no CUDA device here")
    return [f"cuda:{i}" for i in range(n)]


class _Stopped(Exception):
    """The writer stopped (an error elsewhere, or an interrupt): a part's thread just ends."""


def _put(box: queue.Queue, item: object, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            box.put(item, timeout=_POLL)
            return
        except queue.Full:
            continue
    raise _Stopped


def _get(box: queue.Queue, thread: threading.Thread) -> object:
    while True:
        try:
            return box.get(timeout=_POLL)
        except queue.Empty:
            if not thread.is_alive() and box.empty():
                raise RuntimeError(f"{thread.name} ended without its result") from None


def run(owner: Sequence[int], order: Sequence[int], read: pipeline.Reader, kernel: pipeline.Kernel,
        finish: pipeline.Finisher, devices: Mapping[int, str], remote: Callable[[int], torch.Tensor] | None = None
        ) -> None:
    """finish(k, result) for every k in `order`, in the caller's thread. The parts in `devices` (part ->
    device) replay their tensors in a thread each (pipeline.run on that device, on a CUDA stream of its
    own); the other parts' results come from remote(k), also in the caller's thread. Raises the first
    failure in `order`; on any error or interrupt every thread is stopped and joined before it returns."""
    stop = threading.Event()
    boxes: dict[int, queue.Queue] = {g: queue.Queue(maxsize=HANDOFF) for g in devices}

    def part(g: int) -> None:
        mine = [k for k in range(len(owner)) if owner[k] == g]
        device = torch.device(devices[g])
        try:
            with ExitStack() as ctx:
                if device.type == "cuda":  # this thread's current device and stream; pipeline.run uses them
                    ctx.enter_context(torch.cuda.device(device))
                    ctx.enter_context(torch.cuda.stream(torch.cuda.Stream(device)))
                pipeline.run(len(mine), lambda j, pin: read(mine[j], pin), lambda j, w: kernel(mine[j], w),
                             lambda j, w: _put(boxes[g], (mine[j], w), stop), device)
        except _Stopped:
            return
        except BaseException as e:  # noqa: BLE001 -- handed to the writer, at this part's place in the order
            try:
                _put(boxes[g], e, stop)
            except _Stopped:
                return

    threads = {g: threading.Thread(target=part, args=(g,), name=f"mezo-replay-part-{g}", daemon=True)
               for g in devices}
    for t in threads.values():
        t.start()
    try:
        for k in order:
            g = owner[k]
            if g in boxes:
                item = _get(boxes[g], threads[g])
                if isinstance(item, BaseException):
                    raise item
                index, w = item  # type: ignore[misc]
                assert index == k, (index, k)
            elif remote is not None:
                item, w = None, remote(k)
            else:
                raise ValueError(f"part {g} has neither a device nor a remote")
            finish(k, w)
            item = w = None  # the result's memory goes once written
    finally:
        stop.set()
        for t in threads.values():
            while t.is_alive():  # in steps, so that Ctrl-C is taken while waiting
                t.join(_POLL)
