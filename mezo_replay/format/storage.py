"""What a trajectory's bytes are spent on, so that sizes are reported as whole files.

"Bytes per step" of step records alone undersells a file: losses, evaluations, fingerprints, the
header and the initial values of new tensors (a classifier head) are stored too, and can outweigh the
steps many times over. Initial values generated from the seed (a PEFT adapter's, spec/init.md) are
listed too, at 0 bytes, so a reader sees where an adapter's starting point went. `train` and `info` report both, from this walk over the chunks a reader used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import BinaryIO

import zstandard

from .mzt import CHUNK_HEAD, PREAMBLE, Trajectory

# chunk type -> what it holds, in the order reports list them
KINDS = {"HEAD": "header", "INIT": "init", "STEP": "steps", "loss": "losses", "lsbf": "losses", "eval": "evals",
         "FPRT": "fingerprints", "ckpt": "checkpoints"}
_INIT_INDEX_BYTES = 4  # spec/format.md: an INIT payload decompresses to u32 index, u64 offset, data


@dataclass
class Storage:
    """Bytes per kind of content, each including its chunks' 12-byte heads; they add up to file_bytes."""

    file_bytes: int
    steps: int
    by_kind: dict[str, int] = field(default_factory=dict)    # header (with the preamble), steps, ...
    chunks: dict[str, int] = field(default_factory=dict)     # number of chunks of each kind
    init_tensors: list[dict[str, object]] = field(default_factory=list)  # name, raw bytes, stored bytes
    # tensors whose initial values are generated from the seed (spec/init.md): name, raw bytes, the init
    # object; they cost 0 bytes beyond their header entry
    generated: list[dict[str, object]] = field(default_factory=list)

    @property
    def file_bytes_per_step(self) -> float:
        return self.file_bytes / self.steps if self.steps else 0.0

    def as_dict(self) -> dict[str, object]:
        return {"by_kind": dict(self.by_kind), "chunks": dict(self.chunks), "init_tensors": self.init_tensors,
                "generated_tensors": self.generated}


def storage(traj: Trajectory) -> Storage:
    """Walks the chunk heads of the part of the file the reader used (up to traj.valid_bytes); bytes
    past it (a torn last chunk, or a corrupt one and what follows) are counted as 'unread'. Costs one
    12-byte read per chunk, plus a few decompressed bytes per INIT chunk to learn its tensor."""
    by_kind = {"header": PREAMBLE.size}
    chunks: dict[str, int] = {}
    init_stored: dict[int, int] = {}
    offset = PREAMBLE.size
    with open(traj.path, "rb") as f:
        while offset + CHUNK_HEAD.size <= traj.valid_bytes:
            f.seek(offset)
            head = f.read(CHUNK_HEAD.size)
            if len(head) < CHUNK_HEAD.size:
                break  # the file shrank since it was read
            length, raw_type, _ = CHUNK_HEAD.unpack(head)
            size = CHUNK_HEAD.size + length
            if offset + size > traj.valid_bytes:
                break  # the file changed since it was read: stop at what the reader saw
            ctype = raw_type.decode("ascii", "replace")
            kind = KINDS.get(ctype, "other")
            by_kind[kind] = by_kind.get(kind, 0) + size
            chunks[kind] = chunks.get(kind, 0) + 1
            if kind == "init":
                index = _init_index(f)
                init_stored[index] = init_stored.get(index, 0) + size
            offset += size
    if traj.file_bytes > offset:
        by_kind["unread"] = traj.file_bytes - offset
    order = [*dict.fromkeys(KINDS.values()), "other", "unread"]
    tensors = traj.header.get("tensors", [])
    inits = [{"name": tensors[k]["name"], "raw_bytes": math.prod(tensors[k]["shape"]) * _itemsize(tensors[k]["dtype"]),
              "stored_bytes": n} if 0 <= k < len(tensors) else {"name": f"#{k}", "raw_bytes": 0, "stored_bytes": n}
             for k, n in sorted(init_stored.items())]
    generated = [{"name": t["name"], "raw_bytes": math.prod(t["shape"]) * _itemsize(t["dtype"]), "stored_bytes": 0,
                  "init": t["init"]} for t in tensors if isinstance(t.get("init"), dict)]
    return Storage(traj.file_bytes, traj.steps, {k: by_kind[k] for k in order if k in by_kind},
                   {k: chunks[k] for k in order if k in chunks}, inits, generated)


def _init_index(f: BinaryIO) -> int:
    """The tensor index at the start of the INIT payload `f` is positioned at, decompressing only its
    first bytes (a payload can be 64 MiB)."""
    try:
        with zstandard.ZstdDecompressor().stream_reader(f, read_size=4096, closefd=False) as r:
            head = r.read(_INIT_INDEX_BYTES)
    except zstandard.ZstdError:
        return -1
    return int.from_bytes(head, "little") if len(head) == _INIT_INDEX_BYTES else -1


def _itemsize(dtype: str) -> int:
    return {"F32": 4, "BF16": 2, "F16": 2}.get(dtype, 0)
