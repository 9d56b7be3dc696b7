"""mezo-adam and mezo-adam-buffer (spec/adam.md): host values and element cases against spec/vectors/adam.json
on every backend (numpy reference, torch path, C kernel in each ISA, Triton), readers refusing what the spec
forbids, the end-to-end vectors, and training that rebuilds bit for bit (the CLI as a user runs it, a
resume in the middle of a window, reconstruct --step)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mezo_replay import embedded
from mezo_replay.arithmetic import reference as R
from mezo_replay.arithmetic.rule import AdamHost, AdamStep, MezoSGD, Schedule, binary64_power
from mezo_replay.errors import MezoReplayError, TrajectoryError
from mezo_replay.format.mzt import invalid_steps, validate_header
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

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"
ADAM = json.loads((VECTORS / "adam.json").read_text())
F32 = np.float32


def f32(h: str) -> np.ndarray:
    return np.array([int(h, 16)], dtype=np.uint32).view(F32)


def adam_rule(name: str = "mezo-adam", **kw) -> MezoSGD:
    args = dict(lr=1e-3, eps=1e-3, seed=2**40 + 11, rule=name, momentum=0.9, window=3, beta2=0.999, adam_eps=1e-8)
    return MezoSGD.create(**{**args, **kw})


def _rule_of(header_rule: dict) -> MezoSGD:
    header = make_header()
    return MezoSGD.from_header({**header, "rule": {"eps": 2.0**-10, "grad_encoding": "bf16", **header_rule}})


# -- host arithmetic ---------------------------------------------------------------------------------

def test_host_vectors():
    """B_t, alpha_t, h_t and the window terms: the reference, rule.py's AdamHost (in order and out of
    order) and step_constants all give adam.json's values exactly."""
    for case in ADAM["hosts"]:
        rule = _rule_of(case["rule"])
        bits = [int(b, 16) for b in case["grad_bits"]]
        host = AdamHost(rule)
        got = steps.step_constants(rule, bits)
        window = case["rule"].get("window", 0)
        for t, want in enumerate(case["steps"]):
            n = min(window, t + 1) if window else t + 1
            assert binary64_power(rule.momentum, n) == want["B1"] and binary64_power(rule.beta2, n) == want["B2"]
            terms, alpha, h = R.adam_host(case["rule"], t, bits)
            assert (alpha, h) == (want["alpha"], want["h"])
            step = host.step(t, bits[:t + 1])
            assert (step.alpha, step.h) == (alpha, h) and got[t] == step
            if window:
                assert [list(x) for x in step.terms] == want["terms"] == [list(x) for x in terms]
            else:
                assert step.terms == ((t, R.adam_flush(bits[t]), 0.0),)
        assert AdamHost(rule).step(5, bits[:6]) == got[5]  # out of order: recomputed from step 0
        later = steps.step_constants(rule, bits[4:], first_step=4, earlier=bits[:4])
        assert later == got[4:]


def test_writers_quantise_and_headers_round_trip():
    rule = adam_rule(momentum=0.9, beta2=0.999, adam_eps=1e-8)
    assert rule.momentum * 2**24 == round(0.9 * 2**24) and rule.beta2 * 2**24 == round(0.999 * 2**24)
    assert rule.adam_eps == R.round_significant(1e-8, 24)
    for name in ("mezo-adam", "mezo-adam-buffer"):
        r = adam_rule(name)
        fields = r.header_fields()
        assert fields["rule"]["name"] == name and ("window" in fields["rule"]) == (name == "mezo-adam")
        assert MezoSGD.from_header({**make_header(), **fields}) == r
        validate_header({**make_header(), **fields})
    with pytest.raises(ValueError, match="rounds to"):
        adam_rule(beta2=1 - 2.0**-26)


def test_readers_refuse_every_listed_header():
    """adam.json's refusals, each through the file reader's header check (unknown keys included)."""
    for case in ADAM["refusals"]:
        with pytest.raises((TrajectoryError, ValueError)):
            validate_header({**make_header(), "rule": case["rule"]})
    for case in ADAM["refusals"]:  # the rule's own check alone refuses all but the unknown key
        if "momentum" not in case["rule"]:
            with pytest.raises(ValueError):
                MezoSGD.from_header({**make_header(), "rule": case["rule"]})
    with pytest.raises(ValueError, match="2\\^80"):
        _rule_of({"name": "mezo-adam-buffer", "lr": 2.0**60, "schedule": {"name": "constant"}, "beta1": 0.5,
                  "beta2": 0.5, "adam_eps": 2.0**-100})


def test_the_gradient_bound():
    """|gq| >= 2^40 is an invalid Adam step (a reader's invalid_steps finds it; training records +0 and
    stops); below it every record is valid, a subnormal bf16 gq is applied as +0."""
    rule = adam_rule("mezo-adam-buffer")
    bad = np.array([int(b, 16) for b in ADAM["invalid_grad_bits"]], dtype=np.uint16)
    good = np.array([int(b, 16) for b in ADAM["valid_grad_bits"]], dtype=np.uint16)
    assert invalid_steps(bad, rule).tolist() == list(range(bad.size))
    assert invalid_steps(good, rule).size == 0
    with pytest.raises(ValueError, match="beyond 2\\^40"):
        rule.coefficient(0, 0x5380)
    assert AdamHost(rule).step(0, [0x0001]).terms == ((0, 0.0, 0.0),)


# -- elements ------------------------------------------------------------------------------------------

def _dtype_bits(case: dict) -> np.ndarray:
    return np.array([int(case["w"], 16)], dtype=R.BITS_DTYPE[case["dtype"]])


def _buffer_rule(case: dict) -> dict:
    return {"eps": case["eps"], "beta1": case["beta1"], "beta2": case["beta2"], "adam_eps": case["adam_eps"]}


def _torch_buffer(case: dict) -> tuple[int, str, str]:
    """The torch path's functions on one element."""
    rule = MezoSGD(lr=1.0, eps=case["eps"], seed=0, momentum=case["beta1"], beta2=case["beta2"],
                   adam_eps=case["adam_eps"])
    w = bits_to_torch(_dtype_bits(case), case["dtype"], "cpu")
    m, v = torch.from_numpy(f32(case["m"]).copy()), torch.from_numpy(f32(case["v"]).copy())
    z = torch.from_numpy(f32(case["z"]).copy())
    steps.adam_moments_buffer_(m, v, z, rule, case["gq"])
    steps.adam_update_(w, z, rule, m, v, AdamStep((), case["alpha"], case["h"], case["d"]), case["d"])
    hexs = [hex(int(x.numpy().view(np.uint32)[0])) for x in (m, v)]
    return int(torch_to_bits(w, case["dtype"])[0]), hexs[0], hexs[1]


def test_buffer_elements_and_shortcuts():
    """mezo-adam-buffer's P3 on single elements: the reference and the torch path give the vectors' bits;
    the shortcut cases show that an FMA, torch's float32 CPU sqrt or a reciprocal division would not."""
    for case in ADAM["buffer_elements"] + ADAM["shortcuts"]:
        out, m2, v2 = R.adam_buffer_p3(_dtype_bits(case), f32(case["m"]), f32(case["v"]), case["dtype"],
                                       f32(case["z"]), _buffer_rule(case), case["gq"], case["alpha"], case["h"],
                                       case["d"])
        assert (int(out[0]), int(m2.view(np.uint32)[0]), int(v2.view(np.uint32)[0])) == \
            (int(case["p3"], 16), int(case["m_after"], 16), int(case["v_after"], 16)), case
        got = _torch_buffer(case)
        assert (got[0], int(got[1], 16), int(got[2], 16)) == \
            (int(case["p3"], 16), int(case["m_after"], 16), int(case["v_after"], 16)), case
    kinds = {c["shortcut"]: c for c in ADAM["shortcuts"]}
    assert set(kinds) == {"fused_m_after", "fused_v_after", "approx_sqrt", "reciprocal_division"}
    assert kinds["fused_m_after"]["shortcut_value"] != kinds["fused_m_after"]["m_after"]
    assert kinds["fused_v_after"]["shortcut_value"] != kinds["fused_v_after"]["v_after"]
    for k in ("approx_sqrt", "reciprocal_division"):
        assert kinds[k]["shortcut_p3"] != kinds[k]["p3"]
    # torch's own float32 sqrt on CPU is the shortcut: the reason the torch path roots in binary64
    v = torch.from_numpy(np.repeat(f32(kinds["approx_sqrt"]["v_after"]), 16))
    assert hex(int(torch.sqrt(v).numpy().view(np.uint32)[0])) == kinds["approx_sqrt"]["shortcut_value"]


def test_window_elements():
    for case in ADAM["window_elements"]:
        terms = [(cm, cv, f32(z)) for cm, cv, z in case["terms"]]
        out = R.adam_window_p3(_dtype_bits(case), case["dtype"], f32(case["z"]),
                               {"eps": case["eps"], "adam_eps": case["adam_eps"]}, terms, case["alpha"], case["h"],
                               case["d"])
        assert int(out[0]) == int(case["p3"], 16), case
        rule = MezoSGD(lr=1.0, eps=case["eps"], seed=0, momentum=0.5, beta2=0.5, adam_eps=case["adam_eps"],
                       adam_window=4)
        w = bits_to_torch(_dtype_bits(case), case["dtype"], "cpu")
        m, v = torch.zeros(1), torch.zeros(1)
        for cm, cv, zj in terms:
            zt = torch.from_numpy(zj.copy())
            m.add_(zt * cm)
            v.add_((zt * zt).mul_(cv))
        steps.adam_update_(w, torch.from_numpy(f32(case["z"]).copy()), rule, m, v,
                           AdamStep((), case["alpha"], case["h"], case["d"]), case["d"])
        assert int(torch_to_bits(w, case["dtype"])[0]) == int(case["p3"], 16), case


def _tensor_case(case: dict) -> tuple[MezoSGD, torch.Tensor, torch.Tensor | None, AdamStep]:
    window = len(case.get("terms") or [])
    rule = MezoSGD(lr=1.0, eps=case["eps"], seed=int(case["seed"]), noise=case["noise"], momentum=case["beta1"],
                   beta2=case["beta2"], adam_eps=case["adam_eps"], adam_window=window)
    w = bits_to_torch(np.array([int(x, 16) for x in case["w"]], dtype=R.BITS_DTYPE[case["dtype"]]),
                      case["dtype"], "cpu")
    state = None
    terms: tuple = tuple(tuple(x) for x in case.get("terms") or ())
    if not window:
        mv = np.array([int(x, 16) for x in case["m"] + case["v"]], dtype=np.uint32).view(F32)
        state = torch.from_numpy(mv.copy())
        terms = ((case["step"], case["gq"], 0.0),)
    return rule, w, state, AdamStep(terms, case["alpha"], case["h"], case["d"])


def _check_tensor_case(case: dict, w: torch.Tensor, state: torch.Tensor | None) -> None:
    assert [f"0x{x:0{8 if case['dtype'] == 'F32' else 4}x}" for x in torch_to_bits(w, case["dtype"])] == case["p3"]
    if state is not None:
        n = len(case["w"])
        got = [f"0x{int(x):08x}" for x in state.numpy().view(np.uint32)]
        assert got[:n] == case["m_after"] and got[n:] == case["v_after"]


def test_tensor_vectors_on_every_backend(backend):
    """The P3 of one step on runs of elements with the generator's noise (RESTORE_UPDATE), each backend."""
    for case in ADAM["tensors"]:
        rule, w, state, step = _tensor_case(case)
        steps._apply_adam_(w, state, rule, case["tensor"], case["step"], cpu_kernel.RESTORE_UPDATE, [step],
                           bool(case["d"]), None, None, int(case["start"]))
        _check_tensor_case(case, w, state)


@pytest.mark.skipif(not cpu_kernel.available(), reason="the compiled CPU kernel is not built")
@pytest.mark.parametrize("isa", cpu_kernel.isas())
def test_tensor_vectors_in_every_isa(isa):
    for case in ADAM["tensors"]:
        rule, w, state, step = _tensor_case(case)
        n = w.numel()
        cpu_kernel.apply_adam_(w, None if state is None else state[:n], None if state is None else state[n:],
                               int(case["start"]), rule, case["tensor"], case["step"], cpu_kernel.RESTORE_UPDATE,
                               steps=[step], isa=isa)
        _check_tensor_case(case, w, state)


def test_record_run_vectors_on_every_backend(backend):
    """adam.json's record_runs: records below 2^-100 but not zero (0x0001, 0x8d00) are applied as +0. The
    reference and steps.replay_tensor_ on this backend give `after`; the buffer form's runs are the ones
    where an unflushed record would give other bits."""
    assert {c["rule"]["name"] for c in ADAM["record_runs"] if c["unflushed_differs"]} == {"mezo-adam-buffer"}
    for case in ADAM["record_runs"]:
        dtype, width = case["dtype"], 8 if case["dtype"] == "F32" else 4
        w = np.array([int(x, 16) for x in case["w"]], dtype=R.BITS_DTYPE[dtype])
        grads = [int(b, 16) for b in case["grad_bits"]]
        got = R.replay(w, dtype, seed=int(case["seed"]), k=case["tensor"], noise_name=case["noise"], rule=case["rule"],
                       grads=grads, decayed=case["decay"], start=int(case["start"]))
        assert [f"0x{int(x):0{width}x}" for x in got] == case["after"], case["rule"]["name"]
        rule = dataclasses.replace(_rule_of(case["rule"]), seed=int(case["seed"]), noise=case["noise"])
        x = bits_to_torch(w, dtype, "cpu")
        steps.replay_tensor_(x, rule, case["tensor"], steps.step_constants(rule, grads), decay=case["decay"],
                             start=int(case["start"]))
        assert [f"0x{int(b):0{width}x}" for b in torch_to_bits(x, dtype)] == case["after"], (backend, dtype)


def _random_weights(dtype: torch.dtype, n: int) -> torch.Tensor:
    w = (torch.randn(n, generator=torch.Generator().manual_seed(3)) * 0.05).to(dtype)
    w[:4] = torch.tensor([0.0, -0.0, float("inf"), float("nan")]).to(dtype)
    return w


GRADS = [R.grad_bits(g) for g in (0.5, -1.25, 0.0, 3.0, 2.0**-120, -0.75, 40.0)] + [0x0001, 0x537F]


@pytest.mark.parametrize("name", ["mezo-adam", "mezo-adam-buffer"])
def test_replay_equals_the_reference_on_every_backend(backend, name):
    """Nine steps (a bf16 subnormal record and one just below 2^40 included) with decay, cosine schedule,
    each dtype, against the numpy reference; a replay split at step 4 (state carried) is the same."""
    rule = adam_rule(name, schedule=Schedule("cosine", warmup_steps=1, total_steps=9), weight_decay=0.5, lr=1e-2)
    header = rule.header_fields()["rule"]
    n = 21 if backend == "triton" else 1111  # the interpreter: a few elements past the special values
    for dtype, tag in ((torch.float32, "F32"), (torch.bfloat16, "BF16"), (torch.float16, "F16")):
        w = _random_weights(dtype, n)
        want = R.replay(torch_to_bits(w, tag), tag, seed=rule.seed, k=2, noise_name="gaussian16", rule=header,
                        grads=GRADS, decayed=True, start=5)
        a = w.clone()
        steps.replay_tensor_(a, rule, 2, steps.step_constants(rule, GRADS), decay=True, start=5, slice_size=100)
        assert torch_to_bits(a, tag).tolist() == want.tolist(), tag
        b = w.clone()
        state = torch.zeros(2 * n) if name == "mezo-adam-buffer" else None
        steps.replay_tensor_(b, rule, 2, steps.step_constants(rule, GRADS[:4]), decay=True, start=5, state=state)
        steps.replay_tensor_(b, rule, 2, steps.step_constants(rule, GRADS[4:], 4, GRADS[:4]), decay=True, start=5,
                             first_step=4, state=state)
        assert torch_to_bits(b, tag).tolist() == want.tolist(), tag


@pytest.mark.parametrize("name", ["mezo-adam", "mezo-adam-buffer"])
def test_fused_training_pass_is_the_two_passes(backend, name):
    """UPDATE_PERTURB (P3 of t, then P1 of t + 1) gives the bytes of RESTORE_UPDATE followed by PERTURB."""
    rule = adam_rule(name, weight_decay=0.25)
    host = AdamHost(rule)
    st = [host.step(t, GRADS[max(0, t - 2):t + 1]) for t in range(3)][2]
    for dtype in (torch.float32, torch.bfloat16):
        w = _random_weights(dtype, 77)
        state = torch.rand(2 * 77) if name == "mezo-adam-buffer" else None
        a, sa = w.clone(), None if state is None else state.clone()
        steps.restore_adam_all_([a], None if sa is None else [sa], rule, st, 2, [True])
        steps.perturb_all_([a], rule, 3, rule.eps)
        b, sb = w.clone(), None if state is None else state.clone()
        steps.restore_adam_all_([b], None if sb is None else [sb], rule, st, 2, [True], then_perturb=True)
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        if state is not None:
            assert torch.equal(sa, sb)


@pytest.mark.parametrize("name", ["tiny-adam", "tiny-adam-buffer"])
def test_tiny_end_to_end_vector(tmp_path, name, backend):
    """spec/vectors/tiny-adam*: the numpy reference and reconstruct on each backend land on expected.json."""
    from mezo_replay.format.mzt import read_trajectory

    tiny = VECTORS / name
    expected = json.loads((tiny / "expected.json").read_text())
    traj = read_trajectory(tiny / "traj.mzt")
    h = traj.header
    assert h["rule"]["name"] == {"tiny-adam": "mezo-adam", "tiny-adam-buffer": "mezo-adam-buffer"}[name]
    base = BaseCheckpoint.open(tiny / "base.safetensors")
    for k, t in enumerate(h["tensors"]):
        w = np.frombuffer(base.read_bytes(t["name"]), dtype=R.BITS_DTYPE[t["dtype"]]).copy()
        got = R.replay(w, t["dtype"], seed=int(h["generator"]["seed"]), k=k, noise_name=h["noise"]["name"],
                       rule=h["rule"], grads=[int(b) for b in traj.grad_bits], decayed=bool(t.get("decay")))
        assert hashlib.sha256(got.tobytes()).hexdigest() == expected["tensors"][t["name"]]["sha256"], t["name"]
    out = replay.reconstruct(replay.plan(tiny / "base.safetensors", tiny / "traj.mzt"), tmp_path / "o.safetensors")
    result = BaseCheckpoint.open(out)
    for tname, want in expected["tensors"].items():
        assert hashlib.sha256(bytes(result.read_bytes(tname))).hexdigest() == want["sha256"], tname


# -- training ------------------------------------------------------------------------------------------

ADAM_ARGS = ("--optimizer", "mezo-adam", "--momentum", "0.75", "--beta2", "0.875", "--momentum-window", "3",
             "--lr", "1e-4")
BUFFER_ARGS = ("--optimizer", "mezo-adam-buffer", "--momentum", "0.75", "--beta2", "0.875", "--adam-eps", "1e-6",
               "--lr", "1e-4")


@pytest.mark.parametrize("args, shown, run", [
    (ADAM_ARGS, "beta1 0.75, beta2 0.875, adam_eps 1e-08 over 3 steps", inproc),
    (BUFFER_ARGS, "beta1 0.75, beta2 0.875, adam_eps 1e-06 (state buffers m, v)", cli)], ids=["window", "buffer"])
def test_train_cli_then_the_printed_reconstruct(tmp_path, args, shown, run):
    """What a user runs: train with each Adam form, then the command train prints: verified against training's
    own fingerprint; `info` shows the rule's settings. The buffer form in subprocesses (the real CLI), the
    window form in this process (click's runner: the same command lines, without two interpreter starts)."""
    r = run("train", "--steps", "4", "--eval-every", "0", *args, "-q", "-o", "run.mzt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r2 = run(*printed_command(r.stdout), "-q", cwd=tmp_path)
    assert r2.returncode == 0 and "verified against" in r2.stdout, r2.stderr
    info = inproc("info", "run.mzt", cwd=tmp_path)
    assert f"rule       {args[1]}:" in info.stdout and shown in info.stdout, info.stdout


def test_train_cli_refuses_adam_options_without_the_rule_in_one_line(tmp_path):
    r = inproc("train", "--steps", "2", "--beta2", "0.99", "-q", "-o", "x.mzt", cwd=tmp_path)
    assert "--optimizer mezo-adam" in one_line_error(r)
    r = inproc("train", "--steps", "2", "--optimizer", "mezo-momentum", "--adam-eps", "1e-6", "-q", "-o", "x.mzt",
               cwd=tmp_path)
    assert "--optimizer mezo-adam" in one_line_error(r)
    r = inproc("train", "--steps", "2", *BUFFER_ARGS, "--momentum-window", "4", "-q", "-o", "x.mzt", cwd=tmp_path)
    assert "mezo-adam-buffer keeps m and v instead and has none" in one_line_error(r)
    r = inproc("train", "--steps", "2", *ADAM_ARGS[:-1], "1e30", "--adam-eps", "1e-30", "-q", "-o", "x.mzt",
               cwd=tmp_path)
    assert "2^80 * adam_eps" in one_line_error(r)
    assert not (tmp_path / "x.mzt").exists()


def test_queue_step_refuses_adam_in_one_line():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = MeZO([("p", p)], lr=1e-3, rule="mezo-adam-buffer")
    assert len(opt.states) == 1 and opt.states[0].numel() == 8  # m and v: 8 bytes per tuned parameter
    with pytest.raises(MezoReplayError, match="queue_step takes mezo-sgd steps only, not mezo-adam-buffer's"):
        opt.queue_step(lambda: 1.0)


@pytest.mark.parametrize("args", [ADAM_ARGS, BUFFER_ARGS], ids=["window", "buffer"])
def test_resume_mid_window_equals_the_uninterrupted_run(tmp_path, args):
    """Stopped after 2 steps (inside a window of 3) and resumed to 4: the records and final weights of 4
    steps in one go; reconstruct --step 2 and 4 verify."""
    common = ("--eval-every", "0", "-q")
    assert inproc("train", "--steps", "4", *args, *common, "-o", "whole.mzt", cwd=tmp_path).returncode == 0
    r = inproc("train", "--steps", "2", *args, *common, "-o", "run.mzt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    base = printed_command(r.stdout)[1]
    r = inproc("train", "--resume", "run.mzt", "--steps", "4", *args, *common, cwd=tmp_path)
    assert r.returncode == 0 and "resumed at step 2" in r.stdout, r.stderr
    from mezo_replay.format.mzt import read_trajectory

    whole, resumed = read_trajectory(tmp_path / "whole.mzt"), read_trajectory(tmp_path / "run.mzt")
    assert list(resumed.grad_bits) == list(whole.grad_bits)
    assert resumed.final_fingerprint == whole.final_fingerprint
    r = inproc("reconstruct", base, "run.mzt", "--step", "2", "-o", "at2", cwd=tmp_path)
    assert r.returncode == 0 and "verified against" in r.stdout, r.stderr


@pytest.mark.parametrize("rule, dtype, codec", [("mezo-adam", "bf16", "bf16"), ("mezo-adam-buffer", "fp16", "bf16"),
                                                ("mezo-adam-buffer", "fp32", "fp8"), ("mezo-adam", "fp32", "sign")])
def test_training_bytes_equal_reconstruction(tmp_path, rule, dtype, codec):
    """train() in process on tiny Llama: its final in-memory weights against reconstruct's bytes, with each
    gradient encoding too (Adam's P3 takes the decoded gq like every rule)."""
    tr, ev = embedded.load_task()
    result = train(TrainConfig(model=embedded.MODEL_DIR, train_examples=tr[:32], eval_examples=ev[:8],
                               out=tmp_path / "t.mzt", steps=4, lr=1e-4, eps=1e-3, batch_size=4, dtype=dtype,
                               optimizer=rule, momentum=0.75, momentum_window=3, weight_decay=0.01,
                               grad_codec=codec, grad_scale=None if codec == "bf16" else 4.0))
    assert_rebuild_is_training(result, tmp_path / "out")


def test_gpu_kernel_compiles_with_correctly_rounded_division_and_root():
    """The Adam Triton kernel compiles for sm_90 on this GPU-less machine (Triton ships ptxas): its PTX has
    div.rn.f32 and sqrt.rn.f32, and no fma, no approx and no flushing of subnormals."""
    from mezo_replay.kernels import triton_kernels

    if not triton_kernels.available():
        pytest.skip("Triton is not installed")
    code = """
import torch
from mezo_replay.kernels import triton_kernels as T
for buffered, dt, replay in ((True, torch.float32, True), (False, torch.bfloat16, True), (True, torch.float16, False)):
    ptx = T.compile_adam_for_gpu(dt, buffered=buffered, replay=replay).asm["ptx"]
    assert "sm_90" in ptx and "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx, (buffered, dt)
    assert "fma" not in ptx and "approx" not in ptx and ".ftz" not in ptx, (buffered, dt)
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.skipif(not cpu_kernel.available(), reason="the compiled CPU kernel is not built")
def test_the_c_build_has_no_fused_multiply_add_and_no_estimates():
    """The kernel's object code: no vfmadd/vfmsub (contraction off) and no rcpps/rsqrtps estimates."""
    lib = next(Path(cpu_kernel.__file__).parent.glob("_cpu_kernel*.so"), None)
    if lib is None:
        pytest.skip("no built kernel file")
    try:
        dump = subprocess.run(["objdump", "-d", str(lib)], capture_output=True, text=True, timeout=120).stdout
    except FileNotFoundError:
        pytest.skip("objdump is not installed")
    assert "sqrtps" in dump and "divps" in dump
    for bad in ("vfmadd", "vfmsub", "vfnmadd", "rcpps", "rsqrtps", "rcp14", "rsqrt14"):
        assert bad not in dump, bad


@pytest.mark.parametrize("bits", [0x5380, 0xD380])  # |gq| = 2^40: the first invalid Adam magnitude
def test_a_file_with_a_step_beyond_the_gradient_bound_is_rejected(tmp_path: Path, bits: int) -> None:
    """A reader rejects an Adam file from the STEP chunk holding |gq| >= 2^40 (a mezo-sgd file may hold it);
    the writer refuses to append it."""
    from mezo_replay.errors import CorruptChunkError
    from mezo_replay.format.mzt import TrajectoryWriter, read_trajectory
    from tests.test_mzt import PREAMBLE, crafted, head_chunk, step_chunk

    header = make_header()
    header["rule"] = adam_rule("mezo-adam-buffer").header_fields()["rule"]
    path = crafted(tmp_path, PREAMBLE, head_chunk(header), step_chunk(0, [0x3F80, 0x537F, bits]))
    with pytest.raises(CorruptChunkError, match=f"step 2 records gradient bits 0x{bits:04x}"):
        read_trajectory(path)
    sgd = crafted(tmp_path, PREAMBLE, head_chunk(), step_chunk(0, [0x3F80, bits]), name="sgd.mzt")
    assert read_trajectory(sgd).steps == 2
    with TrajectoryWriter(tmp_path / "w.mzt", {**header, "records": {"losses": False}}) as w:
        w.append_step(0x537F)
        with pytest.raises(ValueError, match="refusing"):
            w.append_step(bits)
        assert w.steps == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (tools/gpu_check.sh can run it)")
@pytest.mark.parametrize("name", ["mezo-adam", "mezo-adam-buffer"])
def test_cuda_gives_the_reference_bits(name):
    """On a GPU, Triton's Adam kernel and the torch path (CUDA's sqrt and division): a replay gives the numpy
    reference's bits; the fused training pass gives the compiled CPU kernel's (weights and m, v); the
    tensor vectors hold."""
    rule = adam_rule(name, lr=3e-2, eps=1e-2, seed=11, weight_decay=0.25, schedule=Schedule("linear", 2, 9))
    constants = steps.step_constants(rule, GRADS)
    try:
        for backend in ("triton", "torch"):
            steps.set_backend(backend)
            for dtype in ("F32", "BF16", "F16"):
                ref = R.round_to((np.random.default_rng(1).standard_normal(5003) * 2.0).astype(np.float32), dtype)
                want = R.replay(ref, dtype, seed=11, k=2, noise_name=rule.noise, rule=rule.header_fields()["rule"],
                                grads=GRADS, decayed=True, start=123)
                x = bits_to_torch(ref, dtype, "cuda")
                steps.replay_tensor_(x, rule, 2, constants, decay=True, start=123)
                assert torch_to_bits(x.cpu(), dtype).tolist() == want.tolist(), (backend, dtype)
                ws = {dev: [bits_to_torch(ref, dtype, dev)] for dev in ("cpu", "cuda")}
                ss = {dev: [torch.linspace(-1, 1, 2 * ref.size, device=dev).abs()] if name == "mezo-adam-buffer"
                      else None for dev in ("cpu", "cuda")}
                for dev in ("cpu", "cuda"):
                    steps.restore_adam_all_(ws[dev], ss[dev], rule, constants[5], 5, [True], starts=[123],
                                            then_perturb=True)
                assert tensor_bytes(ws["cuda"][0].cpu()) == tensor_bytes(ws["cpu"][0]), (backend, dtype)
                if ss["cpu"] is not None:
                    assert tensor_bytes(ss["cuda"][0].cpu()) == tensor_bytes(ss["cpu"][0]), (backend, dtype)
            for case in ADAM["tensors"]:
                r, w, state, step = _tensor_case(case)
                w, state = w.cuda(), None if state is None else state.cuda()
                steps._apply_adam_(w, state, r, case["tensor"], case["step"], cpu_kernel.RESTORE_UPDATE, [step],
                                   bool(case["d"]), None, None, int(case["start"]))
                _check_tensor_case(case, w.cpu(), None if state is None else state.cpu())
    finally:
        steps.set_backend("auto")


@pytest.mark.parametrize("backend_name", ["torch", "compiled"])
def test_random_hyperparameters_replay_like_the_reference(backend_name):
    """Hypothesis: any valid (beta1, beta2, adam_eps, lr, window, records, dtype) replays on the torch path
    and the C kernel to the numpy reference's bits."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    if backend_name == "compiled" and not cpu_kernel.available():
        pytest.skip("the compiled CPU kernel is not built")
    beta = st.integers(1, 2**24 - 1).map(lambda k: k / 2**24)
    records = st.lists(st.integers(0, 0xFFFF).filter(lambda b: abs(R.grad_value(b)) < 2.0**40), min_size=1, max_size=6)

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(b1=beta, b2=beta, delta_exp=st.integers(-100, 0), lr_exp=st.integers(-120, -4), window=st.integers(0, 5),
           grads=records, dtype=st.sampled_from(["F32", "BF16", "F16"]), wd=st.sampled_from([0.0, 0.5]))
    def check(b1, b2, delta_exp, lr_exp, window, grads, dtype, wd):
        lr = 2.0**max(-100, min(-1, lr_exp + delta_exp + 60))  # mostly within the step-size bound; d < 1
        rule = MezoSGD(lr=lr, eps=2.0**-10, seed=5, momentum=b1, beta2=b2, adam_eps=2.0**delta_exp,
                       adam_window=window, weight_decay=wd)
        try:
            rule.validated()
        except ValueError:
            return  # the step-size bound: a reader refuses the header
        w = _random_weights(TORCH_DTYPE[dtype], 150)
        want = R.replay(torch_to_bits(w, dtype), dtype, seed=5, k=1, noise_name="gaussian16",
                        rule=rule.header_fields()["rule"], grads=grads, decayed=True)
        steps.replay_tensor_(w, rule, 1, steps.step_constants(rule, grads), decay=True)
        assert torch_to_bits(w, dtype).tolist() == want.tolist()

    steps.set_backend(backend_name)
    try:
        check()
    finally:
        steps.set_backend("auto")


TORCH_DTYPE = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
