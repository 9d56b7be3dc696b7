"""The `.mzt` trajectory file: writer and reader, exactly as spec/format.md defines it.

Training appends to the file as it goes and fsyncs after each chunk, so a crash leaves a readable
prefix. Files also arrive from strangers, so the reader trusts nothing: every declared size is checked
against the spec's limits and the bytes actually left before anything is allocated or decompressed,
JSON nesting is bounded before parsing, and nothing is ever unpickled.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Sequence, Union

import numpy as np
import zstandard

from ..errors import (CorruptChunkError, LimitError, MezoReplayError, OutputExistsError, TrajectoryError,
                     UnsupportedError)
from .filelock import FileLock
from .fingerprint import SHA256_HEX, base_fingerprint
from ..arithmetic.grad_codec import ENCODINGS, bf16_bits, fp8_value
from ..arithmetic.rule import _COS_K, MezoSGD

PathLike = Union[str, "os.PathLike[str]"]

MAGIC = b"\x89MZT\r\n\x1a\n"
FORMAT_VERSION = 1
PREAMBLE = struct.Struct("<8sII")      # magic, version, flags
CHUNK_HEAD = struct.Struct("<I4sI")    # length, type, crc

MAX_CHUNK_BYTES = 64 << 20             # compressed payload
MAX_WINDOW_BYTES = 1 << 27
MAX_HEADER_BYTES = 64 << 20            # HEAD decompressed
MAX_FPRT_BYTES = 128 << 20             # FPRT decompressed
MAX_EVAL_BYTES = 64 << 10              # eval decompressed
CKPT = struct.Struct("<I32s")          # ckpt payload, decompressed: step, checkpoint fingerprint
MAX_INIT_DATA = 64 << 20               # INIT data bytes per chunk
MAX_STEPS_PER_CHUNK = 1 << 20
MAX_STEP_PAYLOAD = 8 + 2 * MAX_STEPS_PER_CHUNK
MAX_LOSS_PAYLOAD = 8 + 4 * MAX_STEPS_PER_CHUNK
MAX_STEPS = 2**32 - 1
MAX_TENSORS = 1 << 20
MAX_NAME_BYTES = 1024
MAX_RANK = 8
MAX_ELEMENTS = 1 << 48                 # exclusive
MAX_METADATA_PAIRS = 4096
MAX_METADATA_KEY_BYTES = 256
MAX_METADATA_VALUE_BYTES = 65536
MAX_JSON_DEPTH = 32
MAX_JSON_INT = 2**64                   # exclusive bound on the magnitude of a JSON integer
# Decompression budgets (format.md, *Reading cost*): what all chunks of a file may decompress to, in
# total, grows with the file's size, so a small file cannot make a reader allocate gigabytes.
BUDGET_BASE, BUDGET_RATIO = 64 << 20, 64             # every decompressed chunk
JSON_BUDGET_BASE, JSON_BUDGET_RATIO = 1 << 20, 16    # HEAD, FPRT and eval (parsed into Python objects)

GAUSSIAN16_SHA256 = "33888ab6f4616c9a0d6bba520458612f7f70d5be5df01e655e1fe972d49d478b"  # spec/noise.md
DTYPES = ("F32", "BF16", "F16")
# The objects that change replayed bits: a name or key outside these sets needs a newer reader.
KNOWN: dict[str, dict[str, set[str]]] = {
    "generator": {"philox4x32-10": {"name", "seed"}},
    "noise": {"gaussian16": {"name", "table_sha256"}, "rademacher16": {"name"}},
    "rule": {"mezo-sgd": {"name", "eps", "lr", "schedule", "grad_encoding", "grad_scale", "weight_decay",
                          "perturbations", "layerwise"},  # spec/nspsa.md, spec/layerwise.md
             "mezo-momentum": {"name", "eps", "lr", "schedule", "grad_encoding", "grad_scale", "weight_decay",
                               "momentum", "window", "layerwise"},  # spec/momentum.md
             "mezo-momentum-buffer": {"name", "eps", "lr", "schedule", "grad_encoding", "grad_scale",
                                      "weight_decay", "momentum", "layerwise"},
             "mezo-adam": {"name", "eps", "lr", "schedule", "grad_encoding", "grad_scale", "weight_decay",
                           "beta1", "beta2", "adam_eps", "window"},  # spec/adam.md
             "mezo-adam-buffer": {"name", "eps", "lr", "schedule", "grad_encoding", "grad_scale", "weight_decay",
                                  "beta1", "beta2", "adam_eps"}},
}
_OPTIONAL = {"weight_decay", "grad_scale", "perturbations", "layerwise"}
# Generated initial values (spec/init.md): a tensor entry's "init" may name one instead of `true`.
INIT_KINDS: dict[str, set[str]] = {"zeros": {"name"}, "uniform16": {"name", "bound"}, "gaussian16": {"name", "std"}}
INIT_SCALES = {"uniform16": "bound", "gaussian16": "std"}
_HEADER_KEYS = ("creator", "generator", "noise", "rule", "tensors", "base", "records", "metadata")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


# --- header ---------------------------------------------------------------------------------------

def _utf8(s: str, what: str) -> bytes:
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError:
        raise TrajectoryError(f"{what} is not valid UTF-8 (it holds a lone surrogate)") from None


def _known_object(header: dict, key: str) -> dict:
    obj = header[key]
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise TrajectoryError(f"header {key!r} must be an object with a string 'name'")
    allowed = KNOWN[key].get(obj["name"])
    if allowed is None:
        raise UnsupportedError(f"unknown {key} {obj['name']!r} (this mezo-replay knows {sorted(KNOWN[key])}): "
                               f"the file needs a newer mezo-replay")
    if unknown := sorted(obj.keys() - allowed):
        raise UnsupportedError(f"{key} {obj['name']!r} has keys {unknown} that this mezo-replay does not know: "
                               f"the file needs a newer mezo-replay")
    if missing := sorted(allowed - _OPTIONAL - obj.keys()):
        raise TrajectoryError(f"{key} {obj['name']!r} lacks the keys {missing}")
    return obj


def _check_rule(header: dict) -> MezoSGD:
    """The numbers of rule.md (eps, lr, schedule, weight decay), checked by the rule's own code."""
    encoding = header["rule"]["grad_encoding"]
    if not isinstance(encoding, str) or encoding not in ENCODINGS:
        raise UnsupportedError(f"rule grad_encoding {encoding!r} is not one of {', '.join(ENCODINGS)}: "
                               f"the file needs a newer mezo-replay")
    try:
        return MezoSGD.from_header(header)
    except ValueError as e:
        if "newer" in str(e) or "unknown schedule" in str(e):
            raise UnsupportedError(f"rule: {e}") from None
        raise TrajectoryError(f"rule: {e}") from None


def _check_tensors(tensors: object) -> tuple[list[str], list[str]]:
    if not isinstance(tensors, list):
        raise TrajectoryError("header 'tensors' must be an array")
    if len(tensors) > MAX_TENSORS:
        raise LimitError(f"header lists {len(tensors)} tensors, over the limit of {MAX_TENSORS}")
    names, fps, previous = [], [], b""
    for k, t in enumerate(tensors):
        where = f"tensors[{k}]"
        if not isinstance(t, dict) or not all(key in t for key in ("name", "dtype", "shape", "sha256")):
            raise TrajectoryError(f"{where} must be an object with name, dtype, shape and sha256")
        name, dtype, shape, sha = t["name"], t["dtype"], t["shape"], t["sha256"]
        if not isinstance(name, str) or not name or "\0" in name:
            raise TrajectoryError(f"{where} name must be a non-empty string without NUL characters")
        raw = _utf8(name, f"{where} name")
        if len(raw) > MAX_NAME_BYTES:
            raise LimitError(f"{where} name is {len(raw)} bytes, over the limit of {MAX_NAME_BYTES}")
        if k and raw == previous:
            raise TrajectoryError(f"tensor name {name!r} is listed twice (tensors[{k - 1}] and {where})")
        if k and raw < previous:
            raise TrajectoryError(f"tensor names are not sorted by UTF-8 bytes: {where} {name!r} "
                                  f"comes after {previous.decode()!r}")
        if dtype not in DTYPES:
            cls = UnsupportedError if isinstance(dtype, str) else TrajectoryError
            raise cls(f"{where} ({name!r}) has dtype {dtype!r}; supported: {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise TrajectoryError(f"{where} ({name!r}) shape must be an array of non-negative integers")
        if len(shape) > MAX_RANK:
            raise LimitError(f"{where} ({name!r}) has rank {len(shape)}, over the limit of {MAX_RANK}")
        if math.prod(shape) >= MAX_ELEMENTS:
            raise LimitError(f"{where} ({name!r}) has {math.prod(shape)} elements, the limit is below 2^48")
        if not isinstance(sha, str) or not SHA256_HEX.fullmatch(sha):
            raise TrajectoryError(f"{where} ({name!r}) sha256 is not 64 lowercase hex digits")
        _check_init(t.get("init", False), f"{where} ({name!r})")
        if not isinstance(t.get("decay", False), bool):  # also without a weight decay, where it does nothing
            raise TrajectoryError(f"{where} ({name!r}) decay must be a boolean")
        names.append(name)
        fps.append(sha)
        previous = raw
    return names, fps


def _positive_binary32(x: object) -> bool:
    """A JSON number (not a boolean) equal to a positive finite binary32 value. Huge integers and
    values beyond binary32's range are refused without an OverflowError or a numpy warning on stderr."""
    if type(x) not in (int, float):
        return False
    try:
        f = float(x)
    except OverflowError:
        return False
    if not (math.isfinite(f) and f > 0 and f == x) or f > float(np.finfo(np.float32).max):
        return False
    return float(np.float32(f)) == f


def _check_init(init: object, where: str) -> None:
    """`init` is a boolean (true: the value is in INIT chunks) or names a generated value (spec/init.md)."""
    if isinstance(init, bool):
        return
    if not isinstance(init, dict) or not isinstance(init.get("name"), str):
        raise TrajectoryError(f"{where} init must be a boolean or an object with a name")
    kind = init["name"]
    if kind not in INIT_KINDS:
        raise UnsupportedError(f"{where} has initial value {kind!r}, which this reader does not know "
                               f"(known: {', '.join(INIT_KINDS)}): the file needs a newer mezo-replay")
    if unknown := sorted(set(init) - INIT_KINDS[kind]):
        raise UnsupportedError(f"{where} init {kind!r} has keys {unknown} this reader does not know: "
                               f"the file needs a newer mezo-replay")
    if missing := sorted(INIT_KINDS[kind] - set(init)):
        raise TrajectoryError(f"{where} init {kind!r} lacks {missing}")
    if kind in INIT_SCALES:
        x = init[INIT_SCALES[kind]]
        if not _positive_binary32(x):
            raise TrajectoryError(f"{where} init {kind!r} {INIT_SCALES[kind]} must be a positive finite "
                                  f"number exactly representable in binary32, not {x!r}")


def validate_header(header: dict) -> None:
    """Refuse any header a replay could misread; raise UnsupportedError where a newer reader is needed."""
    if not isinstance(header, dict):
        raise TrajectoryError("the header is not a JSON object")
    if missing := [key for key in _HEADER_KEYS if key not in header]:
        raise TrajectoryError(f"the header lacks the required keys {missing}")
    if not isinstance(header["creator"], str):
        raise TrajectoryError("header 'creator' must be a string")
    seed = _known_object(header, "generator")["seed"]
    if not isinstance(seed, str) or not re.fullmatch(r"0|[1-9][0-9]{0,19}", seed) or int(seed) >= 2**64:
        raise TrajectoryError(f"generator seed {seed!r} is not a decimal string of an integer in [0, 2^64)")
    noise = _known_object(header, "noise")
    if noise["name"] == "gaussian16" and noise["table_sha256"] != GAUSSIAN16_SHA256:
        raise UnsupportedError(f"noise table_sha256 {noise['table_sha256']!r} is not the spec's gaussian16 table "
                               f"({GAUSSIAN16_SHA256})")
    rule_obj = header["rule"]
    name = rule_obj.get("name") if isinstance(rule_obj, dict) else None
    # a known rule that has no such key: a bad file, not a newer one (a name that is not a string: below)
    if isinstance(name, str) and "perturbations" in rule_obj and name in KNOWN["rule"] and name != "mezo-sgd":
        raise TrajectoryError(f"rule {rule_obj['name']} takes no perturbations (spec/nspsa.md: n-SPSA is "
                              f"defined for mezo-sgd only)")
    _known_object(header, "rule")
    rule = _check_rule(header)
    names, fps = _check_tensors(header["tensors"])
    if rule.weight_decay and not all(isinstance(t.get("decay"), bool) for t in header["tensors"]):
        raise TrajectoryError("with a weight_decay, every tensor entry needs a boolean 'decay'")

    base = header["base"]
    if not isinstance(base, dict) or not all(key in base for key in ("fingerprint", "source", "revision")):
        raise TrajectoryError("header 'base' must be an object with fingerprint, source and revision")
    for key in ("source", "revision"):
        if base[key] is not None and not isinstance(base[key], str):
            raise TrajectoryError(f"base {key} must be a string or null")
    if base["fingerprint"] != base_fingerprint(names, fps):
        raise TrajectoryError("base fingerprint does not match the fingerprints of the listed tensors "
                              "(the header is inconsistent)")
    if not isinstance(header.get("config", {}), dict):
        raise TrajectoryError("header 'config' must be an object (a config.json)")
    records = header["records"]
    if not isinstance(records, dict) or not isinstance(records.get("losses"), bool):
        raise TrajectoryError("header 'records' must be an object with a boolean 'losses'")

    metadata = header["metadata"]
    if not isinstance(metadata, dict):
        raise TrajectoryError("header 'metadata' must be an object")
    if len(metadata) > MAX_METADATA_PAIRS:
        raise LimitError(f"metadata has {len(metadata)} pairs, over the limit of {MAX_METADATA_PAIRS}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str) or not key:
            raise TrajectoryError(f"metadata {key!r} must map a non-empty string to a string")
        if len(_utf8(key, "a metadata key")) > MAX_METADATA_KEY_BYTES:
            raise LimitError(f"metadata key {key[:40]!r}... is over {MAX_METADATA_KEY_BYTES} bytes")
        if len(_utf8(value, f"metadata {key!r}")) > MAX_METADATA_VALUE_BYTES:
            raise LimitError(f"metadata value of {key!r} is over {MAX_METADATA_VALUE_BYTES} bytes")


# --- JSON and chunk payloads ------------------------------------------------------------------------

_JSON_ESCAPE = re.compile(rb"\\.", re.S)    # an escape pair; left to right, so "\\\\" is one pair
_JSON_STRING = re.compile(rb'"[^"]*"')     # with the escapes gone a string holds no quote
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))
_BRACKETS = bytes.maketrans(b"{}", b"[]")


def _reject(what: str) -> object:
    raise ValueError(f"{what} is not valid JSON here")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("a JSON object repeats a key")
    return obj


def _parse_float(text: str) -> float:
    value = float(text)
    return value if math.isfinite(value) else _reject(text)  # type: ignore[return-value]


def _parse_int(text: str) -> int:
    """Integers of at most 20 digits and magnitude below 2^64: no field needs more, and huge ones would
    overflow a float conversion later (and cost quadratic time to convert)."""
    digits = len(text) - text.startswith("-")
    value = int(text) if digits <= 20 else MAX_JSON_INT
    if abs(value) >= MAX_JSON_INT:
        raise ValueError(f"the integer {text[:24]}{'...' if len(text) > 24 else ''} is beyond 2^64 in magnitude")
    return value


def _json_depth(data: bytes) -> int:
    """Nesting depth of JSON text, in time linear in its length (so before the recursive parser runs).
    Escape pairs go first, so that no string holds a quote and one non-backtracking pattern removes
    them all; then each pass over the bracket skeleton drops exactly the innermost level."""
    brackets = _JSON_STRING.sub(b"", _JSON_ESCAPE.sub(b"", data)).translate(_BRACKETS, _NOT_BRACKET)
    depth = 0
    while brackets:
        inner = brackets.replace(b"[]", b"")
        if inner == brackets:
            raise ValueError("unbalanced brackets: not valid JSON")
        depth += 1
        if depth > MAX_JSON_DEPTH:
            raise LimitError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        brackets = inner
    return depth


def _check_surrogates(obj: object) -> None:
    """A JSON escape can spell a lone surrogate, which no UTF-8 output can hold: refuse it here, where it
    enters, instead of failing wherever the string is printed or written."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and not item.isascii():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"a string holds a lone surrogate ({ascii(item[:40])})") from None


def _json_loads(data: bytes) -> object:
    """Parse untrusted JSON in time and memory linear in its length: depth is measured first, integers
    are bounded, duplicate keys, NaN and infinities refused, and lone surrogates rejected."""
    _json_depth(data)
    obj = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_reject,
                     parse_float=_parse_float, parse_int=_parse_int)
    if _SURROGATE_ESCAPE.search(data):  # only an escape can make one (raw UTF-8 surrogates fail to decode)
        _check_surrogates(obj)
    return obj


def _json_dumps(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def _rs(x: np.ndarray, bits: int) -> np.ndarray:
    """rule.md's RS(x, n) on an array: frexp's mantissa times 2^n is exact, rint rounds ties to even."""
    m, e = np.frexp(x)
    return np.ldexp(np.rint(m * float(1 << bits)), e - bits)


def _cos_pi(p: np.ndarray) -> np.ndarray:
    """rule.md's COS_PI, elementwise: numpy rounds every * and + separately, as the spec demands."""
    x = np.where(p > 0.5, 1.0 - p, p)
    q = x * x
    r = np.full_like(q, _COS_K[12])
    for k in range(11, -1, -1):
        r = r * q + _COS_K[k]
    return np.where(p > 0.5, -r, r)


def step_rates(rule: MezoSGD, t: np.ndarray) -> np.ndarray:
    """lr_t of rule.md for an array of step indices (float64, exact below 2^53), bit for bit what
    MezoSGD.lr_at gives step by step, in time linear in len(t) without a Python loop per step."""
    s = rule.schedule
    f = np.ones_like(t)
    warm = t < s.warmup_steps
    f[warm] = (t[warm] + 1.0) / float(s.warmup_steps + 1)
    if s.name != "constant":
        after = ~warm
        p = np.minimum(1.0, (t[after] - float(s.warmup_steps)) / float(max(1, s.total_steps - s.warmup_steps)))
        f[after] = 1.0 - p if s.name == "linear" else 0.5 * (1.0 + _cos_pi(p))
    lr = _rs(rule.lr * f, 24)
    lr[lr < 2.0**-100] = 0.0
    return lr


def step_coefficients(rule: MezoSGD, grad_bits: np.ndarray, first_step: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(c, d) of rule.md for every step, as float64 arrays: what MezoSGD.coefficient and .decay give step by
    step, without a Python loop per step. The steps must be valid (see invalid_steps)."""
    g = (np.asarray(grad_bits).astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    lr_t = step_rates(rule, np.arange(first_step, first_step + g.size, dtype=np.float64))
    c = _rs(lr_t * g, 16)
    c[np.abs(c) < 2.0**-100] = 0.0
    d = _rs(lr_t * rule.weight_decay, 12)
    d[d < 2.0**-40] = 0.0
    return c, d


_BLOCK = 1 << 16  # steps per vectorised block: bounds the float64 temporaries


def invalid_steps(grad_bits: np.ndarray, rule: MezoSGD, first_step: int = 0) -> np.ndarray:
    """Indices of steps rule.md forbids: non-finite or >= 2^127 gradients, |c| > 2^100 (or some tensor's
    layer-wise c_k beyond it: spec/layerwise.md), d >= 1.

    Vectorised: a chunk of a million steps costs milliseconds. Since every lr_t <= lr, most files are
    cleared by one bound; otherwise c and d are computed for every step, a block at a time."""
    with np.errstate(invalid="ignore"):  # signalling NaNs widen quietly; they are refused just below
        g = (grad_bits.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    bad = ~np.isfinite(g) | (np.abs(g) >= 2.0**127)
    if rule.adam:  # spec/adam.md: |gq| >= 2^40 is invalid, and c is not used (only d's check remains)
        bad |= np.abs(g) >= 2.0**40
        if _rs(np.array([rule.lr * rule.weight_decay]), 12)[0] >= 1.0:
            for at in range(0, g.size, _BLOCK):
                t = np.arange(first_step + at, first_step + min(g.size, at + _BLOCK), dtype=np.float64)
                bad[at:at + _BLOCK] |= _rs(step_rates(rule, t) * rule.weight_decay, 12) >= 1.0
        return np.flatnonzero(bad)
    ok_g = np.where(bad, 0.0, np.abs(g))
    lr, wd = np.array([rule.lr]), np.array([rule.weight_decay])
    if ok_g.size == 0 or (_rs(lr * ok_g.max(), 16)[0] <= rule.coefficient_limit and _rs(lr * wd, 12)[0] < 1.0):
        return np.flatnonzero(bad)
    for at in range(0, g.size, _BLOCK):
        t = np.arange(first_step + at, first_step + min(g.size, at + _BLOCK), dtype=np.float64)
        lr_t = step_rates(rule, t)
        c = np.abs(_rs(lr_t * ok_g[at:at + _BLOCK], 16))
        d = _rs(lr_t * rule.weight_decay, 12)
        bad[at:at + _BLOCK] |= (c > rule.coefficient_limit) | (d >= 1.0)
    return np.flatnonzero(bad)


def invalid_perturbation_steps(grad_bits: np.ndarray, rule: MezoSGD, first_step: int = 0) -> np.ndarray:
    """invalid_steps for n-SPSA (spec/nspsa.md): indices, into the flattened (steps, N) records, of values
    rule.md forbids (non-finite or >= 2^127) or whose c_j = RS(q_t * gq_j, 16) exceeds 2^100, and of every
    value of a step whose d >= 1. q_t = RS(lr_t / N, 24) is at most lr, so one bound clears most files."""
    n = rule.perturbations
    flat = np.asarray(grad_bits).reshape(-1)
    with np.errstate(invalid="ignore"):
        g = (flat.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    bad = ~np.isfinite(g) | (np.abs(g) >= 2.0**127)
    ok_g = np.where(bad, 0.0, np.abs(g))
    lr, wd = np.array([rule.lr]), np.array([rule.weight_decay])
    if ok_g.size == 0 or (_rs(lr * ok_g.max(), 16)[0] <= 2.0**100 and _rs(lr * wd, 12)[0] < 1.0):
        return np.flatnonzero(bad)
    t = first_step + np.arange(flat.size, dtype=np.float64) // n
    lr_t = step_rates(rule, t)
    q = _rs(lr_t / n, 24)
    c = np.abs(_rs(q * ok_g, 16))
    d = _rs(lr_t * rule.weight_decay, 12)
    bad |= (c > 2.0**100) | (d >= 1.0)
    return np.flatnonzero(bad)


class StepCodec:
    """The step records of one grad_encoding (format.md `STEP`) <-> the bfloat16 patterns of gq, the form
    every later stage uses (Trajectory.grad_bits, the coefficients, the kernels). Vectorised both ways."""

    def __init__(self, rule: MezoSGD) -> None:
        self.encoding = rule.grad_encoding
        self.per_step = rule.perturbations  # n-SPSA (spec/nspsa.md): N values a step, laid out as N*count steps
        # to_bits[code] is the bf16 pattern of the code's gq; from_bits[pattern] its code, -1 if none
        if self.encoding == "fp8":
            assert rule.grad_scale is not None
            values = [fp8_value(c) for c in range(256)]
            self.valid = np.array([not math.isnan(v) for v in values])
            self.to_bits = np.array([bf16_bits(v * rule.grad_scale) if ok else 0 for v, ok in zip(values, self.valid)],
                                    dtype=np.uint16)
            self.from_bits = np.full(1 << 16, -1, dtype=np.int32)
            self.from_bits[self.to_bits[self.valid]] = np.flatnonzero(self.valid)
        elif self.encoding == "sign":
            assert rule.grad_scale is not None
            s = bf16_bits(rule.grad_scale)
            self.to_bits = np.array([0, s, 0, s | 0x8000], dtype=np.uint16)  # index: nonzero | negative << 1
            self.from_bits = np.full(1 << 16, -1, dtype=np.int32)
            self.from_bits[[0, s, s | 0x8000]] = [0, 1, 3]

    @property
    def max_payload(self) -> int:
        """The largest STEP payload format.md allows for this encoding (count <= 2^20)."""
        return 8 + {"bf16": 2 * MAX_STEPS_PER_CHUNK, "fp8": MAX_STEPS_PER_CHUNK,
                    "sign": 2 * (MAX_STEPS_PER_CHUNK // 8)}[self.encoding]

    def budget_cost(self, size: int) -> int:
        """What a STEP frame declaring `size` bytes costs the decompression budget (format.md, *Reading
        cost*): 2 bytes for each step it can hold, its form once decoded. fp8 and sign records are 1 byte
        and 2 bits: charged their own size, a small file of sign chunks would decode to 8x the budget."""
        per_byte = {"bf16": 1, "fp8": 2, "sign": 8}[self.encoding]
        return size if size <= 8 else 8 + per_byte * (size - 8)

    def representable(self, bits: int) -> bool:
        return self.encoding == "bf16" or bool(self.from_bits[bits] >= 0)

    def encode(self, first: int, bits: np.ndarray) -> bytes:
        """A STEP payload for steps first.. (their bits must be representable); n-SPSA: bits holds the
        count * N values in order (step by step, perturbation by perturbation), the head counts steps."""
        if self.per_step > 1:
            return struct.pack("<II", first, bits.size // self.per_step) + self._encode_values(bits)[8:]
        return self._encode_values(bits, first)

    def _encode_values(self, bits: np.ndarray, first: int = 0) -> bytes:
        head = struct.pack("<II", first, bits.size)
        if self.encoding == "bf16":
            return head + (bits >> 8).astype(np.uint8).tobytes() + (bits & 0xFF).astype(np.uint8).tobytes()
        codes = self.from_bits[bits]
        assert (codes >= 0).all()
        if self.encoding == "fp8":
            return head + codes.astype(np.uint8).tobytes()
        planes = [np.packbits((codes >> i) & 1, bitorder="little") for i in (0, 1)]  # nonzero, negative
        return head + planes[0].tobytes() + planes[1].tobytes()

    def decode(self, payload: bytes) -> tuple[int, np.ndarray]:
        """(first_step, bf16 patterns) of a STEP payload; _Corrupt where format.md or rule.md forbid it.
        n-SPSA (spec/nspsa.md): the patterns come as a (count, N) array."""
        if self.per_step > 1:
            return self._decode_perturbations(payload)
        return self._decode_values(payload)

    def _decode_perturbations(self, payload: bytes) -> tuple[int, np.ndarray]:
        """The records region of count steps holds count * N values, laid out as count * N steps' records:
        decoded as such, then each value's index v read as (step first + v // N, perturbation v % N)."""
        n = self.per_step
        first, count = _count(payload)
        if count * n > MAX_STEPS_PER_CHUNK:
            raise _Corrupt(f"count {count} with {n} perturbations a step is {count * n} values, over the limit "
                           f"of {MAX_STEPS_PER_CHUNK} a chunk")
        try:
            _, values = self._decode_values(struct.pack("<II", 0, count * n) + payload[8:])
        except _Corrupt as e:
            def where(m: re.Match) -> str:
                v = int(m.group(1))
                return f"step {first + v // n} (perturbation {v % n})"
            reason = re.sub(r"step (\d+)", where, str(e)).replace(f"count {count * n} needs",
                                                                    f"count {count} x {n} perturbations needs")
            raise _Corrupt(reason) from None
        return first, values.reshape(count, n)

    def _decode_values(self, payload: bytes) -> tuple[int, np.ndarray]:
        if self.encoding == "bf16":
            first, (hi, lo) = _counted(payload, 2)
            return first, (hi.astype(np.uint16) << 8) | lo
        if self.encoding == "fp8":
            first, (codes,) = _counted(payload, 1)
            if not (ok := self.valid[codes]).all():
                at = int(np.flatnonzero(~ok)[0])
                raise _Corrupt(f"step {first + at} records fp8 code 0x{codes[at]:02x}, a NaN, which rule.md forbids")
            return first, self.to_bits[codes]
        first, count = _count(payload)
        n = (count + 7) // 8
        if len(payload) != 8 + 2 * n:
            raise _Corrupt(f"payload is {len(payload)} bytes, but count {count} needs {8 + 2 * n}")
        nonzero, negative = (np.unpackbits(np.frombuffer(payload, np.uint8, n, 8 + i * n), bitorder="little")
                             for i in (0, 1))
        if nonzero[count:].any() or negative[count:].any():
            raise _Corrupt("the bits after the last step's are not 0")
        if (bad := np.flatnonzero(negative & ~nonzero)).size:
            raise _Corrupt(f"step {first + int(bad[0])} records a negative sign for a zero gradient, which "
                           f"rule.md forbids")
        return first, self.to_bits[nonzero[:count] | (negative[:count] << 1)]


LOSS_CHUNK = b"lsbf"  # the chunk type the writer records losses in (format.md `lsbf`; `loss` is still read)
_LOSS_WIDTH = {"loss": 4, "lsbf": 2}  # bytes per value: binary32, bfloat16


def _encode_losses_f32(first: int, values: np.ndarray) -> bytes:
    """A `loss` payload: binary32 values in four byte planes (what files before `lsbf` hold)."""
    u = values.astype(np.float32).view(np.uint32)
    return struct.pack("<II", first, u.size) + b"".join((u >> s).astype(np.uint8).tobytes() for s in (24, 16, 8, 0))


def losses_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round binary32 values to bfloat16 bit patterns, to nearest, ties to even (rule.md R_D for BF16);
    every NaN becomes 0x7FC0. Losses are noisy batch measurements: 8 significant bits keep them to 0.2%."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(values.astype(np.float32)), np.uint16(0x7FC0), bits)


def _encode_losses(first: int, values: np.ndarray) -> bytes:
    """A LOSS_CHUNK (`lsbf`) payload: bfloat16 values in two byte planes, like the STEP records."""
    bits = losses_to_bf16(values)
    return struct.pack("<II", first, bits.size) + (bits >> 8).astype(np.uint8).tobytes() + \
        (bits & 0xFF).astype(np.uint8).tobytes()


def decode_losses(payload: bytes, ctype: str = "loss") -> tuple[int, np.ndarray]:
    """A `loss` or `lsbf` payload (format.md) -> (first_step, float32 values)."""
    first, planes = _counted(payload, _LOSS_WIDTH[ctype])
    u = planes.astype(np.uint32)
    if ctype == "lsbf":
        return first, ((u[0] << 24) | (u[1] << 16)).view(np.float32)
    return first, (u[0] << 24 | u[1] << 16 | u[2] << 8 | u[3]).view(np.float32)


class _Corrupt(Exception):
    """Internal: why the chunk being read is corrupt (the caller adds index and offset)."""

    def __init__(self, reason: str, ctype: str | None = None) -> None:
        super().__init__(reason)
        self.ctype = ctype


def _count(payload: bytes) -> tuple[int, int]:
    """first_step and count of a STEP/loss payload, the count checked against its bounds."""
    if len(payload) < 8:
        raise _Corrupt(f"payload is {len(payload)} bytes, shorter than its 8-byte prefix")
    first, count = struct.unpack_from("<II", payload)
    if not 1 <= count <= MAX_STEPS_PER_CHUNK:
        raise _Corrupt(f"count {count} is outside 1..{MAX_STEPS_PER_CHUNK}")
    return first, count


def _counted(payload: bytes, width: int) -> tuple[int, np.ndarray]:
    """Split a STEP/loss payload into first_step and its byte planes, checking the declared count."""
    first, count = _count(payload)
    if len(payload) != 8 + width * count:
        raise _Corrupt(f"payload is {len(payload)} bytes, but count {count} needs {8 + width * count}")
    return first, np.frombuffer(payload, np.uint8, offset=8).reshape(width, count)


class _Budget:
    """The decompression budgets of format.md (*Reading cost*), spent chunk by chunk as a file is read."""

    def __init__(self, file_bytes: int) -> None:
        self.left = BUDGET_BASE + BUDGET_RATIO * file_bytes
        self.json_left = JSON_BUDGET_BASE + JSON_BUDGET_RATIO * file_bytes

    def spend(self, size: int, is_json: bool, what: str = "decompressed bytes") -> None:
        if size > self.left:
            raise _Corrupt(f"its {size} {what} would exceed the file's decompression budget "
                           f"({BUDGET_BASE} + {BUDGET_RATIO} x file size; {self.left} left)")
        if is_json and size > self.json_left:
            raise _Corrupt(f"its {size} bytes of JSON would exceed the file's JSON budget ({JSON_BUDGET_BASE} "
                           f"+ {JSON_BUDGET_RATIO} x file size; {self.json_left} left)")
        self.left -= size
        if is_json:
            self.json_left -= size


def _decompress(dctx: zstandard.ZstdDecompressor, payload: bytes, limit: int, budget: _Budget | None = None,
                is_json: bool = False, cost: Callable[[int], int] | None = None) -> bytes:
    """Exactly one checksummed zstd frame of declared size <= limit (and within the budget, charged
    cost(size) if given), and nothing after it. The declared size is checked before anything is
    decompressed."""
    if payload[:4] != _ZSTD_MAGIC:
        raise _Corrupt("payload is not a zstd frame")
    try:
        params = zstandard.get_frame_parameters(payload)
    except zstandard.ZstdError as e:
        raise _Corrupt(f"bad zstd frame header ({e})") from None
    size = params.content_size
    if size == zstandard.CONTENTSIZE_UNKNOWN:
        raise _Corrupt("zstd frame does not declare its content size")
    if size > limit:
        raise _Corrupt(f"zstd frame declares {size} bytes of content, over this chunk type's limit of {limit}")
    if params.window_size > MAX_WINDOW_BYTES:
        raise _Corrupt(f"zstd window of {params.window_size} bytes is over the limit of {MAX_WINDOW_BYTES}")
    if not params.has_checksum or params.dict_id:
        raise _Corrupt("zstd frame lacks a content checksum or needs a dictionary")
    if budget is not None:
        if cost is None:
            budget.spend(size, is_json)
        else:
            budget.spend(cost(size), is_json, "bytes of steps decoded to bfloat16 (2 a step)")
    dobj = dctx.decompressobj()
    try:
        out = dobj.decompress(payload)  # libzstd stops at the declared content size
    except zstandard.ZstdError as e:
        raise _Corrupt(f"zstd: {e}") from None
    if not dobj.eof:
        raise _Corrupt("zstd frame is incomplete")
    if dobj.unused_data:
        raise _Corrupt(f"{len(dobj.unused_data)} bytes follow the zstd frame")
    if len(out) != size:
        raise _Corrupt(f"zstd frame holds {len(out)} bytes but declares {size}")
    return out


# --- reading ----------------------------------------------------------------------------------------

@dataclass
class CorruptInfo:
    index: int
    type: str
    offset: int
    reason: str


@dataclass
class Trajectory:
    path: Path
    header: dict
    grad_bits: np.ndarray               # uint16 bfloat16 pattern of each step's gq, whatever the grad_encoding;
    #                                     n-SPSA (rule perturbations N > 1): shape (steps, N), a row a step
    losses: np.ndarray | None           # float32 (bfloat16 values from lsbf), NaN where none was recorded
    fingerprints: dict[int, list[str]]  # step -> tensor fingerprints
    truncated: bool                     # the file ends inside a chunk (a torn write)
    corrupt: CorruptInfo | None         # only with strict=False
    file_bytes: int
    step_bytes: int                     # 12-byte heads + payloads of all STEP chunks
    valid_bytes: int                    # end of the last chunk used: where an append continues
    evals: list[dict] = field(default_factory=list)  # {"step", "split", "metrics"} in file order
    # tensor index -> initial bytes of a new tensor (a read-only view when one INIT chunk held them all)
    inits: dict[int, bytes | memoryview] = field(default_factory=dict)
    loss_bytes: int = 0                 # 12-byte heads + payloads of all loss and lsbf chunks
    checkpoints: dict[int, str] = field(default_factory=dict)  # step -> checkpoint fingerprint (ckpt chunks)
    init_bytes: int = 0                 # 12-byte heads + payloads of all INIT chunks

    @property
    def new_tensors(self) -> dict[str, int]:
        """Tuned tensors the base lacks, whose initial values the file stores: name -> raw bytes."""
        return {self.header["tensors"][k]["name"]: len(v) for k, v in sorted(self.inits.items())}

    @property
    def steps(self) -> int:
        return int(self.grad_bits.shape[0])  # n-SPSA: grad_bits is (steps, N)

    @property
    def final_fingerprint(self) -> list[str] | None:
        return self.fingerprints.get(self.steps)

    @property
    def bytes_per_step(self) -> float:
        return self.step_bytes / self.steps if self.steps else 0.0


def _check_preamble(path: Path, pre: bytes) -> None:
    if not pre:
        raise TrajectoryError(f"{path} is empty, not a .mzt trajectory")
    magic = pre[:len(MAGIC)]
    if magic != MAGIC[:len(magic)]:
        if magic[1:4] == b"MZT":
            raise TrajectoryError(f"{path}: its magic bytes were altered (probably by a text-mode or 7-bit "
                                  f"transfer): copy the file again in binary mode")
        raise TrajectoryError(f"{path} is not a .mzt trajectory (bad magic bytes)")
    if len(pre) < PREAMBLE.size:
        raise TrajectoryError(f"{path} is truncated inside its {PREAMBLE.size}-byte preamble: nothing to recover")
    _, version, flags = PREAMBLE.unpack(pre)
    if version != FORMAT_VERSION:
        raise UnsupportedError(f"{path} has format version {version}; this mezo-replay reads version "
                               f"{FORMAT_VERSION}" + (": upgrade mezo-replay" if version > FORMAT_VERSION else ""))
    if flags:
        raise UnsupportedError(f"{path} has preamble flags 0x{flags:08x}, not 0: it needs a newer mezo-replay "
                               f"or is damaged")


def _zeros_to_end(f: BinaryIO) -> bool:
    while block := f.read(1 << 20):
        if block.count(0) != len(block):
            return False
    return True


def _read_chunk(f: BinaryIO, offset: int, size: int) -> tuple[str, bytes] | None:
    """The next chunk's type and CRC-checked payload, or None if the file ends inside it."""
    head = f.read(CHUNK_HEAD.size)
    if len(head) < CHUNK_HEAD.size:
        return None
    length, raw_type, crc = CHUNK_HEAD.unpack(head)
    if head == bytes(CHUNK_HEAD.size) and _zeros_to_end(f):
        return None  # a crash can leave zero-filled blocks after the last write: that is truncation
    if not (raw_type.isalpha() and raw_type.isascii()):
        raise _Corrupt("the type is not four ASCII letters", repr(raw_type)[2:-1])
    ctype = raw_type.decode("ascii")
    if length > MAX_CHUNK_BYTES:
        raise _Corrupt(f"declares a {length}-byte payload, over the limit of {MAX_CHUNK_BYTES}", ctype)
    if length > size - offset - CHUNK_HEAD.size:
        return None  # checked before reading: never allocate what the file cannot hold
    payload = f.read(length)
    if len(payload) < length:
        return None  # the file shrank while we read it
    if zlib.crc32(payload, zlib.crc32(raw_type)) != crc:
        raise _Corrupt("CRC mismatch", ctype)
    return ctype, payload


def read_trajectory(path: PathLike, *, strict: bool = True) -> Trajectory:
    """Read a trajectory: truncation is reported, corruption raises (strict) or is reported (not strict).

    Time and memory stay proportional to the file's size (format.md, *Reading cost*): every chunk's
    declared content size is charged to the decompression budgets before it is decompressed, and no
    step is looked at by a Python loop."""
    path = Path(path)
    dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_BYTES)
    header: dict = {}
    bits: list[np.ndarray] = []
    losses: list[tuple[int, np.ndarray]] = []
    loss_end = 0  # loss chunks cover disjoint, increasing step ranges
    fingerprints: dict[int, list[str]] = {}
    evals: list[dict] = []
    inits: dict[int, list[memoryview]] = {}
    init_got: dict[int, int] = {}
    init_needed: dict[int, int] = {}  # index -> bytes, for tensors marked init
    checkpoints: dict[int, str] = {}
    steps = step_bytes = loss_bytes = init_bytes = index = 0
    truncated, corrupt = False, None
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        budget = _Budget(size)
        _check_preamble(path, f.read(PREAMBLE.size))
        offset = PREAMBLE.size
        while offset < size or index == 0:
            ctype = "?"
            try:
                chunk = _read_chunk(f, offset, size)
                if chunk is None:
                    if index == 0:
                        raise TrajectoryError(f"{path} is truncated inside its HEAD chunk (file is {size} bytes): "
                                              f"nothing to recover")
                    truncated = True
                    break
                ctype, payload = chunk
                if (index == 0) != (ctype == "HEAD"):
                    raise _Corrupt("the first chunk must be HEAD, and only the first")
                if ctype == "HEAD":
                    header = _decode_head(dctx, payload, path, budget)
                    rule = MezoSGD.from_header(header)
                    codec = StepCodec(rule)
                    init_needed = {k: math.prod(t["shape"]) * _ITEMSIZE[t["dtype"]]
                                   for k, t in enumerate(header["tensors"]) if t.get("init") is True}
                elif ctype == "INIT":
                    if bits:
                        raise _Corrupt("INIT after the first STEP chunk")
                    k, at, data = _decode_init(dctx, payload, budget)
                    got = init_got.get(k, 0)
                    if k not in init_needed or at != got or at + len(data) > init_needed[k]:
                        raise _Corrupt(f"tensor {k} is not marked init, or these bytes ({at}..{at + len(data)}) "
                                       f"do not continue its initial value in order")
                    inits.setdefault(k, []).append(data)
                    init_got[k] = got + len(data)
                    init_bytes += CHUNK_HEAD.size + len(payload)
                elif ctype == "STEP":
                    if not bits:
                        _check_inits_complete(path, init_got, init_needed)
                    first, chunk_bits = codec.decode(_decompress(dctx, payload, codec.max_payload, budget,
                                                                  cost=codec.budget_cost))
                    if first != steps:
                        raise _Corrupt(f"first_step is {first}, but {steps} steps precede it (a gap or overlap)")
                    if first + chunk_bits.shape[0] > MAX_STEPS // rule.perturbations:  # nspsa.md: N t + j < 2^32 - 1
                        raise _Corrupt(f"more than {MAX_STEPS // rule.perturbations} steps in the file" +
                                       (f" (a file of {rule.perturbations} perturbations a step holds at most "
                                        f"(2^32 - 1) // {rule.perturbations})" if rule.perturbations > 1 else ""))
                    if rule.perturbations > 1:
                        if (bad := invalid_perturbation_steps(chunk_bits, rule, first)).size:
                            t, j = divmod(int(bad[0]), rule.perturbations)
                            raise _Corrupt(f"step {first + t} (perturbation {j}) records gradient bits "
                                           f"0x{int(chunk_bits.reshape(-1)[bad[0]]):04x}, which rule.md forbids")
                    elif (bad := invalid_steps(chunk_bits, rule, first)).size:
                        raise _Corrupt(f"step {first + bad[0]} records gradient bits 0x{chunk_bits[bad[0]]:04x}, "
                                       f"which rule.md forbids")
                    bits.append(chunk_bits)
                    steps += chunk_bits.shape[0]
                    step_bytes += CHUNK_HEAD.size + len(payload)
                elif ctype == "FPRT":
                    fprt = _decode_fprt(dctx, payload, steps, len(header["tensors"]), budget)
                    if fingerprints.setdefault(steps, fprt) != fprt:
                        raise _Corrupt(f"contradicts the fingerprint recorded earlier for step {steps}")
                elif ctype == "eval":
                    evals.append(_decode_eval(dctx, payload, steps, budget))
                elif ctype == "ckpt":
                    at, fp = _decode_ckpt(dctx, payload, steps, budget)
                    if checkpoints.setdefault(at, fp) != fp:
                        raise _Corrupt(f"contradicts the checkpoint fingerprint recorded earlier for step {at}")
                elif ctype in _LOSS_WIDTH:
                    first, values = decode_losses(_decompress(dctx, payload, MAX_LOSS_PAYLOAD, budget), ctype)
                    if first < loss_end or first + values.size > steps:
                        raise _Corrupt(f"covers steps {first}..{first + values.size - 1}, but only {steps} are "
                                       f"recorded" + (f" and steps before {loss_end} already have losses"
                                                      if first < loss_end else ""))
                    losses.append((first, values))
                    loss_end = first + values.size
                    loss_bytes += CHUNK_HEAD.size + len(payload)
                elif ctype[0].isupper():
                    raise UnsupportedError(f"{path}: chunk {index} at byte offset {offset} has the critical type "
                                           f"{ctype!r}, unknown to this mezo-replay: it needs a newer version")
            except _Corrupt as e:
                ctype = e.ctype or ctype
                if strict or index == 0:
                    raise CorruptChunkError(path, index, ctype, offset, str(e), steps_before=steps) from None
                corrupt = CorruptInfo(index, ctype, offset, str(e))
                break
            offset += CHUNK_HEAD.size + len(payload)
            index += 1

    if not bits:  # no STEP chunk: the initial values must still be whole to replay zero steps
        _check_inits_complete(path, init_got, init_needed)
    loss_array = None
    if header["records"]["losses"]:
        loss_array = np.full(steps, np.nan, dtype=np.float32)
        for first, values in losses:
            loss_array[first:first + values.size] = values
    grad_bits = np.concatenate(bits) if bits else np.zeros(0, dtype=np.uint16)
    if header["rule"].get("perturbations", 1) > 1 and not bits:
        grad_bits = grad_bits.reshape(0, header["rule"]["perturbations"])
    # One part (the usual case) is kept as it came out of zstd; several are joined once.
    init_data = {k: parts[0] if len(parts) == 1 else b"".join(parts) for k, parts in inits.items()}
    return Trajectory(path, header, grad_bits, loss_array, fingerprints, truncated, corrupt, size, step_bytes, offset,
                      evals, init_data, loss_bytes, checkpoints, init_bytes)


_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}
_INIT_HEAD = struct.Struct("<IQ")


def _decode_init(dctx: zstandard.ZstdDecompressor, payload: bytes, budget: _Budget) -> tuple[int, int, memoryview]:
    data = _decompress(dctx, payload, _INIT_HEAD.size + MAX_INIT_DATA, budget)
    if len(data) < _INIT_HEAD.size:
        raise _Corrupt("payload shorter than its index and offset")
    k, at = _INIT_HEAD.unpack_from(data)
    return k, at, memoryview(data)[_INIT_HEAD.size:]  # a view: the tensor's bytes are not copied


def _check_inits_complete(path: Path, got: dict[int, int], needed: dict[int, int]) -> None:
    for k, n in needed.items():
        if got.get(k, 0) != n:
            raise TrajectoryError(f"{path}: the initial value of new tensor {k} is incomplete "
                                  f"({got.get(k, 0)} of {n} bytes): nothing can be replayed")


def _decode_head(dctx: zstandard.ZstdDecompressor, payload: bytes, path: Path, budget: _Budget) -> dict:
    try:
        header = _json_loads(_decompress(dctx, payload, MAX_HEADER_BYTES, budget, is_json=True))
        validate_header(header)  # type: ignore[arg-type]
    except TrajectoryError as e:
        raise type(e)(f"{path}: HEAD: {e}") from None
    except ValueError as e:
        raise _Corrupt(f"bad JSON ({e})") from None
    return header  # type: ignore[return-value]


def _decode_fprt(dctx: zstandard.ZstdDecompressor, payload: bytes, steps: int, n_tensors: int,
                 budget: _Budget) -> list[str]:
    try:
        obj = _json_loads(_decompress(dctx, payload, MAX_FPRT_BYTES, budget, is_json=True))
    except (ValueError, LimitError) as e:
        raise _Corrupt(f"bad JSON ({e})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("tensors"), list) or type(obj.get("step")) is not int:
        raise _Corrupt('payload is not {"step": N, "tensors": [...]}')
    if obj["step"] != steps:
        raise _Corrupt(f"step is {obj['step']}, but {steps} steps precede it")
    fps = obj["tensors"]
    if len(fps) != n_tensors or not all(isinstance(s, str) and SHA256_HEX.fullmatch(s) for s in fps):
        raise _Corrupt(f"tensors must be {n_tensors} lowercase hex SHA-256 strings, one per tuned tensor")
    return fps


def _decode_ckpt(dctx: zstandard.ZstdDecompressor, payload: bytes, steps: int, budget: _Budget) -> tuple[int, str]:
    data = _decompress(dctx, payload, CKPT.size, budget)
    if len(data) != CKPT.size:
        raise _Corrupt(f"payload is {len(data)} bytes, not {CKPT.size}")
    at, fp = CKPT.unpack(data)
    if at > steps:
        raise _Corrupt(f"step {at} is beyond the {steps} steps recorded before it")
    return at, fp.hex()


def _check_eval(obj: object, steps: int) -> dict:
    """{"step": N, "split": str, "metrics": {str: finite number}} with N <= steps; raises ValueError."""
    if not isinstance(obj, dict) or set(obj) != {"step", "split", "metrics"}:
        raise ValueError('payload is not {"step": N, "split": ..., "metrics": {...}}')
    step, split, metrics = obj["step"], obj["split"], obj["metrics"]
    if type(step) is not int or not 0 <= step <= steps:
        raise ValueError(f"step {step!r} is not in 0..{steps}, the steps recorded before it")
    if not isinstance(split, str) or not isinstance(metrics, dict) or not all(
            isinstance(k, str) and type(v) in (int, float) and math.isfinite(v) for k, v in metrics.items()):
        raise ValueError("split must be a string and metrics a map of names to finite numbers")
    return obj


def _decode_eval(dctx: zstandard.ZstdDecompressor, payload: bytes, steps: int, budget: _Budget) -> dict:
    try:
        return _check_eval(_json_loads(_decompress(dctx, payload, MAX_EVAL_BYTES, budget, is_json=True)), steps)
    except (ValueError, LimitError) as e:
        raise _Corrupt(str(e)) from None


# --- writing ----------------------------------------------------------------------------------------

def fsync_dir(directory: Path) -> None:
    """Makes a rename in `directory` durable where the platform can; silently a no-op where it cannot."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported here (e.g. Windows): the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_WRITE_FAILURES = {errno.ENOSPC: "no space left on device",
                   errno.EFBIG: "file too large (a file size limit was reached)"}
if hasattr(errno, "EDQUOT"):
    _WRITE_FAILURES[errno.EDQUOT] = "disk quota exceeded"


class TrajectoryWriteError(MezoReplayError):
    """The system refused a write (disk full, quota, file size limit, I/O error). The writer stops and cuts
    the file back to its last complete chunk, so the file holds exactly the steps written before, and a
    resume continues it."""

    def __init__(self, path: Path, cause: OSError, steps: int | None) -> None:
        self.path, self.cause, self.steps = path, cause, steps
        reason = _WRITE_FAILURES.get(cause.errno or 0) or f"{cause.strerror or cause} (errno {cause.errno})"
        if steps is None:
            message = f"{reason} while creating {path}: nothing was written"
        elif steps == 0:
            message = (f"{reason} while writing {path} before its first step was recorded: free some space and "
                       f"start again with --overwrite")
        else:
            message = (f"{reason} while writing {path} after step {steps}: the file holds its first {steps} steps, "
                       f"intact, and `mezo-replay train --resume {path}` with the same options continues it "
                       f"exactly")
        super().__init__(message)


def _write_all(f: BinaryIO, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[f.write(view) or 0:]  # an unbuffered file may write less than asked


def _exists_error(path: Path) -> OutputExistsError:
    return OutputExistsError(f"{path} already exists: pass --overwrite to replace it")


def _filled(f: BinaryIO, fill: Callable[[BinaryIO], None], path: Path) -> None:
    try:
        fill(f)
        os.fsync(f.fileno())
    except OSError as e:
        raise TrajectoryWriteError(path, e, None) from e


def create_locked(path: PathLike, fill: Callable[[BinaryIO], None], *, overwrite: bool = False,
                  replacing: FileLock | None = None) -> tuple[BinaryIO, FileLock]:
    """A new file named `path`, holding what `fill` wrote, returned open for writing and locked.

    `fill` writes into a temporary file beside `path`, which is then hard-linked to `path`: the link
    fails if `path` exists, so two writers starting at once cannot both win, and `path` never names a
    half-written file. With `overwrite` an existing file is replaced by a rename, but only one that no
    one is writing (its lock is taken first), or the one `replacing` (a lock the caller holds on it)
    locks. On filesystems without hard links, `path` is created with O_EXCL and `fill` runs again on it
    (still exclusive, but a crash can leave it half-written).
    """
    path = Path(path)
    if not overwrite and os.path.lexists(path):
        raise FileLock.probe(path) or _exists_error(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        f = open(tmp, "xb", buffering=0)
    except OSError as e:
        if e.errno in _WRITE_FAILURES:  # a full directory can refuse a new name
            raise TrajectoryWriteError(path, e, None) from e
        raise
    lock: FileLock | None = None
    try:
        _filled(f, fill, path)
        lock = FileLock.acquire(tmp)  # before the file has its name: no one else can take it first
        if replacing is not None:
            os.replace(tmp, path)  # the caller's lock keeps every other writer off the file it replaces
            in_place = None
        else:
            in_place = _publish(tmp, path, overwrite, fill)
    except BaseException as e:
        f.close()
        if lock is not None:
            lock.release()
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in _WRITE_FAILURES:
            raise TrajectoryWriteError(path, e, None) from e
        raise
    if in_place is not None:
        f.close()
        lock.release()
        tmp.unlink(missing_ok=True)
        f, lock = in_place
    fsync_dir(path.absolute().parent)
    lock.path = path
    return f, lock


def _publish(tmp: Path, path: Path, overwrite: bool,
             fill: Callable[[BinaryIO], None]) -> tuple[BinaryIO, FileLock] | None:
    """Give the (locked) file `tmp` the name `path`; the file and lock to use instead if that could
    only be done by writing `path` itself."""
    for _ in range(8):
        if overwrite and os.path.lexists(path):
            try:
                old = FileLock.acquire(path) if os.path.isfile(path) else None
            except FileNotFoundError:
                continue  # gone meanwhile
            try:
                os.replace(tmp, path)
            finally:
                if old is not None:
                    old.release()
            return None
        try:
            os.link(tmp, path)
        except FileExistsError:
            if not overwrite:
                raise FileLock.probe(path) or _exists_error(path) from None
            continue  # another writer created it meanwhile: replace it, unless it is still writing
        except OSError:
            return _create_in_place(path, fill)  # this filesystem has no hard links
        tmp.unlink()
        return None
    raise FileLock.probe(path) or _exists_error(path)


def _create_in_place(path: Path, fill: Callable[[BinaryIO], None]) -> tuple[BinaryIO, FileLock]:
    try:
        f = open(path, "xb", buffering=0)
    except FileExistsError:
        raise FileLock.probe(path) or _exists_error(path) from None
    try:
        lock = FileLock.acquire(path)
        try:
            _filled(f, fill, path)
        except BaseException:
            lock.release()
            raise
    except BaseException:
        f.close()
        path.unlink(missing_ok=True)  # ours, and half-written
        raise
    return f, lock


class TrajectoryWriter:
    """Appends steps to a `.mzt` file; every flush leaves a complete, fsynced, readable file.

    From creation (or open_append) to close the writer holds the file's lock, so a second writer of
    the same file, here or in another process, fails at once with FileBusyError. If the system refuses
    a write (disk full, ...), the writer cuts the file back to its last complete chunk, stops, and
    raises TrajectoryWriteError, again on every later call that would write.
    """

    def __init__(self, path: PathLike, header: dict, *, overwrite: bool = False, steps_per_chunk: int = 256,
                 compact: bool = False):
        self._check_steps_per_chunk(steps_per_chunk)
        self.compact = compact  # close() merges the per-flush chunks (format/compact.py)
        path = Path(path)
        self._cctx = zstandard.ZstdCompressor(level=19, write_checksum=True, write_content_size=True)
        validate_header(header)
        try:
            data = _json_dumps(header)
        except UnicodeEncodeError:
            raise TrajectoryError("the header holds a string that is not valid UTF-8 (a lone surrogate)") from None
        except (TypeError, ValueError, RecursionError) as e:
            raise TrajectoryError(f"the header cannot be written as JSON: {e}") from None
        if len(data) > MAX_HEADER_BYTES:
            raise LimitError(f"the header is {len(data)} bytes of JSON, over the limit of {MAX_HEADER_BYTES}")
        try:
            validate_header(_json_loads(data))  # and what the reader will see: JSON depth, no tuple surprises
        except ValueError as e:
            raise TrajectoryError(f"the header is not valid JSON: {e}") from None
        head = PREAMBLE.pack(MAGIC, FORMAT_VERSION, 0) + self._chunk(b"HEAD", data)
        f, lock = create_locked(path, lambda f: _write_all(f, head), overwrite=overwrite)
        self._setup(path, f, lock, header, 0, steps_per_chunk, len(head))

    @staticmethod
    def _check_steps_per_chunk(steps_per_chunk: int) -> None:
        if not 1 <= steps_per_chunk <= MAX_STEPS_PER_CHUNK:
            raise ValueError(f"steps_per_chunk must be in 1..{MAX_STEPS_PER_CHUNK}, not {steps_per_chunk}")

    def _setup(self, path: Path, f: BinaryIO, lock: FileLock, header: dict, steps: int, steps_per_chunk: int,
               end: int) -> None:
        self.path, self._file, self._lock, self._spc = path, f, lock, steps_per_chunk
        self._end = end  # where the last complete chunk ends: what a failed write is cut back to
        self._failure: TrajectoryWriteError | None = None
        self._has_losses = bool(header["records"]["losses"])
        self._n_tensors = len(header["tensors"])
        self._rule = MezoSGD.from_header(header)
        self._codec = StepCodec(self._rule)
        self._flushed = steps
        self._bits: list[int] = []
        self._losses: list[float] = []
        self._evals: list[bytes] = []
        if not hasattr(self, "_cctx"):
            self._cctx = zstandard.ZstdCompressor(level=19, write_checksum=True, write_content_size=True)

    @classmethod
    def open_append(cls, path: PathLike, *, steps_per_chunk: int = 256,
                    lock: FileLock | None = None, compact: bool = False) -> "TrajectoryWriter":
        """Continue a trajectory (resume): a torn trailing chunk is cut off, a corrupt file is refused.

        Takes the file's lock before reading it (FileBusyError if another writer holds it), or uses
        `lock`, one the caller already holds on this file. The writer owns the lock once this returns;
        if it raises, a lock passed in is still the caller's to release."""
        cls._check_steps_per_chunk(steps_per_chunk)
        held = lock if lock is not None else FileLock.acquire(path)
        try:
            traj = read_trajectory(path, strict=True)
            f = open(traj.path, "ab", buffering=0)
            try:
                if traj.valid_bytes < os.fstat(f.fileno()).st_size:
                    f.truncate(traj.valid_bytes)
                    os.fsync(f.fileno())
            except OSError as e:
                f.close()
                raise TrajectoryWriteError(traj.path, e, traj.steps) from e
            except BaseException:
                f.close()
                raise
        except BaseException:
            if lock is None:
                held.release()
            raise
        writer = cls.__new__(cls)
        writer.compact = compact
        writer._setup(traj.path, f, held, traj.header, traj.steps, steps_per_chunk, traj.valid_bytes)
        return writer

    @property
    def steps(self) -> int:
        return self._flushed + len(self._bits) // self._codec.per_step

    @property
    def records_losses(self) -> bool:
        return self._has_losses

    def _chunk(self, ctype: bytes, data: bytes) -> bytes:
        payload = self._cctx.compress(data)
        if len(payload) > MAX_CHUNK_BYTES:
            raise LimitError(f"a {ctype.decode()} chunk compresses to {len(payload)} bytes, over {MAX_CHUNK_BYTES}")
        return CHUNK_HEAD.pack(len(payload), ctype, zlib.crc32(payload, zlib.crc32(ctype))) + payload

    def _check_open(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._file is None:
            raise ValueError(f"the writer of {self.path} is closed")

    def _write(self, data: bytes) -> None:
        self._check_open()
        assert self._file is not None
        try:
            _write_all(self._file, data)
            os.fsync(self._file.fileno())
        except BaseException as e:
            self._abandon()
            if isinstance(e, OSError):
                self._failure = TrajectoryWriteError(self.path, e, self._flushed)
                raise self._failure from e
            raise
        self._end += len(data)

    def _abandon(self) -> None:
        """After a failed or interrupted write: cut the torn bytes off, so the file ends on a complete
        chunk (if even that fails, readers and open_append treat the tail as a torn write), then close
        and unlock. Appending after torn bytes would corrupt the file, so the writer stops here."""
        f, self._file = self._file, None
        if f is None:
            return
        try:
            f.truncate(self._end)
            os.fsync(f.fileno())
        except OSError:
            pass
        finally:
            f.close()
            self._lock.release()

    def append_step(self, grad_bits: int | Sequence[int], loss: float | None = None) -> None:
        """Record one step; buffered, and written out every steps_per_chunk steps. n-SPSA (the header's
        rule has perturbations N > 1): grad_bits is the step's N records in perturbation order, loss the
        mean of its 2N losses."""
        if self._codec.per_step > 1:
            self._append_perturbations(grad_bits, loss)
            return
        self._check_open()
        if isinstance(grad_bits, bool) or not isinstance(grad_bits, (int, np.integer)) or not 0 <= grad_bits <= 0xFFFF:
            raise ValueError(f"grad_bits must be a bfloat16 bit pattern in 0..65535, not {grad_bits!r}")
        if (loss is None) == self._has_losses:
            raise ValueError("a loss is required for every step" if self._has_losses
                             else "the header says records.losses is false: pass no loss")
        if self.steps >= MAX_STEPS:
            raise LimitError(f"a trajectory holds at most {MAX_STEPS} steps")
        if invalid_steps(np.array([grad_bits], dtype=np.uint16), self._rule, self.steps).size:
            raise ValueError(f"gradient bits 0x{int(grad_bits):04x} are not finite, >= 2^127, or make |lr * g| "
                             f"exceed 2^100 (rule.md): refusing to record the step")
        if not self._codec.representable(int(grad_bits)):
            raise ValueError(f"gradient bits 0x{int(grad_bits):04x} are not a value the {self._codec.encoding} "
                             f"encoding records (rule.md): refusing to record the step")
        self._bits.append(int(grad_bits))
        if loss is not None:
            self._losses.append(float(loss))
        if len(self._bits) >= self._spc:
            self.flush()

    def _append_perturbations(self, grad_bits: Sequence[int], loss: float | None) -> None:
        self._check_open()
        n = self._codec.per_step
        values = [grad_bits] if isinstance(grad_bits, (int, np.integer)) else list(grad_bits)
        if len(values) != n or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 0 <= b <= 0xFFFF
                                   for b in values):
            raise ValueError(f"a step of {n} perturbations records {n} bfloat16 bit patterns in 0..65535, "
                             f"not {grad_bits!r}")
        if (loss is None) == self._has_losses:
            raise ValueError("a loss is required for every step" if self._has_losses
                             else "the header says records.losses is false: pass no loss")
        if self.steps >= MAX_STEPS // n:
            raise LimitError(f"a trajectory of {n} perturbations a step holds at most {MAX_STEPS // n} steps")
        row = np.array(values, dtype=np.uint16)
        if (bad := invalid_perturbation_steps(row, self._rule, self.steps)).size:
            raise ValueError(f"gradient bits 0x{int(row[bad[0]]):04x} (perturbation {int(bad[0])}) are not finite, "
                             f">= 2^127, or make |c| exceed 2^100 (spec/nspsa.md): refusing to record the step")
        for b in values:
            if not self._codec.representable(int(b)):
                raise ValueError(f"gradient bits 0x{int(b):04x} are not a value the {self._codec.encoding} "
                                 f"encoding records (rule.md): refusing to record the step")
        self._bits.extend(int(b) for b in values)
        if loss is not None:
            self._losses.append(float(loss))
        if len(self._bits) // n >= min(self._spc, MAX_STEPS_PER_CHUNK // n):
            self.flush()

    def write_init(self, index: int, data: bytes | memoryview) -> None:
        """The initial value of new tensor `index` (marked init in the header), before any step."""
        if self.steps or self._flushed:
            raise ValueError("initial values must be written before the first step")
        data = memoryview(data).cast("B")
        for at in range(0, max(len(data), 1), MAX_INIT_DATA):
            self._write(self._chunk(b"INIT", _INIT_HEAD.pack(index, at) + bytes(data[at:at + MAX_INIT_DATA])))

    def add_eval(self, step: int, split: str, metrics: dict[str, float]) -> None:
        """Record evaluation results on the weights after `step` steps. Kept until the next flush, so that
        evaluating often does not cut the step records into small, poorly compressed chunks."""
        obj = _check_eval({"step": step, "split": split, "metrics": {k: float(v) for k, v in metrics.items()}},
                          self.steps)
        self._evals.append(self._chunk(b"eval", _json_dumps(obj)))

    def add_checkpoint(self, step: int, fingerprint: str) -> None:
        """Record the checkpoint fingerprint of the weights after `step` steps (format.md `ckpt`). Kept until
        the next flush like evals: 36 bytes that need no cut in the step records."""
        if type(step) is not int or not 0 <= step <= self.steps or not SHA256_HEX.fullmatch(fingerprint):
            raise ValueError(f"a checkpoint needs a step in 0..{self.steps} and a lowercase hex SHA-256")
        self._evals.append(self._chunk(b"ckpt", CKPT.pack(step, bytes.fromhex(fingerprint))))

    def flush(self) -> None:
        """Write pending steps (their losses, then pending evals) as chunks and fsync; the file is then
        complete."""
        data = b""
        if self._bits:
            bits = np.array(self._bits, dtype=np.uint16)
            data = self._chunk(b"STEP", self._codec.encode(self._flushed, bits))
            if self._has_losses:
                data += self._chunk(LOSS_CHUNK, _encode_losses(self._flushed, np.array(self._losses, dtype=np.float32)))
        data += b"".join(self._evals)
        if not data:
            return
        self._write(data)
        self._flushed += len(self._bits) // self._codec.per_step
        self._bits.clear()
        self._losses.clear()
        self._evals.clear()

    def write_fingerprint(self, tensor_fps: list[str]) -> None:
        """Record the tuned tensors' fingerprints after every step so far (a checkpoint or the end)."""
        if len(tensor_fps) != self._n_tensors or not all(isinstance(s, str) and SHA256_HEX.fullmatch(s)
                                                         for s in tensor_fps):
            raise ValueError(f"expected {self._n_tensors} lowercase hex SHA-256 strings, one per tuned tensor")
        self.flush()
        self._write(self._chunk(b"FPRT", _json_dumps({"step": self.steps, "tensors": list(tensor_fps)})))

    def close(self, *, compact: bool | None = None) -> None:
        """Flush, close and unlock; closing twice, or after a failed write, is harmless.

        With `compact` (default: the writer's setting) a file whose run ended cleanly is rewritten with
        its per-flush chunks merged (format/compact.py), under the lock; if that fails it stays as it is."""
        if self._file is None:
            return
        try:
            self.flush()
            if (self.compact if compact is None else compact) and self._failure is None:
                from .compact import compact_locked  # compact.py reads files with this module
                compact_locked(self.path, self._end)
        finally:
            if self._file is not None:
                self._file.close()
                self._file = None
                self._lock.release()

    def __enter__(self) -> "TrajectoryWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        # also on an exception: what was recorded is valid and worth keeping (but not compacted: the run
        # did not end cleanly)
        self.close(compact=None if exc[0] is None else False)
