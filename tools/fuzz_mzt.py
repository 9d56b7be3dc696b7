"""A mutation fuzzer for the `.mzt` reader (pure Python; no atheris needed).

It takes the small valid trajectories of a corpus (tests/corpus/mzt), mutates them, and reads every
mutant with read_trajectory. A reader that holds spec/format.md answers each mutant in one of two ways:
it reads it, or it raises a MezoReplayError (one line for the CLI). Anything else (an OverflowError, a
UnicodeError, a RecursionError, MemoryError...) is a bug: the mutant is saved and the run fails.

Two kinds of mutants:
- raw: bytes flipped, inserted, deleted, chunks dropped, repeated, swapped or spliced, with no CRC
  fixed up. Chunk CRCs protect the payloads, so a raw mutant that still reads must hold the same header
  and a prefix of the original's steps: that is checked too.
- deep: a chunk's payload decompressed, its content mutated (JSON text and values, counts, step bits,
  zstd frame fields), recompressed and given a correct CRC, so the mutation reaches the parsers and
  the rule checks behind the CRC.

    python tools/fuzz_mzt.py --seconds 120                 # report cases/s and outcome classes
    python tools/fuzz_mzt.py --glob '*sign*' --seconds 300  # only the sign-encoded files
    python tools/fuzz_mzt.py --cli --seconds 300            # and `mezo-replay info` on every mutant
    python tools/fuzz_mzt.py --glob '*nspsa*' --cli         # the n-SPSA files (also '*adam*', '*compacted*')
    python tools/fuzz_mzt.py --make-corpus tests/corpus/mzt  # rebuild the kept corpus
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import resource
import struct
import sys
import tempfile
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mezo_replay.errors import MezoReplayError  # noqa: E402
from mezo_replay.format.mzt import read_trajectory  # noqa: E402

CORPUS = ROOT / "tests" / "corpus" / "mzt"
PREAMBLE_SIZE = 16
_CCTX = zstandard.ZstdCompressor(level=3, write_checksum=True, write_content_size=True)
INTERESTING_U32 = [0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 1 << 20, (1 << 20) + 1, 1 << 26,
                   (1 << 26) + 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]
JSON_TOKENS = [b"[", b"]", b"{", b"}", b'"', b"\\", b",", b":", b"0", b"-", b"1e999", b"NaN", b"Infinity",
               b"1" * 30, b"\\ud800", b"\\udc00\\ud800", b"\\u0000", b"\xff", b"\xed\xa0\x80", b"null", b"true",
               b"[" * 40, b'"\\"' * 50, b"99999999999999999999999", b"-0", b"1.5e308", b"4.9e-324"]
JSON_ATOMS = [None, True, False, 0, -1, 2**63, 2**64 - 1, -(2**64 - 1), 1e308, -0.0, 5e-324, "", "\ud800", "x" * 300,
              [], {}, [[[[]]]], {"k": {"k": {}}}, "\U0001F600", "\0", 3.5, 2**53 + 1]
# the edges of the newer rules' keys: perturbations 2..64, exponents -40..40, windows 1..64, betas in
# [2^-24, 1 - 2^-24], adam_eps in [2^-100, 1], and the values just outside each range
EDGE_ATOMS = [1, 2, 63, 64, 65, -40, 40, -41, 41, 2.0**-24, 1 - 2.0**-24, 2.0**-25, 1 - 2.0**-25, 2.0**-100, 2.0**-101,
              1.0, 0.75, 1.0000001, 0.0]
JSON_ATOMS += EDGE_ATOMS * 2  # drawn about as often as the others together


# --- the container, parsed just enough to mutate it ----------------------------------------------------

def split_chunks(data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """(preamble, [(type, payload)], trailing bytes) of a well-formed file."""
    chunks, at = [], PREAMBLE_SIZE
    while at + 12 <= len(data):
        length = struct.unpack_from("<I", data, at)[0]
        if at + 12 + length > len(data):
            break
        chunks.append((data[at + 4:at + 8], data[at + 12:at + 12 + length]))
        at += 12 + length
    return data[:PREAMBLE_SIZE], chunks, data[at:]


def chunk_bytes(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack("<I", len(payload)) + ctype + struct.pack("<I", zlib.crc32(ctype + payload)) + payload


def join(pre: bytes, chunks: list[tuple[bytes, bytes]], tail: bytes = b"") -> bytes:
    return pre + b"".join(chunk_bytes(t, p) for t, p in chunks) + tail


def content(payload: bytes) -> bytes | None:
    """A payload's content, if it is a sane small frame (earlier mutations may have made it anything)."""
    try:
        size = zstandard.get_frame_parameters(payload).content_size
        if size > 8 << 20:
            return None
        return zstandard.ZstdDecompressor(max_window_size=1 << 27).decompress(payload, max_output_size=8 << 20)
    except (zstandard.ZstdError, MemoryError, ValueError):
        return None


# --- mutators ------------------------------------------------------------------------------------------

def mutate_raw(rng: random.Random, data: bytes, corpus: list[bytes]) -> tuple[bytes, bool]:
    """A mutant, and whether only bytes changed (then it must read as a prefix of the original); chunks
    moved whole keep their CRCs and can make a different valid file."""
    b = bytearray(data)
    kind = rng.randrange(11)
    if kind == 0 and b:
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == 1 and b:
        b[rng.randrange(len(b))] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
    elif kind == 2:
        i = rng.randrange(len(b) + 1)
        b[i:i] = rng.randbytes(rng.randint(1, 16))
    elif kind == 3 and b:
        i = rng.randrange(len(b))
        del b[i:i + rng.randint(1, 32)]
    elif kind == 4:
        b = b[:rng.randrange(len(b) + 1)]
    elif kind == 5:
        b += bytes(rng.choice([1, 12, 100, 5000]))
    elif kind == 6 and len(b) > PREAMBLE_SIZE + 4:  # a chunk length field, or any u32
        pre, chunks, _ = split_chunks(data)
        offsets = [PREAMBLE_SIZE]
        for t, p in chunks[:-1]:
            offsets.append(offsets[-1] + 12 + len(p))
        i = rng.choice(offsets) if chunks and rng.random() < 0.7 else rng.randrange(len(b) - 3)
        b[i:i + 4] = struct.pack("<I", rng.choice(INTERESTING_U32))
    else:  # chunk-level: drop, repeat, swap, splice from another file (CRCs stay valid)
        pre, chunks, tail = split_chunks(data)
        if not chunks:
            return bytes(b), True
        i = rng.randrange(len(chunks))
        op = rng.randrange(4)
        if op == 0:
            del chunks[i]
        elif op == 1:
            chunks.insert(i, chunks[i])
        elif op == 2:
            j = rng.randrange(len(chunks))
            chunks[i], chunks[j] = chunks[j], chunks[i]
        else:
            _, other, _ = split_chunks(rng.choice(corpus))
            if other:
                chunks.insert(i, rng.choice(other))
        return join(pre, chunks, tail), False
    return bytes(b), True


def _mutate_json_text(rng: random.Random, text: bytes) -> bytes:
    b = bytearray(text)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(b) + 1)
        op = rng.randrange(3)
        if op == 0:
            b[i:i] = rng.choice(JSON_TOKENS)
        elif op == 1 and b:
            del b[i:i + rng.randint(1, 8)]
        elif b:
            b[min(i, len(b) - 1)] = rng.randrange(256)
    return bytes(b)


def _mutate_json_value(rng: random.Random, obj: object, grow: bool = True) -> object:
    """Replace one value somewhere in obj (or add a key) with an atom chosen to hurt; with grow, a list
    may also be lengthened (only for small payloads: repeated growth would make the fuzzer, not the
    reader, allocate gigabytes)."""
    if isinstance(obj, dict) and obj and rng.random() < 0.8:
        k = rng.choice(list(obj))
        if rng.random() < 0.3:
            obj[k] = rng.choice(JSON_ATOMS)
        else:
            obj[k] = _mutate_json_value(rng, obj[k], grow)
        return obj
    if isinstance(obj, list) and obj and rng.random() < 0.8:
        i = rng.randrange(len(obj))
        obj[i] = _mutate_json_value(rng, obj[i], grow) if rng.random() < 0.7 else rng.choice(JSON_ATOMS)
        if grow and rng.random() < 0.1:
            obj.extend([obj[i]] * rng.choice([1, 100, 10_000]))
        return obj
    if isinstance(obj, dict) and rng.random() < 0.5:
        obj[rng.choice(["future", "init", "decay", "config", "x", "perturbations", "layerwise", "perturb_exp",
                        "step_exp", "beta1", "beta2", "adam_eps", "window", "momentum"])] = rng.choice(JSON_ATOMS)
        return obj
    return rng.choice(JSON_ATOMS)


def _mutate_binary(rng: random.Random, raw: bytes) -> bytes:
    b = bytearray(raw)
    op = rng.randrange(5)
    if op == 0 and len(b) >= 8:  # first_step / count, or INIT index / offset
        at = rng.choice([0, 4]) if len(b) < 12 else rng.choice([0, 4, 8])
        b[at:at + 4] = struct.pack("<I", rng.choice(INTERESTING_U32))
    elif op == 1 and len(b) > 8:  # step bits: NaN, inf, 2^127, huge
        i = rng.randrange(8, len(b))
        b[i] = rng.choice([0x7F, 0xFF, 0x7F, 0x80, 0xC0, 0x00, 0x81])
    elif op == 2:
        b += rng.randbytes(rng.choice([1, 2, 4, 100]))
    elif op == 3 and b:
        del b[rng.randrange(len(b)):]
    elif b:
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


STEP_BYTES = [0x00, 0x01, 0x7E, 0x7F, 0x80, 0x81, 0xFE, 0xFF, 0x55, 0xAA, 0x0F, 0xF0, 0x38, 0xB8]


def _mutate_steps(rng: random.Random, raw: bytes) -> bytes:
    """A STEP payload aimed at the record layouts of every grad_encoding (format.md): counts that keep
    the length but not the plane split (ceil(count/8) for sign), padding bits, (0, 1) sign pairs, the
    NaN codes 0x7F/0xFF, -0 (0x80), saturated codes, the two sign planes swapped, a byte more or less."""
    b = bytearray(raw)
    if len(b) < 8:
        return _mutate_binary(rng, raw)
    count = struct.unpack_from("<I", b, 4)[0]
    body = len(b) - 8
    op = rng.randrange(8)
    if op == 0:  # a count near the true one, or one that fits this length in another encoding
        new = rng.choice([count + rng.randint(-9, 9), body, body // 2, 8 * (body // 2), 8 * (body // 2) - 7,
                          8 * (body // 2) + 1, 4 * body, 1 << 20, (1 << 20) + 1, 0])
        b[4:8] = struct.pack("<I", new % (1 << 32))
    elif op == 1 and body:  # records
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(8, len(b))] = rng.choice(STEP_BYTES + [rng.randrange(256)])
    elif op == 2 and body:  # one bit: a sign plane's padding or a pair (0, 1)
        i = rng.choice([len(b) - 1, 8 + body // 2 - 1, rng.randrange(8, len(b))])
        b[i] ^= 1 << rng.choice([7, 6, 5, 3, rng.randrange(8)])
    elif op == 3 and body >= 2:  # swap the halves (sign: the two planes)
        h = body // 2
        b[8:] = b[8 + h:] + b[8:8 + h]
    elif op == 4:
        b.insert(rng.randrange(8, len(b) + 1), rng.choice(STEP_BYTES))
    elif op == 5 and body:
        del b[rng.randrange(8, len(b))]
    elif op == 6:  # first_step
        b[0:4] = struct.pack("<I", rng.choice(INTERESTING_U32))
    else:  # every record the same byte: all NaN, all -0, all saturated, all (1, 1) / all padding set
        fill = rng.choice(STEP_BYTES)
        b[8:] = bytes([fill]) * body
    return bytes(b)


def _mutate_frame(rng: random.Random, payload: bytes) -> bytes:
    """Frame header fields (descriptor, window, content size) or the checksum, CRC fixed later."""
    b = bytearray(payload)
    if len(b) < 6:
        return bytes(b)
    i = min(rng.choice([4, 5, 6, 7, len(b) - 1, len(b) - 4, rng.randrange(4, len(b))]), len(b) - 1)
    b[i] = rng.randrange(256)
    return bytes(b)


def mutate_deep(rng: random.Random, data: bytes) -> bytes:
    pre, chunks, tail = split_chunks(data)
    if not chunks:
        return data
    i = rng.randrange(len(chunks))
    ctype, payload = chunks[i]
    raw = content(payload)
    r = rng.random()
    if raw is None or r < 0.12:
        new_payload = _mutate_frame(rng, payload)
    else:
        if ctype in (b"HEAD", b"FPRT", b"eval"):
            if r < 0.5:
                raw = _mutate_json_text(rng, raw)
            else:
                try:
                    obj = json.loads(raw)
                    mutated = _mutate_json_value(rng, obj, len(raw) < 8192)
                    raw = json.dumps(mutated, ensure_ascii=rng.random() < 0.5).encode(
                        "utf-8", "surrogatepass")
                except ValueError:
                    raw = _mutate_json_text(rng, raw)
        elif ctype == b"STEP" and rng.random() < 0.7:
            raw = _mutate_steps(rng, raw)
        else:
            raw = _mutate_binary(rng, raw)
        new_payload = _CCTX.compress(raw)
    if rng.random() < 0.05:  # and sometimes a type the reader does not know
        ctype = rng.choice([b"XTRA", b"xtra", b"Step", b"INIT", b"loss", b"lsbf", b"FPRT"])
    chunks[i] = (ctype, new_payload)
    return join(pre, chunks, tail)


# --- running -------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"0x[0-9a-f]+|\d+")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def outcome_class(e: BaseException, path: str) -> str:
    """An exception's type and message with paths, numbers and quoted values erased: its *class*."""
    msg = str(e).replace(path, "<file>")
    if " is corrupt: " in msg:
        msg = msg.split(" is corrupt: ", 1)[1]
        msg = msg.split("; the ", 1)[0]
    msg = _NUMBER.sub("N", _QUOTED.sub("'…'", msg))
    msg = re.sub(r"\(.*", "(…", msg)
    return f"{type(e).__name__}: {msg[:70]}"


@dataclass
class Stats:
    cases: int = 0
    seconds: float = 0.0
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (saved path or "", description)
    slowest: tuple[float, int] = (0.0, 0)  # (seconds, mutant bytes)
    slowest_mutant: bytes = b""
    rss_growth: tuple[int, int, bytes] = (0, 0, b"")  # (largest rise of peak RSS in one case, KiB; bytes; mutant)

    @property
    def rate(self) -> float:
        return self.cases / self.seconds if self.seconds else 0.0

    def report(self, top: int = 40) -> str:
        lines = [f"{self.cases} cases in {self.seconds:.1f} s: {self.rate:.0f} cases/s; slowest case "
                 f"{self.slowest[0] * 1e3:.1f} ms ({self.slowest[1]} bytes); largest rise of peak RSS in one case "
                 f"{self.rss_growth[0] / 1024:.1f} MiB ({self.rss_growth[1]} bytes); {len(self.failures)} failures"]
        kinds: collections.Counter = collections.Counter()
        for name, n in self.outcomes.items():
            kinds[name.split(":")[0]] += n
        lines.append("by kind: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()) +
                     f"; {len(self.outcomes)} classes")
        for name, n in self.outcomes.most_common(top):
            lines.append(f"{n:8d}  {name}")
        if len(self.outcomes) > top:
            lines.append(f"   ... and {len(self.outcomes) - top} more classes")
        lines += [f"FAILURE {d} (saved: {p or 'not saved'})" for p, d in self.failures]
        return "\n".join(lines)


def check_one(data: bytes, original: bytes, path: Path, any_file: bool, strict: bool, expect: dict) -> str:
    """Read one mutant; return its outcome class, or raise AssertionError for a reader bug."""
    path.write_bytes(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a numpy RuntimeWarning on stderr is a finding too
            traj = read_trajectory(path, strict=strict)
    except MezoReplayError as e:
        return outcome_class(e, str(path))
    except Exception as e:  # noqa: BLE001 - anything else is the bug we hunt
        raise AssertionError(f"{type(e).__name__}: {e}") from e
    if not any_file:  # CRCs guard every payload: a raw mutant reads as the original or a prefix of it
        want = expect[original]
        if traj.header != want["header"] or not np.array_equal(traj.grad_bits, want["bits"][:traj.steps]):
            raise AssertionError("a raw mutant read as something other than a prefix of the original")
    state = "truncated" if traj.truncated else "corrupt (reported)" if traj.corrupt else "intact"
    return f"read: {state}"


def check_cli(path: Path, args: list[str]) -> None:
    """`mezo-replay info` on a mutant, in process: it prints its report, or one `Error:` line and exits 1;
    never a traceback, a warning, or a message over several lines."""
    from click.testing import CliRunner

    from mezo_replay.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = CliRunner().invoke(main, [*args, str(path)], catch_exceptions=True)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"info: {type(r.exception).__name__}: {r.exception}")
    lines = r.stderr.strip().splitlines()
    if r.exit_code not in (0, 1) or (r.exit_code == 1 and (len(lines) != 1 or not lines[0].startswith("Error: "))):
        raise AssertionError(f"info exited {r.exit_code} with stderr {r.stderr[-200:]!r}")


def fuzz(corpus: list[bytes], *, seconds: float, seed: int = 0, max_cases: int | None = None,
         crashes: Path | None = None, cli: bool = False) -> Stats:
    rng = random.Random(seed)
    stats = Stats()
    expect = {}
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        path = Path(tmp) / "case.mzt"
        for data in corpus:
            path.write_bytes(data)
            t = read_trajectory(path)
            expect[data] = {"header": t.header, "bits": t.grad_bits}
        start = time.perf_counter()
        while time.perf_counter() - start < seconds and (max_cases is None or stats.cases < max_cases):
            original = rng.choice(corpus)
            deep = rng.random() < 0.5
            mutant, bytes_only = original, not deep
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                if deep:
                    mutant = mutate_deep(rng, mutant)
                else:
                    mutant, only = mutate_raw(rng, mutant, corpus)
                    bytes_only &= only
            t0, rss0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            try:
                name = check_one(mutant, original, path, not bytes_only, rng.random() < 0.5, expect)
                if cli:
                    check_cli(path, rng.choice([["info"], ["info", "--json"]]))
            except AssertionError as e:
                name = f"FAILURE {str(e)[:80]}"
                saved = ""
                if crashes is not None:
                    crashes.mkdir(parents=True, exist_ok=True)
                    saved = str(crashes / f"crash-{seed}-{stats.cases}.mzt")
                    Path(saved).write_bytes(mutant)
                stats.failures.append((saved, str(e)[:200]))
            dt = time.perf_counter() - t0
            rise = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
            if rise > stats.rss_growth[0]:
                stats.rss_growth = (rise, len(mutant), mutant)
            if dt > stats.slowest[0]:
                stats.slowest, stats.slowest_mutant = (dt, len(mutant)), mutant
            stats.outcomes[name] += 1
            stats.cases += 1
        stats.seconds = time.perf_counter() - start
    return stats


def load_corpus(folder: Path = CORPUS, pattern: str = "*.mzt") -> list[bytes]:
    files = sorted(folder.glob(pattern))
    if not files:
        raise SystemExit(f"no .mzt files in {folder}: run with --make-corpus {folder}")
    return [f.read_bytes() for f in files]


# --- the kept corpus -----------------------------------------------------------------------------------

def make_corpus(folder: Path) -> None:
    """Small valid files that together reach every chunk type and header feature."""
    import shutil

    from mezo_replay.format.fingerprint import base_fingerprint, fingerprint_raw
    from mezo_replay.format.mzt import TrajectoryWriter
    from mezo_replay.arithmetic.rule import encode_grad

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tiny", "tiny-cosine-decay", "tiny-new-tensor", "tiny-nan", "tiny-checkpoints", "tiny-lora",
                 "tiny-fp8", "tiny-sign", "tiny-nspsa", "tiny-nspsa-sign", "tiny-adam", "tiny-adam-buffer",
                 "tiny-layerwise", "tiny-layerwise-momentum", "tiny-momentum", "tiny-momentum-buffer"):
        shutil.copyfile(ROOT / "spec" / "vectors" / name / "traj.mzt", folder / f"vector-{name}.mzt")
    rng = np.random.default_rng(14)
    fps = ["11" * 32, "22" * 32]
    init = rng.standard_normal(6).astype(np.float32).tobytes()
    init_fp = fingerprint_raw("F32", [2, 3], init)

    def header(**over: object) -> dict:
        tensors = [{"name": "a.weight", "dtype": "F32", "shape": [2, 3], "sha256": fps[0], "decay": True},
                   {"name": "b.bias", "dtype": "BF16", "shape": [4], "sha256": fps[1], "decay": False},
                   {"name": "c.head", "dtype": "F32", "shape": [2, 3], "sha256": init_fp, "init": True,
                    "decay": True}]
        h = {"creator": "fuzz corpus", "generator": {"name": "philox4x32-10", "seed": "18446744073709551615"},
             "noise": {"name": "rademacher16"},
             "rule": {"name": "mezo-sgd", "eps": 0.0009999871253967285, "lr": 2.0**-10, "grad_encoding": "bf16",
                      "schedule": {"name": "cosine", "warmup_steps": 3, "total_steps": 40}, "weight_decay": 0.5},
             "tensors": tensors, "records": {"losses": True},
             "base": {"fingerprint": "", "source": "hf://x/y", "revision": None},
             "metadata": {"task": "fuzz", "ünï": "✓ \U0001F600"}, "config": {"architectures": ["X"], "n": [1, 2.5]}}
        h.update(over)
        h["base"]["fingerprint"] = base_fingerprint([t["name"] for t in h["tensors"]],
                                                    [t["sha256"] for t in h["tensors"]])
        return h

    def steps(w: TrajectoryWriter, n: int, losses: bool = True) -> None:
        for t in range(n):
            g = float(rng.standard_normal() * 3)
            w.append_step(encode_grad(g), loss=[1.5, float("nan"), -0.0, float("inf")][t % 4] if losses else None)
            if t % 7 == 3:
                w.add_eval(w.steps, "eval", {"loss": 1.0 / (t + 1), "accuracy": t})

    for name, spc in (("full", 4), ("one-chunk", 64)):
        path = folder / f"{name}.mzt"
        path.unlink(missing_ok=True)
        with TrajectoryWriter(path, header(), steps_per_chunk=spc) as w:
            w.write_init(2, init)
            w.write_fingerprint(fps + [init_fp])
            steps(w, 12)
            w.write_fingerprint(["aa" * 32, "bb" * 32, "cc" * 32])
    path = folder / "no-losses.mzt"
    path.unlink(missing_ok=True)
    from mezo_replay.format.mzt import GAUSSIAN16_SHA256
    gaussian = {"name": "gaussian16", "table_sha256": GAUSSIAN16_SHA256}
    h = header(records={"losses": False}, noise=gaussian, tensors=header()["tensors"][:2],
               rule={"name": "mezo-sgd", "eps": 0.5, "lr": 2.0**-20, "grad_encoding": "bf16",
                     "schedule": {"name": "constant"}})  # decay flags without a weight decay: allowed
    with TrajectoryWriter(path, h, steps_per_chunk=5) as w:
        steps(w, 9, losses=False)
    # by hand: INIT split over two chunks with an unknown ancillary chunk between, and a torn tail
    data = (folder / "full.mzt").read_bytes()
    pre, chunks, _ = split_chunks(data)
    init_chunks = [(b"INIT", _CCTX.compress(struct.pack("<IQ", 2, 0) + init[:10])),
                   (b"zzzz", b"anything"),
                   (b"INIT", _CCTX.compress(struct.pack("<IQ", 2, 10) + init[10:]))]
    rest = [c for c in chunks[1:] if c[0] != b"INIT"]
    (folder / "split-init.mzt").write_bytes(join(pre, [chunks[0]] + init_chunks + rest))
    (folder / "torn.mzt").write_bytes(data[:-7])
    # files from before `lsbf` hold binary32 `loss` chunks: the same run, its losses re-encoded that way
    from mezo_replay.format.mzt import _encode_losses_f32, decode_losses
    legacy = [(b"loss", _CCTX.compress(_encode_losses_f32(*decode_losses(content(p), "lsbf"))))
              if t == b"lsbf" else (t, p) for t, p in chunks]
    (folder / "legacy-f32-losses.mzt").write_bytes(join(pre, legacy))
    make_codec_corpus(folder, header)
    make_variant_corpus(folder, header)
    for f in sorted(folder.glob("*.mzt")):
        read_trajectory(f)  # every corpus file is valid (torn ones truncated)
        print(f"{f.name}: {f.stat().st_size} bytes")


# fp8 codes worth having in a file: 0, the smallest subnormal, 1.0, the largest finite (saturated
# 448), -0 (0x80: valid, writers never write it), negative subnormal, -1.0, -448.
FP8_CODES = [0x00, 0x01, 0x38, 0x7E, 0x80, 0x81, 0xB8, 0xFE, 0x07, 0x08, 0x77]


def make_codec_corpus(folder: Path, header: Callable[..., dict]) -> None:
    """fp8 and sign trajectories (rule.md, *Gradient encodings*): both grad_scale extremes, step counts
    that are not multiples of 8 (the sign planes' padding bits), all-zero sign chunks, saturated and
    -0 fp8 codes, and a stopped-and-resumed file (several STEP runs between fingerprints)."""
    from mezo_replay.arithmetic.rule import MezoSGD
    from mezo_replay.format.mzt import StepCodec, TrajectoryWriter

    fps3 = [t["sha256"] for t in header()["tensors"]]

    def codec_header(encoding: str, k: int, losses: bool, lr: float) -> dict:
        h = header(records={"losses": losses}, tensors=header()["tensors"][:2])
        h["rule"] = {"name": "mezo-sgd", "eps": 0.5, "lr": lr, "grad_encoding": encoding, "grad_scale": 2.0**k,
                     "schedule": {"name": "linear", "warmup_steps": 2, "total_steps": 30}}
        h["base"]["fingerprint"] = header(tensors=h["tensors"])["base"]["fingerprint"]
        return h

    def write(name: str, h: dict, codes: list[int], spc: int, fprt: bool = True) -> Path:
        codec = StepCodec(MezoSGD.from_header(h))
        path = folder / name
        path.unlink(missing_ok=True)
        losses = h["records"]["losses"]
        with TrajectoryWriter(path, h, steps_per_chunk=spc) as w:
            for t, code in enumerate(codes):
                w.append_step(int(codec.to_bits[code]), loss=float(t) / 3 if losses else None)
            if fprt:
                w.write_fingerprint(fps3[:2])
            else:  # stopped hard: no final fingerprint, only a checkpoint fingerprint of its last step
                w.add_checkpoint(w.steps, "ab" * 32)
        return path

    fp8 = FP8_CODES + [0x38, 0x7E]                                   # 13 steps: 5 + 5 + 3
    write("fp8-scale-min.mzt", codec_header("fp8", -60, True, 2.0**-10), fp8, 5)
    write("fp8-scale-max.mzt", codec_header("fp8", 60, False, 2.0**-60), fp8[::-1], 13)
    sign = [1, 3, 0, 1, 1, 3, 3, 0, 1, 0, 3]                         # 11 steps: 4 + 4 + 3; index 1|negative<<1
    write("sign-scale-max.mzt", codec_header("sign", 60, True, 2.0**-50), sign, 4)
    write("sign-zeros.mzt", codec_header("sign", -60, False, 1.0), [0] * 9 + [1] * 8 + [0] * 3, 9)
    # stopped and resumed: a final fingerprint for each stop, the STEP chunks of each run after it
    h = codec_header("sign", -3, True, 2.0**-8)
    path = write("sign-resumed.mzt", h, sign[:6], 4)
    codec = StepCodec(MezoSGD.from_header(h))
    with TrajectoryWriter.open_append(path, steps_per_chunk=3) as w:
        for t, code in enumerate(sign[::-1] + [3] * 7):
            w.append_step(int(codec.to_bits[code]), loss=-float(t))
        w.write_fingerprint(["dd" * 32, "ee" * 32])
    h = codec_header("fp8", 0, False, 2.0**-12)
    path = write("fp8-resumed.mzt", h, fp8[:7], 7, fprt=False)       # stopped hard: no fingerprint
    codec = StepCodec(MezoSGD.from_header(h))
    with TrajectoryWriter.open_append(path, steps_per_chunk=6) as w:
        for code in fp8[::-1]:
            w.append_step(int(codec.to_bits[code]))
        w.write_fingerprint(["dd" * 32, "ee" * 32])
    # torn inside its last STEP chunk (what `repair` cuts back)
    data = (folder / "sign-resumed.mzt").read_bytes()
    _, chunks, _ = split_chunks(data)
    at, last_step = PREAMBLE_SIZE, 0
    for t, p in chunks:
        if t == b"STEP":
            last_step = at + 12 + len(p) // 2
        at += 12 + len(p)
    (folder / "sign-torn.mzt").write_bytes(data[:last_step])


def make_variant_corpus(folder: Path, header: Callable[..., dict]) -> None:
    """The rules and layouts added after the codecs: n-SPSA (nspsa.md: N records a step, with each
    encoding, chunks not a multiple of N steps apart), Adam in both forms (adam.md), layer-wise exponents
    with momentum (layerwise.md), and compacted files (format.md: few large STEP/loss chunks, a resumed
    run's FPRT between them)."""
    from mezo_replay.arithmetic.rule import MezoSGD
    from mezo_replay.format.mzt import StepCodec, TrajectoryWriter

    fps2 = [t["sha256"] for t in header()["tensors"][:2]]

    def rule_header(rule: dict, losses: bool = True, tensors: list[dict] | None = None) -> dict:
        h = header(records={"losses": losses}, tensors=tensors or header()["tensors"][:2])
        h["rule"] = {"name": "mezo-sgd", "eps": 0.5, "lr": 2.0**-10, "grad_encoding": "bf16",
                     "schedule": {"name": "linear", "warmup_steps": 2, "total_steps": 30}, **rule}
        h["base"]["fingerprint"] = header(tensors=h["tensors"])["base"]["fingerprint"]
        return h

    def write(name: str, h: dict, n_steps: int, spc: int, *, compact: bool = False, fprt: bool = True,
              append: bool = False, seed: int = 0) -> Path:
        rule = MezoSGD.from_header(h)
        codec = StepCodec(rule)
        n = codec.per_step
        r = np.random.default_rng(seed)
        codes = getattr(codec, "to_bits", None)  # fp8, sign: the patterns their codes stand for
        path = folder / name
        if not append:
            path.unlink(missing_ok=True)
        opened = (TrajectoryWriter.open_append(path, steps_per_chunk=spc) if append
                  else TrajectoryWriter(path, h, steps_per_chunk=spc))
        with opened as w:
            for t in range(n_steps):
                if codes is not None:
                    row = [int(codec.to_bits[int(r.integers(len(codec.to_bits)))]) for _ in range(n)]
                else:
                    row = [int(rule.encode_grad(float(r.standard_normal() * 4))) for _ in range(n)]
                w.append_step(row if n > 1 else row[0],
                              loss=float(r.standard_normal()) if h["records"]["losses"] else None)
                if t % 5 == 2:
                    w.add_eval(w.steps, "eval", {"loss": 0.5})
            if fprt:
                w.write_fingerprint(fps2)
            else:
                w.add_checkpoint(w.steps, "ab" * 32)
            w.compact = compact
        return path

    write("nspsa-bf16.mzt", rule_header({"perturbations": 3}), 7, 3)
    write("nspsa-fp8.mzt", rule_header({"perturbations": 2, "grad_encoding": "fp8", "grad_scale": 2.0**-3},
                                       losses=False), 9, 4, seed=1)
    write("nspsa-sign.mzt", rule_header({"perturbations": 5, "grad_encoding": "sign", "grad_scale": 0.25}), 7, 3,
          seed=2)  # 5 records a step: sign planes of 15 and 10 bits, padding in both
    adam = {"beta1": 0.75, "beta2": 0.875, "adam_eps": 2.0**-20}
    write("adam.mzt", rule_header({"name": "mezo-adam", "window": 3, "weight_decay": 0.25, **adam}), 8, 3, seed=3)
    write("adam-buffer-fp8.mzt", rule_header({"name": "mezo-adam-buffer", "grad_encoding": "fp8", "grad_scale": 4.0,
                                              **adam}), 8, 5, seed=4)
    lw = [dict(t) for t in header()["tensors"][:2]]
    lw[0]["perturb_exp"], lw[0]["step_exp"], lw[1]["step_exp"] = 3, -40, 40
    write("layerwise-momentum.mzt", rule_header({"name": "mezo-momentum", "momentum": 0.75, "window": 4,
                                                 "layerwise": True}, tensors=lw), 9, 4, seed=5)
    write("compacted.mzt", rule_header({"perturbations": 2, "grad_encoding": "sign", "grad_scale": 1.0}), 11, 2,
          compact=True, seed=6)
    h = rule_header({"name": "mezo-adam", "window": 2, "grad_encoding": "fp8", "grad_scale": 0.5, **adam})
    write("resumed-compacted.mzt", h, 5, 2, seed=7)
    write("resumed-compacted.mzt", h, 6, 2, append=True, fprt=False, seed=8)
    path = write("resumed-compacted.mzt", h, 4, 3, append=True, compact=True, seed=9)
    assert sum(1 for t, _ in split_chunks(path.read_bytes())[1] if t == b"STEP") < 9, "compaction merged nothing"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--glob", default="*.mzt", help="corpus files to fuzz, e.g. 'sign-*' or '*fp8*'")
    ap.add_argument("--cli", action="store_true", help="also run `mezo-replay info` on every mutant (slower)")
    ap.add_argument("--top", type=int, default=40, help="outcome classes to list")
    ap.add_argument("--crashes", type=Path, default=Path("fuzz-crashes"), help="where failing mutants go")
    ap.add_argument("--make-corpus", type=Path, metavar="FOLDER", help="write the kept corpus and exit")
    args = ap.parse_args()
    if args.make_corpus:
        make_corpus(args.make_corpus)
        return
    stats = fuzz(load_corpus(args.corpus, args.glob), seconds=args.seconds, seed=args.seed, crashes=args.crashes,
                 cli=args.cli)
    print(stats.report(args.top))
    args.crashes.mkdir(parents=True, exist_ok=True)
    if stats.rss_growth[2]:
        (args.crashes / "largest-rss-rise.mzt").write_bytes(stats.rss_growth[2])
    if stats.slowest_mutant:
        (args.crashes / "slowest.mzt").write_bytes(stats.slowest_mutant)
    sys.exit(1 if stats.failures else 0)


if __name__ == "__main__":
    main()
