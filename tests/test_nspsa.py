"""n-SPSA (spec/nspsa.md): the host coefficients and the sub-step plan against the vectors, whole steps on
every backend against the numpy reference, the STEP layout of N records a step, readers refusing bad
headers and payloads in one line, and training with several perturbations rebuilding bit for bit (the
CLI as a user runs it, --resume mid-run, reconstruct --step)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings, strategies as st

from mezo_replay import embedded
from mezo_replay.arithmetic import reference as R
from mezo_replay.arithmetic.rule import MezoSGD, Schedule
from mezo_replay.errors import CorruptChunkError, MezoReplayError, TrajectoryError
from mezo_replay.format import mzt
from mezo_replay.format.mzt import TrajectoryWriter, read_trajectory
from mezo_replay.kernels import cpu_kernel, steps
from mezo_replay.training.optimizer import MeZO, NonFiniteLossError
from mezo_replay.training.train import TrainConfig, train
from tests.test_momentum import assert_cpu_backends_replay
from tests.test_mzt import make_header
from tests.test_rebuild_cli import cli, inproc, one_line_error, printed_command
from tests.test_roundtrip import tensor_bytes
from tests.test_spec_vectors import bits_to_torch, torch_to_bits
from tests.test_train_cli import assert_rebuild_is_training

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
NSPSA = json.loads((VECTORS / "nspsa.json").read_text())


def _rule(case_rule: dict, seed: int = 0, noise: str = "gaussian16") -> MezoSGD:
    return MezoSGD(lr=case_rule["lr"], eps=case_rule.get("eps", 2.0**-10), seed=seed, noise=noise,
                   schedule=Schedule.from_header(case_rule["schedule"]),
                   weight_decay=case_rule.get("weight_decay", 0.0),
                   perturbations=case_rule["perturbations"]).validated()


def _rows(hexes: list[list[str]]) -> list[list[int]]:
    return [[int(x, 16) for x in row] for row in hexes]


# -- host arithmetic ---------------------------------------------------------------------------------

def test_coefficient_vectors_and_the_sub_step_plan():
    """q and c_j: the reference, rule.py (step by step) and the vectorised plan give nspsa.json's values;
    the plan of two steps is N - 1 empty sub-steps then the step's N terms with its d."""
    for run in NSPSA["runs"]:
        header = {"name": "mezo-sgd", "lr": run["lr"], "schedule": run["schedule"],
                  "perturbations": run["perturbations"]}
        rule = _rule(header)
        rows = _rows(run["grad_bits"])
        n = run["perturbations"]
        for t, row in enumerate(rows):
            want = [tuple(x) for x in run["terms"][t]]
            assert R.nspsa_terms(header, t, row) == want
            assert rule.perturbation_rate(t) == run["q"][t]
            assert [(n * t + j, rule.perturbation_coefficient(t, b)) for j, b in enumerate(row)] == want
            assert rule.substeps(t, row)[-1][0] == tuple(want)
        plan = steps.step_constants(rule, np.array(rows, dtype=np.uint16))
        assert [list(terms) for terms, _ in plan[n - 1::n]] == [[tuple(x) for x in w] for w in run["terms"]]
        assert all(p == ((), 0.0) for i, p in enumerate(plan) if i % n != n - 1)
    assert any(c == 0.0 for run in NSPSA["runs"] if run["lr"] == 2.0**-100 for t in run["terms"] for _, c in t)
    rule = _rule(NSPSA["plan_rule"])
    got = steps.step_constants(rule, np.array(_rows(NSPSA["plan_grad_bits"]), dtype=np.uint16))
    assert [[[list(x) for x in terms], d] for terms, d in got] == NSPSA["plan"]


def test_one_perturbation_is_mezo_sgd_and_the_key_is_omitted():
    """N = 1 writes no key, and q = lr_t makes c_0 rule.md's c."""
    one = MezoSGD.create(lr=1e-3, eps=1e-3, seed=1)
    assert "perturbations" not in one.header_fields()["rule"] and one.perturbations == 1
    three = MezoSGD.create(lr=1e-3, eps=1e-3, seed=1, perturbations=3)
    assert three.header_fields()["rule"]["perturbations"] == 3
    assert MezoSGD.from_header({**three.header_fields(), "tensors": []}) == three
    assert three.max_steps == (2**32 - 1) // 3


def test_payload_vectors():
    """STEP payloads of N records a step (nspsa.json): the reader's codec and the reference decode the valid
    ones to their rows and refuse the corrupt ones; the writer's encoding gives the same bytes back."""
    for case in NSPSA["payloads"]:
        rule = MezoSGD(lr=2.0**-20, eps=2.0**-10, seed=0, grad_encoding=case["grad_encoding"],
                       grad_scale=case["grad_scale"], perturbations=case["perturbations"]).validated()
        codec = mzt.StepCodec(rule)
        payload = bytes.fromhex(case["payload"])
        if case["grad_bits"] is None:
            with pytest.raises(mzt._Corrupt):
                codec.decode(payload)
            with pytest.raises(ValueError):
                _, records = R.decode_step_payload(case["grad_encoding"], payload, case["perturbations"])
                [R.record_bf16_bits(case["grad_encoding"], case["grad_scale"], r) for row in records for r in row]
            continue
        _, records = R.decode_step_payload(case["grad_encoding"], payload, case["perturbations"])
        assert [[R.record_bf16_bits(case["grad_encoding"], case["grad_scale"], r) for r in row]
                for row in records] == _rows(case["grad_bits"])
        first, bits = codec.decode(payload)
        assert first == case["first_step"] and bits.tolist() == _rows(case["grad_bits"])
        assert codec.encode(first, bits.reshape(-1)) == payload


def test_whole_step_tensor_vectors(backend):
    """nspsa.json tensors (the generator's noise): each backend's replay of the steps' sub-steps gives the bits."""
    for case in NSPSA["tensors"]:
        dtype = case["dtype"]
        w = np.array([int(x, 16) for x in case["w"]], dtype=R.BITS_DTYPE[dtype])
        rule = _rule(case["rule"], int(case["seed"]), case["noise"])
        rows = _rows(case["grad_bits"])
        want = [int(x, 16) for x in case["after"]]
        assert R.replay(w, dtype, seed=rule.seed, k=case["tensor"], noise_name=rule.noise, rule=case["rule"],
                        grads=rows, decayed=case["decay"], start=int(case["start"])).tolist() == want
        x = bits_to_torch(w, dtype, "cpu")
        steps.replay_tensor_(x, rule, case["tensor"], steps.step_constants(rule, rows), decay=case["decay"],
                             start=int(case["start"]))
        assert torch_to_bits(x, dtype).tolist() == want, (backend, dtype, case["rule"]["perturbations"])


@pytest.mark.skipif(not cpu_kernel.available(), reason="the compiled CPU kernel is not built")
def test_every_isa_build_gives_the_vectors():
    """Each instruction-set build of the C kernel this CPU runs (generic, AVX2, AVX-512): a noise ring of N."""
    for isa in cpu_kernel.isas():
        for case in NSPSA["tensors"]:
            dtype = case["dtype"]
            w = np.array([int(x, 16) for x in case["w"]], dtype=R.BITS_DTYPE[dtype])
            rule = _rule(case["rule"], int(case["seed"]), case["noise"])
            plan = steps.step_constants(rule, _rows(case["grad_bits"]))
            if not case["decay"]:
                plan = [(terms, 0.0) for terms, _ in plan]
            x = bits_to_torch(w, dtype, "cpu")
            cpu_kernel.apply_terms_(x, int(case["start"]), rule, case["tensor"], 0, cpu_kernel.REPLAY, steps=plan,
                                    isa=isa)
            assert torch_to_bits(x, dtype).tolist() == [int(v, 16) for v in case["after"]], isa


def test_tiny_nspsa_vectors_record_what_they_are_for():
    """The end-to-end vectors (replayed by test_spec_vectors.test_tiny_end_to_end_vector on every backend):
    3 perturbations with a zero record, sign records of 2, and sign records of 3 with negative ones."""
    traj = read_trajectory(VECTORS / "tiny-nspsa" / "traj.mzt")
    assert traj.header["rule"]["perturbations"] == 3 and traj.grad_bits.shape == (6, 3)
    assert traj.grad_bits[1, 1] == 0 and traj.losses is not None and traj.losses.shape == (6,)
    sign = read_trajectory(VECTORS / "tiny-nspsa-sign" / "traj.mzt")
    assert sign.header["rule"]["grad_encoding"] == "sign" and sign.grad_bits.shape == (6, 2)
    neg = read_trajectory(VECTORS / "tiny-nspsa-sign-neg" / "traj.mzt")  # every sign, 12 values in chunk 0
    assert neg.header["rule"]["grad_encoding"] == "sign" and neg.grad_bits.shape == (6, 3)
    assert {int(b) for b in neg.grad_bits.reshape(-1)} == {0x3E00, 0xBE00, 0x0000}
    assert (neg.grad_bits[:4] == 0xBE00).sum() > 0 and (neg.grad_bits[4:] == 0xBE00).sum() > 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**64 - 1), dtype=st.sampled_from(["F32", "BF16", "F16"]), n_pert=st.integers(2, 64),
       n=st.integers(1, 40), start=st.integers(0, 2**40), steps_=st.integers(1, 3),
       grads=st.lists(st.floats(-1e4, 1e4), min_size=64 * 3, max_size=64 * 3), wd=st.sampled_from([0.0, 0.25]),
       noise=st.sampled_from(["gaussian16", "rademacher16"]), codec=st.sampled_from(["bf16", "fp8", "sign"]))
def test_random_runs_match_the_reference(seed, dtype, n_pert, n, start, steps_, grads, wd, noise, codec):
    """Random N, records of every codec and element runs: torch and the C kernel replay the reference's bits."""
    rule = MezoSGD.create(lr=3e-2, eps=1e-2, seed=seed, noise=noise, weight_decay=wd, grad_encoding=codec,
                          schedule=Schedule("linear", 1, 3), perturbations=n_pert)
    rows = [[rule.encode_grad(grads[t * n_pert + j]) for j in range(n_pert)] for t in range(steps_)]
    w = (np.random.default_rng(seed % 2**32).standard_normal(n) * 2.0).astype(np.float32)
    ref_bits = R.round_to(w, dtype)
    want = R.replay(ref_bits, dtype, seed=seed, k=5, noise_name=noise, rule=rule.header_fields()["rule"],
                    grads=rows, decayed=True, start=start)
    constants = steps.step_constants(rule, rows)
    assert len(constants) == n_pert * steps_
    assert_cpu_backends_replay(ref_bits, dtype, rule, constants, start, want)


# -- the file ----------------------------------------------------------------------------------------

def _header(perturbations: object = 3, **rule) -> dict:
    h = make_header()
    h["rule"] = {**h["rule"], "perturbations": perturbations, **rule}
    return h


def test_writer_lays_out_n_records_a_step_and_the_reader_returns_rows(tmp_path):
    """bytes: count optimizer steps, count * N values in the encoding's layout; losses one a step."""
    for codec, scale in (("bf16", None), ("fp8", 0.25), ("sign", 0.125)):
        h = _header(3, grad_encoding=codec, **({"grad_scale": scale} if scale else {}))
        rule = MezoSGD.from_header(h)
        rows = [[rule.encode_grad(g) for g in (1.5, -2.0, 0.0)], [rule.encode_grad(g) for g in (0.5, 3.0, -7.0)]] * 3
        path = tmp_path / f"{codec}.mzt"
        with TrajectoryWriter(path, h, steps_per_chunk=4) as w:
            for t, row in enumerate(rows):
                w.append_step(row, loss=1.0 + t)
            assert w.steps == 6
        traj = read_trajectory(path)
        assert traj.steps == 6 and traj.grad_bits.tolist() == rows and traj.losses.tolist() == [1.0 + t for t in range(6)]
        flat = np.array(rows[:4], dtype=np.uint16).reshape(-1)
        single = mzt.StepCodec(MezoSGD(lr=rule.lr, eps=rule.eps, seed=0, grad_encoding=codec, grad_scale=scale))
        assert mzt.StepCodec(rule).encode(0, flat) == struct.pack("<II", 0, 4) + single.encode(0, flat)[8:]
        with TrajectoryWriter(tmp_path / "x.mzt", h, overwrite=True) as w:
            with pytest.raises(ValueError, match="3 perturbations records 3"):
                w.append_step(rows[0][:2], loss=1.0)
            with pytest.raises(ValueError, match="3 perturbations records 3"):
                w.append_step(rows[0][0], loss=1.0)


def _file_with_step_payload(tmp_path: Path, header: dict, payload: bytes) -> Path:
    path = tmp_path / "crafted.mzt"
    with TrajectoryWriter(path, header, overwrite=True):
        pass
    frame = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(payload)
    import zlib
    chunk = struct.pack("<I4sI", len(frame), b"STEP", zlib.crc32(frame, zlib.crc32(b"STEP"))) + frame
    with open(path, "ab") as f:
        f.write(chunk)
    return path


def test_a_step_payload_of_the_wrong_length_for_n_is_refused(tmp_path):
    h = _header(3, grad_encoding="bf16")
    h["records"] = {"losses": False}
    good = struct.pack("<II", 0, 2) + bytes(12)
    assert read_trajectory(_file_with_step_payload(tmp_path, h, good)).grad_bits.shape == (2, 3)
    for payload, words in ((struct.pack("<II", 0, 2) + bytes(4), "count 2 x 3 perturbations needs 20"),
                           (struct.pack("<II", 0, 349526) + bytes(12),
                            "is 1048578 values, over the limit of 1048576"),
                           (struct.pack("<II", 0, 1) + bytes([0x7F, 0, 0, 0x80, 0, 0]), "step 0 (perturbation 0)")):
        with pytest.raises(CorruptChunkError) as e:
            read_trajectory(_file_with_step_payload(tmp_path, h, payload))
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("value, words", [
    (0, "integer in [2, 64]"), (1, "integer in [2, 64]"), (65, "integer in [2, 64]"), (2.0, "integer in [2, 64]"),
    ("2", "integer in [2, 64]"), (True, "integer in [2, 64]")])
def test_hostile_perturbations_are_refused_in_one_line(tmp_path, value, words):
    path = tmp_path / "bad.mzt"
    with pytest.raises(TrajectoryError) as e:
        TrajectoryWriter(path, _header(value))
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not path.exists()


def test_perturbations_with_a_momentum_rule_are_refused(tmp_path):
    for rule in ({"name": "mezo-momentum", "momentum": 0.75, "window": 4},
                 {"name": "mezo-momentum-buffer", "momentum": 0.75},
                 {"name": "mezo-adam", "beta1": 0.75, "beta2": 0.875, "adam_eps": 2.0**-20, "window": 4},
                 {"name": "mezo-adam-buffer", "beta1": 0.75, "beta2": 0.875, "adam_eps": 2.0**-20}):
        with pytest.raises(TrajectoryError) as e:
            TrajectoryWriter(tmp_path / "m.mzt", _header(2, **rule))
        assert "takes no perturbations" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="mezo-sgd only"):
        MezoSGD.create(lr=1e-3, eps=1e-3, seed=0, rule="mezo-momentum", perturbations=2)
    with pytest.raises(ValueError, match="mezo-sgd only"):
        MeZO([("w", torch.nn.Parameter(torch.zeros(3)))], lr=1e-3, rule="mezo-momentum-buffer", perturbations=4)
    for rule in ("mezo-adam", "mezo-adam-buffer"):
        with pytest.raises(ValueError, match="mezo-sgd only"):
            MeZO([("w", torch.nn.Parameter(torch.zeros(3)))], lr=1e-3, rule=rule, perturbations=2)


# -- training ----------------------------------------------------------------------------------------

def test_optimizer_steps_replay_exactly_with_failures_and_every_codec(tmp_path):
    """MeZO(perturbations=3): 2N closure calls a step, the mean loss returned; a NaN loss in skip mode records
    +0 for that perturbation only; pending and settled steps alike rebuild to training's bytes."""
    from tests.test_step_pipeline import N, make_closure_for, tiny_model

    for codec in ("bf16", "fp8", "sign"):
        model = tiny_model("bf16")
        opt = MeZO(model.named_parameters(), lr=2e-2, eps=1e-2, seed=7, weight_decay=0.05, on_nonfinite="skip",
                   grad_codec=codec, grad_scale=None if codec == "bf16" else 0.25, schedule=Schedule("cosine", 1, N),
                   perturbations=3)
        start = {n: p.detach().clone() for n, p in zip(opt.names, opt.params)}
        opt.record(tmp_path / f"{codec}.mzt")
        calls = []
        closure_for = make_closure_for(model)

        def counted(t):
            inner = closure_for(t)
            return lambda: (calls.append(t), float("nan") if t == 2 and len(calls) % 6 == 3 else inner())[1]

        for t in range(N):
            opt.step(counted(t), settle=t % 2 == 0)
        opt.close()
        assert len(calls) == 6 * N
        traj = read_trajectory(tmp_path / f"{codec}.mzt")
        assert traj.grad_bits.shape == (N, 3) and traj.grad_bits[2, 1] == 0 and np.isnan(traj.losses[2])
        rule = MezoSGD.from_header(traj.header)
        constants = steps.step_constants(rule, traj.grad_bits)
        for k, (name, p) in enumerate(zip(opt.names, opt.params)):
            w = start[name].clone()
            steps.replay_tensor_(w, rule, k, constants, decay=opt.decay[k])
            assert tensor_bytes(w) == tensor_bytes(p.detach()), (codec, name)


def test_a_failing_perturbation_raises_after_recording_in_raise_mode(tmp_path):
    p = torch.nn.Parameter(torch.linspace(-1, 1, 10))
    opt = MeZO([("w", p)], lr=1e-2, eps=1e-2, perturbations=2)
    opt.record(tmp_path / "r.mzt", record_losses=False)
    values = iter([1.0, 0.5, float("inf"), 1.0])
    with pytest.raises(NonFiniteLossError, match="perturbation 1"):
        opt.step(lambda: next(values))
    assert opt.step_count == 1 and not opt.pending
    opt.close()
    traj = read_trajectory(tmp_path / "r.mzt")
    assert traj.grad_bits[0, 1] == 0 and traj.grad_bits[0, 0] != 0


def test_queue_step_refuses_perturbations():
    opt = MeZO([("w", torch.nn.Parameter(torch.zeros(4)))], lr=1e-2, perturbations=2)
    with pytest.raises(MezoReplayError, match="n-SPSA"):
        opt.queue_step(lambda: 1.0)


def test_fused_restores_are_the_separate_passes(backend):
    """The plain restore of perturbation j fused with P1 of j + 1 (an empty term list, then_perturb) equals
    the restore then the perturbation, on every backend."""
    rule = MezoSGD.create(lr=1e-2, eps=1e-3, seed=3, perturbations=4, weight_decay=0.1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = [torch.randn(203).to(dtype), torch.randn(3, 7).to(dtype)]
        fused, apart = [x.clone() for x in w], [x.clone() for x in w]
        steps.restore_terms_all_(fused, rule, 9, (), 0.0, [True, False], then_perturb=True)
        steps.restore_terms_all_(apart, rule, 9, (), 0.0, [True, False])
        steps.perturb_all_(apart, rule, 10, rule.eps)
        for a, b in zip(fused, apart):
            assert tensor_bytes(a) == tensor_bytes(b), (backend, dtype)


def test_fit_never_queues_nspsa_steps(tmp_path):
    """Where fit would queue steps (a GPU, here the CPU by patching), n-SPSA steps run through step(): the
    file equals the one written with every step settled."""
    from unittest import mock

    from mezo_replay.training import train as train_module
    from mezo_replay.training.train import fit
    from tests.test_step_pipeline import N, make_closure_for, tiny_model

    def go(queued: set[str], reads: bool, name: str) -> bytes:
        model = tiny_model("fp32")
        opt = MeZO(model.named_parameters(), lr=2e-2, eps=1e-2, seed=7, perturbations=2, weight_decay=0.1)
        opt.record(tmp_path / name)
        with mock.patch.object(train_module, "QUEUED_DEVICES", queued):
            fit(opt, N, make_closure_for(model), reads_weights=reads)
        return (tmp_path / name).read_bytes()

    assert go({"cpu"}, False, "queued.mzt") == go(set(), True, "settled.mzt")


def test_train_cli_then_the_printed_reconstruct(tmp_path):
    """What a user runs: train --perturbations 3, then the command train prints: verified against training's
    own fingerprint; `info` and `info --json` show the perturbations."""
    r = cli("train", "--steps", "4", "--eval-every", "0", "--perturbations", "3", "-q", "-o", "run.mzt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r2 = cli(*printed_command(r.stdout), "-q", cwd=tmp_path)
    assert r2.returncode == 0 and "verified against" in r2.stdout, r2.stderr
    traj = read_trajectory(tmp_path / "run.mzt")
    assert traj.header["rule"]["perturbations"] == 3 and traj.grad_bits.shape == (4, 3)
    info = inproc("info", "run.mzt", cwd=tmp_path)
    assert "3 perturbations a step (n-SPSA)" in info.stdout and "steps      4 " in info.stdout, info.stdout
    js = json.loads(inproc("info", "--json", "run.mzt", cwd=tmp_path).stdout)
    assert js["rule"]["perturbations"] == 3 and js["steps"] == 4


def test_train_cli_refuses_perturbations_with_momentum_in_one_line(tmp_path):
    r = inproc("train", "--steps", "2", "--optimizer", "mezo-momentum", "--perturbations", "2", "-q", "-o", "x.mzt",
               cwd=tmp_path)
    assert "--perturbations (n-SPSA) applies to --optimizer mezo-sgd only" in one_line_error(r)
    r = inproc("train", "--steps", "2", "--optimizer", "mezo-adam-buffer", "--perturbations", "2", "-q", "-o",
               "x.mzt", cwd=tmp_path)
    assert "--perturbations (n-SPSA) applies to --optimizer mezo-sgd only" in one_line_error(r)
    r = inproc("train", "--steps", "2", "--perturbations", "65", "-q", "-o", "x.mzt", cwd=tmp_path)
    assert r.returncode != 0 and "65" in r.stderr
    assert not (tmp_path / "x.mzt").exists()


def _config(tmp_path: Path, dtype: str = "fp32", steps: int = 3, **kw) -> TrainConfig:
    tr, ev = embedded.load_task()
    args = dict(model=embedded.MODEL_DIR, train_examples=tr[:32], eval_examples=ev[:8], out=tmp_path / "t.mzt",
                steps=steps, lr=embedded.DEFAULTS["lr"], eps=1e-3, batch_size=4, dtype=dtype, perturbations=2,
                weight_decay=0.01)
    return TrainConfig(**{**args, **kw})


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_training_bytes_equal_reconstruction(tmp_path, dtype):
    """train() in process on tiny Llama in bf16 and fp16: final in-memory weights against reconstruct's bytes."""
    result = train(_config(tmp_path, dtype))
    assert_rebuild_is_training(result, tmp_path / "out")


def test_resume_mid_run_equals_the_uninterrupted_run(tmp_path):
    """Stopped after 2 steps and resumed to 4: the same records and final weights as 4 steps in one go; a
    resume with another N is refused in one line; reconstruct --step 2 and 4 verify."""
    common = ("--eval-every", "0", "--checkpoint-every", "1", "-q", "--perturbations", "2")
    assert inproc("train", "--steps", "4", *common, "-o", "whole.mzt", cwd=tmp_path).returncode == 0
    r = inproc("train", "--steps", "2", *common, "-o", "run.mzt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    base = printed_command(r.stdout)[1]
    wrong = inproc("train", "--resume", "run.mzt", "--steps", "4", *common[:-1], "3", cwd=tmp_path)
    assert "--perturbations 2 there, 3 now" in one_line_error(wrong)
    r = inproc("train", "--resume", "run.mzt", "--steps", "4", *common, cwd=tmp_path)
    assert r.returncode == 0 and "resumed at step 2" in r.stdout, r.stderr
    whole, resumed = read_trajectory(tmp_path / "whole.mzt"), read_trajectory(tmp_path / "run.mzt")
    assert resumed.grad_bits.tolist() == whole.grad_bits.tolist()
    assert resumed.final_fingerprint == whole.final_fingerprint
    for step, out in (("1", "at1"), ("4", "at4")):
        r = inproc("reconstruct", base, "run.mzt", "--step", step, "-o", out, cwd=tmp_path)
        assert r.returncode == 0 and "verified against" in r.stdout, r.stderr


def test_a_trainer_run_with_perturbations_rebuilds_with_the_cli(tmp_path):
    """MeZOTrainer(mezo_perturbations=2) with fp8 records: the file holds 2 records a step, and the CLI's
    rebuild is the trained weights, byte for byte."""
    pytest.importorskip("transformers")
    from tests.test_trainer import assert_weights, make, run_cli
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32)
    base = tmp_path / "base"
    LlamaForCausalLM(cfg).save_pretrained(base)
    trainer = make(base, tmp_path / "run", seed=3, max_steps=3,
                   extra={"mezo_eps": 1e-2, "mezo_grad_codec": "fp8", "mezo_grad_scale": 0.25, "mezo_perturbations": 2})
    trainer.train()
    traj = read_trajectory(tmp_path / "run" / "trajectory.mzt")
    assert traj.header["rule"]["perturbations"] == 2 and traj.grad_bits.shape == (3, 2)
    done = run_cli("reconstruct", str(base), str(tmp_path / "run" / "trajectory.mzt"), "-o", str(tmp_path / "rebuilt"))
    assert done.returncode == 0, done.stderr
    assert_weights(trainer.model, tmp_path / "rebuilt")


@pytest.mark.slow
def test_data_parallel_and_sharded_runs_record_the_same_steps(tmp_path):
    """torchrun, 2 ranks (gloo): data parallel and --shard (FSDP2) record the same n-SPSA steps (each closure's
    loss is the whole batch's, all-reduced per perturbation), and each file rebuilds verified in one process."""
    from tests.test_distributed_train import cli as dcli, torchrun

    common = ("train", "--steps", "3", "--eval-every", "0", "--perturbations", "2", "-q")
    files = {}
    for name, extra in (("data", ()), ("shard", ("--shard",))):
        r = torchrun(2, "-m", "mezo_replay", *common, *extra, "-o", f"{name}.mzt", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        r2 = dcli(*printed_command(r.stdout), "-q", cwd=tmp_path)
        assert r2.returncode == 0 and "verified against" in r2.stdout, r2.stderr
        files[name] = read_trajectory(tmp_path / f"{name}.mzt")
    assert files["data"].grad_bits.tolist() == files["shard"].grad_bits.tolist()
    assert files["data"].final_fingerprint == files["shard"].final_fingerprint
