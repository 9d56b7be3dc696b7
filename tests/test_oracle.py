"""MeZO is MeZO: checks against oracles that share nothing with the training path but the spec's noise.

Every other test checks that training, replay, kernels and the reference agree with one another; a sign
flipped everywhere at once (gradient ascent) passes them all. These compare with what MeZO is defined to
do: the recorded projected gradient is the central difference of the loss measured on separately
perturbed copies of the model, the weights move along -lr * g * z, the loss falls on the embedded task,
and on a quadratic, where the right answer is known in closed form, every step moves toward the minimum.

z always comes from the numpy reference (mezo_replay/arithmetic/reference.py), which shares no code with the torch
path, so the oracle is independent of the noise code under test too.
"""
from __future__ import annotations

import copy
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from mezo_replay import embedded
from mezo_replay.arithmetic import reference as R
from mezo_replay.training.data import batch_order, completion_nll
from mezo_replay.format.mzt import read_trajectory
from mezo_replay.training.optimizer import MeZO
from mezo_replay.training.train import TrainConfig, fit, load_model, train
from mezo_replay.training.tasks import make_task

# Significand bits p and smallest normal exponent of each dtype: the rounding unit of a value x is
# 2^(max(floor(log2|x|), emin) - p + 1).
FORMATS = {torch.float32: (24, -126), torch.bfloat16: (8, -126), torch.float16: (11, -14)}
BF16_RELATIVE = 2.0**-8  # a recorded g is g rounded to 8 significant bits: relative error at most 2^-8


def ulp(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Spacing of `dtype`'s values at |x| (float64), subnormals included."""
    p, emin = FORMATS[dtype]
    mag = np.maximum(np.abs(np.asarray(x, dtype=np.float64)), 2.0**emin)
    return np.exp2(np.maximum(np.floor(np.log2(mag)), emin) - (p - 1))


def z_of(seed: int, step: int, k: int, shape: torch.Size) -> np.ndarray:
    """Tensor k's noise at `step`, from the spec's numpy transcription (float64; the values are exact)."""
    n = math.prod(shape)
    return R.noise("gaussian16", seed, step, k, np.arange(n, dtype=np.uint64)).astype(np.float64).reshape(shape)


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


# --- (a) a real model: the recorded g is the central difference on separate copies -----------------

@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    """Three steps of the embedded model (fp32) through train.fit, with the weights before each step, the
    weights each loss was measured at, and the batches kept for the oracle."""
    torch.set_flush_denormal(False)
    model, tok, _ = load_model(embedded.MODEL_DIR, "fp32", "cpu")
    task = make_task("prompt-completion", tokenizer=tok, max_length=128, masked=False)
    examples = task.encode(tok, embedded.load_task()[0])
    opt = MeZO(model.named_parameters(), lr=5e-5, eps=1e-3, seed=3)
    path = tmp_path_factory.mktemp("oracle") / "run.mzt"
    opt.record(path)
    before, batches, measured = [], [], []

    def closure_for(step: int):
        before.append([p.detach().clone() for p in opt.params])  # called before the step perturbs
        batch = task.make_batch([examples[i] for i in batch_order(len(examples), 16, 3, step)], tok.pad_token_id)
        batches.append(batch)

        def closure():
            measured.append([p.detach().clone() for p in opt.params])
            return task.objective(model, batch, "ce")
        return closure

    steps = 3
    fit(opt, steps, closure_for)
    before.append([p.detach().clone() for p in opt.params])
    return {"model": model, "task": task, "opt": opt, "traj": read_trajectory(path), "before": before,
            "batches": batches, "measured": measured, "steps": steps}


def _copy_with(model, names, weights):
    clone = copy.deepcopy(model)
    params = dict(clone.named_parameters())
    for name, w in zip(names, weights):
        params[name].data.copy_(w)
    return clone


def test_recorded_gradient_is_the_central_difference_on_separate_copies(embedded_run):
    """g_t == (L(w + eps z) - L(w - eps z)) / (2 eps), the losses measured on two deep copies perturbed
    here in float64 and cast once (not by the optimizer's in-place P1/P2), z from the numpy reference.

    Tolerance, term by term: the recorded g is rounded to 8 bits (2^-8 relative). The copy at w + eps z
    equals the optimizer's P1 exactly (one rounding of an exact sum; checked below). The copy at
    w - eps z is rounded once, the optimizer's P2 twice (fl(fl(w + eps z) - 2 eps z)): they differ by at
    most one unit in the last place per element, which moves the loss by at most sum |dL/dw| * ulp(w),
    bounded with the true gradient from autograd. The two float32 forward passes are allowed 16 units of
    the loss's last place each. A flipped sign misses by 2|g|, which the test checks is far outside.
    """
    run = embedded_run
    model, task, opt, traj = run["model"], run["task"], run["opt"], run["traj"]
    eps, lr, seed = opt.rule.eps, opt.rule.lr, opt.rule.seed
    for t in range(run["steps"]):
        w = run["before"][t]
        zs = [z_of(seed, t, k, p.shape) for k, p in enumerate(w)]
        plus = [torch.from_numpy(f64(p) + eps * z).to(torch.float32) for p, z in zip(w, zs)]
        minus = [torch.from_numpy(f64(p) - eps * z).to(torch.float32) for p, z in zip(w, zs)]
        for k, (ours, theirs) in enumerate(zip(plus, run["measured"][2 * t])):
            assert torch.equal(ours, theirs), f"step {t}: tensor {opt.names[k]} at the first loss is not w + eps z"
        batch = run["batches"][t]
        loss_plus = float(task.objective(_copy_with(model, opt.names, plus), batch, "ce"))
        loss_minus = float(task.objective(_copy_with(model, opt.names, minus), batch, "ce"))
        g = (loss_plus - loss_minus) / (2 * eps)

        base = _copy_with(model, opt.names, w)
        for p in base.parameters():
            p.requires_grad_(True)
        with torch.enable_grad():
            total, n = completion_nll(base, batch)
            (total / n).backward()
        grads = dict(base.named_parameters())
        directional = sum(float((f64(grads[name].grad) * z).sum()) for name, z in zip(opt.names, zs))
        rounding = sum(float((np.abs(f64(grads[name].grad)) * ulp(f64(p), torch.float32)).sum())
                       for name, p in zip(opt.names, w)) / (2 * eps)
        forward = 2 * 16 * float(ulp(np.array(max(loss_plus, loss_minus)), torch.float32)) / (2 * eps)
        slack = rounding + forward

        recorded = R.grad_value(int(traj.grad_bits[t]))
        assert abs(recorded - g) <= BF16_RELATIVE * (abs(g) + slack) + slack, (t, recorded, g, slack)
        assert 2 * abs(g) > 10 * (BF16_RELATIVE * abs(g) + slack), "the step is too flat to show a sign"
        # A third, perturbation-free oracle: the directional derivative grad . z by backpropagation. The
        # central difference differs from it by eps^2/6 times a third derivative (not bounded here), so
        # only 5% is asked: the sign and the size.
        assert abs(recorded - directional) <= 0.05 * abs(directional), (t, recorded, directional)
        assert math.isclose(float(traj.losses[t]), (loss_plus + loss_minus) / 2, rel_tol=2**-8, abs_tol=1e-6)  # losses are kept as bfloat16 (lsbf)


def test_weights_move_along_minus_lr_g_z(embedded_run):
    """w_{t+1} == w_t - lr * g_t * z_t per element, within the roundings of P1, P2, P3 (rule.md): two of
    the dtype's last place from P1 and P2, two binary32 roundings inside P3, and c rounded to 16 bits."""
    run = embedded_run
    opt, traj = run["opt"], run["traj"]
    eps, lr, seed = opt.rule.eps, opt.rule.lr, opt.rule.seed
    for t in range(run["steps"]):
        g = R.grad_value(int(traj.grad_bits[t]))
        moved, along = 0.0, 0.0
        for k, (old, new) in enumerate(zip(run["before"][t], run["before"][t + 1])):
            z = z_of(seed, t, k, old.shape)
            w0, w1 = f64(old), f64(new)
            step = lr * g * z
            big = np.abs(w0) + eps * np.abs(z) + np.abs(step)
            bound = 2 * ulp(big, torch.float32) + 2.0**-16 * np.abs(step)
            err = np.abs(w1 - (w0 - step))
            assert (err <= bound).all(), f"step {t}, {opt.names[k]}: off by {float((err - bound).max()):.3g}"
            moved += float(((w1 - w0) * z).sum())
            along += float((z * z).sum())
        assert moved * g < 0 and math.isclose(moved, -lr * g * along, rel_tol=1e-3), (t, moved, -lr * g * along)


# --- (b) the loss falls on the embedded task -----------------------------------------------------

def test_eval_loss_falls_on_the_embedded_task(tmp_path):
    """50 steps of the embedded default settings: the eval loss (64 eval examples) falls by a fifth.
    Measured 2026-11-30: 1.887 -> 1.25 after 60 steps; with the sign flipped it rose to 7.1."""
    tr, ev = embedded.load_task()
    d = embedded.DEFAULTS
    result = train(TrainConfig(model=embedded.MODEL_DIR, train_examples=tr, eval_examples=ev[:64],
                               out=tmp_path / "t.mzt", steps=50, lr=d["lr"], eps=d["eps"],
                               batch_size=d["batch_size"], seed=d["seed"], eval_every=0))
    (s0, first), (s1, last) = result.evals[0], result.evals[-1]
    assert (s0, s1) == (0, 50)
    assert last["loss"] < 0.8 * first["loss"], (first, last)


@pytest.mark.slow
def test_cli_default_run_keeps_lowering_the_eval_loss(tmp_path):
    """The real CLI with the embedded defaults for 300 steps: every evaluation (each 100 steps) is below
    the one before, and the last below 60% of the first (measured: 1.95 -> 0.9 and falling)."""
    out = tmp_path / "t.mzt"
    proc = subprocess.run([sys.executable, "-m", "mezo_replay", "train", "--steps", "300", "--eval-every", "100",
                           "-q", "-o", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    losses = [e["metrics"]["loss"] for e in read_trajectory(out).evals]
    assert len(losses) == 4 and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.6 * losses[0], losses


# --- (c) a quadratic: the right step is known in closed form -------------------------------------

QUAD_N, QUAD_LR, QUAD_EPS, QUAD_STEPS, QUAD_SEED = 32, 2.0**-5, 2.0**-1, 40, 11


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_quadratic_every_step_moves_toward_the_minimum(backend, dtype):
    """L(w) = |w - w*|^2 / 2 on one tensor. For a quadratic the central difference is exact for any eps:
    (L(w + eps z) - L(w - eps z)) / (2 eps) = z . (w - w*), so the recorded g must be that, and the step
    -lr g z has inner product lr g^2 > 0 with w* - w: every step moves toward w*, and with lr < 2 / |z|^2
    lowers the loss. E[L] shrinks by 1 - 2 lr + lr^2 (n + 2) = 0.97 per step here, so 40 steps leave
    about 30% of it; the test asks for under 60%.

    The bound on g: P1 and P2 round w + eps z to a and w1 - 2 eps z to b (|a|, |b| <= half a unit in the
    dtype's last place); expanding the two losses exactly gives
    g = z.(d) + z.(a + b/2) - b.(d + a + b/2) / (2 eps) with d = w - w*, which the test bounds by
    absolute values, then adds the 8-bit rounding of the record. The update is checked per element
    against w - lr g z, and the numpy reference's phases for the same step are held to the same bounds.
    """
    torch.set_flush_denormal(False)
    rng = np.random.default_rng(5)
    target = torch.from_numpy(rng.standard_normal(QUAD_N) * 0.1).to(dtype)
    w = torch.nn.Parameter(torch.from_numpy(rng.standard_normal(QUAD_N) * 2).to(dtype))
    star = f64(target)
    opt = MeZO([("w", w)], lr=QUAD_LR, eps=QUAD_EPS, seed=QUAD_SEED)

    def loss() -> float:
        return 0.5 * float(((f64(w) - star) ** 2).sum())

    dtype_name = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
    steps = QUAD_STEPS if backend != "triton" else 8  # Triton's interpreter (no GPU) costs ~0.1 s a launch
    start, informative = loss(), 0
    for t in range(steps):
        w0 = f64(w)
        old_bits = w.detach().clone()
        l0 = loss()
        opt.step(loss)
        z = z_of(QUAD_SEED, t, 0, w.shape)
        d = w0 - star
        half = ulp(np.abs(w0) + 2 * QUAD_EPS * np.abs(z), dtype) / 2  # bounds |a| and |b|
        slack = float((np.abs(z) * 1.5 * half).sum() + (half * (np.abs(d) + 1.5 * half)).sum() / (2 * QUAD_EPS))
        exact = float(z @ d)
        g = R.grad_value(opt.last_grad_bits)
        assert abs(g - exact) <= BF16_RELATIVE * (abs(exact) + slack) + slack, (t, g, exact, slack)
        informative += 2 * abs(exact) > 4 * (BF16_RELATIVE * abs(exact) + slack)  # a flipped sign would fail

        step = QUAD_LR * g * z
        big = np.abs(w0) + QUAD_EPS * np.abs(z) + np.abs(step)
        bound = 2 * ulp(big, dtype) + 2 * ulp(big, torch.float32) + 2.0**-16 * np.abs(step)
        bits = old_bits.contiguous().view(torch.int32 if dtype == torch.float32 else torch.int16).numpy()
        ref = R.phases(bits.view(R.BITS_DTYPE[dtype_name]), dtype_name, z.astype(np.float32), QUAD_EPS,
                       R.coefficient(QUAD_LR, int(opt.last_grad_bits)))[2]
        ref_w = f64(torch.from_numpy(ref.view(np.int32 if dtype == torch.float32 else np.int16)).view(dtype))
        # In exact arithmetic the step gains lr g (w* - w).z = lr g^2 toward w* and lowers L by
        # lr g z.d - (lr g)^2 |z|^2 / 2; roundings (the bound) may take at most sum bound |d| off either.
        gain, wobble = -QUAD_LR * g * float(z @ d), float(bound @ (np.abs(d) + np.abs(step) + bound))
        drop = QUAD_LR * g * exact - 0.5 * (QUAD_LR * g) ** 2 * float(z @ z)
        for who, w1 in (("library", f64(w)), ("reference", ref_w)):
            err = np.abs(w1 - (w0 - step))
            assert (err <= bound).all(), f"{who}, step {t}: off by {float((err - bound).max()):.3g}"
            if gain > wobble:
                assert float((w1 - w0) @ (star - w0)) > 0, f"{who}, step {t}: moved away from the minimum"
        if drop > wobble:
            assert loss() < l0, (t, loss(), l0)
    assert loss() < (0.6 if steps == QUAD_STEPS else 0.95) * start, (start, loss())
    assert informative >= 0.8 * steps, f"only {informative} steps could show a wrong sign"
