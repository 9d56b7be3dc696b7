"""The step pipeline: a step that leaves its update pending (applied by the next step's first pass, or by
settle()) writes the same trajectory and leaves the same weights as the three-pass step it replaces, and
reads the losses with one host synchronisation per step. `legacy_step` below is the step as it was before
the pipeline (three passes, float() after each forward): every run here is compared with it byte for byte.
Tiny real Hugging Face models built from configs (no Hub); the train/resume CLI runs in subprocesses."""
from __future__ import annotations

import math
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from unittest import mock
from pathlib import Path

import pytest
import torch

from mezo_replay import embedded
from mezo_replay.arithmetic.rule import Schedule, encode_grad
from mezo_replay.format.mzt import read_trajectory
from mezo_replay.kernels import cpu_kernel, steps
from mezo_replay.kernels.steps import perturb_all_, restore_update_all_
from mezo_replay.training.optimizer import MeZO, NonFiniteLossError
from mezo_replay.training import train as train_module
from mezo_replay.training.train import TrainConfig, fit, train

N = 6
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def legacy_step(opt: MeZO, closure: Callable[[], torch.Tensor | float]) -> float:
    """The step before the pipeline, verbatim in substance: P1, float(loss+), P2, float(loss-), P3."""
    eps, t, ts = opt.rule.eps, opt.step_count, [p.data for p in opt.params]
    with torch.no_grad():
        perturb_all_(ts, opt.rule, t, eps)
        loss_plus = float(closure())
        perturb_all_(ts, opt.rule, t, -2.0 * eps)
        loss_minus = float(closure())
        d = opt.rule.decay(t)
        bits, failure = 0, None
        try:
            bits = encode_grad((loss_plus - loss_minus) / (2.0 * eps))
            c = opt.rule.coefficient(t, bits)
        except ValueError as e:
            bits, c, failure = 0, 0.0, e
        restore_update_all_(ts, opt.rule, t, c, d, opt.decay)
    loss = (loss_plus + loss_minus) / 2.0
    if opt.writer is not None:
        opt.writer.append_step(bits, loss if opt.writer_records_losses else None)
    opt.step_count += 1
    opt.last_grad_bits = bits
    if failure is not None and (opt.on_nonfinite == "raise" or math.isfinite(loss)):
        raise NonFiniteLossError(str(failure))
    return loss


def tiny_model(dtype: str) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False))
    return model.to(DTYPES[dtype]).eval()


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1000 + step))


def make_closure_for(model: torch.nn.Module, bad: tuple[int, str] | None = None):
    """closure_for(step): the LM loss on step's batch; `bad` = (step, kind) makes that step's losses
    non-finite ("nan": loss- is NaN) or diverged ("huge": finite losses whose difference overflows)."""
    def closure_for(step: int):
        ids, calls = batch(step), []

        def closure() -> torch.Tensor:
            calls.append(None)
            loss = model(input_ids=ids, labels=ids).loss
            if bad is not None and bad[0] == step:
                if bad[1] == "nan" and len(calls) == 2:
                    return loss * float("nan")
                if bad[1] == "huge":
                    return torch.tensor(3e38 if len(calls) == 1 else -3e38)
            return loss
        return closure
    return closure_for


def new_opt(model: torch.nn.Module, path: Path, on_nonfinite: str = "raise") -> MeZO:
    opt = MeZO(model.named_parameters(), lr=2e-2, eps=1e-2, seed=7, weight_decay=0.05,
               schedule=Schedule("cosine", 1, N).validated(), on_nonfinite=on_nonfinite)  # type: ignore[arg-type]
    opt.record(path)
    return opt


def weights(opt: MeZO) -> list[torch.Tensor]:
    return [p.detach().clone() for p in opt.params]


def run(mode: str, dtype: str, path: Path, bad: tuple[int, str] | None = None, on_nonfinite: str = "raise",
        after: Callable[[MeZO, int], None] | None = None) -> tuple[bytes, list[torch.Tensor], str | None]:
    """N steps one way: legacy (the three-pass step), settle (fit's default), pending (fit,
    reads_weights=False), mixed (fit, settled on even steps, `after` called after each), manual
    (step(settle=False) then settle() then close()). Returns the file, the weights and any error."""
    model = tiny_model(dtype)
    opt = new_opt(model, path, on_nonfinite)
    closure_for = make_closure_for(model, bad)
    error = None
    try:
        if mode == "legacy":
            try:
                for t in range(N):
                    legacy_step(opt, closure_for(t))
            finally:
                opt.close()
        elif mode == "manual":
            try:
                for t in range(N):
                    opt.step(closure_for(t), settle=False)
                    assert opt.pending or (bad is not None and bad[0] == t)  # a failing step settles
                opt.settle()
                assert not opt.pending
            finally:
                opt.close()
        else:
            reads = {"settle": True, "pending": False, "mixed": lambda done: done % 2 == 0, "queued": False,
                     "queued-mixed": lambda done: done % 3 == 0}[mode]
            # queued: fit's GPU loop (MeZO.queue_step: gradient on the device, records read one step late),
            # here on the CPU so that its logic is held to the legacy bytes without a GPU
            queued = {"cpu"} if mode.startswith("queued") else set()
            with mock.patch.object(train_module, "QUEUED_DEVICES", queued):
                fit(opt, N, closure_for, reads_weights=reads,
                    after_step=None if after is None else (lambda done, loss: after(opt, done)))
    except NonFiniteLossError as e:
        error = type(e).__name__
    assert not opt.pending
    return path.read_bytes(), weights(opt), error


def assert_same(a: tuple[bytes, list[torch.Tensor], str | None], b: tuple[bytes, list[torch.Tensor], str | None]):
    assert a[0] == b[0], "trajectory bytes differ"
    assert len(a[1]) == len(b[1])
    for x, y in zip(a[1], b[1]):  # raw bits: NaNs and signed zeros included
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8))
    assert a[2] == b[2]


@pytest.fixture(params=["torch", "compiled"])
def cpu_backend(request):
    if request.param == "compiled" and not cpu_kernel.available():
        pytest.skip("the compiled CPU kernel is not built")
    steps.set_backend(request.param)
    yield request.param
    steps.set_backend("auto")


@pytest.mark.parametrize("cpu_backend,dtype", [
    ("compiled", "fp32"), ("compiled", "bf16"), ("compiled", "fp16"), ("torch", "fp32"),
    pytest.param("torch", "bf16", marks=pytest.mark.slow), pytest.param("torch", "fp16", marks=pytest.mark.slow)],
    indirect=["cpu_backend"])
def test_every_settle_pattern_writes_the_legacy_bytes(tmp_path, dtype, cpu_backend):
    """Weight decay and a cosine schedule, so c and d change every step; the weights move (checked).
    The compiled kernel (the CPU default) takes every dtype by default, the torch path fp32 (all: -m slow)."""
    legacy = run("legacy", dtype, tmp_path / "legacy.mzt")
    assert not all(torch.equal(w, p.detach()) for w, p in zip(legacy[1], tiny_model(dtype).parameters()))
    assert len(set(read_trajectory(tmp_path / "legacy.mzt").grad_bits.tolist())) > 1
    for mode in ("settle", "pending", "mixed", "manual", "queued", "queued-mixed"):
        assert_same(run(mode, dtype, tmp_path / f"{mode}.mzt"), legacy)


def test_steps_read_the_weights_only_settled(tmp_path, cpu_backend):
    """What after_step sees: settled weights (equal to the legacy run's at that step) exactly where
    reads_weights says it reads them, the second perturbation (pending) elsewhere."""
    model = tiny_model("bf16")
    opt = new_opt(model, tmp_path / "legacy.mzt")
    closure_for = make_closure_for(model)
    expected = []
    for t in range(N):
        legacy_step(opt, closure_for(t))
        expected.append(weights(opt))
    opt.close()
    seen: list[int] = []

    def after(opt: MeZO, done: int) -> None:
        assert opt.pending == (done % 2 == 1)
        if not opt.pending:
            seen.append(done)
            for x, y in zip(weights(opt), expected[done - 1]):
                assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), done
        else:  # the weights a pending step leaves differ from the settled ones
            assert not all(torch.equal(x, y) for x, y in zip(weights(opt), expected[done - 1]))

    run("mixed", "bf16", tmp_path / "mixed.mzt", after=after)
    assert seen == [2, 4, 6]


@pytest.mark.parametrize("dtype", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("bad,on_nonfinite", [((2, "nan"), "raise"), ((2, "nan"), "skip"), ((3, "huge"), "skip")])
def test_a_failing_step_mid_run_is_the_legacy_one(tmp_path, dtype, bad, on_nonfinite, cpu_backend):
    """raise: the error comes from that step's call, with its zero update recorded and the weights
    settled; skip: the run goes on past a NaN; a diverged step raises even in skip mode."""
    legacy = run("legacy", dtype, tmp_path / "legacy.mzt", bad, on_nonfinite)
    stopped = on_nonfinite == "raise" or bad[1] == "huge"
    assert legacy[2] == ("NonFiniteLossError" if stopped else None)
    assert read_trajectory(tmp_path / "legacy.mzt").steps == (bad[0] + 1 if stopped else N)
    for mode in ("pending", "mixed", "manual", "queued", "queued-mixed"):
        assert_same(run(mode, dtype, tmp_path / f"{mode}.mzt", bad, on_nonfinite), legacy)


def test_a_failing_step_leaves_nothing_pending(tmp_path):
    model = tiny_model("fp32")
    opt = new_opt(model, tmp_path / "run.mzt")
    closure_for = make_closure_for(model, (1, "nan"))
    opt.step(closure_for(0), settle=False)
    assert opt.pending
    with pytest.raises(NonFiniteLossError, match="step 1"):
        opt.step(closure_for(1), settle=False)
    assert not opt.pending and opt.last_grad_bits == 0
    opt.close()


# --- one host synchronisation per step --------------------------------------------------------------

SYNCS = {torch.Tensor.__float__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__,
         torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu}


class Watched(torch.Tensor):
    """A loss that logs every read of its value on the host (what waits for the device on a GPU)."""

    log: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in SYNCS:
            cls.log.append("sync")
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("loss_dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_one_host_read_per_step_after_both_forwards(tmp_path, loss_dtype):
    """The log of each step is forward, forward, sync: nothing waits for the first loss before the
    second forward is queued. The legacy step logs forward, sync, forward, sync (the watch works), and
    both read the same values (the losses are read exactly, whatever their dtype)."""
    def closure_for(model, log):
        def make(step):
            def closure():
                log.append("forward")
                ids = batch(step)
                return model(input_ids=ids, labels=ids).loss.to(loss_dtype).as_subclass(Watched)
            return closure
        return make

    logs = {}
    for how in ("legacy", "pipelined"):
        model = tiny_model("fp32")
        opt = new_opt(model, tmp_path / f"{how}.mzt")
        Watched.log = log = []
        make = closure_for(model, log)
        for t in range(3):
            if how == "legacy":
                legacy_step(opt, make(t))
            else:
                opt.step(make(t), settle=t == 1)
            log.append("|")
        opt.close()
        logs[how] = log
    assert logs["pipelined"] == ["forward", "forward", "sync", "|"] * 3
    assert logs["legacy"] == ["forward", "sync", "forward", "sync", "|"] * 3
    assert (tmp_path / "legacy.mzt").read_bytes() == (tmp_path / "pipelined.mzt").read_bytes()


def test_losses_of_any_kind_still_work(tmp_path):
    """Python floats, losses on different dtypes, and one-element tensors of any shape, as before."""
    model = tiny_model("fp32")
    opt = new_opt(model, tmp_path / "a.mzt")
    values = iter([1.5, torch.tensor([2.0]), torch.tensor(1.0, dtype=torch.float64), torch.tensor([[0.5]])])
    assert opt.step(lambda: next(values), settle=False) == 1.75
    assert opt.step(lambda: next(values), settle=False) == 0.75
    with pytest.raises((ValueError, RuntimeError)):  # what float() of a many-element tensor raises
        opt.step(lambda: torch.ones(2))
    opt.close()


def test_a_loss_buffer_reused_by_the_next_forward_is_read_as_it_was(tmp_path):
    """A compiled model (CUDA graphs) may hand back the same output memory from each forward: the first
    loss must be the value it had, not what the second forward wrote there."""
    model = tiny_model("fp32")
    opt = new_opt(model, tmp_path / "a.mzt")
    out = torch.zeros(())
    values = iter([3.0, 1.0])

    def closure():
        out.fill_(next(values))
        return out

    assert opt.step(closure) == 2.0
    opt.close()
    assert read_trajectory(tmp_path / "a.mzt").grad_bits.tolist() == [encode_grad(2.0 / (2 * opt.rule.eps))]


def test_everything_that_reads_the_weights_settles(tmp_path):
    model = tiny_model("fp32")
    opt = new_opt(model, tmp_path / "a.mzt")
    closure_for = make_closure_for(model)
    opt.step(closure_for(0), settle=False)
    opt.fingerprints()
    assert not opt.pending
    opt.step(closure_for(1), settle=False)
    writer = opt.writer
    opt.attach(writer, 2)  # type: ignore[arg-type]
    assert not opt.pending
    opt.step(closure_for(2), settle=False)
    with opt:
        pass
    assert not opt.pending
    opt.settle()  # nothing pending: a no-op


# --- train: the same files, and SIGINT + --resume through the CLI -----------------------------------

def test_train_writes_the_file_a_settled_run_writes(tmp_path, monkeypatch):
    """`train` (pending between evals) against the same run with every step settled, as before the
    pipeline: identical files and final weights."""
    tr, ev = embedded.load_task()

    def once(out: Path):
        cfg = TrainConfig(model=embedded.MODEL_DIR, train_examples=tr[:32], eval_examples=ev[:8], out=out, steps=5,
                          lr=2e-4, eps=1e-3, batch_size=4, eval_every=2, schedule="cosine", warmup_steps=1,
                          weight_decay=0.05)
        result = train(cfg)
        return out.read_bytes(), [p.detach().clone() for p in result.optimizer.params], result.evals

    piped = once(tmp_path / "piped.mzt")
    step = MeZO.step
    monkeypatch.setattr(MeZO, "step", lambda self, closure, settle=True: step(self, closure, settle=True))
    settled = once(tmp_path / "settled.mzt")
    assert piped[0] == settled[0] and piped[2] == settled[2] and [e[0] for e in piped[2]] == [0, 2, 4, 5]
    assert all(torch.equal(a, b) for a, b in zip(piped[1], settled[1]))


CLI = [sys.executable, "-m", "mezo_replay"]
TRAIN = ["train", "--steps", "12", "--flush-every", "2", "--batch-size", "4", "--eval-every", "5", "--lr", "2e-4",
         "--schedule", "cosine", "--warmup-steps", "2", "--weight-decay", "0.05", "-q"]


@pytest.mark.slow  # a minute of subprocesses; tests/test_resume.py runs the same CLI path (train steps fused) by default
def test_sigint_then_resume_then_the_printed_reconstruct(tmp_path):
    from tests.test_resume import finish, start, wait_for_steps

    whole = tmp_path / "whole"
    whole.mkdir()
    finish(*TRAIN, "-o", "run.mzt", cwd=whole)
    proc = start(*TRAIN, "-o", "run.mzt", cwd=tmp_path)
    wait_for_steps(tmp_path / "run.mzt", 2, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    cut = read_trajectory(tmp_path / "run.mzt")
    assert cut.steps < 12 and cut.final_fingerprint is not None
    assert "--resume run.mzt" in out
    finish("verify", str(embedded.MODEL_DIR), "run.mzt", "-q", cwd=tmp_path)  # the stop settled the weights
    r = finish(*TRAIN, "--resume", "run.mzt", cwd=tmp_path)
    reference = read_trajectory(whole / "run.mzt")
    done = read_trajectory(tmp_path / "run.mzt")
    assert done.grad_bits.tolist() == reference.grad_bits.tolist()
    assert done.final_fingerprint == reference.final_fingerprint
    line = r.stdout.strip().splitlines()[-1].strip()
    assert line.startswith("mezo-replay reconstruct "), r.stdout
    args = shlex.split(line)[1:]
    rebuilt = subprocess.run([*CLI, *args, "-q"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rebuilt.returncode == 0 and "verified against" in rebuilt.stdout, rebuilt.stderr
    finish(*args, "-q", cwd=whole)
    assert (tmp_path / "run-tuned" / "model.safetensors").read_bytes() == \
        (whole / "run-tuned" / "model.safetensors").read_bytes()



# --- queued steps (fit's GPU loop) ------------------------------------------------------------------

def test_queued_steps_report_late_in_order_and_checkpoint_settled(tmp_path):
    """fit with queued steps and checkpoints every 2 steps: the same file (ckpt chunks included) as settled
    steps, after_step sees every step once, in order, with the same losses, and checkpoints see settled
    weights (their fingerprints are in the file, which equals the settled run's)."""
    def go(queued: set[str], name: str) -> tuple[bytes, list[tuple[int, float]]]:
        model = tiny_model("bf16")
        opt = new_opt(model, tmp_path / name)
        seen: list[tuple[int, float]] = []
        with mock.patch.object(train_module, "QUEUED_DEVICES", queued):
            fit(opt, N, make_closure_for(model), after_step=lambda done, loss: seen.append((done, loss)),
                checkpoint_every=2, reads_weights=False)
        return (tmp_path / name).read_bytes(), seen

    settled, queued = go(set(), "settled.mzt"), go({"cpu"}, "queued.mzt")
    assert queued == settled
    assert [d for d, _ in queued[1]] == list(range(1, N + 1))
    assert len(read_trajectory(tmp_path / "queued.mzt").checkpoints) == N // 2 - 1


@pytest.mark.cuda
def test_queued_steps_never_wait_for_the_gpu(tmp_path):
    """On CUDA, queue_step makes no synchronising call (torch's sync debug mode raises on one) apart
    from the wait for the previous step's record, and the run equals settled steps byte for byte."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")

    def go(name: str, queued: bool) -> tuple[bytes, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 64).cuda().to(torch.bfloat16)
        target = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
        opt = new_opt(model, tmp_path / name)

        def closure() -> torch.Tensor:
            return (model.weight.float() - target.float()).square().mean()

        for _ in range(N):
            if queued:
                torch.cuda.set_sync_debug_mode("error")
                try:
                    opt.queue_step(closure)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            else:
                opt.step(closure)
        opt.close()
        return (tmp_path / name).read_bytes(), weights(opt)

    a, b = go("settled.mzt", False), go("queued.mzt", True)
    assert a[0] == b[0]
    assert all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a[1], b[1]))
