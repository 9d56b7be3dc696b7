"""A rebuild split over torchrun's ranks: each rank replays its share of the tuned tensors (spread.assign)
and rank 0 writes them all, as one process would.

Transport: point-to-point messages of raw bytes on a gloo group of all ranks (the results are on the host
anyway, and gloo carries them whatever the default backend is, so `--device cuda` works with nccl too).

Protocol, driven by rank 0 so that no rank ever blocks on a message that may not come:
  rank 0 -> rank r: (SEND, k) "your result for tensor k, now"; (OK, 0) the end, all written; or (STOP, 0)
  then the length and UTF-8 text of an error: every rank raises that error.
  rank r -> rank 0, only in answer to (SEND, k): (0, nbytes) then the tensor's raw bytes, or (1, nbytes)
  then "ErrorClass\\nmessage" when rank r failed on tensor k (a wrong base, say).
Rank 0 asks in the write order (spread.write_order), so a rank's results are taken about as fast as it
makes them and it holds only its pipeline's few tensors; rank 0 holds its own few plus the one it writes.
Every rank other than 0 ends on rank 0's OK or STOP, so a failure anywhere reaches every rank as one line
(a rank busy replaying takes the STOP when it next hands a result over: one tensor's replay later at most).
A rank that dies outright (killed, out of memory) is torchrun's to handle: it stops the others.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import MezoReplayError
from ..training.distributed import World
from . import pipeline

SEND, OK, STOP = 0, 1, 2
_CONTROL, _DATA = 1, 2  # message tags
# A rank waits for rank 0 while rank 0 replays or writes other ranks' tensors, which can take hours on
# CPUs; a rank that dies is torchrun's to stop, so the wait need not be short.
TIMEOUT = timedelta(seconds=float(os.environ.get("MEZO_REPLAY_REBUILD_TIMEOUT", str(7 * 24 * 3600))))


class _Stopped(Exception):
    """Rank 0 sent STOP: its message is the error every rank raises."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _error(kind: str, message: str) -> MezoReplayError:
    """The error another rank raised, as this rank raises it (same class where it is a rebuild error)."""
    from . import replay

    cls = {c.__name__: c for c in (replay.BaseMismatchError, replay.VerificationError)}.get(kind, MezoReplayError)
    return cls(message)


def _text(e: BaseException) -> tuple[str, str]:
    if isinstance(e, MezoReplayError):
        return type(e).__name__, str(e)
    if isinstance(e, KeyboardInterrupt):
        return "MezoReplayError", "interrupted"
    return "MezoReplayError", f"{type(e).__name__}: {e}"


class Crew:
    """The ranks of one distributed rebuild (every rank makes one, in the same order: it makes a group)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.group = dist.new_group(backend="gloo", timeout=TIMEOUT)

    def settle(self, error: BaseException | None, inputs: Any) -> None:
        """Collective, before any work: raises on every rank if any rank failed to prepare (the lowest
        such rank's error) or holds other inputs than rank 0 (a digest of the JSON-able `inputs`)."""
        mine = (_text(error) if error is not None else None,
                hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest())
        every: list[Any] = [None] * self.world.size
        dist.all_gather_object(every, mine, group=self.group)
        for rank, (failed, _) in enumerate(every):
            if failed is not None:
                if rank == self.world.rank and error is not None:
                    raise error
                raise _error(*failed)
        for rank, (_, digest) in enumerate(every):
            if digest != every[0][1]:
                raise MezoReplayError(f"rank {rank} has other inputs than rank 0 (trajectory, base, step or "
                                      f"output): every rank must run the same command on the same files")

    # --- rank 0 -------------------------------------------------------------------------------------

    def fetch(self, owner: int, index: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        """Tensor `index`'s result from the rank that replayed it (rank 0 only); raises that rank's error."""
        self._send(torch.tensor([SEND, index], dtype=torch.int64), owner)
        head = torch.empty(2, dtype=torch.int64)
        self._recv(head, owner, _DATA)
        status, nbytes = int(head[0]), int(head[1])
        raw = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            self._recv(raw, owner, _DATA)
        if status:
            kind, _, message = bytes(raw.numpy()).decode("utf-8", "replace").partition("\n")
            raise _error(kind, message)
        return raw.view(dtype).reshape(tuple(shape))

    @contextmanager
    def lead(self) -> Iterator[None]:
        """Around rank 0's whole rebuild: at the end every other rank learns the outcome (OK, or STOP and
        the error, which rank 0 raises too)."""
        try:
            yield
        except BaseException as e:
            self._tell(STOP, _text(e))
            raise
        self._tell(OK, None)

    def _tell(self, what: int, error: tuple[str, str] | None) -> None:
        text = b"" if error is None else "\n".join(error).encode()
        for rank in range(1, self.world.size):
            self._send(torch.tensor([what, 0], dtype=torch.int64), rank)
            if what == STOP:
                self._send(torch.tensor([len(text)], dtype=torch.int64), rank)
                if text:
                    self._send(torch.frombuffer(bytearray(text), dtype=torch.uint8), rank)

    # --- other ranks --------------------------------------------------------------------------------

    def follow(self, mine: Sequence[int], read: pipeline.Reader, kernel: pipeline.Kernel,
               device: torch.device | str) -> None:
        """Replays this rank's tensors (`mine`, in index order) and hands each to rank 0 when it asks;
        returns on rank 0's OK, raises the error rank 0 reports (this rank's own, or another's)."""
        try:
            try:
                pipeline.run(len(mine), lambda j, pin: read(mine[j], pin), lambda j, w: kernel(mine[j], w),
                             lambda j, w: self._answer(mine[j], w), device)
            except _Stopped:
                raise
            except BaseException as e:
                self._answer_error(e)
            what, _ = self._control()  # OK; STOP when rank 0 fails after this rank's last result
        except _Stopped as e:
            raise _error(e.kind, str(e)) from None
        if what != OK:
            raise MezoReplayError(f"rank 0 sent {what} where the end of the rebuild was due")

    def _control(self) -> tuple[int, int]:
        """Rank 0's next request; raises _Stopped on STOP."""
        head = torch.empty(2, dtype=torch.int64)
        self._recv(head, 0, _CONTROL)
        what, index = int(head[0]), int(head[1])
        if what == STOP:
            n = torch.empty(1, dtype=torch.int64)
            self._recv(n, 0, _CONTROL)
            raw = torch.empty(int(n[0]), dtype=torch.uint8)
            if raw.numel():
                self._recv(raw, 0, _CONTROL)
            kind, _, message = bytes(raw.numpy()).decode("utf-8", "replace").partition("\n")
            raise _Stopped(kind, message)
        return what, index

    def _answer(self, index: int, w: torch.Tensor) -> None:
        what, asked = self._control()
        if what != SEND or asked != index:
            raise MezoReplayError(f"rank 0 asked for tensor {asked} ({what}) where tensor {index} was due")
        raw = w.reshape(-1).view(torch.uint8) if w.numel() else torch.empty(0, dtype=torch.uint8)
        self._send(torch.tensor([0, raw.numel()], dtype=torch.int64), 0, _DATA)
        if raw.numel():
            self._send(raw.contiguous(), 0, _DATA)

    def _answer_error(self, e: BaseException) -> None:
        """Answers rank 0's next request (the failed tensor's) with the error, then waits for rank 0's STOP."""
        self._control()
        text = torch.frombuffer(bytearray("\n".join(_text(e)).encode()), dtype=torch.uint8)
        self._send(torch.tensor([1, text.numel()], dtype=torch.int64), 0, _DATA)
        self._send(text, 0, _DATA)
        self._control()  # STOP, raised
        raise MezoReplayError("rank 0 went on after this rank failed")  # not reached

    def _send(self, t: torch.Tensor, rank: int, tag: int = _CONTROL) -> None:
        dist.send(t, rank, group=self.group, tag=tag)

    def _recv(self, t: torch.Tensor, rank: int, tag: int) -> None:
        dist.recv(t, rank, group=self.group, tag=tag)
