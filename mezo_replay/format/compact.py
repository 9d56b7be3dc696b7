"""Merging a finished trajectory's per-flush chunks, so that framing stops dominating its size.

A writer flushes a STEP chunk (and a loss chunk) every few hundred steps so that a crash loses little;
each chunk then pays a 12-byte head, a zstd frame and a cold compression context, which for fp8 and
sign records costs more than the records themselves. Once a run has ended cleanly nothing is left to
protect, so the file is rewritten with as few chunks as format.md allows: the same records, losses,
evaluations and fingerprints, read back and compared before the rewrite replaces the original.

Placement (format.md): an FPRT for step N must follow exactly N steps, so it (and any chunk whose rules
this code cannot know: unknown ancillary types) stays where it was in step terms and the STEP chunks
around it are merged on either side. `ckpt` and `eval` may follow the STEP chunk holding their step at
any distance: they move after the merged chunk. Loss chunks only need their steps recorded before
them: they merge across the whole file and go last. Everything before the first STEP chunk (HEAD,
INIT, ...) is copied byte for byte, and so is every chunk that is not merged.

The rewrite is a temporary file beside the original, fsynced, locked, then renamed over it while the
writer still holds the original's lock: a concurrent writer never finds the name unlocked, a reader
sees the old file or the new one. Any failure (a full disk) leaves the original untouched.
"""
from __future__ import annotations

import json
import os
import secrets
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from .filelock import FileLock
from .mzt import (CHUNK_HEAD, CKPT, MAGIC, FORMAT_VERSION, MAX_CHUNK_BYTES, MAX_STEPS_PER_CHUNK, MAX_WINDOW_BYTES,
                  PREAMBLE, MezoSGD, StepCodec, Trajectory, _LOSS_WIDTH, _read_chunk, fsync_dir, read_trajectory)

# steps per merged chunk (records per STEP chunk with n-SPSA): format.md's limit; a test lowers it
MAX_MERGED = MAX_STEPS_PER_CHUNK
_MOVABLE = {"ckpt", "eval"}   # may follow their step's STEP chunk at any distance


class CompactionWarning(UserWarning):
    """The run succeeded but its file could not be compacted; it keeps its per-flush chunks."""


@dataclass
class CompactResult:
    compacted: bool
    bytes_before: int
    bytes_after: int


def _frame(cctx: zstandard.ZstdCompressor, ctype: bytes, data: bytes) -> bytes:
    payload = cctx.compress(data)
    if len(payload) > MAX_CHUNK_BYTES:  # cannot happen for <= 2 MiB of records; never write what readers refuse
        raise ValueError(f"a merged {ctype.decode()} chunk compresses to {len(payload)} bytes")
    return CHUNK_HEAD.pack(len(payload), ctype, zlib.crc32(payload, zlib.crc32(ctype))) + payload


def _raw(ctype: str, payload: bytes) -> bytes:
    raw_type = ctype.encode("ascii")
    return CHUNK_HEAD.pack(len(payload), raw_type, zlib.crc32(payload, zlib.crc32(raw_type))) + payload


Item = tuple  # ("step", first, records) | ("loss", ctype, first, planes) | ("raw", ctype, chunk bytes)


def _items(path: Path, end: int) -> tuple[bytes, StepCodec, list[Item], int]:
    """The preamble, codec and chunks of the first `end` bytes of the complete trajectory at `path`:
    STEP and loss chunks decoded (records; byte planes), every other chunk as its bytes."""
    dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_BYTES)
    items: list[Item] = []
    codec: StepCodec | None = None
    with open(path, "rb") as f:
        pre = f.read(PREAMBLE.size)
        if pre[:len(MAGIC)] != MAGIC or PREAMBLE.unpack(pre)[1:] != (FORMAT_VERSION, 0):
            raise ValueError(f"{path} is not a version {FORMAT_VERSION} trajectory")
        offset = PREAMBLE.size
        while offset < end:
            chunk = _read_chunk(f, offset, end)
            if chunk is None:
                raise ValueError(f"{path}: a chunk at byte {offset} is cut short")
            ctype, payload = chunk
            offset += CHUNK_HEAD.size + len(payload)
            if ctype == "HEAD":
                codec = StepCodec(MezoSGD.from_header(json.loads(dctx.decompress(payload))))
            if ctype == "STEP":
                assert codec is not None
                items.append(("step", *codec.decode(dctx.decompress(payload))))
            elif ctype in _LOSS_WIDTH:
                data = dctx.decompress(payload)
                first, count = struct.unpack_from("<II", data)
                items.append(("loss", ctype, first,
                              np.frombuffer(data, np.uint8, offset=8).reshape(_LOSS_WIDTH[ctype], count)))
            else:
                items.append(("raw", ctype, _raw(ctype, payload)))
    assert codec is not None
    return pre, codec, items, len(items)


def _build(pre: bytes, codec: StepCodec, items: list[Item]) -> tuple[bytes, int]:
    """The file of these chunks with consecutive STEP chunks merged (up to the limit), `ckpt`/`eval` after
    them, every other chunk in its place in step terms, and the losses merged at the end; and its number
    of chunks."""
    cctx = zstandard.ZstdCompressor(level=19, write_checksum=True, write_content_size=True)
    out: list[bytes] = [pre]
    steps: list[np.ndarray] = []          # records of the STEP chunks not yet written
    step_first = 0                        # the first step of `steps`
    held: list[bytes] = []                # ckpt/eval chunks waiting for the merged STEP chunks
    losses: list[tuple[str, int, np.ndarray]] = []   # type, first step, byte planes (width, count)
    seen_step = False

    def emit_steps() -> None:
        nonlocal step_first
        if steps:
            records = np.concatenate(steps)
            per = max(1, MAX_MERGED // codec.per_step)
            for at in range(0, records.shape[0], per):
                out.append(_frame(cctx, b"STEP", codec.encode(step_first + at, records[at:at + per].reshape(-1))))
            step_first += records.shape[0]
            steps.clear()
        out.extend(held)
        held.clear()

    for item in items:
        if item[0] == "step":
            if not seen_step:
                seen_step, step_first = True, item[1]
            steps.append(item[2])
        elif item[0] == "loss":
            losses.append(item[1:])
        elif not seen_step:
            out.append(item[2])  # HEAD, INIT, what sits before the first step: as it was
        elif item[1] in _MOVABLE:
            held.append(item[2])
        else:  # FPRT, or a type whose placement rules are unknown here: it keeps its place in step terms
            emit_steps()
            out.append(item[2])
    emit_steps()
    # losses: consecutive chunks of one type covering contiguous steps become one (up to the step limit)
    runs: list[tuple[str, int, list[np.ndarray]]] = []
    for ctype, first, planes in losses:
        if runs and runs[-1][0] == ctype and runs[-1][1] + sum(p.shape[1] for p in runs[-1][2]) == first:
            runs[-1][2].append(planes)
        else:
            runs.append((ctype, first, [planes]))
    for ctype, first, parts in runs:
        planes = np.concatenate(parts, axis=1)
        for at in range(0, planes.shape[1], MAX_MERGED):
            part = planes[:, at:at + MAX_MERGED]
            head = struct.pack("<II", first + at, part.shape[1])
            out.append(_frame(cctx, ctype.encode("ascii"), head + np.ascontiguousarray(part).tobytes()))
    return b"".join(out), len(out) - 1


def compacted_bytes(path: Path, end: int) -> tuple[bytes, int]:
    """The compacted form of the first `end` bytes of the trajectory at `path` (a complete file: the
    writer's own, just flushed), and how many chunks it merged away (0: nothing to gain)."""
    pre, codec, items, n_in = _items(path, end)
    data, n_out = _build(pre, codec, items)
    return data, n_in - n_out


def through_checkpoint(path: Path, step: int, end: int) -> bytes | None:
    """The trajectory as a run that stopped right after recording its `ckpt` for `step` would have
    left it, compacted: what MeZOTrainer's resume_from_checkpoint continues from when the file was
    compacted (its `ckpt` chunks then follow the merged steps). None if there is no such `ckpt`, or a
    fingerprint of a later step precedes it."""
    dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_BYTES)
    pre, codec, items, _ = _items(path, end)
    kept: list[Item] = []
    seen = 0      # steps in the STEP chunks so far
    found = False
    for item in items:
        if item[0] == "step":
            if not found and seen < step:
                kept.append(("step", item[1], item[2][:step - seen]))
            seen += item[2].shape[0]
        elif item[0] == "loss":
            ctype, first, planes = item[1:]
            if first < step:
                kept.append(("loss", ctype, first, planes[:, :step - first]))
        elif not found:
            ctype, raw = item[1], item[2]
            if ctype == "FPRT" and seen > step:
                return None  # a fingerprint of steps beyond the checkpoint comes first
            kept.append(item)
            if ctype == "ckpt" and CKPT.unpack(dctx.decompress(raw[CHUNK_HEAD.size:]))[0] == step:
                found = True
    if not found or seen < step:
        return None
    return _build(pre, codec, kept)[0]


def _same(a: Trajectory, b: Trajectory) -> bool:
    """Every decoded field a reader sees, compared exactly (losses bit for bit, NaNs included)."""
    if a.header != b.header or not np.array_equal(a.grad_bits, b.grad_bits):
        return False
    if (a.losses is None) != (b.losses is None):
        return False
    if a.losses is not None and a.losses.view(np.uint32).tobytes() != b.losses.view(np.uint32).tobytes():
        return False
    return (a.fingerprints == b.fingerprints and a.evals == b.evals and a.checkpoints == b.checkpoints
            and {k: bytes(v) for k, v in a.inits.items()} == {k: bytes(v) for k, v in b.inits.items()}
            and not (b.truncated or b.corrupt))


def _write_new(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def compact_locked(path: Path, end: int) -> CompactResult:
    """Rewrite the trajectory `path` (whose lock the caller holds, and whose bytes end at `end`) in
    compacted form. On any failure the original stays as it was and one CompactionWarning says why;
    the run that wrote it succeeded either way."""
    path = Path(path)
    tmp: Path | None = None
    lock: FileLock | None = None
    try:
        data, merged = compacted_bytes(path, end)
        if merged <= 0 or len(data) >= end:
            return CompactResult(False, end, end)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.compact.tmp")
        _write_new(tmp, data)
        try:
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        except OSError:
            pass
        if not _same(read_trajectory(path), read_trajectory(tmp)):
            raise ValueError("the compacted file does not read back as the original (a bug: please report it)")
        lock = FileLock.acquire(tmp)  # the new file is locked before it has the name
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.absolute().parent)
        return CompactResult(True, end, len(data))
    except Exception as e:  # noqa: BLE001 - compaction is an optimisation: never lose the run over it
        why = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else str(e) or type(e).__name__
        warnings.warn(f"{path}: not compacted ({why}); the file is complete and keeps its per-flush chunks",
                      CompactionWarning, stacklevel=3)
        return CompactResult(False, end, end)
    finally:
        if tmp is not None:
            try:
                tmp.unlink()
            except OSError:
                pass
        if lock is not None:
            lock.release()
