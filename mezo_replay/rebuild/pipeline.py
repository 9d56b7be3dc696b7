"""Tensor-level pipelining of a rebuild: while tensor k is in the kernel, tensor k+1 is read, checked and
copied to the device, and tensor k-1 is copied back, checked and written.

A rebuild is a chain of stages per tensor (read, base fingerprint, host->device, kernel, device->host,
result fingerprint, write) of which only the kernel needs the accelerator; run one after the other, the
rest (about 14 s of 46 for a 1.3B model on an H100) leaves it idle. Here a reader thread and a writer thread
run those stages for the neighbouring tensors while the caller's thread runs the kernel (and so reports
progress, and takes Ctrl-C, as before). The file reads, hashing and writes release the GIL.

Memory bound: at most `in_flight` (default 3) tuned tensors exist at once, on the host and, on a GPU, on
the device: a tensor is read into one host buffer that also receives its result, and a slot is only
freed once the writer is done with it. Peak memory is about in_flight x the largest tuned tensor.

Errors are the sequential path's: the one raised is that of the earliest tensor, and within a tensor the
earliest stage, whatever thread saw it first; a base tensor is checked before its kernel runs; on any error
or interrupt both threads are stopped and joined before the call returns, so the caller's writer can abort
with nothing still writing into it.

CUDA: every device operation goes on the caller's current stream, so stream order alone makes the
host->device copy precede the kernel and the kernel precede the copy back; the only cross-thread wait is
the writer's event synchronize on the copy back. Host buffers are pinned so both copies are asynchronous.
(A separate copy stream would hide the two copies too, about 0.2 s for a 1.3B bf16 model at PCIe speed,
at the price of cross-stream allocator bookkeeping; not worth it.)
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

IN_FLIGHT = 3  # one being read, one in the kernel, one being written
_POLL = 0.05  # seconds between checks of the stop flag while a thread waits

Reader = Callable[[int, bool], torch.Tensor]  # (index, pin_memory) -> the checked base tensor, on the host
Kernel = Callable[[int, torch.Tensor], None]  # replays tensor index in place (caller's thread)
Finisher = Callable[[int, torch.Tensor], None]  # takes the result on the host (writer thread)


@dataclass
class _Slot:
    index: int
    host: torch.Tensor  # the base as read; the result is copied back into it
    work: torch.Tensor  # what the kernel updates: `host` itself on the CPU, its device copy otherwise
    done: torch.cuda.Event | None = None  # CUDA: recorded after the copy back


class _Failure:
    """An exception raised by a worker thread for the tensor at `index`, to be re-raised by the caller."""

    def __init__(self, index: int, error: BaseException) -> None:
        self.index, self.error = index, error


def run(count: int, read: Reader, kernel: Kernel, finish: Finisher, device: torch.device | str = "cpu",
        in_flight: int | None = None) -> None:
    """read(k), kernel(k, w) and finish(k, w) for k in 0..count-1, each stage in index order, overlapped
    across tensors; returns when every finish has returned, raises what the sequential loop would have."""
    if count == 0:
        return
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda and device.index is None:  # the worker threads' current device need not be the caller's
        device = torch.device("cuda", torch.cuda.current_device())
    stream = torch.cuda.current_stream(device) if cuda else None
    stop, stop_reading = threading.Event(), threading.Event()
    slots = threading.Semaphore(max(1, IN_FLIGHT if in_flight is None else in_flight))
    ready: queue.Queue[_Slot | _Failure] = queue.Queue()  # bounded by `slots`
    results: queue.Queue[_Slot | None] = queue.Queue()  # None: no more
    failed: list[_Failure] = []  # the writer's first failure

    def acquire() -> bool:
        while not stop_reading.is_set():
            if slots.acquire(timeout=_POLL):
                return True
        return False

    def reader() -> None:
        for k in range(count):
            if not acquire():
                return
            try:
                host = read(k, cuda)
                work = host
                if cuda:
                    with torch.cuda.device(device), torch.cuda.stream(stream):
                        work = torch.empty_like(host, device=device)
                        work.copy_(host, non_blocking=True)
            except BaseException as e:  # noqa: BLE001 -- handed to the caller's thread
                ready.put(_Failure(k, e))
                return
            ready.put(_Slot(k, host, work))
            del host, work  # the slot's memory is the writer's to free now
            if stop_reading.is_set():
                return

    def writer() -> None:
        while True:
            slot = results.get()
            if slot is None or stop.is_set() or failed:
                return
            try:
                if slot.done is not None:
                    slot.done.synchronize()
                finish(slot.index, slot.host)
            except BaseException as e:  # noqa: BLE001 -- handed to the caller's thread
                failed.append(_Failure(slot.index, e))
                return
            finally:
                del slot
                slots.release()

    threads = [threading.Thread(target=reader, name="mezo-replay-reader", daemon=True),
               threading.Thread(target=writer, name="mezo-replay-writer", daemon=True)]
    for t in threads:
        t.start()
    clean = False
    try:
        for k in range(count):
            item = _next(ready, failed)
            if failed:
                break
            try:
                if isinstance(item, _Failure):
                    raise item.error
                kernel(k, item.work)
                if cuda:
                    with torch.cuda.device(device), torch.cuda.stream(stream):
                        item.host.copy_(item.work, non_blocking=True)
                        item.done = torch.cuda.Event(blocking=True)  # the writer sleeps on it, not spins
                        item.done.record(stream)
                    item.work = item.host  # the device copy goes back to the allocator (stream-ordered)
            except Exception:
                stop_reading.set()
                _finish_earlier(results, threads[1], failed)  # a result before k that fails wins, as it would
                raise
            results.put(item)
            del item
        results.put(None)
        _join(threads[1])
        if failed:
            raise failed[0].error
        clean = True
    finally:
        stop_reading.set()
        stop.set()
        if not clean:
            results.put(None)
        for t in threads:
            _join(t)
        if cuda:
            empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
            if empty is not None:
                empty()  # the pinned buffers of this rebuild, kept by torch's host cache otherwise


def _next(ready: queue.Queue, failed: list[_Failure]) -> _Slot | _Failure:
    """The reader's next item; gives up (returning a placeholder) once the writer has failed, since its
    error is then the one to raise. Polls so that Ctrl-C is taken promptly."""
    while not failed:
        try:
            return ready.get(timeout=_POLL)
        except queue.Empty:
            continue
    return _Failure(-1, RuntimeError("unreachable"))


def _finish_earlier(results: queue.Queue, writer: threading.Thread, failed: list[_Failure]) -> None:
    """Lets the writer finish the tensors before the failing one, so that one of them failing its check
    is reported in its place, as the sequential loop would have; then re-raises that error."""
    results.put(None)
    _join(writer)
    if failed:
        raise failed[0].error from None


def _join(thread: threading.Thread) -> None:
    while thread.is_alive():  # in steps, so that Ctrl-C is taken while waiting
        thread.join(_POLL)
