"""Streaming access to safetensors checkpoints, and a writer that mirrors a base checkpoint's layout.

Reconstruction touches one tensor at a time so that peak memory stays near the largest tensor, so everything
here works on byte ranges with positioned reads and writes rather than loading whole files. Headers are
parsed here rather than by the safetensors library so that a hostile or corrupt file fails with a precise,
one-line CheckpointError before anything is allocated from its claims. Pickle-based weights are never opened.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import secrets
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..errors import CheckpointError, OutputExistsError
from .fingerprint import base_fingerprint, fingerprint_raw

MAX_HEADER_BYTES = 100_000_000  # a real header is a few MB even for huge models; more means a hostile file
COPY_CHUNK = 64 << 20
_OWN_MAPPING = 1 << 20  # tensors this large are read into memory of their own (see _fresh)
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl"})
# Copies of the base weights in other formats would be stale in the output, so they are skipped, not carried.
OTHER_WEIGHT_SUFFIXES = frozenset({".h5", ".msgpack", ".onnx", ".gguf"})

# safetensors dtype -> (bytes per element, torch dtype or None where this torch build lacks it).
# Sub-byte dtypes (F4, F6_*) are deliberately absent: their sizes don't follow shape * itemsize.
_DTYPES: dict[str, tuple[int, torch.dtype | None]] = {
    name: (size, getattr(torch, tname, None))
    for name, size, tname in [
        ("BOOL", 1, "bool"), ("U8", 1, "uint8"), ("I8", 1, "int8"), ("F8_E5M2", 1, "float8_e5m2"),
        ("F8_E4M3", 1, "float8_e4m3fn"), ("F8_E8M0", 1, "float8_e8m0fnu"), ("I16", 2, "int16"),
        ("U16", 2, "uint16"), ("F16", 2, "float16"), ("BF16", 2, "bfloat16"), ("I32", 4, "int32"),
        ("U32", 4, "uint32"), ("F32", 4, "float32"), ("I64", 8, "int64"), ("U64", 8, "uint64"),
        ("F64", 8, "float64"), ("C64", 8, "complex64"),
    ]
}
_TORCH_TO_ST = {dt: name for name, (_, dt) in _DTYPES.items() if dt is not None}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offsets of the data within `file`
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _r(value: Any) -> str:
    """Untrusted values go into one-line messages: repr escapes newlines, and the cut bounds the length."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last duplicate; two entries for one tensor must be an error instead.
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {_r(key)}")
        obj[key] = value
    return obj


def _load_json(raw: bytes, file: Path, what: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = " ".join(str(e).split())[:120]
        raise CheckpointError(f"{file}: {what} is not valid JSON ({reason})") from None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _read_into(fh: BinaryIO, view: memoryview, offset: int, file: Path) -> None:
    fh.seek(offset)
    while view.nbytes:  # raw reads may return short (e.g. the ~2 GiB per-call limit on Linux)
        n = fh.readinto(view)
        if not n:
            raise CheckpointError(f"{file}: unexpected end of file at byte {offset} (truncated while open?)")
        view, offset = view[n:], offset + n


def _write_at(fh: BinaryIO, view: memoryview, offset: int) -> None:
    fh.seek(offset)
    while view.nbytes:
        view = view[fh.write(view) :]


def _byte_view(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor without a copy; going through uint8 also covers bf16."""
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def _fresh(shape: tuple[int, ...], dtype: torch.dtype, nbytes: int, pin_memory: bool) -> torch.Tensor:
    """An uninitialised tensor for a read. A large one gets its own anonymous mapping, unmapped when the
    tensor dies: from malloc, freed tensors linger in the arenas of the threads that read them (about two
    tensors per thread measured), so a pipelined rebuild's memory would no longer be a few tensors."""
    if pin_memory or nbytes < _OWN_MAPPING:
        return torch.empty(shape, dtype=dtype, pin_memory=pin_memory)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


def _parse_file(file: Path) -> tuple[tuple[int, int], dict[str, str], list[TensorEntry]]:
    """Validate one safetensors file; returns ((data start, file size), __metadata__, entries by offset)."""

    def fail(problem: str) -> CheckpointError:
        return CheckpointError(f"{file}: {problem}")

    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise fail(f"file is {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise fail(f"header length {n} exceeds the {MAX_HEADER_BYTES} byte cap")
            if n > size - 8:
                raise fail(f"header length {n} exceeds the file size ({size} bytes)")
            raw = fh.read(n)
    except OSError as e:
        raise fail(f"cannot read ({e.strerror})") from None

    header = _load_json(raw, file, "header")
    if not isinstance(header, dict):
        raise fail("header is not a JSON object")
    meta = header.pop("__metadata__", None)
    meta = {} if meta is None else meta
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise fail("__metadata__ must map strings to strings")

    data_start = 8 + n
    buffer_len = size - data_start
    entries = []
    for name, info in header.items():
        what = f"tensor {_r(name)}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise fail(f"{what} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise fail(f"{what} has unsupported dtype {_r(dtype)}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise fail(f"{what} has invalid shape {_r(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))
                and 0 <= offsets[0] <= offsets[1]):
            raise fail(f"{what} has invalid data_offsets {_r(offsets)}")
        start, end = offsets
        if end > buffer_len:
            raise fail(f"{what} data_offsets [{start}, {end}] run past the end of the file "
                       f"(data buffer is {buffer_len} bytes)")
        need = math.prod(shape) * _DTYPES[dtype][0]
        if need != end - start:
            raise fail(f"{what} of dtype {dtype} and shape {_r(shape)} needs {need} bytes "
                       f"but its data_offsets span {end - start}")
        entries.append(TensorEntry(name, dtype, tuple(shape), file, data_start + start, data_start + end))

    # The format requires the tensors to tile the data buffer exactly: no overlaps, no holes, no tail.
    entries.sort(key=lambda e: (e.start, e.end))
    pos, prev = data_start, None
    for e in entries:
        if e.start < pos:
            raise fail(f"tensor {_r(e.name)} overlaps the data of tensor {_r(prev)}")
        if e.start > pos:
            raise fail(f"hole of {e.start - pos} bytes in the data buffer before tensor {_r(e.name)}")
        pos, prev = e.end, e.name
    if pos != size:
        raise fail(f"{size - pos} trailing bytes after the last tensor's data")
    return (data_start, size), meta, entries


def _is_weight_file(name: str) -> bool:
    suffix = Path(name).suffix.lower()
    return (suffix in PICKLE_SUFFIXES or suffix in OTHER_WEIGHT_SUFFIXES
            or name.endswith(".safetensors") or name.endswith(".index.json"))


def _safe_shard_name(name: Any) -> bool:
    """Shards must be plain file names in the checkpoint directory, so an index can't point elsewhere."""
    return (isinstance(name, str) and name.endswith(".safetensors") and name not in (".", "..")
            and not any(c in name for c in "/\\\0:") and not os.path.isabs(name))


def _read_index(directory: Path) -> dict[str, str]:
    file = directory / INDEX_NAME
    try:
        if file.stat().st_size > MAX_HEADER_BYTES:
            raise CheckpointError(f"{file}: index is larger than the {MAX_HEADER_BYTES} byte cap")
        raw = file.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e.strerror})") from None
    index = _load_json(raw, file, "index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{file}: index needs a non-empty \"weight_map\" object")
    if not isinstance(index.get("metadata", {}), dict):
        raise CheckpointError(f"{file}: index \"metadata\" is not an object")
    for tensor, shard in weight_map.items():
        if not _safe_shard_name(shard):
            raise CheckpointError(f"{file}: tensor {_r(tensor)} maps to unsafe shard name {_r(shard)} "
                                  "(must be a plain *.safetensors file name in the same directory)")
    return weight_map


def _missing_weights_message(directory: Path, names: list[str]) -> str:
    pickles = [n for n in names if Path(n).suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        return (f"{directory}: no safetensors weights, only pickle-based {', '.join(pickles[:5])}; "
                "convert the checkpoint to safetensors first (mezo-replay never unpickles)")
    found = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "nothing"
    return f"{directory}: neither {SINGLE_NAME} nor {INDEX_NAME} found (found: {found})"


class BaseCheckpoint:
    """A read-only view of a safetensors checkpoint: one file, or a directory holding model.safetensors or
    model.safetensors.index.json + shards.

    Everything is validated at open(), so later reads can trust the offsets; tensor data is read on demand.
    """

    path: Path
    is_dir: bool
    files: list[Path]  # weight files; for an index, its distinct shards sorted by name (HF numbering order)
    entries: dict[str, TensorEntry]  # every tensor, grouped by file, by offset within a file
    metadata: dict[str, dict[str, str]]  # file name -> that file's __metadata__

    def __init__(self, path: Path, is_dir: bool, files: list[Path], weight_map: dict[str, str] | None,
                 aux: list[Path], skipped: list[Path]) -> None:
        """Use open(); this does the parsing and the cross-file checks."""
        self.path, self.is_dir, self.files = path, is_dir, files
        self.index_file = path / INDEX_NAME if weight_map is not None else None
        self._aux, self._skipped = aux, skipped
        self.entries, self.metadata = {}, {}
        self._data_span: dict[Path, tuple[int, int]] = {}  # where each file's data buffer lies
        seen: dict[str, Path] = {}
        for file in files:
            self._data_span[file], self.metadata[file.name], entries = _parse_file(file)
            for e in entries:
                if e.name in seen:
                    raise CheckpointError(f"{path}: tensor {_r(e.name)} is in two shards, "
                                          f"{seen[e.name].name} and {file.name}")
                seen[e.name] = file
                if weight_map is not None and weight_map.get(e.name) != file.name:
                    where = f"maps it to {weight_map[e.name]}" if e.name in weight_map else "does not list it"
                    raise CheckpointError(f"{self.index_file}: tensor {_r(e.name)} is in shard {file.name} "
                                          f"but the index {where}")
                self.entries[e.name] = e
        for tensor, shard in (weight_map or {}).items():
            if tensor not in self.entries:
                raise CheckpointError(f"{self.index_file}: tensor {_r(tensor)} listed for shard {shard} "
                                      "is not in that shard")

    @classmethod
    def open(cls, path: str | Path) -> BaseCheckpoint:
        path = Path(path)
        if path.is_file():
            return cls(path, False, [path], None, [], [])
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such file or directory")
        names = sorted(p.name for p in path.iterdir() if p.is_file())
        if SINGLE_NAME in names and INDEX_NAME in names:
            raise CheckpointError(f"{path}: holds both {SINGLE_NAME} and {INDEX_NAME}; "
                                  "remove the stale one so the weights are unambiguous")
        if INDEX_NAME in names:
            weight_map = _read_index(path)
            files = [path / s for s in sorted(set(weight_map.values()))]
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{path / INDEX_NAME}: shard {f.name} listed in the index "
                                          "is missing")
        elif SINGLE_NAME in names:
            weight_map, files = None, [path / SINGLE_NAME]
        else:
            raise CheckpointError(_missing_weights_message(path, names))
        used = {f.name for f in files} | {INDEX_NAME}
        rest = [n for n in names if n not in used]
        return cls(path, True, files, weight_map,
                   aux=[path / n for n in rest if not _is_weight_file(n)],
                   skipped=[path / n for n in rest if _is_weight_file(n)])

    def aux_files(self) -> list[Path]:
        """Non-weight files (config, tokenizer, README, ...) an output directory must carry to be loadable;
        subdirectories are ignored."""
        return list(self._aux)

    def skipped_files(self) -> list[Path]:
        """Weight files that are neither read nor carried over (pickle formats, other formats, unreferenced
        safetensors), so the caller can warn that the output lacks them."""
        return list(self._skipped)

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {_r(name)}") from None

    def read(self, name: str, *, pin_memory: bool = False) -> torch.Tensor:
        """A fresh tensor (not a memory map), so the caller may update it in place; pin_memory reads the
        file straight into page-locked memory, for an asynchronous copy to a GPU without a staging copy."""
        e = self.entry(name)
        dtype = _DTYPES[e.dtype][1]
        if dtype is None:
            raise CheckpointError(f"{e.file}: tensor {_r(name)} has dtype {e.dtype}, unknown to this torch")
        t = _fresh(e.shape, dtype, e.nbytes, pin_memory)
        with open(e.file, "rb", buffering=0) as fh:
            _read_into(fh, _byte_view(t), e.start, e.file)
        return t

    def weights_fingerprint(self) -> str:
        """One hash of every floating-point tensor (F32, BF16, F16) as stored, by name (spec/format.md
        `peft.base_weights`): what a PEFT adapter was trained on, so merging it into another model is
        refused. Reads the checkpoint once, a tensor at a time; layout and sharding do not change it."""
        names = sorted((n for n, e in self.entries.items() if e.dtype in ("F32", "BF16", "F16")),
                       key=lambda n: n.encode("utf-8"))
        return base_fingerprint(names, [fingerprint_raw(self.entries[n].dtype, self.entries[n].shape,
                                                        self.read_bytes(n)) for n in names])

    def read_bytes(self, name: str) -> memoryview:
        e = self.entry(name)
        buf = memoryview(bytearray(e.nbytes))
        with open(e.file, "rb", buffering=0) as fh:
            _read_into(fh, buf, e.start, e.file)
        return buf


def _looks_like_checkpoint_dir(d: Path) -> bool:
    # --overwrite replaces a whole directory; refuse one that is clearly not a model output.
    children = [p.name for p in d.iterdir()]
    return not children or any(n == "config.json" or n.endswith(".safetensors") for n in children)


def replace_with(tmp: Path, out: Path, overwrite: bool) -> None:
    """Puts a finished temporary sibling `tmp` (file or folder) in place of `out`. A non-empty folder cannot
    be renamed over, so an old one is moved aside first and dropped after, and put back if the rename fails."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    if not overwrite:  # appeared while we were writing
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    if not tmp.is_dir():
        os.replace(tmp, out)  # atomic for files
        return
    old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    if old.is_symlink():
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointWriter:
    """Writes an output that mirrors a base checkpoint's layout (same shard files, same tensor names,
    dtypes, shapes and byte offsets), so tensors can be written in any order with pwrite-style seeks and the
    base's index.json stays valid. Output is atomic: everything goes to a temporary sibling
    (`.<name>.tmp-<random>`), and commit() renames it into place; on abort or exception nothing remains.

    commit() is final: if it refuses (e.g. a tensor was never written) the writer aborts.

    `new_tensors` (name -> (dtype, shape)) are tensors the base lacks, such as a classifier's head: they are
    appended after the data of the base's last file (and added to the index). `config` replaces the
    base's config.json in a directory output.
    """

    def __init__(self, base: BaseCheckpoint, out: str | Path, *, overwrite: bool = False,
                 metadata: dict[str, str] | None = None,
                 new_tensors: dict[str, tuple[str, tuple[int, ...]]] | None = None,
                 config: dict[str, Any] | None = None) -> None:
        self._state = "open"
        self._made_tmp = False
        self._out_fh: dict[Path, BinaryIO] = {}  # base file -> its output file
        self._base_fh: dict[Path, BinaryIO] = {}
        self._shift: dict[Path, int] = {}  # output position minus base position, per file (headers differ)
        self._written: set[str] = set()
        self.base, self.out, self.overwrite = base, Path(out), overwrite
        extra = dict(metadata or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            raise TypeError("metadata must map str to str")
        self._check_out()
        self._entries = dict(base.entries)
        last = base.files[-1]
        end = base._data_span[last][1]
        for name, (dtype, shape) in (new_tensors or {}).items():
            if name in self._entries or dtype not in _DTYPES or _DTYPES[dtype][0] is None:
                raise CheckpointError(f"{self.out}: new tensor {_r(name)} is already in the base or has an "
                                      f"unsupported dtype {dtype!r}")
            size = math.prod(shape) * _DTYPES[dtype][0]
            self._entries[name] = TensorEntry(name, dtype, tuple(shape), last, end, end + size)
            end += size
        self._tmp = self.out.parent / f".{self.out.name}.tmp-{secrets.token_hex(4)}"
        try:
            if base.is_dir:
                os.mkdir(self._tmp)
                self._made_tmp = True
                carried = base.aux_files() + ([base.index_file] if base.index_file else [])
                for f in carried:  # the index is copied verbatim: offsets and shard names don't change
                    shutil.copyfile(f, self._tmp / f.name)
                if base.index_file and new_tensors:
                    index = json.loads(base.index_file.read_bytes())
                    index.setdefault("weight_map", {}).update({n: last.name for n in new_tensors})
                    added = sum(self._entries[n].nbytes for n in new_tensors)
                    index.setdefault("metadata", {})["total_size"] = index["metadata"].get("total_size", 0) + added
                    (self._tmp / base.index_file.name).write_text(json.dumps(index, indent=2) + "\n")
                if config is not None:
                    (self._tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
                targets = {f: self._tmp / f.name for f in base.files}
            else:
                targets = {base.files[0]: self._tmp}
            for src, dst in targets.items():
                header = self._header(src, extra)
                fh = open(dst, "xb", buffering=0)
                self._made_tmp = True
                self._out_fh[src] = fh
                _write_at(fh, memoryview(header), 0)
                data_start = base._data_span[src][0]
                data_end = max(e.end for e in self._entries.values() if e.file == src) if any(
                    e.file == src for e in self._entries.values()) else base._data_span[src][1]
                self._shift[src] = len(header) - data_start
                fh.truncate(data_end + self._shift[src])  # full size up front: writes may come in any order
        except BaseException:
            self.abort()
            raise

    def _check_out(self) -> None:
        out, base = self.out, self.base
        if not base.is_dir and out.suffix != ".safetensors":
            raise CheckpointError(f"{out}: output file name must end in .safetensors")
        if not out.parent.is_dir():
            raise CheckpointError(f"{out}: parent directory does not exist")
        resolved, base_resolved = out.resolve(), base.path.resolve()
        if resolved == base_resolved or resolved in base_resolved.parents:
            raise CheckpointError(f"{out}: output would replace the base checkpoint {base.path}")
        if os.path.lexists(out):
            if not self.overwrite:
                raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
            if out.is_dir() != base.is_dir:
                kind = "directory" if out.is_dir() else "file"
                raise CheckpointError(f"{out} exists and is a {kind}; refusing to replace it with a "
                                      f"{'directory' if base.is_dir else 'file'}")
            if base.is_dir and not _looks_like_checkpoint_dir(out):
                raise CheckpointError(f"{out}: refusing to overwrite a non-empty directory that holds "
                                      "no config.json or *.safetensors")

    def _header(self, src: Path, extra: dict[str, str]) -> bytes:
        meta = {**self.base.metadata[src.name], **extra}
        header: dict[str, Any] = {"__metadata__": meta} if meta else {}
        data_start = self.base._data_span[src][0]
        for e in self._entries.values():
            if e.file == src:
                header[e.name] = {"dtype": e.dtype, "shape": list(e.shape),
                                  "data_offsets": [e.start - data_start, e.end - data_start]}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # as the reference writer does, so the data buffer starts 8-aligned
        return struct.pack("<Q", len(raw)) + raw

    def _claim(self, name: str) -> TensorEntry:
        if self._state != "open":
            raise CheckpointError(f"{self.out}: writer is already {self._state}")
        e = self._entries.get(name)
        if e is None:
            raise CheckpointError(f"{self.out}: the base has no tensor named {_r(name)}")
        if name in self._written:
            raise CheckpointError(f"{self.out}: tensor {_r(name)} written twice")
        return e

    def write(self, name: str, data: torch.Tensor | bytes | memoryview) -> None:
        e = self._claim(name)
        if isinstance(data, torch.Tensor):
            got = _TORCH_TO_ST.get(data.dtype, str(data.dtype))
            if got != e.dtype or tuple(data.shape) != e.shape:
                raise CheckpointError(f"{self.out}: tensor {_r(name)} is {got} {list(data.shape)}, "
                                      f"the base has {e.dtype} {list(e.shape)}")
            view = _byte_view(data.detach().to("cpu").contiguous())
        else:
            view = memoryview(data).cast("B")
            if view.nbytes != e.nbytes:
                raise CheckpointError(f"{self.out}: tensor {_r(name)} got {view.nbytes} bytes, "
                                      f"the base has {e.nbytes}")
        _write_at(self._out_fh[e.file], view, e.start + self._shift[e.file])
        self._written.add(name)

    def sync(self) -> None:
        """Pushes what was written so far to the disk, so that commit's fsync finds little left: a
        pipelined reconstruct calls this from its writer thread while the kernel runs (for a 1.3B bf16
        model, 2.6 GB would otherwise still be in the page cache when commit waits for it)."""
        if self._state != "open":
            raise CheckpointError(f"{self.out}: writer is already {self._state}")
        for fh in self._out_fh.values():
            os.fdatasync(fh.fileno())

    def copy_from_base(self, name: str) -> None:
        e = self._claim(name)
        if e.file not in self._base_fh:
            self._base_fh[e.file] = open(e.file, "rb", buffering=0)
        src, dst = self._base_fh[e.file], self._out_fh[e.file]
        buf = memoryview(bytearray(min(COPY_CHUNK, e.nbytes)))
        for pos in range(e.start, e.end, COPY_CHUNK):
            chunk = buf[: min(COPY_CHUNK, e.end - pos)]
            _read_into(src, chunk, pos, e.file)
            _write_at(dst, chunk, pos + self._shift[e.file])
        self._written.add(name)

    def commit(self) -> Path:
        if self._state != "open":
            raise CheckpointError(f"{self.out}: writer is already {self._state}")
        try:
            missing = [n for n in self._entries if n not in self._written]
            if missing:
                raise CheckpointError(f"{self.out}: tensor {_r(missing[0])} was never written "
                                      f"({len(missing)} of {len(self._entries)} missing)")
            self._close_files()
            for f in (self._tmp.iterdir() if self.base.is_dir else [self._tmp]):
                _fsync_path(f)
            if self.base.is_dir:
                _fsync_path(self._tmp)
            self._rename_into_place()
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        try:
            _fsync_path(self.out.parent)  # persist the rename; some filesystems can't fsync a directory
        except OSError:
            pass
        return self.out

    def _rename_into_place(self) -> None:
        replace_with(self._tmp, self.out, self.overwrite)

    def _close_files(self) -> None:
        for fh in [*self._out_fh.values(), *self._base_fh.values()]:
            fh.close()

    def abort(self) -> None:
        if self._state != "open":
            return
        self._state = "aborted"
        self._close_files()
        if self._made_tmp:
            if self._tmp.is_dir():
                shutil.rmtree(self._tmp, ignore_errors=True)
            elif os.path.lexists(self._tmp):
                self._tmp.unlink()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()  # no-op after commit; otherwise the output was abandoned or failed
