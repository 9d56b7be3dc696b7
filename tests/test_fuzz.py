"""Property-based tests (hypothesis) of the `.mzt` reader and writer, and a bounded run of the mutation
fuzzer (tools/fuzz_mzt.py) over the kept corpus (tests/corpus/mzt). The promise under test: any file
either reads (a mutant of a valid file as that file or a prefix of it) or fails with one
MezoReplayError; never another exception."""
from __future__ import annotations

import importlib.util
import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mezo_replay.errors import LimitError, MezoReplayError
from mezo_replay.format.mzt import (TrajectoryWriter, _json_loads, invalid_steps, read_trajectory, step_coefficients,
                             step_rates)
from mezo_replay.arithmetic.rule import MezoSGD, Schedule, round_significant
from tests.test_mzt import FINAL, FPS, make_header

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "corpus" / "mzt"
SETTINGS = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])


def load_fuzzer():
    """tools/ is not a package: load tools/fuzz_mzt.py by path (once; dataclasses need it registered)."""
    if "fuzz_mzt" not in sys.modules:
        spec = importlib.util.spec_from_file_location("fuzz_mzt", ROOT / "tools" / "fuzz_mzt.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["fuzz_mzt"] = module
        spec.loader.exec_module(module)
    return sys.modules["fuzz_mzt"]


# --- round trip -------------------------------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)  # no lone surrogates: UTF-8 text
valid_bits = st.integers(0, 0xFFFF).filter(lambda b: (b >> 7) & 0xFF < 247)  # |g| < 2^120: |lr g| <= 2^100


@st.composite
def runs(draw):
    losses = draw(st.booleans())
    n = draw(st.integers(0, 60))
    bits = draw(st.lists(valid_bits, min_size=n, max_size=n))
    values = draw(st.lists(st.floats(width=32), min_size=n, max_size=n)) if losses else None
    fprt_at = sorted(set(draw(st.lists(st.integers(0, n), max_size=3))))
    evals = draw(st.lists(st.tuples(st.integers(0, n), text, st.dictionaries(
        text, st.floats(allow_nan=False, allow_infinity=False) | st.integers(-2**63, 2**63), max_size=3)),
        max_size=4))
    metadata = draw(st.dictionaries(text.filter(bool), text, max_size=3))
    return losses, bits, values, fprt_at, evals, metadata, draw(st.integers(3, 40))


@SETTINGS
@given(run=runs())
def test_round_trip_of_valid_trajectories(tmp_path: Path, run) -> None:
    losses, bits, values, fprt_at, evals, metadata, spc = run
    header = make_header(losses)
    header["metadata"] = metadata
    path = tmp_path / "p.mzt"
    path.unlink(missing_ok=True)
    want_evals = []
    with TrajectoryWriter(path, header, steps_per_chunk=spc) as w:
        for t in range(len(bits) + 1):
            if t in fprt_at:
                w.write_fingerprint(FPS if t % 2 else FINAL)
            for step, split, metrics in evals:
                if step == t:
                    w.add_eval(step, split, metrics)
                    want_evals.append({"step": step, "split": split,
                                       "metrics": {k: float(v) for k, v in metrics.items()}})
            if t < len(bits):
                w.append_step(bits[t], loss=values[t] if losses else None)
    traj = read_trajectory(path)
    assert traj.header == header and traj.grad_bits.tolist() == bits
    assert traj.fingerprints == {t: FPS if t % 2 else FINAL for t in fprt_at}
    assert traj.evals == want_evals and not traj.truncated and traj.corrupt is None
    if losses:
        from mezo_replay.format.mzt import losses_to_bf16  # kept as bfloat16 (format.md lsbf)

        want = losses_to_bf16(np.array(values, np.float32)).astype(np.uint32) << 16
        assert traj.losses.view(np.uint32).tolist() == want.tolist()
    else:
        assert traj.losses is None


FP8_CODES = [c for c in range(256) if c not in (0x7F, 0xFF)]
FP8_EDGES = [0x00, 0x80, 0x01, 0x81, 0x07, 0x08, 0x7E, 0xFE, 0x77, 0x38]  # 0, -0, subnormals, 448, 240, 1


@st.composite
def codec_runs(draw):
    """fp8 or sign steps at any grad_scale, the extremes often; chunk sizes and a stop-and-resume point
    that cut the sign planes anywhere (counts that are not multiples of 8)."""
    encoding = draw(st.sampled_from(["fp8", "sign"]))
    k = draw(st.sampled_from([-60, 60]) | st.integers(-60, 60))
    n = draw(st.integers(0, 70))
    if encoding == "fp8":
        codes = draw(st.lists(st.sampled_from(FP8_EDGES) | st.sampled_from(FP8_CODES), min_size=n, max_size=n))
    else:
        codes = draw(st.lists(st.sampled_from([0, 1, 3]), min_size=n, max_size=n) | st.just([0] * n))
    resume = draw(st.none() | st.integers(0, n))
    return encoding, k, codes, draw(st.integers(1, 19)), draw(st.integers(1, 19)), resume, draw(st.booleans())


@SETTINGS
@given(run=codec_runs())
def test_round_trip_of_codec_trajectories(tmp_path: Path, run) -> None:
    """Written, stopped, resumed (open_append) and read back: the steps are the codes' gq, bit for bit,
    and the records are the layouts of format.md (one byte a step; two planes of ceil(count/8) bytes)."""
    from mezo_replay.format.mzt import StepCodec

    fuzz = load_fuzzer()
    encoding, k, codes, spc, spc2, resume, losses = run
    header = make_header(losses)
    header["rule"].update(grad_encoding=encoding, grad_scale=2.0**k, lr=2.0**-40)
    codec = StepCodec(MezoSGD.from_header(header))
    bits = [int(codec.to_bits[c]) for c in codes]
    path = tmp_path / "c.mzt"
    path.unlink(missing_ok=True)
    stop = len(bits) if resume is None else resume
    with TrajectoryWriter(path, header, steps_per_chunk=spc) as w:
        for b in bits[:stop]:
            w.append_step(b, loss=1.0 if losses else None)
        if stop < len(bits):
            w.write_fingerprint(FPS)
    with TrajectoryWriter.open_append(path, steps_per_chunk=spc2) as w:
        for b in bits[stop:]:
            w.append_step(b, loss=2.0 if losses else None)
        w.write_fingerprint(FINAL)
    traj = read_trajectory(path)
    assert traj.header == header and traj.grad_bits.tolist() == bits and not traj.truncated
    assert traj.fingerprints == {stop: FPS, len(bits): FINAL} if stop < len(bits) else {stop: FINAL}
    records = b""
    for ctype, payload in fuzz.split_chunks(path.read_bytes())[1]:
        if ctype == b"STEP":
            raw = fuzz.content(payload)
            count = struct.unpack_from("<I", raw, 4)[0]
            width = count if encoding == "fp8" else 2 * ((count + 7) // 8)
            assert len(raw) == 8 + width
            if encoding == "fp8":
                records += raw[8:]
            else:
                n = (count + 7) // 8
                nz, neg = (np.unpackbits(np.frombuffer(raw, np.uint8, n, 8 + i * n), bitorder="little")
                           for i in (0, 1))
                assert not nz[count:].any() and not neg[count:].any()
                records += bytes((nz[:count] | neg[:count] << 1).tolist())
    assert list(records) == codes  # 0x80 (-0) stays 0x80: the writer records the pattern it is given


# --- mutations --------------------------------------------------------------------------------------

def corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*.mzt"))


def test_corpus_is_kept_and_valid() -> None:
    files = corpus_files()
    assert len(files) >= 8 and all(f.stat().st_size < 4096 for f in files)
    kinds = set()
    for f in files:
        traj = read_trajectory(f)
        kinds |= {"init" for _ in traj.inits} | {"eval" for _ in traj.evals} | {"fprt" for _ in traj.fingerprints}
        kinds |= {"losses"} if traj.losses is not None else {"no losses"}
        kinds |= {"truncated"} if traj.truncated else set()
    assert kinds == {"init", "eval", "fprt", "losses", "no losses", "truncated"}
    raw = b"".join(f.read_bytes() for f in files)
    assert b"lsbf" in raw and b"loss" in raw  # both loss encodings, the old binary32 one too
    # every grad_encoding, fp8 and sign at both grad_scale extremes, truncated and resumed ones among them
    rules = {(t.header["rule"]["grad_encoding"], t.header["rule"].get("grad_scale"), t.truncated,
              len(t.fingerprints) + len(t.checkpoints) > 1) for t in map(read_trajectory, files)}
    assert {r[0] for r in rules} == {"bf16", "fp8", "sign"}
    for encoding in ("fp8", "sign"):
        scales = {r[1] for r in rules if r[0] == encoding}
        assert {2.0**-60, 2.0**60} <= scales and any(r[3] for r in rules if r[0] == encoding)
    assert ("sign", 2.0**-3, True, False) in rules  # torn inside a STEP chunk


def test_corpus_codec_records_reach_the_edge_cases() -> None:
    """The fp8 and sign files hold what the record decoders must get right: -0 (0x80), saturated codes,
    subnormals, sign chunks whose count is not a multiple of 8 (padding bits), all-zero sign chunks."""
    fuzz = load_fuzzer()
    fp8_bits, sign_counts, zero_chunk = set(), set(), False
    for f in corpus_files():
        traj = read_trajectory(f)
        rule = traj.header["rule"]
        if rule["grad_encoding"] == "fp8":
            fp8_bits |= {(int(b), rule["grad_scale"]) for b in traj.grad_bits.reshape(-1)}  # n-SPSA: (steps, N)
        elif rule["grad_encoding"] == "sign":
            for ctype, payload in fuzz.split_chunks(f.read_bytes())[1]:
                if ctype == b"STEP":
                    raw = fuzz.content(payload)
                    count = struct.unpack_from("<I", raw, 4)[0]
                    sign_counts.add(count % 8)
                    zero_chunk |= not any(raw[8:])
    from mezo_replay.arithmetic.grad_codec import bf16_bits
    for k in (-60, 60):
        s = 2.0**k
        want = {0x0000, 0x8000, bf16_bits(448 * s), bf16_bits(-448 * s), bf16_bits(2.0**-9 * s), bf16_bits(s)}
        assert {(b, s) for b in want} <= fp8_bits, k
    assert zero_chunk and len(sign_counts - {0}) >= 2  # counts 3, 9, ... leave padding bits


@st.composite
def byte_mutants(draw):
    f = draw(st.sampled_from(corpus_files()))
    data = bytearray(f.read_bytes())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "flip", "insert", "delete", "cut", "zeros"]))
        i = draw(st.integers(0, len(data)))
        if op == "set" and i < len(data):
            data[i] = draw(st.integers(0, 255))
        elif op == "flip" and i < len(data):
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=12))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        elif op == "cut":
            del data[i:]
        else:
            data += bytes(draw(st.integers(1, 64)))
    return f, bytes(data)


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=byte_mutants(), strict=st.booleans())
def test_byte_mutants_read_as_a_prefix_or_fail_in_one_error(tmp_path: Path, case, strict: bool) -> None:
    original, data = case
    path = tmp_path / "m.mzt"
    path.write_bytes(data)
    try:
        traj = read_trajectory(path, strict=strict)
    except MezoReplayError:
        return
    want = read_trajectory(original)
    assert traj.header == want.header  # CRCs guard every payload: only a prefix can survive
    assert traj.grad_bits.tolist() == want.grad_bits[:traj.steps].tolist()


@settings(deadline=None, max_examples=300)
@given(seed=st.integers(0, 2**32 - 1))
def test_deep_mutants_fail_in_one_error(tmp_path_factory, seed: int) -> None:
    """Payload contents mutated behind valid CRCs (the fuzzer's deep mutators, driven by hypothesis)."""
    import random

    fuzz = load_fuzzer()
    rng = random.Random(seed)
    data = rng.choice(corpus_files()).read_bytes()
    for _ in range(rng.randint(1, 3)):
        data = fuzz.mutate_deep(rng, data)
    path = tmp_path_factory.mktemp("deep") / "d.mzt"
    path.write_bytes(data)
    try:
        read_trajectory(path, strict=rng.random() < 0.5)
    except MezoReplayError:
        pass


# --- JSON and the rule checks -------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64 + 1, 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | text, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4), max_leaves=30)


@SETTINGS
@given(value=json_values, ascii_only=st.booleans())
def test_json_loads_agrees_with_json_on_valid_text(value, ascii_only: bool) -> None:
    raw = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert _json_loads(raw) == json.loads(raw)


@settings(deadline=None, max_examples=500)
@given(raw=st.binary(max_size=200) | st.lists(st.sampled_from(
    [b"[", b"]", b"{", b"}", b'"', b"\\", b",", b":", b"1", b"-", b"e9", b"\\ud800", b"\\u", b"NaN", b"a", b" "]),
    max_size=60).map(b"".join))
def test_json_loads_accepts_or_raises_value_error(raw: bytes) -> None:
    try:
        _json_loads(raw)
    except (ValueError, LimitError):  # LimitError: nested deeper than 32
        pass


schedules = st.one_of(
    st.builds(lambda t, w: Schedule("constant", min(w, t), t), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.builds(lambda n, t, w: Schedule(n, min(w, t), t), st.sampled_from(["linear", "cosine"]),
              st.integers(1, 2**32 - 1), st.integers(0, 2**32 - 1)))


@SETTINGS
@given(schedule=schedules, lr_exp=st.floats(-100, 100), wd_exp=st.none() | st.floats(-30, 100),
       first=st.integers(0, 2**32 - 64), bits=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=40))
def test_vectorised_step_checks_equal_the_rule(schedule, lr_exp, wd_exp, first, bits) -> None:
    lr = min(max(round_significant(2.0**lr_exp, 24), 2.0**-100), 2.0**100)
    wd = 0.0 if wd_exp is None else min(round_significant(2.0**wd_exp, 24), 2.0**100)
    rule = MezoSGD(lr=lr, eps=2.0**-10, seed=0, schedule=schedule, weight_decay=wd).validated()
    first = min(first, max(0, 2**32 - 1 - len(bits)))
    want = []
    for j, b in enumerate(bits):
        g = struct.unpack("<f", struct.pack("<I", b << 16))[0]
        try:
            if not math.isfinite(g) or abs(g) >= 2.0**127:
                raise ValueError
            rule.coefficient(first + j, b)
            rule.decay(first + j)
        except ValueError:
            want.append(j)
    assert invalid_steps(np.array(bits, np.uint16), rule, first).tolist() == want
    ok = [b for j, b in enumerate(bits) if j not in want]
    if ok and not want:  # all valid: the vectorised (c, d) equal the rule's, bit for bit
        c, d = step_coefficients(rule, np.array(bits, np.uint16), first)
        assert c.tolist() == [rule.coefficient(first + j, b) for j, b in enumerate(bits)]
        assert d.tolist() == [rule.decay(first + j) for j in range(len(bits))]
    t = np.arange(first, first + len(bits), dtype=np.float64)
    assert step_rates(rule, t).tolist() == [rule.lr_at(first + j) for j in range(len(bits))]


# --- the fuzzer, for a bounded time ---------------------------------------------------------------------

def test_fuzzer_over_the_kept_corpus(tmp_path: Path) -> None:
    """CI's fuzz target: a fixed seed, about 10 s. A failure leaves the mutant in tmp_path/crashes."""
    fuzz = load_fuzzer()
    stats = fuzz.fuzz(fuzz.load_corpus(CORPUS), seconds=10, seed=14, crashes=tmp_path / "crashes")
    print(stats.report())
    assert not stats.failures, stats.report()
    assert stats.cases > 200
    reads = sum(n for name, n in stats.outcomes.items() if name.startswith("read:"))
    assert 0 < reads < stats.cases and len(stats.outcomes) > 20  # both outcomes, many error classes


def test_outcome_classes_erase_numbers_and_paths() -> None:
    fuzz = load_fuzzer()
    from mezo_replay.errors import CorruptChunkError

    e = CorruptChunkError("/x/a.mzt", 3, "STEP", 120, "count 0 is outside 1..1048576", steps_before=5)
    assert fuzz.outcome_class(e, "/x/a.mzt") == "CorruptChunkError: count N is outside N..N"


CODEC_FILES = "*[sf][ip][g8]*"  # the fp8 and sign files of the corpus


def test_fuzzer_runs_info_on_codec_mutants(tmp_path: Path) -> None:
    """The fp8 and sign files only, and `mezo-replay info` (in process) on every mutant: one report or one
    `Error:` line, no warning on stderr (a loss summary once printed numpy's overflow warning)."""
    fuzz = load_fuzzer()
    corpus = fuzz.load_corpus(CORPUS, CODEC_FILES)
    assert len(corpus) >= 8
    stats = fuzz.fuzz(corpus, seconds=3, seed=15, crashes=tmp_path / "crashes", cli=True)
    assert not stats.failures, stats.report()
    assert stats.cases > 50


@pytest.mark.slow
def test_fuzzer_longer_on_codec_files(tmp_path: Path) -> None:
    fuzz = load_fuzzer()
    stats = fuzz.fuzz(fuzz.load_corpus(CORPUS, CODEC_FILES), seconds=120, seed=141, crashes=tmp_path / "crashes",
                      cli=True)
    assert not stats.failures, stats.report()


@pytest.mark.slow
def test_fuzzer_longer(tmp_path: Path) -> None:
    fuzz = load_fuzzer()
    stats = fuzz.fuzz(fuzz.load_corpus(CORPUS), seconds=120, seed=140, crashes=tmp_path / "crashes")
    assert not stats.failures, stats.report()


# --- the rules and layouts after the codecs: n-SPSA, Adam, layer-wise, compaction ----------------------

VARIANT_FILES = ["nspsa-bf16.mzt", "nspsa-fp8.mzt", "nspsa-sign.mzt", "adam.mzt", "adam-buffer-fp8.mzt",
                 "layerwise-momentum.mzt", "compacted.mzt", "resumed-compacted.mzt"]


def test_corpus_reaches_the_new_rules_and_layouts() -> None:
    """n-SPSA with each encoding, both Adam forms, layer-wise exponents with momentum, and compacted files
    (one of them resumed: its merged STEP chunks on both sides of an FPRT) are in the kept corpus."""
    fuzz = load_fuzzer()
    rules = {}
    for name in VARIANT_FILES:
        traj = read_trajectory(CORPUS / name)
        rules[name] = traj.header["rule"]
        types = [t for t, _ in fuzz.split_chunks((CORPUS / name).read_bytes())[1]]
        if "compacted" in name:  # one STEP chunk for each run between fingerprints, the losses in one at the end
            assert types.count(b"STEP") == len(traj.fingerprints) and types[-1] == b"lsbf", types
    assert {(r["grad_encoding"], r["perturbations"]) for r in rules.values() if "perturbations" in r} == \
        {("bf16", 3), ("fp8", 2), ("sign", 5), ("sign", 2)}
    assert {r["name"] for r in rules.values()} >= {"mezo-adam", "mezo-adam-buffer", "mezo-momentum"}
    assert rules["layerwise-momentum.mzt"]["layerwise"] is True


@pytest.mark.parametrize("name", [["mezo-sgd"], {"n": 1}, 3, None, 2.5])
def test_a_rule_name_that_is_not_a_string_beside_perturbations_fails_in_one_line(tmp_path: Path, name) -> None:
    """Found by the fuzzer (a `perturbations` key beside a list as the rule name): the check that a known
    rule other than mezo-sgd takes no perturbations looked the name up in a dict (TypeError: unhashable)."""
    from tests.test_mzt import crafted, head_chunk
    from mezo_replay.format.mzt import PREAMBLE, FORMAT_VERSION, MAGIC

    h = make_header()
    h["rule"] = {**h["rule"], "name": name, "perturbations": 2}
    path = crafted(tmp_path, PREAMBLE.pack(MAGIC, FORMAT_VERSION, 0), head_chunk(h))
    with pytest.raises(MezoReplayError, match="string 'name'") as e:
        read_trajectory(path)
    assert "\n" not in str(e.value)
    h["rule"] = 7  # not an object at all
    path = crafted(tmp_path, PREAMBLE.pack(MAGIC, FORMAT_VERSION, 0), head_chunk(h), name="int.mzt")
    with pytest.raises(MezoReplayError, match="must be an object"):
        read_trajectory(path)


@pytest.mark.parametrize("encoding", ["bf16", "fp8", "sign"])
def test_step_counts_whose_product_with_perturbations_wraps_32_bits_are_refused(tmp_path: Path, encoding) -> None:
    """count * N computed in 32 bits would wrap to a small number that a short payload matches: the
    reader refuses the count itself (1..2^20), and a count * N over 2^20 values, in one line."""
    fuzz = load_fuzzer()
    name = {"bf16": "nspsa-bf16.mzt", "fp8": "nspsa-fp8.mzt", "sign": "nspsa-sign.mzt"}[encoding]
    data = (CORPUS / name).read_bytes()
    n = read_trajectory(CORPUS / name).header["rule"]["perturbations"]
    pre, chunks, tail = fuzz.split_chunks(data)
    i = next(k for k, (t, _) in enumerate(chunks) if t == b"STEP")
    for count, words in (((2**32 + 2) // n + 1, "outside 1..1048576"), (2**32 // n + 1, "outside 1..1048576"),
                         ((1 << 20) // n + 1, f"with {n} perturbations a step is")):
        wrapped = count * n % 2**32
        body = {"bf16": 2 * wrapped, "fp8": wrapped, "sign": 2 * ((wrapped + 7) // 8)}[encoding]
        chunks[i] = (b"STEP", fuzz._CCTX.compress(struct.pack("<II", 0, count) + bytes(min(body, 64))))
        path = tmp_path / f"{count}.mzt"
        path.write_bytes(fuzz.join(pre, chunks, tail))
        with pytest.raises(MezoReplayError, match=words) as e:
            read_trajectory(path)
        assert "\n" not in str(e.value)
        assert read_trajectory(path, strict=False).steps == 0


def test_fuzzer_runs_info_on_variant_mutants(tmp_path: Path) -> None:
    """n-SPSA, Adam, layer-wise and compacted files, `info` on every mutant, a few seconds."""
    fuzz = load_fuzzer()
    corpus = [(CORPUS / name).read_bytes() for name in VARIANT_FILES]
    stats = fuzz.fuzz(corpus, seconds=4, seed=16, crashes=tmp_path / "crashes", cli=True)
    assert not stats.failures, stats.report()
    assert stats.cases > 50


@pytest.mark.parametrize("encoding", ["bf16", "fp8", "sign"])
def test_compaction_never_writes_a_chunk_over_the_reader_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                encoding: str) -> None:
    """With the per-chunk limit lowered to 8 values (it stands for 2^20) in the reader, the writer and the
    compactor: files whose per-flush chunks are at the limit, resumed with other flush sizes, compact into
    chunks that each hold at most 8 records (count x N with n-SPSA) and 8 losses, and read back the same."""
    import mezo_replay.format.compact as compact
    import mezo_replay.format.mzt as mzt
    from mezo_replay.format.mzt import StepCodec

    fuzz = load_fuzzer()
    limit = 8
    monkeypatch.setattr(mzt, "MAX_STEPS_PER_CHUNK", limit)
    monkeypatch.setattr(compact, "MAX_MERGED", limit)
    for n in (1, 3, 8):
        h = make_header()
        h["rule"] = {**h["rule"], "grad_encoding": encoding, **({"grad_scale": 0.5} if encoding != "bf16" else {}),
                     **({"perturbations": n} if n > 1 else {})}
        rule = MezoSGD.from_header(h)
        codec = StepCodec(rule)
        rng = np.random.default_rng(n)

        def run(w: TrajectoryWriter, steps: int) -> None:
            for t in range(steps):
                row = [int(codec.to_bits[rng.choice([0, 1, 3])]) if encoding == "sign"
                       else int(rule.encode_grad(float(rng.integers(-4, 5)))) for _ in range(n)]
                w.append_step(row if n > 1 else row[0], loss=float(t))

        paths = {}
        for name, compact_it in (("raw", False), ("compacted", True)):
            rng = np.random.default_rng(n)
            path = paths[name] = tmp_path / f"{name}-{n}.mzt"
            with TrajectoryWriter(path, h, steps_per_chunk=limit) as w:
                run(w, 37)
                w.write_fingerprint(FPS)
            with TrajectoryWriter.open_append(path, steps_per_chunk=3, compact=compact_it) as w:
                run(w, 29)
                w.write_fingerprint(FPS)
        raw, small = read_trajectory(paths["raw"]), read_trajectory(paths["compacted"])
        assert small.steps == 66 and np.array_equal(raw.grad_bits, small.grad_bits)
        assert raw.losses.tolist() == small.losses.tolist()
        chunks = fuzz.split_chunks(paths["compacted"].read_bytes())[1]
        assert len(chunks) < len(fuzz.split_chunks(paths["raw"].read_bytes())[1])
        for ctype, payload in chunks:
            if ctype in (b"STEP", b"lsbf"):
                count = struct.unpack_from("<I", fuzz.content(payload), 4)[0]
                assert count * (n if ctype == b"STEP" else 1) <= limit, (n, ctype, count)
