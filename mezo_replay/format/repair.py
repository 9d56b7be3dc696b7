"""Recovering the longest valid prefix of a damaged trajectory (`mezo-replay repair`).

A trajectory is append-only and every chunk is checksummed, so the chunks before the first damaged one
are exactly what the writer wrote, and spec/format.md lets a reader replay the steps they hold. Repair
copies those bytes unchanged (nothing is decoded and written again, so nothing can drift) and drops the
rest. It writes a new file unless asked to replace the damaged one, and never half-writes either: the
copy is written beside its target and renamed into place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

from ..errors import MezoReplayError, TrajectoryError
from .filelock import FileLock
from .mzt import _write_all, create_locked, read_trajectory

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class RepairReport:
    source: Path
    out: Path
    steps: int                    # steps kept
    kept_bytes: int
    file_bytes: int               # of the damaged file
    damage: str                   # what was dropped, and why
    fingerprint_steps: list[int]  # steps with a fingerprint in the kept part

    @property
    def dropped_bytes(self) -> int:
        return self.file_bytes - self.kept_bytes

    @property
    def verifiable(self) -> bool:
        """The kept part ends with a fingerprint of its last step: a rebuild of it is checked."""
        return self.steps in self.fingerprint_steps


def default_output(path: Path) -> Path:
    return path.with_name(f"{path.stem}-repaired{path.suffix or '.mzt'}")


def repair(path: PathLike, out: PathLike | None = None, *, in_place: bool = False,
           overwrite: bool = False) -> RepairReport:
    """Write the valid prefix of the damaged trajectory `path` to `out` (default NAME-repaired.mzt), or
    over `path` itself with `in_place`. Refuses an intact file, and one that a writer holds."""
    path = Path(path)
    if in_place and out is not None:
        raise ValueError("give either an output or in_place, not both")
    target = path if in_place else Path(out) if out is not None else default_output(path)
    if not in_place and target.exists() and target.resolve() == path.resolve():
        raise MezoReplayError(f"the output {target} is the damaged file itself: pass --in-place to replace it")
    with FileLock.acquire(path) as lock:  # a file being written looks truncated: it is not damaged
        traj = read_trajectory(path, strict=False)
        if not traj.truncated and traj.corrupt is None:
            state = "" if traj.final_fingerprint is not None else (
                "; it has no final fingerprint (training stopped hard): `mezo-replay train --resume` continues it")
            raise MezoReplayError(f"{path} is intact ({traj.steps} steps, every chunk valid): nothing to "
                                  f"repair{state}")
        if traj.corrupt is not None:
            c = traj.corrupt
            damage = f"chunk {c.index} ({c.type}) at byte offset {c.offset:,} is corrupt: {c.reason}"
        else:
            damage = f"the file ends inside a chunk that starts at byte offset {traj.valid_bytes:,} (a torn write)"
        keep = traj.valid_bytes

        def fill(f: BinaryIO) -> None:
            with open(path, "rb") as src:
                left = keep
                while left:
                    block = src.read(min(left, 1 << 20))
                    if not block:
                        raise TrajectoryError(f"{path} shrank while it was being repaired")
                    _write_all(f, block)
                    left -= len(block)

        f, out_lock = create_locked(target, fill, overwrite=overwrite or in_place,
                                    replacing=lock if in_place else None)
        try:
            fixed = read_trajectory(target)  # a prefix of chunks that were valid: checked all the same
        finally:
            f.close()
            out_lock.release()
    if fixed.truncated or fixed.steps != traj.steps or fixed.file_bytes != keep:
        raise TrajectoryError(f"{target}: the repaired copy does not read back as {traj.steps} steps "
                              f"in {keep} bytes (please report this)")
    return RepairReport(path, target, traj.steps, keep, traj.file_bytes, damage, sorted(fixed.fingerprints))
