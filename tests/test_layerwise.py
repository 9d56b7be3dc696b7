"""Layer-wise MeZO (spec/layerwise.md): per-tensor perturb_exp/step_exp on every backend against the vectors
and the numpy reference, readers refusing bad exponents in one line, the writer's exponents from the base,
and training with --layerwise rebuilding bit for bit (the CLI as a user runs it, --resume, reconstruct
--step, a LoRA adapter)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mezo_replay import embedded
from mezo_replay.arithmetic import reference as R
from mezo_replay.arithmetic.rule import MezoSGD, Schedule
from mezo_replay.errors import TrajectoryError
from mezo_replay.format.mzt import TrajectoryWriter, invalid_steps, read_trajectory
from mezo_replay.format.safetensors_io import BaseCheckpoint
from mezo_replay.kernels import cpu_kernel, steps
from mezo_replay.rebuild import replay
from mezo_replay.training.layerwise import block_of, exponents_from_rms, layerwise_exponents
from mezo_replay.training.optimizer import MeZO
from mezo_replay.training.train import TrainConfig, train
from tests.test_adapter import with_header
from tests.test_rebuild_cli import cli, inproc, one_line_error, printed_command
from tests.test_roundtrip import tensor_bytes
from tests.test_spec_vectors import bits_to_torch, torch_to_bits
from tests.test_train_cli import assert_rebuild_is_training

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"
NAMES = ["tiny-layerwise", "tiny-layerwise-momentum", "tiny-layerwise-buffer"]
LAYERWISE = json.loads((VECTORS / "layerwise.json").read_text())
TORCH_DTYPE = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _reference(name: str) -> dict[str, str]:
    """sha256 of each tensor's bytes after the numpy reference's replay of vector `name`."""
    tiny = VECTORS / name
    traj = read_trajectory(tiny / "traj.mzt")
    h = traj.header
    base = BaseCheckpoint.open(tiny / "base.safetensors")
    out = {}
    for k, t in enumerate(h["tensors"]):
        w = np.frombuffer(base.read_bytes(t["name"]), dtype=R.BITS_DTYPE[t["dtype"]]).copy()
        got = R.replay(w, t["dtype"], seed=int(h["generator"]["seed"]), k=k, noise_name=h["noise"]["name"],
                       rule=h["rule"], grads=[int(b) for b in traj.grad_bits], decayed=bool(t.get("decay")),
                       perturb_exp=t.get("perturb_exp", 0), step_exp=t.get("step_exp", 0))
        out[t["name"]] = hashlib.sha256(got.tobytes()).hexdigest()
    return out


# -- vectors ---------------------------------------------------------------------------------------

def test_vectors_hold_mixed_exponents_and_a_coefficient_below_the_floor():
    """What the vectors are for: positive, negative, zero and the extreme -40 exponents, and a step whose c is
    not 0 while one tensor's c_k falls below 2^-100 to +0 (and an unscaled replay gives other bytes)."""
    for name in NAMES:
        traj = read_trajectory(VECTORS / name / "traj.mzt")
        rule = MezoSGD.from_header(traj.header)
        assert rule.exponents == ((3, -2), (-40, -40), (0, 5))
        assert "step_exp" not in traj.header["tensors"][0] or traj.header["tensors"][0]["step_exp"] == -2
        assert "perturb_exp" not in traj.header["tensors"][2]  # writers omit zeros
        c = rule.coefficient(2, int(traj.grad_bits[2]))
        assert c != 0.0 and rule.tensor_coefficient(c, 1) == 0.0 and rule.tensor_coefficient(c, 0) != 0.0
    expected = json.loads((VECTORS / NAMES[0] / "expected.json").read_text())
    plain = json.loads((VECTORS / "tiny-cosine-decay" / "expected.json").read_text())
    assert expected["tensors"]["a.weight"] != plain["tensors"]["a.weight"]


@pytest.mark.parametrize("name", NAMES)
def test_end_to_end_vectors_on_the_reference_and_every_backend(tmp_path, name, backend):
    """The numpy reference (given each entry's exponents) and reconstruct on this backend both land on
    expected.json, which the optimizer's own training passes produced."""
    expected = json.loads((VECTORS / name / "expected.json").read_text())
    ref = _reference(name)
    for n, want in expected["tensors"].items():
        assert ref[n] == want["sha256"], n
    out = replay.reconstruct(replay.plan(VECTORS / name / "base.safetensors", VECTORS / name / "traj.mzt"),
                             tmp_path / "o.safetensors")
    result = BaseCheckpoint.open(out)
    for n, want in expected["tensors"].items():
        assert hashlib.sha256(bytes(result.read_bytes(n))).hexdigest() == want["sha256"], (n, backend)


def test_every_isa_build_gives_the_vectors():
    """Each instruction-set build of the C kernel (generic, AVX2, AVX-512 where the CPU runs them), fed the
    scaled eps_k and c_k as steps.py feeds them."""
    for name in NAMES:
        expected = json.loads((VECTORS / name / "expected.json").read_text())
        traj = read_trajectory(VECTORS / name / "traj.mzt")
        rule = MezoSGD.from_header(traj.header)
        constants = steps.step_constants(rule, traj.grad_bits)
        base = BaseCheckpoint.open(VECTORS / name / "base.safetensors")
        for isa in cpu_kernel.isas():
            for k, t in enumerate(traj.header["tensors"]):
                w = base.read(t["name"]).clone().reshape(-1)
                local, cs, _ = steps._for_tensor(rule, k, constants)
                cs = cs if t.get("decay") else [(c, 0.0) for c, _ in cs]
                if rule.buffered:
                    cpu_kernel.apply_buffer_(w, torch.zeros(w.numel()), 0, local, k, 0, cpu_kernel.REPLAY,
                                             constants=cs, isa=isa)
                elif rule.window:
                    cpu_kernel.apply_terms_(w, 0, local, k, 0, cpu_kernel.REPLAY, steps=cs, isa=isa)
                else:
                    cpu_kernel.apply_(w, 0, local, k, 0, cpu_kernel.REPLAY, constants=cs, isa=isa)
                got = hashlib.sha256(tensor_bytes(w)).hexdigest()
                assert got == expected["tensors"][t["name"]]["sha256"], (name, isa, t["name"])


def test_triton_interpreted_replays_the_vectors_and_trains_like_the_c_kernel():
    """Triton under its interpreter (a subprocess: TRITON_INTERPRET is read at import): both vectors
    reconstruct to expected.json, and training passes (grouped launches for unscaled tensors, per-tensor
    ones for scaled tensors) give the C kernel's bytes for every rule."""
    from mezo_replay.kernels import triton_kernels

    if not triton_kernels.available():
        pytest.skip("Triton is not installed")
    code = r"""
import hashlib, json, tempfile, torch
from pathlib import Path
from mezo_replay.kernels import steps, triton_kernels
from mezo_replay.rebuild import replay
from mezo_replay.format.safetensors_io import BaseCheckpoint
from mezo_replay.training.optimizer import MeZO
assert triton_kernels.interpreting()
V = Path("spec/vectors")
steps.set_backend("triton")
for name in ("tiny-layerwise", "tiny-layerwise-momentum", "tiny-layerwise-buffer"):
    exp = json.loads((V / name / "expected.json").read_text())
    out = replay.reconstruct(replay.plan(V / name / "base.safetensors", V / name / "traj.mzt"),
                             Path(tempfile.mkdtemp()) / "o.safetensors")
    got = BaseCheckpoint.open(out)
    for n, want in exp["tensors"].items():
        assert hashlib.sha256(bytes(got.read_bytes(n))).hexdigest() == want["sha256"], (name, n)
def run(backend, rule):
    steps.set_backend(backend)
    g = torch.Generator().manual_seed(1)
    ps = [("a", torch.randn(40, generator=g) * 0.01), ("b", torch.zeros(8)), ("c", torch.randn(30, generator=g) * 4),
          ("d", (torch.randn(20, generator=g)).to(torch.bfloat16))]
    ps = [(n, torch.nn.Parameter(p)) for n, p in ps]
    opt = MeZO(ps, lr=1e-2, eps=1e-3, seed=9, rule=rule, momentum_window=2, layerwise="both", weight_decay=0.1)
    assert any(e for e, _ in opt.rule.exponents) and (0, 0) in opt.rule.exponents
    for i in range(4):
        opt.step(lambda: sum((p.float() ** 2).sum() for _, p in ps).item(), settle=i == 3)
    opt.settle()
    return [p.detach().clone() for _, p in ps]
for rule in ("mezo-sgd", "mezo-momentum", "mezo-momentum-buffer"):
    a, b = run("triton", rule), run("compiled", rule)
    assert all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b)), rule
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def _case_rule(case: dict) -> MezoSGD:
    """The MezoSGD of a layerwise.json run: its rule object, its seed and noise, and the run's exponents on
    tensor `tensor` (every earlier tensor unscaled)."""
    r = case["rule"]
    return MezoSGD.create(lr=r["lr"], eps=r["eps"], seed=int(case["seed"]), noise=case["noise"],
                          schedule=Schedule.from_header(r["schedule"]), weight_decay=r.get("weight_decay", 0.0),
                          rule=r["name"], momentum=r.get("momentum", 0.9), window=r.get("window", 16),
                          exponents=[(0, 0)] * case["tensor"] + [(case["perturb_exp"], case["step_exp"])])


def run_case(case: dict) -> list[str]:
    """A layerwise.json run through steps.replay_tensor_ on the current backend: its bits after every step."""
    rule, dtype = _case_rule(case), case["dtype"]
    w = bits_to_torch(np.array([int(x, 16) for x in case["w"]], dtype=R.BITS_DTYPE[dtype]), dtype, "cpu")
    grads = [int(b, 16) for b in case["grad_bits"]]
    steps.replay_tensor_(w, rule, case["tensor"], steps.step_constants(rule, grads), decay=case["decay"],
                         start=int(case["start"]))
    return [f"0x{int(x):0{8 if dtype == 'F32' else 4}x}" for x in torch_to_bits(w, dtype)]


def test_coefficient_vectors():
    """layerwise.json's c_k: the reference and rule.py (tensor_coefficient; the step's validity through
    coefficient) give each value, the flush below 2^-100 and the 2^100 limit included."""
    for case in LAYERWISE["coefficients"]:
        bits, e, f = int(case["grad_bits"], 16), case["perturb_exp"], case["step_exp"]
        c = R.coefficient(case["lr"], bits)
        assert c == case["c"]
        if case["c_k"] is None:
            with pytest.raises(ValueError):
                R.layerwise_coefficient(c, e, f)
        else:
            assert R.layerwise_coefficient(c, e, f) == case["c_k"]
        rule = MezoSGD.create(lr=case["lr"], eps=2.0**-20, seed=0, exponents=[(e, f)])
        if case["c_k"] is None:
            with pytest.raises(ValueError):
                rule.coefficient(0, bits)
        else:
            assert rule.coefficient(0, bits) == c and rule.tensor_coefficient(c, 0) == case["c_k"]
    assert any(x["c"] != 0 and x["c_k"] == 0 for x in LAYERWISE["coefficients"])


def test_run_vectors_on_the_reference_and_every_backend(backend):
    """layerwise.json runs (mezo-sgd, mezo-momentum, mezo-momentum-buffer; zero weights where an unflushed
    c_k would show): the numpy reference and steps.replay_tensor_ on this backend give `after`."""
    assert sum(c["unflushed_differs"] for c in LAYERWISE["runs"]) >= 6
    assert {c["rule"]["name"] for c in LAYERWISE["runs"] if c["unflushed_differs"]} == \
        {"mezo-sgd", "mezo-momentum", "mezo-momentum-buffer"}
    for case in LAYERWISE["runs"]:
        dtype = case["dtype"]
        w = np.array([int(x, 16) for x in case["w"]], dtype=R.BITS_DTYPE[dtype])
        got = R.replay(w, dtype, seed=int(case["seed"]), k=case["tensor"], noise_name=case["noise"],
                       rule=case["rule"], grads=[int(b, 16) for b in case["grad_bits"]], decayed=case["decay"],
                       start=int(case["start"]), perturb_exp=case["perturb_exp"], step_exp=case["step_exp"])
        width = 8 if dtype == "F32" else 4
        assert [f"0x{int(x):0{width}x}" for x in got] == case["after"], case["rule"]
        assert run_case(case) == case["after"], (backend, dtype, case["rule"]["name"])


# -- the host arithmetic -----------------------------------------------------------------------------

def test_scaling_helper_and_the_limits():
    rule = MezoSGD.create(lr=1e-3, eps=1e-3, seed=1, exponents=[(2, 3), (0, 0), (-40, 0)])
    assert rule.tensor_scaling(0) == (rule.eps * 4, 32.0) and rule.tensor_scaling(1) == (rule.eps, 1.0)
    assert rule.tensor_coefficient(2.0**-96, 2) == 0.0  # below 2^-100: +0, like c
    assert rule.tensor_coefficient(-2.0**-60, 2) == -2.0**-100  # at the floor: kept
    assert rule.coefficient_limit == 2.0**95  # the largest e + f is 5
    huge = MezoSGD.create(lr=2.0**90, eps=1e-3, seed=1, exponents=[(20, 20)])
    with pytest.raises(ValueError, match="scaled layer-wise is beyond 2"):
        huge.coefficient(0, 0x4000)  # gq 2: c = 2^91, c_k = 2^131 (0x2B80, gq 2^-40: c_k = 2^90)
    assert invalid_steps(np.array([0x4000, 0x2B80], dtype=np.uint16), huge).tolist() == [0]
    assert MezoSGD.create(lr=1e-3, eps=1e-3, seed=1, exponents=[(0, 0)]) == MezoSGD.create(lr=1e-3, eps=1e-3, seed=1)
    with pytest.raises(ValueError, match=r"outside \[2\^-60, 2\^60\]"):
        MezoSGD.create(lr=1e-3, eps=2.0**30, seed=1, exponents=[(31, 0)])


def test_device_coefficient_flags_the_lowered_limit():
    """A queued step computes c on the device: it fails exactly where the host's layer-wise limit does."""
    from mezo_replay.arithmetic.device_grad import device_coefficient

    rule = MezoSGD.create(lr=2.0**80, eps=0.5, seed=1, exponents=[(10, 15)])
    for lp, lm in ((1.0, 0.0), (2.0**-10, 0.0), (0.0, 2.0**-30)):
        _, c, failed = device_coefficient(torch.tensor(lp, dtype=torch.float64), torch.tensor(lm, dtype=torch.float64),
                                          rule, 0)
        try:
            want, host_failed = rule.coefficient(0, rule.encode_grad(lp - lm)), False
        except ValueError:
            want, host_failed = 0.0, True
        assert bool(failed) == host_failed and float(c) == want, (lp, lm)


def test_writers_exponents_from_the_base():
    """round(log2(rms)) less the element-weighted mean, 0 for all-zero and non-finite tensors, clamped."""
    assert exponents_from_rms([-6, 2, None, 0], [2048, 100, 32, 50], 1e-3) == [-1, 7, 0, 5]
    assert exponents_from_rms([None, None], [3, 4], 1e-3) == [0, 0]
    assert exponents_from_rms([-100, 100], [1, 1], 1e-3) == [-40, 40]
    assert exponents_from_rms([0, 60], [1000, 1], 2.0**50) == [0, 10]  # eps_k stays at most 2^60
    ts = [torch.full((64,), 2.0**-6), torch.zeros(8), torch.full((64,), 2.0**-2), torch.tensor([math.nan, 1.0])]
    assert layerwise_exponents(ts, "perturbation", 1e-3) == [(-2, 0), (0, 0), (2, 0), (0, 0)]
    assert layerwise_exponents(ts, "step", 1e-3) == [(0, -2), (0, 0), (0, 2), (0, 0)]
    assert layerwise_exponents(ts, "both", 1e-3) == [(-2, -2), (0, 0), (2, 2), (0, 0)]
    assert layerwise_exponents(ts, "none", 1e-3) == [(0, 0)] * 4
    assert layerwise_exponents(ts, "both", 1e-3, groups=["x", "y", "x", "z"]) == [(0, 0)] * 4
    assert [block_of(n, "layer") for n in ("model.layers.3.mlp.up.weight", "transformer.h.12.attn.c_attn.bias",
                                           "model.embed_tokens.weight", "layers.1.x")] == \
        ["model.layers.3", "transformer.h.12", "model.embed_tokens.weight", "layers.1.x"]
    assert block_of("model.layers.3.mlp.up.weight", "tensor") == "model.layers.3.mlp.up.weight"


def test_layer_blocks_share_one_exponent_per_decoder_layer():
    """--layerwise-blocks layer: each decoder layer's tensors get the exponent of all of them together."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.mul_(16.0 if ".layers.1." in n else 1.0)
    opt = MeZO(model.named_parameters(), lr=1e-3, layerwise="perturbation", layerwise_blocks="layer")
    by_layer: dict[str, set] = {}
    for n, (e, f) in zip(opt.names, opt.rule.exponents):
        by_layer.setdefault(block_of(n, "layer"), set()).add(e)
        assert f == 0
    assert len(by_layer["model.layers.0"]) == len(by_layer["model.layers.1"]) == 1
    assert by_layer["model.layers.1"].pop() - by_layer["model.layers.0"].pop() == 4


def test_queued_steps_scale_the_device_coefficient_like_the_host(tmp_path):
    """fit's queued steps (a GPU's path; here the CPU by patching) keep c on the device and scale it there:
    the file equals the one written with every step settled on the host, and it rebuilds to its fingerprint."""
    from unittest import mock

    from mezo_replay.training import train as train_module
    from mezo_replay.training.train import fit
    from tests.test_step_pipeline import N, make_closure_for, tiny_model

    def go(queued: set[str], reads: bool, name: str) -> bytes:
        model = tiny_model("bf16")
        given = {n: (i % 3 - 1, i % 2 * 3 - 1) for i, (n, _) in enumerate(model.named_parameters())}
        opt = MeZO(model.named_parameters(), lr=2e-2, eps=1e-2, seed=7, weight_decay=0.1, layerwise=given)
        assert len(set(opt.rule.exponents)) > 2
        opt.record(tmp_path / name, new_tensors=list(opt.names))
        with mock.patch.object(train_module, "QUEUED_DEVICES", queued):
            fit(opt, N, make_closure_for(model), reads_weights=reads)
        return (tmp_path / name).read_bytes()

    settled = go(set(), True, "settled.mzt")
    assert go({"cpu"}, False, "queued.mzt") == settled
    replay.verify(replay.plan(None, tmp_path / "queued.mzt"))


# -- files -----------------------------------------------------------------------------------------

def test_readers_refuse_bad_exponents_in_one_line(tmp_path):
    """Hostile headers (what a writer other than ours could produce) are refused at open in one line: an
    exponent out of range, not an integer, a boolean, a string, or one that puts eps_k outside [2^-60, 2^60]."""
    raw = (VECTORS / NAMES[0] / "traj.mzt").read_bytes()
    header = read_trajectory(VECTORS / NAMES[0] / "traj.mzt").header
    cases = [("perturb_exp", 41, "in [-40, 40]"), ("step_exp", -41, "in [-40, 40]"),
             ("perturb_exp", 1.5, "must be an integer"), ("step_exp", True, "must be an integer"),
             ("perturb_exp", "2", "must be an integer"), ("step_exp", 2.0, "must be an integer")]
    for key, value, words in cases:
        h = json.loads(json.dumps(header))
        h["tensors"][2][key] = value
        (tmp_path / "bad.mzt").write_bytes(with_header(raw, h))
        with pytest.raises(TrajectoryError) as e:
            read_trajectory(tmp_path / "bad.mzt")
        assert words in str(e.value) and key in str(e.value) and "\n" not in str(e.value), str(e.value)
    h = json.loads(json.dumps(header))
    h["rule"]["eps"] = 2.0**-25
    h["tensors"][1]["perturb_exp"] = -36  # 2^-61
    (tmp_path / "bad.mzt").write_bytes(with_header(raw, h))
    r = inproc("info", "bad.mzt", cwd=tmp_path)
    assert "outside [2^-60, 2^60]" in one_line_error(r)
    with pytest.raises((TrajectoryError, ValueError), match="in \\[-40, 40\\]"):  # nor does our writer write it
        bad = json.loads(json.dumps(header))
        bad["tensors"][0]["perturb_exp"] = 41
        TrajectoryWriter(tmp_path / "w.mzt", bad)


def test_the_rule_flag_is_required_with_exponents_and_refused_without(tmp_path):
    """spec/layerwise.md: `"layerwise": true` in the rule exactly when an exponent is non-zero, so that readers
    older than layer-wise (which ignore tensor-entry keys) refuse such files by their rule instead of replaying
    them unscaled; exponents are not defined with n-SPSA or the Adam rules."""
    raw = (VECTORS / NAMES[0] / "traj.mzt").read_bytes()
    header = read_trajectory(VECTORS / NAMES[0] / "traj.mzt").header
    assert header["rule"]["layerwise"] is True
    plain = read_trajectory(VECTORS / "tiny" / "traj.mzt").header
    assert "layerwise" not in plain["rule"]
    cases = [(lambda h: h["rule"].pop("layerwise"), 'needs "layerwise": true'),
             (lambda h: h["rule"].update(layerwise=1), "must be true"),
             (lambda h: h["rule"].update(layerwise="yes"), "must be true"),
             (lambda h: [t.pop(k, None) for t in h["tensors"] for k in ("perturb_exp", "step_exp")],
              "no tensor entry has"),
             (lambda h: h["rule"].update(perturbations=2), "not to mezo-sgd with 2 perturbations"),
             (lambda h: h["rule"].update(name="mezo-adam-buffer", beta1=0.75, beta2=0.875, adam_eps=2.0**-20),
              "newer")]
    for change, words in cases:
        h = json.loads(json.dumps(header))
        change(h)
        (tmp_path / "bad.mzt").write_bytes(with_header(raw, h))
        r = inproc("info", "bad.mzt", cwd=tmp_path)
        assert words in one_line_error(r), (words, r.stderr)
    for rule, extra in (("mezo-adam", {}), ("mezo-sgd", {"perturbations": 2})):
        with pytest.raises(ValueError, match="layer-wise exponents"):
            MeZO([("a", torch.nn.Parameter(torch.randn(8) * 64)), ("b", torch.nn.Parameter(torch.randn(8) / 64))],
                 lr=1e-3, rule=rule, layerwise="both", **extra)
    r = inproc("train", "--steps", "2", "--layerwise", "both", "--optimizer", "mezo-adam-buffer", "-q", "-o",
               "x.mzt", cwd=tmp_path)
    assert "layer-wise exponents" in one_line_error(r) and not (tmp_path / "x.mzt").exists()


# -- training --------------------------------------------------------------------------------------

def test_train_cli_then_the_printed_reconstruct(tmp_path):
    """What a user runs: train --layerwise both, then the command train prints: verified against training's
    own fingerprint; `info` shows the exponents, `info --json` each tensor's."""
    r = cli("train", "--steps", "4", "--eval-every", "0", "--layerwise", "both", "-q", "-o", "run.mzt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r2 = cli(*printed_command(r.stdout), "-q", cwd=tmp_path)
    assert r2.returncode == 0 and "verified against" in r2.stdout, r2.stderr
    h = read_trajectory(tmp_path / "run.mzt").header
    exps = [(t.get("perturb_exp", 0), t.get("step_exp", 0)) for t in h["tensors"]]
    assert any(e > 0 for e, _ in exps) and (0, 0) in exps and all(e == f for e, f in exps)  # layer norms: 5
    assert h["metadata"]["layerwise"] == "both"
    info = inproc("info", "run.mzt", cwd=tmp_path)
    lo, hi = min(e for e, _ in exps), max(e for e, _ in exps)
    assert f"layer-wise perturbation exps in [{lo}, {hi}]" in info.stdout, info.stdout
    js = json.loads(inproc("info", "--json", "run.mzt", cwd=tmp_path).stdout)
    assert js["layerwise"] == {t["name"]: [e, f] for t, (e, f) in zip(h["tensors"], exps)}


def test_train_cli_refuses_blocks_without_layerwise_in_one_line(tmp_path):
    r = inproc("train", "--steps", "2", "--layerwise-blocks", "layer", "-q", "-o", "x.mzt", cwd=tmp_path)
    assert "--layerwise-blocks chooses the blocks of --layerwise" in one_line_error(r)
    assert not (tmp_path / "x.mzt").exists()


def _config(tmp_path: Path, steps: int = 4, **kw) -> TrainConfig:
    tr, ev = embedded.load_task()
    args = dict(model=embedded.MODEL_DIR, train_examples=tr[:32], eval_examples=ev[:8], out=tmp_path / "t.mzt",
                steps=steps, lr=embedded.DEFAULTS["lr"], eps=1e-3, batch_size=4, layerwise="perturbation")
    return TrainConfig(**{**args, **kw})


@pytest.mark.parametrize("mode, optimizer, dtype", [
    pytest.param("both", "mezo-sgd", "fp32", marks=pytest.mark.slow),
    pytest.param("step", "mezo-momentum", "bf16", marks=pytest.mark.slow),
    pytest.param("perturbation", "mezo-momentum-buffer", "fp16", marks=pytest.mark.slow)])  # both: fp16 overflows
def test_training_bytes_equal_reconstruction(tmp_path, mode, optimizer, dtype):
    """train() in process on tiny Llama with each choice: its final in-memory weights against reconstruct's."""
    result = train(_config(tmp_path, layerwise=mode, optimizer=optimizer, dtype=dtype, weight_decay=0.01))
    assert_rebuild_is_training(result, tmp_path / "out")


@pytest.mark.slow
def test_resume_and_reconstruct_step(tmp_path):
    """Stopped after 2 steps and resumed to 4: the records and final fingerprint of 4 steps in one go (the
    exponents come again from the same base); a resume with another --layerwise is refused in one line;
    reconstruct --step 2 and 4 verify."""
    common = ("--eval-every", "0", "--checkpoint-every", "2", "--layerwise", "perturbation", "-q")
    assert inproc("train", "--steps", "4", *common, "-o", "whole.mzt", cwd=tmp_path).returncode == 0
    r = inproc("train", "--steps", "2", *common, "-o", "run.mzt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    base = printed_command(r.stdout)[1]
    wrong = inproc("train", "--resume", "run.mzt", "--steps", "4", *common[:-2], "step", "-q", cwd=tmp_path)
    assert "--layerwise perturbation there, step now" in one_line_error(wrong)
    r = inproc("train", "--resume", "run.mzt", "--steps", "4", *common, cwd=tmp_path)
    assert r.returncode == 0 and "resumed at step 2" in r.stdout, r.stderr
    whole, resumed = read_trajectory(tmp_path / "whole.mzt"), read_trajectory(tmp_path / "run.mzt")
    assert list(resumed.grad_bits) == list(whole.grad_bits)
    assert resumed.final_fingerprint == whole.final_fingerprint
    for step, out in (("2", "at2"), ("4", "at4")):
        r = inproc("reconstruct", base, "run.mzt", "--step", step, "-o", out, cwd=tmp_path)
        assert r.returncode == 0 and "verified against" in r.stdout, r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mode, blocks", [("perturbation", "tensor"), ("step", "tensor"), ("perturbation", "layer")])
def test_train_cli_other_choices(tmp_path, mode, blocks):
    r = cli("train", "--steps", "3", "--eval-every", "0", "--layerwise", mode, "--layerwise-blocks", blocks, "-q",
            "-o", "run.mzt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r2 = cli(*printed_command(r.stdout), "-q", cwd=tmp_path)
    assert r2.returncode == 0 and "verified against" in r2.stdout, r2.stderr
    exps = [(t.get("perturb_exp", 0), t.get("step_exp", 0)) for t in read_trajectory(tmp_path / "run.mzt").header["tensors"]]
    assert any(exps) and all((f if mode == "perturbation" else e) == 0 for e, f in exps)


@pytest.mark.slow
def test_lora_with_layerwise_both_rebuilds_exactly(tmp_path):
    """LoRA B starts at zero (rms 0: exponent 0), A from its kaiming bound: the adapter rebuilds from the file
    alone, verified."""
    r = cli("train", "--steps", "3", "--eval-every", "0", "--peft", "lora", "--layerwise", "both", "-q",
            "-o", "run.mzt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    h = read_trajectory(tmp_path / "run.mzt").header
    b = [t for t in h["tensors"] if "lora_B" in t["name"]]
    assert b and all("perturb_exp" not in t and "step_exp" not in t for t in b)
    r2 = cli(*printed_command(r.stdout), "-q", cwd=tmp_path)
    assert r2.returncode == 0 and "verified against" in r2.stdout, r2.stderr
