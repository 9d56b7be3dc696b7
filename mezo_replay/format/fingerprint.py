"""Tensor and base fingerprints, exactly as spec/format.md (*Fingerprints*) defines them.

A fingerprint must not depend on where or how a tensor is stored: not on its device, its strides, or
the payload of its NaNs (which differ between CPUs and GPUs). So the hash covers the dtype, the shape
and the row-major little-endian bit patterns with every NaN replaced by its dtype's canonical quiet NaN.
Tensors can be many GiB, so the data is hashed in slices and never copied whole more than once.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from collections.abc import Iterable, Sequence

import numpy as np
import torch

# Both directions in one table: DTYPE_NAMES[torch.bfloat16] == "BF16", DTYPE_NAMES["BF16"] is torch.bfloat16.
DTYPE_NAMES: dict = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
DTYPE_NAMES.update({name: dtype for dtype, name in list(DTYPE_NAMES.items())})

SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # use with fullmatch: "$" would accept a trailing newline

# dtype -> (unsigned word type, exponent mask, mantissa mask, canonical quiet NaN)
_BITS = {
    "F32": (np.uint32, 0x7F800000, 0x007FFFFF, 0x7FC00000),
    "BF16": (np.uint16, 0x7F80, 0x007F, 0x7FC0),
    "F16": (np.uint16, 0x7C00, 0x03FF, 0x7E00),
}
_INT_VIEW = {"F32": torch.int32, "BF16": torch.int16, "F16": torch.int16}  # same-width view for bit ops
_SLICE_BYTES = 4 << 20


def _dtype_name(dtype: torch.dtype) -> str:
    name = DTYPE_NAMES.get(dtype)
    if not isinstance(name, str):
        raise ValueError(f"unsupported tensor dtype {dtype}: fingerprints cover float32, bfloat16 and float16")
    return name


def canonicalize_nan_(t: torch.Tensor) -> torch.Tensor:
    """Replace every NaN of `t` in place by its dtype's canonical quiet NaN, so outputs are portable."""
    name = _dtype_name(t.dtype)
    mask = torch.isnan(t)
    if bool(mask.any()):  # detach(): parameters that require grad are fixed in place too
        t.detach().view(_INT_VIEW[name]).masked_fill_(mask, _BITS[name][3])
    return t


def _start(dtype: str, shape: Sequence[int]) -> hashlib._Hash:
    if dtype not in _BITS:
        raise ValueError(f"unsupported dtype {dtype!r}: expected F32, BF16 or F16")
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise ValueError(f"negative dimension in shape {dims}")
    h = hashlib.sha256(b"mzt-tensor\0" + dtype.encode() + b"\0")
    h.update(struct.pack(f"<I{len(dims)}Q", len(dims), *dims))
    return h


class _Scratch:
    """Slice-sized buffers for the NaN scan, reused across the slices of one tensor: the scan is most of
    a fingerprint's cost, and fresh 4 MiB temporaries per slice would add page faults to it."""

    def __init__(self, dtype: str) -> None:
        self.word, exp, man, self.canon = _BITS[dtype]
        self.magnitude, self.exp = self.word(exp | man), self.word(exp)
        n = _SLICE_BYTES // np.dtype(self.word).itemsize
        self.bits, self.nan = np.empty(n, self.word), np.empty(n, np.bool_)

    def nans(self, words: np.ndarray) -> np.ndarray | None:
        """Where `words` hold a NaN (an all-ones exponent and a non-zero mantissa: a magnitude above the
        infinity's), or None if nowhere."""
        bits, nan = self.bits[:words.size], self.nan[:words.size]
        np.bitwise_and(words, self.magnitude, out=bits)
        np.greater(bits, self.exp, out=nan)
        return nan if nan.any() else None


def _update(h: hashlib._Hash, dtype: str, words: np.ndarray, scratch: _Scratch | None = None,
            fix: bool = False) -> None:
    """Hash one slice of bit patterns (unsigned words of the dtype's width), NaNs canonicalised; with
    `fix`, canonicalised in `words` itself (which must be writable)."""
    scratch = scratch or _Scratch(dtype)
    nan = scratch.nans(words)
    if nan is not None:
        if fix:
            np.putmask(words, nan, scratch.canon)
        else:
            words = np.where(nan, scratch.word(scratch.canon), words)
    h.update(np.ascontiguousarray(words, dtype=np.dtype(scratch.word).newbyteorder("<")).data)


def tensor_fingerprint(t: torch.Tensor) -> str:
    """The spec's fingerprint of `t`, on any device and layout; `t` itself is left untouched."""
    name = _dtype_name(t.dtype)
    h = _start(name, t.shape)
    flat = t.detach().contiguous().reshape(-1).view(_INT_VIEW[name])  # at most one copy, on t's device
    step = _SLICE_BYTES // flat.element_size()
    scratch = _Scratch(name)
    for i in range(0, flat.numel(), step):
        _update(h, name, flat[i:i + step].cpu().numpy().view(_BITS[name][0]), scratch)
    return h.hexdigest()


def canonical_fingerprint_(t: torch.Tensor) -> str:
    """canonicalize_nan_(t), then tensor_fingerprint(t), in one pass over a CPU tensor: a rebuild's
    result check, where the separate NaN pass cost as much as the fingerprint."""
    if t.device.type != "cpu" or not t.is_contiguous():
        return tensor_fingerprint(canonicalize_nan_(t))
    name = _dtype_name(t.dtype)
    h = _start(name, t.shape)
    words = t.detach().reshape(-1).view(_INT_VIEW[name]).numpy().view(_BITS[name][0])
    step = _SLICE_BYTES // words.itemsize
    scratch = _Scratch(name)
    for i in range(0, words.size, step):
        _update(h, name, words[i:i + step], scratch, fix=True)
    return h.hexdigest()


def fingerprint_raw(dtype: str, shape: Sequence[int], data: bytes | memoryview | np.ndarray) -> str:
    """The fingerprint of raw little-endian tensor bytes (a safetensors slice), without building a tensor."""
    h = _start(dtype, shape)
    word = np.dtype(_BITS[dtype][0]).newbyteorder("<")
    if isinstance(data, np.ndarray):
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    else:
        raw = np.frombuffer(data, dtype=np.uint8)
    expected = math.prod(int(d) for d in shape) * word.itemsize
    if raw.size != expected:
        raise ValueError(f"{dtype}{list(shape)} needs {expected} bytes, got {raw.size}")
    words = raw.view(word)
    step = _SLICE_BYTES // word.itemsize
    scratch = _Scratch(dtype)
    for i in range(0, words.size, step):
        _update(h, dtype, words[i:i + step], scratch)
    return h.hexdigest()


class ShardedFingerprint:
    """tensor_fingerprint of a tensor that no process holds whole: its row-major elements arrive in order
    as shards (a rank's dim-0 rows, a slice streamed to rank 0, a run of raw bytes) and are hashed as they
    come, so the whole tensor is never concatenated. The hash is a stream over the canonicalised words,
    so any split gives the same digest; raw byte chunks may even split a word (the odd bytes wait for the
    next chunk).

        fp = ShardedFingerprint("BF16", (4096, 4096))
        for shard in shards: fp.update(shard)
        fp.hexdigest() == tensor_fingerprint(whole)
    """

    def __init__(self, dtype: str | torch.dtype, shape: Sequence[int]) -> None:
        self.dtype = dtype if isinstance(dtype, str) else _dtype_name(dtype)
        self.shape = tuple(int(d) for d in shape)
        self._hash = _start(self.dtype, self.shape)
        self._word = np.dtype(_BITS[self.dtype][0]).newbyteorder("<")
        self._scratch = _Scratch(self.dtype)
        self._expected = math.prod(self.shape)
        self._seen = 0  # words hashed
        self._carry = b""  # the bytes of a word split between two raw chunks

    def update(self, chunk: torch.Tensor | np.ndarray | bytes | bytearray | memoryview) -> None:
        """The next elements in row-major order: a tensor of the fingerprint's dtype (any device, any
        layout: its own row-major order is taken), or raw little-endian bytes (a numpy array is taken as
        its bytes)."""
        if isinstance(chunk, torch.Tensor):
            if self._carry:
                raise ValueError("a tensor chunk after raw bytes that end mid-element")
            if _dtype_name(chunk.dtype) != self.dtype:
                raise ValueError(f"a {chunk.dtype} shard in a {self.dtype} fingerprint")
            flat = chunk.detach().contiguous().reshape(-1).view(_INT_VIEW[self.dtype])
            self._grow(flat.numel())
            step = _SLICE_BYTES // flat.element_size()
            for i in range(0, flat.numel(), step):
                _update(self._hash, self.dtype, flat[i:i + step].cpu().numpy().view(_BITS[self.dtype][0]),
                        self._scratch)
            return
        if isinstance(chunk, np.ndarray):
            raw = np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
        else:
            raw = np.frombuffer(chunk, dtype=np.uint8)
        size = self._word.itemsize
        if self._carry:
            head = size - len(self._carry)
            if raw.size < head:
                self._carry += raw.tobytes()
                return
            self._words(np.frombuffer(self._carry + raw[:head].tobytes(), dtype=self._word))
            self._carry, raw = b"", raw[head:]
        whole = raw.size - raw.size % size
        self._carry = raw[whole:].tobytes()
        self._words(raw[:whole].view(self._word))

    def _grow(self, n: int) -> None:
        if self._seen + n > self._expected:
            raise ValueError(f"{self.dtype}{list(self.shape)} holds {self._expected} elements; the shards "
                             f"streamed so far hold {self._seen + n}")
        self._seen += n

    def _words(self, words: np.ndarray) -> None:
        self._grow(words.size)
        step = _SLICE_BYTES // self._word.itemsize
        for i in range(0, words.size, step):
            _update(self._hash, self.dtype, words[i:i + step], self._scratch)

    def hexdigest(self) -> str:
        """The fingerprint, once every element has arrived (fewer is an error, not a different hash)."""
        if self._carry or self._seen != self._expected:
            held = f"{self._seen} elements" + (f" and {len(self._carry)} stray bytes" if self._carry else "")
            raise ValueError(f"{self.dtype}{list(self.shape)} holds {self._expected} elements; the shards "
                             f"streamed hold {held}")
        return self._hash.copy().hexdigest()


def fingerprint_chunks(dtype: str | torch.dtype, shape: Sequence[int],
                       chunks: Iterable[torch.Tensor | np.ndarray | bytes | bytearray | memoryview]) -> str:
    """tensor_fingerprint of the tensor whose row-major elements are `chunks`, in order (ShardedFingerprint)."""
    fp = ShardedFingerprint(dtype, shape)
    for chunk in chunks:
        fp.update(chunk)
    return fp.hexdigest()


def base_fingerprint(names: Sequence[str], fps: Sequence[str]) -> str:
    """One hash naming the base's tuned tensors and their contents, to check a base before replaying."""
    if len(names) != len(fps):
        raise ValueError(f"{len(names)} names but {len(fps)} fingerprints")
    h = hashlib.sha256()
    for name, fp in zip(names, fps):
        if not isinstance(fp, str) or not SHA256_HEX.fullmatch(fp):
            raise ValueError(f"fingerprint of {name!r} is not 64 lowercase hex digits: {fp!r}")
        h.update(name.encode("utf-8") + b"\0" + bytes.fromhex(fp))
    return h.hexdigest()


def checkpoint_fingerprint(names: Sequence[str], fps: Sequence[str]) -> str:
    """One hash for all tuned tensors after some step (format.md `ckpt`): the base fingerprint's recipe,
    so a checkpoint costs 32 bytes in the file whatever the number of tensors, and step 0's equals the
    base fingerprint."""
    return base_fingerprint(names, fps)
