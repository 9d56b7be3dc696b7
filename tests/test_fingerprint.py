"""Fingerprints against hand-built byte strings (spec/format.md, *Fingerprints*)."""

import hashlib
import struct

import numpy as np
import pytest
import torch

from mezo_replay.format.fingerprint import (DTYPE_NAMES, base_fingerprint, canonicalize_nan_, fingerprint_raw,
                                     tensor_fingerprint)


def expected(dtype: str, shape: tuple, data: bytes) -> str:
    """The spec's definition written out, independent of the implementation."""
    prefix = b"mzt-tensor\0" + dtype.encode() + b"\0" + struct.pack("<I", len(shape))
    return hashlib.sha256(prefix + b"".join(struct.pack("<Q", d) for d in shape) + data).hexdigest()


def from_bits(bits: list[int], dtype: torch.dtype) -> torch.Tensor:
    """A tensor with exactly these bit patterns (NaN payloads included)."""
    if dtype == torch.float32:
        return torch.from_numpy(np.array(bits, dtype=np.uint32).view(np.int32)).view(torch.float32)
    return torch.from_numpy(np.array(bits, dtype=np.uint16).view(np.int16)).view(dtype)


def test_hand_computed_f32() -> None:
    t = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float32)
    want = expected("F32", (3,), struct.pack("<3f", 1.0, -2.0, 0.5))
    assert want == hashlib.sha256(b"mzt-tensor\x00F32\x00\x01\x00\x00\x00\x03" + b"\x00" * 7
                                  + bytes.fromhex("0000803f000000c00000003f")).hexdigest()
    assert tensor_fingerprint(t) == want


def test_row_major_order_whatever_the_layout() -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    want = expected("F32", (2, 3), struct.pack("<6f", 0, 1, 2, 3, 4, 5))
    assert tensor_fingerprint(t) == want
    transposed = torch.arange(6, dtype=torch.float32).reshape(3, 2).t()  # non-contiguous view
    assert tensor_fingerprint(transposed) == expected("F32", (2, 3), struct.pack("<6f", 0, 2, 4, 1, 3, 5))


def test_bf16_and_f16_hand_computed() -> None:
    assert tensor_fingerprint(torch.tensor([1.0, -2.0], dtype=torch.bfloat16)) == \
        expected("BF16", (2,), struct.pack("<2H", 0x3F80, 0xC000))
    assert tensor_fingerprint(torch.tensor([1.0, -2.0], dtype=torch.float16)) == \
        expected("F16", (2,), struct.pack("<2H", 0x3C00, 0xC000))


def test_dtype_is_hashed() -> None:
    zeros = [torch.zeros(2, dtype=d) for d in (torch.bfloat16, torch.float16)]
    assert tensor_fingerprint(zeros[0]) != tensor_fingerprint(zeros[1])  # same bytes, other dtype


@pytest.mark.parametrize("dtype, name, nans, canonical", [
    (torch.float32, "F32", [0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FBFFFFF, 0xFFFFFFFF, 0x7FC01234], 0x7FC00000),
    (torch.bfloat16, "BF16", [0x7FC0, 0xFFC0, 0x7F81, 0x7FFF, 0xFF81], 0x7FC0),
    (torch.float16, "F16", [0x7E00, 0xFE00, 0x7C01, 0x7FFF, 0xFD55], 0x7E00),
])
def test_nan_payloads_and_signs_hash_equal(dtype: torch.dtype, name: str, nans: list[int], canonical: int) -> None:
    fmt = "<2I" if name == "F32" else "<2H"
    one = {"F32": 0x3F800000, "BF16": 0x3F80, "F16": 0x3C00}[name]
    want = expected(name, (2,), struct.pack(fmt, one, canonical))
    for nan in nans:
        t = from_bits([one, nan], dtype)
        assert tensor_fingerprint(t) == want, hex(nan)
        assert fingerprint_raw(name, [2], struct.pack(fmt, one, nan)) == want, hex(nan)
        # the caller's tensor keeps its payload: hashing must not write to it
        assert t.view(torch.int32 if name == "F32" else torch.int16).numpy().view(
            np.uint32 if name == "F32" else np.uint16)[1] == nan


def test_infinities_are_not_nans() -> None:
    inf = from_bits([0x7F800000, 0xFF800000], torch.float32)
    assert tensor_fingerprint(inf) == expected("F32", (2,), struct.pack("<2I", 0x7F800000, 0xFF800000))


def test_signed_zeros_differ() -> None:
    pos, neg = torch.tensor([0.0]), torch.tensor([-0.0])
    assert tensor_fingerprint(pos) != tensor_fingerprint(neg)
    assert tensor_fingerprint(neg) == expected("F32", (1,), struct.pack("<I", 0x80000000))


def test_zero_dim_and_empty() -> None:
    assert tensor_fingerprint(torch.tensor(1.5)) == expected("F32", (), struct.pack("<f", 1.5))
    empty = torch.zeros(0, 3, dtype=torch.bfloat16)
    assert tensor_fingerprint(empty) == expected("BF16", (0, 3), b"")
    assert tensor_fingerprint(empty) != tensor_fingerprint(torch.zeros(3, 0, dtype=torch.bfloat16))
    assert fingerprint_raw("BF16", [0, 3], b"") == expected("BF16", (0, 3), b"")
    assert fingerprint_raw("F32", [], struct.pack("<f", 1.5)) == tensor_fingerprint(torch.tensor(1.5))


def test_many_slices_with_nans_everywhere() -> None:
    n = 3_000_001  # about 12 MB: several hashing slices, and a ragged last one
    values = np.arange(n, dtype=np.float32)
    values[[0, 1_048_576, n - 1]] = np.array([0xFFC00001, 0x7F800002, 0xFFFFFFFF], dtype=np.uint32).view(np.float32)
    canonical = values.view(np.uint32).copy()
    canonical[[0, 1_048_576, n - 1]] = 0x7FC00000
    want = expected("F32", (n,), canonical.astype("<u4").tobytes())
    assert tensor_fingerprint(torch.from_numpy(values)) == want
    assert fingerprint_raw("F32", (n,), values) == want
    assert fingerprint_raw("F32", (n,), memoryview(values.tobytes())) == want
    assert fingerprint_raw("F32", (n,), values.tobytes()) == want


def test_fingerprint_raw_checks_the_byte_count() -> None:
    with pytest.raises(ValueError, match="needs 8 bytes"):
        fingerprint_raw("F32", [2], b"\0" * 7)
    with pytest.raises(ValueError, match="unsupported dtype"):
        fingerprint_raw("F64", [1], b"\0" * 8)


def test_unsupported_tensor_dtype() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        tensor_fingerprint(torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("dtype, view, canonical", [
    (torch.float32, torch.int32, 0x7FC00000),
    (torch.bfloat16, torch.int16, 0x7FC0),
    (torch.float16, torch.int16, 0x7E00),
])
def test_canonicalize_nan_in_place(dtype: torch.dtype, view: torch.dtype, canonical: int) -> None:
    big = dtype == torch.float32
    one = {torch.float32: 0x3F800000, torch.bfloat16: 0x3F80, torch.float16: 0x3C00}[dtype]
    bits = [0xFFC00001, one, 0x7F800001, 0x80000000] if big else [0xFFC1, one, 0x7FFF, 0x8000]
    base = from_bits(bits * 2, dtype).reshape(2, 4)
    t = base.t()  # non-contiguous: must still be fixed in place
    assert canonicalize_nan_(t) is t
    got = base.view(view).numpy().view(np.uint32 if big else np.uint16).reshape(-1).tolist()
    assert got == [canonical, bits[1], canonical, bits[3]] * 2


def test_canonicalize_nan_on_a_parameter() -> None:
    p = torch.nn.Parameter(from_bits([0xFFC00001, 0x3F800000], torch.float32))
    assert canonicalize_nan_(p) is p
    assert p.detach().view(torch.int32).tolist() == [0x7FC00000, 0x3F800000]
    with pytest.raises(ValueError, match="unsupported"):
        canonicalize_nan_(torch.zeros(2, dtype=torch.float64))


def test_base_fingerprint_hand_computed() -> None:
    fa, fb = "01" * 32, "ef" * 32
    want = hashlib.sha256(b"a\0" + bytes.fromhex(fa) + "b.é\0".encode() + bytes.fromhex(fb)).hexdigest()
    assert base_fingerprint(["a", "b.é"], [fa, fb]) == want
    assert base_fingerprint([], []) == hashlib.sha256(b"").hexdigest()
    with pytest.raises(ValueError):
        base_fingerprint(["a"], ["AB" * 32])  # uppercase is not a fingerprint
    with pytest.raises(ValueError):
        base_fingerprint(["a", "b"], [fa])


def test_dtype_names_both_ways() -> None:
    for dtype, name in [(torch.float32, "F32"), (torch.bfloat16, "BF16"), (torch.float16, "F16")]:
        assert DTYPE_NAMES[dtype] == name and DTYPE_NAMES[name] is dtype
