"""mezo-momentum (spec/momentum.md): the host terms and the multi-term P3 on every backend against the
vectors and the numpy reference, readers refusing bad hyperparameters in one line, and training with
momentum rebuilding bit for bit (the CLI as a user runs it, --resume in the middle of a window,
reconstruct --step, fp32/bf16/fp16 models)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from mezo_replay import embedded
from mezo_replay.arithmetic import reference as R
from mezo_replay.arithmetic.rule import MezoSGD, Schedule
from mezo_replay.errors import MezoReplayError, TrajectoryError
from mezo_replay.format.mzt import TrajectoryWriter, read_trajectory
from mezo_replay.format.safetensors_io import BaseCheckpoint
from mezo_replay.kernels import cpu_kernel, steps
from mezo_replay.rebuild import replay
from mezo_replay.training.optimizer import MeZO
from mezo_replay.training.train import TrainConfig, train
from tests.test_mzt import make_header
from tests.test_rebuild_cli import cli, inproc, one_line_error, printed_command
from tests.test_roundtrip import tensor_bytes
from tests.test_spec_vectors import bits_to_torch, torch_to_bits
from tests.test_train_cli import assert_rebuild_is_training

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
MOMENTUM = json.loads((VECTORS / "momentum.json").read_text())
TORCH_DTYPE = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def momentum_rule(**kw) -> MezoSGD:
    args = dict(lr=1e-2, eps=1e-3, seed=2**40 + 11, rule="mezo-momentum", momentum=0.9, window=4)
    return MezoSGD.create(**{**args, **kw})


# -- host arithmetic ---------------------------------------------------------------------------------

def test_powers_and_terms_vectors():
    """p_k and c_(t,k): the reference and rule.py both give momentum.json's values exactly."""
    for case in MOMENTUM["powers"]:
        assert R.momentum_powers(case["momentum"], case["window"]) == case["p"]
        rule = momentum_rule(momentum=case["momentum"], window=case["window"])
        assert list(rule.powers()) == case["p"]
    assert 0.0 in MOMENTUM["powers"][2]["p"]  # beta 2^-16: the powers drop to +0 below 2^-100
    for run in MOMENTUM["runs"]:
        header = {"name": "mezo-momentum", "lr": run["lr"], "schedule": run["schedule"],
                  "momentum": run["momentum"], "window": run["window"]}
        bits = [int(b, 16) for b in run["grad_bits"]]
        rule = MezoSGD(lr=run["lr"], eps=2.0**-10, seed=0, schedule=Schedule.from_header(run["schedule"]),
                       momentum=run["momentum"], window=run["window"]).validated()
        for t, want in enumerate(run["terms"]):
            want = [tuple(x) for x in want]
            assert R.momentum_terms(header, t, bits[:t + 1]) == want
            assert list(rule.terms(t, bits[:t + 1])) == want
        got = steps.step_constants(rule, bits)
        assert [list(terms) for terms, _ in got] == [[tuple(x) for x in w] for w in run["terms"]]
        split = steps.step_constants(rule, bits[5:], 5, bits[:5])  # a replay starting mid-run
        assert split == got[5:]


def test_window_one_is_mezo_sgd():
    """K = 1: every step's one term is mezo-sgd's (t, c), so the replayed bytes are mezo-sgd's."""
    sgd = MezoSGD.create(lr=1e-2, eps=1e-3, seed=3, weight_decay=0.1)
    mom = MezoSGD.create(lr=1e-2, eps=1e-3, seed=3, weight_decay=0.1, rule="mezo-momentum", window=1)
    bits = [R.grad_bits(g) for g in (1.5, -3.0, 0.0, 7.25, -0.5)]
    for (terms, d), (c, d2) in zip(steps.step_constants(mom, bits), steps.step_constants(sgd, bits)):
        assert len(terms) == 1 and terms[0][1] == c and d == d2
    w = torch.randn(777).to(torch.bfloat16)
    a, b = w.clone(), w.clone()
    steps.replay_tensor_(a, sgd, 1, steps.step_constants(sgd, bits), decay=True)
    steps.replay_tensor_(b, mom, 1, steps.step_constants(mom, bits), decay=True)
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))


# -- the element pass ------------------------------------------------------------------------------

def test_multi_term_element_vectors():
    """momentum.json elements: the reference and the torch element pass (restore_terms_)."""
    cases = MOMENTUM["elements"]
    assert len(cases) >= 60 and any(c == 0.0 for case in cases for c, _ in case["terms"])
    for case in cases:
        dtype = case["dtype"]
        w = np.array([int(case["w"], 16)], dtype=R.BITS_DTYPE[dtype])
        z = np.array([int(case["z"], 16)], dtype=np.uint32).view(np.float32)
        terms = [(c, np.array([int(zj, 16)], dtype=np.uint32).view(np.float32)) for c, zj in case["terms"]]
        want = int(case["p3"], 16)
        assert int(R.multi_term_update(w, dtype, z, case["eps"], terms, case["d"])[0]) == want, case
        t = bits_to_torch(w, dtype, "cpu")
        steps.restore_terms_(t, torch.from_numpy(z.copy()), case["eps"],
                             ((c, torch.from_numpy(zj.copy())) for c, zj in terms), case["d"])
        assert int(torch_to_bits(t, dtype)[0]) == want, case


def _tensor_case(case: dict) -> tuple[np.ndarray, MezoSGD, int, int, list, int, str]:
    dtype = case["dtype"]
    w = np.array([int(x, 16) for x in case["w"]], dtype=R.BITS_DTYPE[dtype])
    rule = MezoSGD(lr=1.0, eps=case["eps"], seed=int(case["seed"]), noise=case["noise"]).validated()
    terms = tuple((s, c) for s, c in case["terms"])
    return w, rule, case["tensor"], int(case["start"]), [(terms, case["d"])], case["step"], dtype


def test_multi_term_tensor_vectors(backend):
    """momentum.json tensors (the generator's noise): each backend's restore-update pass gives the bits."""
    for case in MOMENTUM["tensors"]:
        w, rule, k, start, plan, t, dtype = _tensor_case(case)
        want = [int(x, 16) for x in case["p3"]]
        assert R.multi_term_update(w, dtype, R.noise(rule.noise, rule.seed, t, k,
                                                     np.arange(start, start + w.size, dtype=np.uint64)),
                                   rule.eps, [(c, R.noise(rule.noise, rule.seed, s, k,
                                                          np.arange(start, start + w.size, dtype=np.uint64)))
                                              for s, c in plan[0][0]], plan[0][1]).tolist() == want
        x = bits_to_torch(w, dtype, "cpu")
        steps._apply_terms_(x, rule, k, t, cpu_kernel.RESTORE_UPDATE, plan, plan[0][1] != 0.0, None, None, start)
        assert torch_to_bits(x, dtype).tolist() == want, (backend, case["dtype"], case["step"], case["noise"])


@pytest.mark.skipif(not cpu_kernel.available(), reason="the compiled CPU kernel is not built")
def test_every_isa_build_gives_the_vectors():
    """Each instruction-set build of the C kernel this CPU runs (generic, AVX2, AVX-512)."""
    for isa in cpu_kernel.isas():
        for case in MOMENTUM["tensors"]:
            w, rule, k, start, plan, t, dtype = _tensor_case(case)
            x = bits_to_torch(w, dtype, "cpu")
            cpu_kernel.apply_terms_(x, start, rule, k, t, cpu_kernel.RESTORE_UPDATE, steps=plan, isa=isa)
            assert torch_to_bits(x, dtype).tolist() == [int(v, 16) for v in case["p3"]], isa


def test_tiny_momentum_vectors_record_their_rules():
    """The momentum end-to-end vectors (replayed by test_spec_vectors.test_tiny_end_to_end_vector on every
    backend) hold what they are for: a window of 3 with a zero record, and the buffer form without a window."""
    window = read_trajectory(VECTORS / "tiny-momentum" / "traj.mzt")
    assert window.header["rule"]["name"] == "mezo-momentum" and window.header["rule"]["window"] == 3
    assert 0 in window.grad_bits
    buffer = read_trajectory(VECTORS / "tiny-momentum-buffer" / "traj.mzt").header["rule"]
    assert buffer["name"] == "mezo-momentum-buffer" and "window" not in buffer


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**64 - 1), dtype=st.sampled_from(["F32", "BF16", "F16"]),
       beta=st.floats(2.0**-16, 1 - 2.0**-16), window=st.integers(1, 64), n=st.integers(1, 40),
       start=st.integers(0, 2**40), grads=st.lists(st.floats(-1e4, 1e4), min_size=1, max_size=12),
       wd=st.sampled_from([0.0, 0.25]), noise=st.sampled_from(["gaussian16", "rademacher16"]),
       kind=st.sampled_from(["mezo-momentum", "mezo-momentum-buffer"]))
def test_random_runs_match_the_reference(seed, dtype, beta, window, n, start, grads, wd, noise, kind):
    """Random rules (both forms), records and element runs: torch and the C kernel replay the reference's bits."""
    rule = MezoSGD.create(lr=3e-2, eps=1e-2, seed=seed, noise=noise, weight_decay=wd, rule=kind,
                          momentum=beta, window=window, schedule=Schedule("linear", 2, 9))
    bits = [R.grad_bits(g) for g in grads]
    w = (np.random.default_rng(seed % 2**32).standard_normal(n) * 2.0).astype(np.float32)
    ref_bits = R.round_to(w, dtype)
    want = R.replay(ref_bits, dtype, seed=seed, k=5, noise_name=noise, rule=rule.header_fields()["rule"],
                    grads=bits, decayed=True, start=start)
    assert_cpu_backends_replay(ref_bits, dtype, rule, steps.step_constants(rule, bits), start, want)


def assert_cpu_backends_replay(ref_bits: np.ndarray, dtype: str, rule: MezoSGD, constants: list, start: int,
                               want: np.ndarray) -> None:
    """The torch path and the compiled kernel (when built) replay tensor 5 from ref_bits to want's bits."""
    for backend in ("torch", "compiled") if cpu_kernel.available() else ("torch",):
        steps.set_backend(backend)
        try:
            x = bits_to_torch(ref_bits, dtype, "cpu")
            steps.replay_tensor_(x, rule, 5, constants, decay=True, start=start)
        finally:
            steps.set_backend("auto")
        assert torch_to_bits(x, dtype).tolist() == want.tolist(), backend


# -- the state-buffer form (mezo-momentum-buffer) ------------------------------------------------------

def test_buffer_element_vectors():
    """momentum.json buffer_elements: the reference and the torch element pass give P3 and the new m; one
    case shows that a fused multiply-add would give another m."""
    cases = MOMENTUM["buffer_elements"]
    assert len(cases) >= 60 and "fused_m_after" in cases[-1]
    for case in cases:
        dtype = case["dtype"]
        w = np.array([int(case["w"], 16)], dtype=R.BITS_DTYPE[dtype])
        m = np.array([int(case["m"], 16)], dtype=np.uint32).view(np.float32)
        z = np.array([int(case["z"], 16)], dtype=np.uint32).view(np.float32)
        out, m2 = R.buffer_update(w, m, dtype, z, case["eps"], case["c"], case["momentum"], case["d"])
        assert (hex(int(out[0])), hex(int(m2.view(np.uint32)[0]))) == \
            (hex(int(case["p3"], 16)), hex(int(case["m_after"], 16))), case
        t, mt = bits_to_torch(w, dtype, "cpu"), torch.from_numpy(m.copy())
        steps.buffer_update_(t, mt, torch.from_numpy(z.copy()), case["eps"], case["c"], case["momentum"], case["d"])
        assert int(torch_to_bits(t, dtype)[0]) == int(case["p3"], 16), case
        assert int(mt.view(torch.int32)[0]) & 0xFFFFFFFF == int(case["m_after"], 16), case
    assert cases[-1]["fused_m_after"] != cases[-1]["m_after"]


@pytest.mark.skipif(not cpu_kernel.available(), reason="the compiled CPU kernel is not built")
def test_buffer_form_on_every_isa_and_from_a_saved_state():
    """The C kernel's builds, the torch path and Triton against the reference, whole and split at step 4
    with the state carried over (what training's step-by-step passes do)."""
    rule = MezoSGD.create(lr=1e-2, eps=1e-3, seed=2**63 + 5, rule="mezo-momentum-buffer", momentum=0.9,
                          weight_decay=0.1, schedule=Schedule("cosine", 2, 10))
    bits = [R.grad_bits(g) for g in (2.0, -3.5, 0.0, 1e-3, -7.0, 5.5, 0.25, -1.0, 2.0)]
    constants = steps.step_constants(rule, bits)
    for dtype in ("F32", "BF16", "F16"):
        w = R.round_to((np.random.default_rng(1).standard_normal(333) * 0.5).astype(np.float32), dtype)
        want = R.replay(w, dtype, seed=rule.seed, k=2, noise_name=rule.noise, rule=rule.header_fields()["rule"],
                        grads=bits, decayed=True, start=2**35 + 3).tolist()
        for isa in cpu_kernel.isas():
            x, m = bits_to_torch(w, dtype, "cpu"), torch.zeros(333)
            cpu_kernel.apply_buffer_(x, m, 2**35 + 3, rule, 2, 0, cpu_kernel.REPLAY, constants=constants, isa=isa)
            assert torch_to_bits(x, dtype).tolist() == want, (dtype, isa)
        for backend in ("torch", "compiled", "triton"):
            steps.set_backend(backend)
            try:
                x, m = bits_to_torch(w, dtype, "cpu"), torch.zeros(333)
                steps.replay_tensor_(x, rule, 2, constants[:4], decay=True, start=2**35 + 3, state=m)
                for t in range(4, len(bits)):  # one step at a time, as training applies them
                    steps.replay_tensor_(x, rule, 2, constants[t:t + 1], decay=True, first_step=t,
                                         start=2**35 + 3, state=m)
            finally:
                steps.set_backend("auto")
            assert torch_to_bits(x, dtype).tolist() == want, (dtype, backend)


def test_buffer_training_resumed_equals_the_uninterrupted_run(tmp_path):
    """train() in process with the buffer form: stopped after 2 steps and resumed to 4 gives the records and
    final fingerprint of 4 steps in one go (the resume rebuilds the buffers from the file), and the
    reconstruction is training's bytes."""
    whole = train(_config(tmp_path, out=tmp_path / "whole.mzt", optimizer="mezo-momentum-buffer"))
    out = replay.reconstruct(replay.plan(whole.base, whole.trajectory), tmp_path / "out")
    got, tuned = BaseCheckpoint.open(out), dict(whole.model.named_parameters())
    for name in whole.optimizer.names:
        assert tensor_bytes(got.read(name)) == tensor_bytes(tuned[name]), name
    train(_config(tmp_path, steps=2, out=tmp_path / "part.mzt", optimizer="mezo-momentum-buffer"))
    resumed = train(_config(tmp_path, out=tmp_path / "part.mzt", optimizer="mezo-momentum-buffer", resume=True))
    assert resumed.resumed_from == 2
    a, b = read_trajectory(tmp_path / "whole.mzt"), read_trajectory(tmp_path / "part.mzt")
    assert list(a.grad_bits) == list(b.grad_bits) and a.final_fingerprint == b.final_fingerprint
    mid = replay.reconstruct(replay.plan(whole.base, tmp_path / "part.mzt", step=2), tmp_path / "at2")  # verified
    assert BaseCheckpoint.open(mid).read(whole.optimizer.names[0]) is not None


# -- files -----------------------------------------------------------------------------------------

def _write(tmp_path: Path, rule: dict) -> Path:
    h = make_header(losses=False)
    h["rule"] = {**h["rule"], **rule}
    path = tmp_path / "m.mzt"
    TrajectoryWriter(path, h, overwrite=True).close()
    return path


def test_header_records_the_rule_and_readers_refuse_bad_values(tmp_path):
    ok = _write(tmp_path, {"name": "mezo-momentum", "momentum": 0.75, "window": 8})
    assert read_trajectory(ok).header["rule"]["window"] == 8
    for rule, words in (({"momentum": 0.75}, "lacks the keys ['window']"),
                        ({"window": 8}, "lacks the keys ['momentum']"),
                        ({"momentum": 1.0, "window": 8}, "momentum"), ({"momentum": 0.0, "window": 8}, "momentum"),
                        ({"momentum": 0.9, "window": 8}, "16 significant bits"),
                        ({"momentum": 0.75, "window": 0}, "window"), ({"momentum": 0.75, "window": 65}, "window"),
                        ({"momentum": 0.75, "window": 2.5}, "window"), ({"momentum": "0.75", "window": 4}, "momentum"),
                        ({"momentum": 0.75, "window": True}, "window")):
        path = tmp_path / "bad.mzt"
        good = read_trajectory(ok)
        h = {**good.header, "rule": {**good.header["rule"], **rule}}
        for key in ("momentum", "window"):
            if key not in rule:
                h["rule"].pop(key)
        with pytest.raises((TrajectoryError, ValueError)) as e:
            TrajectoryWriter(path, h, overwrite=True).close()
            read_trajectory(path)
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    buffered = _write(tmp_path, {"name": "mezo-momentum-buffer", "momentum": 0.75})
    h = read_trajectory(buffered).header
    assert h["rule"]["name"] == "mezo-momentum-buffer"
    with pytest.raises((TrajectoryError, ValueError), match="window"):
        TrajectoryWriter(tmp_path / "y.mzt", {**h, "rule": {**h["rule"], "window": 4}}, overwrite=True).close()
        read_trajectory(tmp_path / "y.mzt")
    sgd_with_window = _write(tmp_path, {})
    h = read_trajectory(sgd_with_window).header
    with pytest.raises((TrajectoryError, ValueError), match="window"):
        TrajectoryWriter(tmp_path / "x.mzt", {**h, "rule": {**h["rule"], "window": 4}}, overwrite=True).close()
        read_trajectory(tmp_path / "x.mzt")


def test_queue_step_refuses_momentum():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = MeZO([("w", p)], lr=1e-2, rule="mezo-momentum")
    with pytest.raises(MezoReplayError, match="mezo-sgd steps only"):
        opt.queue_step(lambda: 1.0)


def test_fit_never_queues_momentum_steps(tmp_path):
    """Where fit would queue steps (a GPU, here the CPU by patching), momentum steps run unqueued and
    unfused, pending or not: the file equals the one written with every step settled."""
    from unittest import mock

    from mezo_replay.training import train as train_module
    from mezo_replay.training.train import fit
    from tests.test_step_pipeline import N, make_closure_for, tiny_model

    def go(queued: set[str], reads: bool, name: str) -> bytes:
        model = tiny_model("bf16")
        opt = MeZO(model.named_parameters(), lr=2e-2, eps=1e-2, seed=7, rule="mezo-momentum", momentum=0.5,
                   momentum_window=3, weight_decay=0.1)
        opt.record(tmp_path / name)
        with mock.patch.object(train_module, "QUEUED_DEVICES", queued):
            fit(opt, N, make_closure_for(model), reads_weights=reads)
        return (tmp_path / name).read_bytes()

    settled = go(set(), True, "settled.mzt")
    assert go({"cpu"}, False, "queued.mzt") == settled
    traj = read_trajectory(tmp_path / "settled.mzt")
    assert traj.header["rule"]["name"] == "mezo-momentum" and traj.final_fingerprint is not None


# -- training --------------------------------------------------------------------------------------

MOMENTUM_ARGS = ("--optimizer", "mezo-momentum", "--momentum", "0.75", "--momentum-window", "3")


BUFFER_ARGS = ("--optimizer", "mezo-momentum-buffer", "--momentum", "0.75")


@pytest.mark.parametrize("args, shown", [(MOMENTUM_ARGS, "momentum 0.75 over 3 steps"),
                                         (BUFFER_ARGS, "momentum 0.75 (state buffer)")])
def test_train_cli_then_the_printed_reconstruct(tmp_path, args, shown):
    """What a user runs: train with each momentum form, then the command train prints: verified against
    training's own fingerprint; `info` shows the rule."""
    r = cli("train", "--steps", "5", "--eval-every", "0", *args, "-q", "-o", "run.mzt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r2 = cli(*printed_command(r.stdout), "-q", cwd=tmp_path)
    assert r2.returncode == 0 and "verified against" in r2.stdout, r2.stderr
    rule = read_trajectory(tmp_path / "run.mzt").header["rule"]
    assert (rule["name"], rule["momentum"], rule.get("window")) == (args[1], 0.75, 3 if "over 3" in shown else None)
    info = inproc("info", "run.mzt", cwd=tmp_path)
    assert f"rule       {args[1]}:" in info.stdout and shown in info.stdout, info.stdout


def test_train_cli_refuses_momentum_options_without_the_rule_in_one_line(tmp_path):
    r = inproc("train", "--steps", "2", "--momentum-window", "4", "-q", "-o", "x.mzt", cwd=tmp_path)
    assert "--optimizer mezo-momentum" in one_line_error(r)
    r = inproc("train", "--steps", "2", "--optimizer", "mezo-momentum", "--momentum", "1e-6", "-q", "-o", "x.mzt",
               cwd=tmp_path)
    assert "momentum must be in [2^-16, 1 - 2^-16]" in one_line_error(r)
    r = inproc("train", "--steps", "2", *BUFFER_ARGS, "--momentum-window", "4", "-q", "-o", "x.mzt", cwd=tmp_path)
    assert "mezo-momentum-buffer keeps a buffer instead and has none" in one_line_error(r)
    assert not (tmp_path / "x.mzt").exists()


def _config(tmp_path: Path, dtype: str = "fp32", steps: int = 4, **kw) -> TrainConfig:
    tr, ev = embedded.load_task()
    args = dict(model=embedded.MODEL_DIR, train_examples=tr[:32], eval_examples=ev[:8], out=tmp_path / "t.mzt",
                steps=steps, lr=embedded.DEFAULTS["lr"], eps=1e-3, batch_size=4, dtype=dtype,
                optimizer="mezo-momentum", momentum=0.75, momentum_window=3, weight_decay=0.01)
    return TrainConfig(**{**args, **kw})


@pytest.mark.parametrize("rule, dtype", [
    ("mezo-momentum", "fp32"), pytest.param("mezo-momentum", "bf16", marks=pytest.mark.slow),
    pytest.param("mezo-momentum", "fp16", marks=pytest.mark.slow),
    pytest.param("mezo-momentum-buffer", "bf16", marks=pytest.mark.slow),  # fp32: the resume test below
    pytest.param("mezo-momentum-buffer", "fp16", marks=pytest.mark.slow)])
def test_training_bytes_equal_reconstruction(tmp_path, rule, dtype):
    """train() in process on tiny Llama: its final in-memory weights against reconstruct's bytes."""
    result = train(_config(tmp_path, dtype, optimizer=rule))
    assert_rebuild_is_training(result, tmp_path / "out")


def test_resume_mid_window_equals_the_uninterrupted_run(tmp_path):
    """Stopped after 2 steps of a window of 3 and resumed to 5: the same step records and final weights as
    5 steps in one go; a resume with another window is refused in one line; reconstruct --step 2 works."""
    common = ("--eval-every", "0", "-q")
    assert inproc("train", "--steps", "5", *MOMENTUM_ARGS, *common, "-o", "whole.mzt", cwd=tmp_path).returncode == 0
    r = inproc("train", "--steps", "2", *MOMENTUM_ARGS, *common, "-o", "run.mzt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    base = printed_command(r.stdout)[1]
    wrong = inproc("train", "--resume", "run.mzt", "--steps", "5", *MOMENTUM_ARGS[:-1], "4", *common, cwd=tmp_path)
    assert "--momentum-window 3 there, 4 now" in one_line_error(wrong)
    r = inproc("train", "--resume", "run.mzt", "--steps", "5", *MOMENTUM_ARGS, *common, cwd=tmp_path)
    assert r.returncode == 0 and "resumed at step 2" in r.stdout, r.stderr
    whole, resumed = read_trajectory(tmp_path / "whole.mzt"), read_trajectory(tmp_path / "run.mzt")
    assert list(resumed.grad_bits) == list(whole.grad_bits)
    assert resumed.final_fingerprint == whole.final_fingerprint
    for step, out in (("2", "at2"), ("5", "at5")):
        r = inproc("reconstruct", base, "run.mzt", "--step", step, "-o", out, cwd=tmp_path)
        assert r.returncode == 0 and "verified against" in r.stdout, r.stderr


def test_gpu_kernels_compile_and_the_buffer_kernel_fuses_nothing():
    """Both momentum Triton kernels compile for sm_90 on this GPU-less machine (Triton ships ptxas); the
    buffer kernel's PTX has no fused multiply-add (beta*m must round alone, spec/momentum.md) and neither
    flushes subnormals."""
    import os
    import subprocess
    import sys

    from mezo_replay.kernels import triton_kernels

    if not triton_kernels.available():
        pytest.skip("Triton is not installed")
    code = """
import torch
from mezo_replay.kernels import triton_kernels as T
for kind, dt in (("buffer", torch.float32), ("buffer", torch.float16), ("terms", torch.bfloat16)):
    ptx = T.compile_momentum_for_gpu(kind, dt).asm["ptx"]
    assert ".ftz" not in ptx and "sm_90" in ptx, (kind, dt)
    assert ("fma.rn.f32" in ptx) == (kind == "terms"), (kind, dt)
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.parametrize("kind, codec", [("mezo-momentum", "sign"), ("mezo-momentum-buffer", "fp8")])
def test_a_skipped_non_finite_step_and_codecs_replay_exactly(tmp_path, kind, codec):
    """A step with a NaN loss in skip mode records a zero update, yet the older terms (or the buffer) still
    move the weights; with the fp8 and sign codecs too, the rebuild from the file is training's bytes."""
    from tests.test_step_pipeline import N, make_closure_for, tiny_model

    model = tiny_model("bf16")
    opt = MeZO(model.named_parameters(), lr=2e-2, eps=1e-2, seed=7, weight_decay=0.05, on_nonfinite="skip",
               rule=kind, momentum=0.5, momentum_window=3, grad_codec=codec, grad_scale=0.25,
               schedule=Schedule("cosine", 1, N))
    start = {n: p.detach().clone() for n, p in zip(opt.names, opt.params)}
    opt.record(tmp_path / "run.mzt")
    closure_for = make_closure_for(model, bad=(2, "nan"))
    for t in range(N):
        opt.step(closure_for(t), settle=t % 2 == 0)  # pending updates too: applied by the next step's pass
    opt.close()
    traj = read_trajectory(tmp_path / "run.mzt")
    assert traj.grad_bits[2] == 0 and traj.header["rule"]["name"] == kind
    rule = MezoSGD.from_header(traj.header)
    constants = steps.step_constants(rule, traj.grad_bits)
    for k, (name, p) in enumerate(zip(opt.names, opt.params)):
        w = start[name].clone()
        steps.replay_tensor_(w, rule, k, constants, decay=opt.decay[k])
        assert tensor_bytes(w) == tensor_bytes(p.detach()), name


@pytest.mark.parametrize("kind", ["mezo-momentum", "mezo-momentum-buffer"])
def test_fused_update_perturb_is_the_two_passes(backend, kind):
    """then_perturb: one pass with the bytes of the restore-update followed by the next step's P1, on every
    backend, both forms (the pass training uses between steps)."""
    rule = momentum_rule(rule=kind, weight_decay=0.1, window=3)
    bits = [R.grad_bits(g) for g in (2.0, -3.5, 1.25, 0.0)]
    terms, d = steps.step_constants(rule, bits)[3] if kind == "mezo-momentum" else (None, rule.decay(3))
    c = rule.coefficient(3, bits[3])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = [torch.randn(203).to(dtype), torch.randn(3, 7).to(dtype)]
        fused, apart = [x.clone() for x in w], [x.clone() for x in w]
        sf = [torch.randn(x.numel()) for x in w]
        sa = [x.clone() for x in sf]
        if kind == "mezo-momentum":
            steps.restore_terms_all_(fused, rule, 3, terms, d, [True, False], then_perturb=True)
            steps.restore_terms_all_(apart, rule, 3, terms, d, [True, False])
        else:
            steps.restore_buffer_all_(fused, sf, rule, 3, c, d, [True, False], then_perturb=True)
            steps.restore_buffer_all_(apart, sa, rule, 3, c, d, [True, False])
            assert all(torch.equal(a, b) for a, b in zip(sf, sa))
        steps.perturb_all_(apart, rule, 4, rule.eps)
        for a, b in zip(fused, apart):
            assert tensor_bytes(a) == tensor_bytes(b), (backend, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (tools/gpu_check.sh runs it)")
@pytest.mark.parametrize("kind", ["mezo-momentum", "mezo-momentum-buffer"])
def test_cuda_kernels_give_the_reference_bits(kind):
    """The momentum Triton kernels compiled for the GPU: a replay gives the numpy reference's bits, and the
    training passes (restore-update, fused with the next P1) give the compiled CPU kernel's, per dtype."""
    rule = momentum_rule(lr=3e-2, eps=1e-2, seed=11, weight_decay=0.25, rule=kind, momentum=0.75,
                         schedule=Schedule("linear", 2, 9))
    bits = [R.grad_bits(g) for g in (2.0, -3.5, 1.25, 0.0, 7.0, -0.5)]
    constants = steps.step_constants(rule, bits)
    for dtype in ("F32", "BF16", "F16"):
        ref = R.round_to((np.random.default_rng(1).standard_normal(5003) * 2.0).astype(np.float32), dtype)
        want = R.replay(ref, dtype, seed=11, k=2, noise_name=rule.noise, rule=rule.header_fields()["rule"],
                        grads=bits, decayed=True, start=123)
        x = bits_to_torch(ref, dtype, "cuda")
        steps.replay_tensor_(x, rule, 2, constants, decay=True, start=123)
        assert torch_to_bits(x.cpu(), dtype).tolist() == want.tolist(), dtype
        ws = {dev: [bits_to_torch(ref, dtype, dev)] for dev in ("cpu", "cuda")}
        ms = {dev: [torch.linspace(-1, 1, ref.size, device=dev)] for dev in ("cpu", "cuda")}
        for dev in ("cpu", "cuda"):
            if kind == "mezo-momentum":
                steps.restore_terms_all_(ws[dev], rule, 5, constants[5][0], constants[5][1], [True], starts=[123],
                                         then_perturb=True)
            else:
                steps.restore_buffer_all_(ws[dev], ms[dev], rule, 5, rule.coefficient(5, bits[5]), rule.decay(5),
                                          [True], starts=[123], then_perturb=True)
        assert tensor_bytes(ws["cuda"][0].cpu()) == tensor_bytes(ws["cpu"][0]), dtype
        assert tensor_bytes(ms["cuda"][0].cpu()) == tensor_bytes(ms["cpu"][0]), dtype
