"""MeZOTrainer: a transformers.Trainer run records a trajectory that rebuilds the trained weights exactly.

The base is a tiny random Llama saved with save_pretrained, the data a few rows of token ids; every
comparison is of raw bytes. The 2-process case runs real torchrun (gloo, CPU) processes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments  # noqa: E402

import mezo_replay  # noqa: E402
from mezo_replay import MeZOTrainer, MezoReplayError, Schedule, plan, read_trajectory, reconstruct  # noqa: E402
from mezo_replay.arithmetic.rule import MezoSGD, decode_grad  # noqa: E402
from mezo_replay.training.optimizer import NonFiniteLossError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32)
    path = tmp_path_factory.mktemp("trainer") / "base"
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def dataset(rows: int = 16) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, 64, (rows, 12), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": r, "labels": r} for r in ids]


def make(base: Path, out: Path, *, trainer_cls: type = MeZOTrainer, extra: dict | None = None, **args) -> MeZOTrainer:
    settings = dict(output_dir=str(out), learning_rate=1e-3, max_steps=4, per_device_train_batch_size=4,
                    use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=1)
    settings.update(args)
    model = LlamaForCausalLM.from_pretrained(base)
    return trainer_cls(model=model, args=TrainingArguments(**settings), train_dataset=dataset(), **(extra or {}))


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def assert_weights(model_or_file: torch.nn.Module | Path, rebuilt: Path) -> None:
    want = load_file(rebuilt / "model.safetensors")
    got = model_or_file.state_dict() if isinstance(model_or_file, torch.nn.Module) else \
        load_file(model_or_file / "model.safetensors")
    assert sorted(got) == sorted(want)
    different = [k for k in want if not same_bytes(got[k].detach().cpu().contiguous(), want[k])]
    assert not different, different


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mezo_replay", *args], capture_output=True, text=True, env=env)


def test_trainer_run_rebuilds_byte_for_byte_with_the_cli(base: Path, tmp_path: Path) -> None:
    """Cosine schedule and weight decay from TrainingArguments, a Trainer checkpoint at step 2: the CLI
    rebuilds the final weights, and the library the checkpoint's, both verified and byte for byte."""
    trainer = make(base, tmp_path / "run", lr_scheduler_type="cosine", weight_decay=0.1, seed=7,
                   save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2,
                   extra={"mezo_eps": 1e-2, "eval_dataset": dataset(4)})
    result = trainer.train()
    assert result.global_step == 4
    trainer.save_model(str(tmp_path / "final"))
    traj_path = tmp_path / "run" / "trajectory.mzt"
    traj = read_trajectory(traj_path)
    assert traj.steps == 4 and traj.final_fingerprint is not None and 2 in traj.checkpoints
    h = traj.header
    assert h["base"]["source"] == os.path.relpath(base, traj_path.parent)
    rule = MezoSGD.from_header(h)
    assert rule == MezoSGD.create(lr=1e-3, eps=1e-2, seed=7, schedule=Schedule("cosine", 0, 4), weight_decay=0.1)
    decay = {t["name"]: t["decay"] for t in h["tensors"]}
    assert decay["model.norm.weight"] is False and decay["model.layers.0.self_attn.q_proj.weight"] is True
    assert "world_size" not in h["metadata"] and h["metadata"]["batch_size"] == "4"  # one process: no key
    assert [(e["step"], sorted(e["metrics"])) for e in traj.evals] == [(2, ["loss"]), (4, ["loss"])]
    # the logged learning rate is the one the rule used at each step
    logged = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    assert logged == [pytest.approx(1e-3 * rule.schedule.multiplier(t)) for t in range(4)]

    done = run_cli("reconstruct", str(base), str(traj_path), "-o", str(tmp_path / "rebuilt"))
    assert done.returncode == 0, done.stderr
    assert_weights(trainer.model, tmp_path / "rebuilt")
    assert_weights(tmp_path / "final", tmp_path / "rebuilt")
    base_weights = load_file(base / "model.safetensors")
    assert all(not torch.equal(base_weights[k], w) for k, w in trainer.model.state_dict().items())

    reconstruct(plan(base, traj_path, step=2), tmp_path / "at2")
    assert_weights(tmp_path / "run" / "checkpoint-2", tmp_path / "at2")


def test_a_trainer_run_with_a_grad_codec_and_a_rule_rebuilds_with_the_cli(base: Path, tmp_path: Path) -> None:
    """mezo_grad_codec and mezo_rule reach the rule: the file records sign steps of +-2^-3 under the memory-free
    momentum rule, and the CLI rebuilds the bytes."""
    trainer = make(base, tmp_path / "run", seed=3, extra={"mezo_eps": 1e-2, "mezo_grad_codec": "sign",
                                                         "mezo_grad_scale": 0.125, "mezo_rule": "mezo-momentum",
                                                         "mezo_momentum": 0.5, "mezo_momentum_window": 3})
    trainer.train()
    traj = read_trajectory(tmp_path / "run" / "trajectory.mzt")
    rule = traj.header["rule"]
    assert (rule["grad_encoding"], rule["grad_scale"]) == ("sign", 0.125)
    assert (rule["name"], rule["momentum"], rule["window"]) == ("mezo-momentum", 0.5, 3)
    assert {abs(decode_grad(b)) for b in traj.grad_bits} <= {0.0, 0.125} and traj.steps == 4
    done = run_cli("reconstruct", str(base), str(tmp_path / "run" / "trajectory.mzt"), "-o", str(tmp_path / "rebuilt"))
    assert done.returncode == 0, done.stderr
    assert_weights(trainer.model, tmp_path / "rebuilt")


def test_the_schedule_maps_exactly_or_comes_from_mezo_schedule(base: Path, tmp_path: Path) -> None:
    t = make(base, tmp_path / "a", lr_scheduler_type="constant_with_warmup")
    t.create_optimizer()
    t.create_scheduler(10)
    assert t._schedule == Schedule("constant", 0, 10)
    t = make(base, tmp_path / "b", warmup_steps=3, extra={"mezo_schedule": Schedule("linear", 3, 10)})
    t.create_optimizer()
    t.create_scheduler(10)
    assert t._schedule == Schedule("linear", 3, 10)
    assert t.lr_scheduler.get_last_lr() == [pytest.approx(1e-3 / 4)]  # (t+1)/(w+1) at t=0


@pytest.mark.parametrize("args, extra, says", [
    ({"gradient_accumulation_steps": 2}, {}, "gradient_accumulation_steps=2"),
    ({"bf16": True}, {}, "mixed precision"),
    ({"fp16": True}, {}, "mixed precision"),
    ({"lr_scheduler_type": "polynomial"}, {}, "lr_scheduler_type='polynomial'"),
    ({"warmup_steps": 2}, {}, "warmup"),
    ({"warmup_steps": 0.1}, {}, "warmup"),
    ({"lr_scheduler_type": "cosine", "lr_scheduler_kwargs": {"num_cycles": 1}}, {}, "lr_scheduler_kwargs"),
    ({}, {"mezo_eps": 0.0}, "eps must be in"),
])
def test_unreplayable_settings_are_refused_in_one_line(base: Path, tmp_path: Path, args: dict, extra: dict,
                                                       says: str) -> None:
    with pytest.raises(MezoReplayError) as e:
        make(base, tmp_path, extra=extra, **args)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_given_optimizer_and_an_existing_file_are_refused(base: Path, tmp_path: Path) -> None:
    model = LlamaForCausalLM.from_pretrained(base)
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[], max_steps=2)
    with pytest.raises(MezoReplayError, match="an optimizer or scheduler was given"):
        MeZOTrainer(model=model, args=args, train_dataset=dataset(),
                    optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    (tmp_path / "trajectory.mzt").write_bytes(b"")
    t = MeZOTrainer(model=model, args=args, train_dataset=dataset())  # it may be resumed: train() decides
    with pytest.raises(MezoReplayError, match="already exists: pass overwrite_trajectory=True") as e:
        t.train()
    assert "resume_from_checkpoint" in str(e.value) and "\n" not in str(e.value)
    assert (tmp_path / "trajectory.mzt").read_bytes() == b""


class _Cut(TrainerCallback):
    """Interrupts a run after `at` steps (as a crash or Ctrl-C would, between steps)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kw):  # type: ignore[override]
        if state.global_step == self.at:
            raise KeyboardInterrupt


def resumable(base: Path, out: Path, rule: dict | None = None, **args) -> MeZOTrainer:
    """7 steps of 4 rows over 16 (an epoch is 4 steps), a Trainer checkpoint every 2, an eval every 3."""
    settings = dict(max_steps=7, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=3, seed=3)
    settings.update(args)
    return make(base, out, extra={"eval_dataset": dataset(4), **(rule or {})}, **settings)


def test_a_resumed_run_ends_on_the_bytes_of_an_uninterrupted_one(base: Path, tmp_path: Path) -> None:
    """Cut after step 5 (the file then holds 5 steps and a final fingerprint), resumed from the last
    checkpoint (4, an epoch boundary): the file and weights are the uninterrupted run's, byte for byte.
    Then resumed again from checkpoint-2 (mid-epoch: Trainer skips the seen batches), which cuts the
    finished file back to step 2: the same bytes once more. From the last step's checkpoint: refused
    (Trainer would take an eighth step), the file untouched."""
    ref = resumable(base, tmp_path / "ref")
    ref.train()
    want = (tmp_path / "ref" / "trajectory.mzt").read_bytes()
    run = tmp_path / "run"
    cut = resumable(base, run)
    cut.add_callback(_Cut(5))
    with pytest.raises(KeyboardInterrupt):
        cut.train()
    traj = read_trajectory(run / "trajectory.mzt")
    assert traj.steps == 5 and sorted(traj.checkpoints) == [2, 4]

    for checkpoint in (True, str(run / "checkpoint-2")):
        again = resumable(base, run)
        again.train(resume_from_checkpoint=checkpoint)
        assert (run / "trajectory.mzt").read_bytes() == want, checkpoint
        assert all(same_bytes(a, b) for a, b in zip(ref.model.state_dict().values(), again.model.state_dict().values()))
    with pytest.raises(MezoReplayError, match=r"the checkpoint is at step 7, the end of the run \(max_steps=7\)"):
        resumable(base, run).train(resume_from_checkpoint=True)
    assert (run / "trajectory.mzt").read_bytes() == want


@pytest.mark.parametrize("rule", [
    {"mezo_rule": "mezo-momentum", "mezo_momentum": 0.5, "mezo_momentum_window": 3},
    {"mezo_rule": "mezo-momentum-buffer", "mezo_momentum": 0.5},
    pytest.param({"mezo_rule": "mezo-adam", "mezo_momentum": 0.5, "mezo_momentum_window": 3, "mezo_beta2": 0.75},
                 marks=pytest.mark.slow),  # test_adam's CLI resume covers the window form in the default run
    {"mezo_rule": "mezo-adam-buffer", "mezo_momentum": 0.5, "mezo_beta2": 0.75, "mezo_adam_eps": 1e-6}],
    ids=["window", "buffer", "adam-window", "adam-buffer"])
def test_a_resumed_momentum_run_ends_on_the_bytes_of_an_uninterrupted_one(base: Path, tmp_path: Path, rule) -> None:
    """The momentum and Adam forms resume from a Trainer checkpoint mid-window (checkpoint 4, window 3; and 2):
    the window forms take the records before the checkpoint from the file, the buffer forms replay their state
    from them (it never depends on the weights): the uninterrupted run's file and weights, byte for byte."""
    ref = resumable(base, tmp_path / "ref", rule)
    ref.train()
    want = (tmp_path / "ref" / "trajectory.mzt").read_bytes()
    assert read_trajectory(tmp_path / "ref" / "trajectory.mzt").header["rule"]["name"] == rule["mezo_rule"]
    run = tmp_path / "run"
    cut = resumable(base, run, rule)
    cut.add_callback(_Cut(5))
    with pytest.raises(KeyboardInterrupt):
        cut.train()
    for checkpoint in (True, str(run / "checkpoint-2")):
        again = resumable(base, run, rule)
        again.train(resume_from_checkpoint=checkpoint)
        assert (run / "trajectory.mzt").read_bytes() == want, checkpoint
        assert all(same_bytes(a, b) for a, b in zip(ref.model.state_dict().values(), again.model.state_dict().values()))


def test_a_layerwise_run_resumes_with_the_recorded_exponents_and_rebuilds_with_the_cli(base: Path,
                                                                                     tmp_path: Path) -> None:
    """mezo_layerwise: the exponents come from the base weights; a resumed run takes them from the file (the
    checkpoint's weights would give others) and ends on the uninterrupted run's bytes; the CLI rebuilds it."""
    rule = {"mezo_layerwise": "perturbation"}
    ref = resumable(base, tmp_path / "ref", rule)
    ref.train()
    want = (tmp_path / "ref" / "trajectory.mzt").read_bytes()
    header = read_trajectory(tmp_path / "ref" / "trajectory.mzt").header
    assert header["rule"]["layerwise"] is True and {t.get("perturb_exp", 0) for t in header["tensors"]} != {0}
    run = tmp_path / "run"
    cut = resumable(base, run, rule)
    cut.add_callback(_Cut(5))
    with pytest.raises(KeyboardInterrupt):
        cut.train()
    again = resumable(base, run, rule)
    again.train(resume_from_checkpoint=str(run / "checkpoint-4"))
    assert (run / "trajectory.mzt").read_bytes() == want
    r = run_cli("reconstruct", str(base), str(run / "trajectory.mzt"), "-o", str(tmp_path / "rebuilt"), "-q")
    assert r.returncode == 0, r.stderr
    assert_weights(again.model, tmp_path / "rebuilt")


def test_what_cannot_resume_exactly_is_refused_in_one_line(base: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cut = resumable(base, run, max_steps=4, eval_strategy="no")
    cut.add_callback(_Cut(3))
    with pytest.raises(KeyboardInterrupt):
        cut.train()
    before = (run / "trajectory.mzt").read_bytes()
    cases = [
        ({"ignore_data_skip": True}, {}, "ignore_data_skip=True"),
        ({"learning_rate": 2e-3}, {}, "recorded with other settings: rule.lr 0.001 in the file, 0.002 now"),
        ({}, {"trajectory": tmp_path / "none.mzt"}, "none.mzt does not exist"),
    ]
    for args, extra, says in cases:
        t = make(base, run, extra=extra, **{"max_steps": 4, "seed": 3, **args})
        with pytest.raises(MezoReplayError) as e:
            t.train(resume_from_checkpoint=str(run / "checkpoint-2"))
        assert says in str(e.value) and "\n" not in str(e.value), str(e.value)
    other = tmp_path / "other"  # a checkpoint of another run (other batches), with this run's trajectory
    make(base, other, max_steps=2, save_strategy="steps", save_steps=2, seed=3, per_device_train_batch_size=2).train()
    t = make(base, run, max_steps=4, seed=3, save_strategy="steps", save_steps=2)
    with pytest.raises(MezoReplayError, match="checkpoint's weights are not those the trajectory recorded"):
        t.train(resume_from_checkpoint=str(other / "checkpoint-2"))
    assert (run / "trajectory.mzt").read_bytes() == before  # nothing was cut


class _Failing(MeZOTrainer):
    """compute_loss fails at a chosen forward: with `inf` (a non-finite loss) or an exception."""

    fail_at, how, calls = 5, "raise", 0

    def compute_loss(self, model, inputs, **kw):  # type: ignore[override]
        self.calls += 1
        loss = super().compute_loss(model, inputs, **kw)
        if self.calls == self.fail_at:
            if self.how == "raise":
                raise RuntimeError("boom")
            return loss * float("inf")
        return loss


def test_a_failed_step_leaves_a_readable_trajectory(base: Path, tmp_path: Path) -> None:
    """Cut in the middle of step 2 (its first forward): two steps stay recorded, and no final fingerprint
    is claimed for weights that hold a perturbation. A non-finite loss in step 2: recorded as a zero update,
    the file is closed on the settled weights, and rebuilds to them."""
    t = make(base, tmp_path / "cut", trainer_cls=_Failing)
    with pytest.raises(RuntimeError, match="boom"):
        t.train()
    traj = read_trajectory(tmp_path / "cut" / "trajectory.mzt")
    assert traj.steps == 2 and traj.final_fingerprint is None and not traj.truncated

    t = make(base, tmp_path / "inf", trainer_cls=type("Inf", (_Failing,), {"how": "inf"}))
    with pytest.raises(NonFiniteLossError):
        t.train()
    traj = read_trajectory(tmp_path / "inf" / "trajectory.mzt")
    assert traj.steps == 3 and traj.grad_bits[2] == 0 and traj.final_fingerprint is not None
    reconstruct(plan(base, traj), tmp_path / "rebuilt")
    assert_weights(t.model, tmp_path / "rebuilt")


def test_mezo_trainer_is_exported_lazily() -> None:
    assert mezo_replay.MeZOTrainer is MeZOTrainer and issubclass(MeZOTrainer, transformers.Trainer)


_DDP_SCRIPT = """
import os, sys, torch
from transformers import LlamaForCausalLM, TrainingArguments
from mezo_replay import MeZOTrainer
base, out = sys.argv[1], sys.argv[2]
ids = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(1))
model = LlamaForCausalLM.from_pretrained(base)
args = TrainingArguments(output_dir=out, learning_rate=1e-3, max_steps=4, per_device_train_batch_size=2,
                         use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, ddp_backend="gloo")
seen = []
class Seeing(MeZOTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        seen.append(inputs["input_ids"].clone())
        return super().training_step(model, inputs, num_items_in_batch)
trainer = Seeing(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids])
trainer.train()
torch.save({"weights": model.state_dict(), "seen": seen}, os.path.join(out, f"rank{os.environ['RANK']}.pt"))
trainer.save_model(os.path.join(out, "final"))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_under_torchrun_rebuild_exactly(base: Path, tmp_path: Path) -> None:
    """Two DDP ranks (gloo, CPU), each on its half of every batch: both end on the same bytes, rank 0
    alone writes the file, and a one-process rebuild gives those bytes."""
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(_DDP_SCRIPT))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(script), str(base),
                           str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    traj = read_trajectory(out / "trajectory.mzt")
    assert traj.steps == 4 and traj.header["metadata"]["world_size"] == "2" and traj.header["metadata"]["parallel"] == "data"
    assert traj.header["metadata"]["batch_size"] == "4"
    reconstruct(plan(base, traj), tmp_path / "rebuilt")
    want = load_file(tmp_path / "rebuilt" / "model.safetensors")
    ranks = [torch.load(out / f"rank{rank}.pt") for rank in (0, 1)]
    for rank, got in enumerate(ranks):
        assert all(same_bytes(got["weights"][k], want[k]) for k in want), rank
    # each rank stepped on its own rows: the same weights on both can only come from the combined loss
    assert all(a.shape == (2, 12) and not torch.equal(a, b) for a, b in zip(ranks[0]["seen"], ranks[1]["seen"]))
    assert_weights(out / "final", tmp_path / "rebuilt")


_LAUNCHED = """
import json, os, signal, sys, torch
from transformers import LlamaForCausalLM, TrainerCallback, TrainingArguments
from mezo_replay import MeZOTrainer
base, out, resume, signal_at = sys.argv[1], sys.argv[2], sys.argv[3] == "resume", sys.argv[4]
rule = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}  # MeZOTrainer's mezo_rule etc.
ids = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(1))
args = TrainingArguments(output_dir=out, learning_rate=1e-3, max_steps=7, per_device_train_batch_size=2, use_cpu=True,
                         report_to=[], save_strategy="steps", save_steps=2, disable_tqdm=True, seed=3)
class Signal(TrainerCallback):  # "RANK:SIGNAL:STEP": that rank gets that signal before step STEP + 1
    def on_step_begin(self, args, state, control, **kw):
        rank, name, step = signal_at.split(":") if signal_at != "-" else ("", "", "-1")
        if state.global_step == int(step) and os.environ["RANK"] == rank:
            os.kill(os.getpid(), getattr(signal, name))
trainer = MeZOTrainer(model=LlamaForCausalLM.from_pretrained(base), args=args, callbacks=[Signal()],
                      train_dataset=[{"input_ids": r, "labels": r} for r in ids], **rule)
trainer.train(resume_from_checkpoint=True if resume else None)
trainer.save_model(os.path.join(out, "final"))
"""


def _launch(launcher: list[str], tmp_path: Path, base: Path, out: Path, *script_args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "launched.py"
    script.write_text(textwrap.dedent(_LAUNCHED))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # a hang guard well under the collective timeouts (mezo-replay's 600 s, Trainer's ddp_timeout 1800 s)
    return subprocess.run([*launcher, str(script), str(base), str(out), *script_args], capture_output=True, text=True,
                          env=env, timeout=300)


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port())]


def test_accelerate_launch_two_cpu_processes_rebuilds_with_the_cli(base: Path, tmp_path: Path) -> None:
    """`accelerate launch` (1.15) starts several CPU processes through torchrun only with --multi_gpu (its
    --cpu flag runs them through mpirun, with --mpirun_hostfile, else one process); the script's
    use_cpu=True makes them gloo ranks on the CPU. The CLI rebuilds what the trainer ended with."""
    out = tmp_path / "run"
    done = _launch([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", str(_free_port())], tmp_path, base, out, "new", "-")
    assert done.returncode == 0, done.stderr[-3000:]
    traj = read_trajectory(out / "trajectory.mzt")
    assert traj.steps == 7 and traj.header["metadata"]["world_size"] == "2" and sorted(traj.checkpoints) == [2, 4, 6, 7]
    rebuilt = run_cli("reconstruct", str(base), str(out / "trajectory.mzt"), "-o", str(tmp_path / "rebuilt"))
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert_weights(out / "final", tmp_path / "rebuilt")


@pytest.mark.slow
def test_a_killed_rank_stops_the_other_in_one_line_and_resume_ends_on_the_uninterrupted_bytes(
        base: Path, tmp_path: Path) -> None:
    ref = _launch(_torchrun(), tmp_path, base, tmp_path / "ref", "new", "-")
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "run"
    cut = _launch(_torchrun(), tmp_path, base, run, "new", "1:SIGKILL:5")
    assert cut.returncode != 0
    lines = [line for line in cut.stderr.splitlines() if "lost contact with another rank" in line]
    assert len(lines) == 1 and "PeerLost: rank 0: lost contact with another rank" in lines[0], cut.stderr[-3000:]
    assert f"after 5 steps; {run / 'trajectory.mzt'} holds the steps recorded until then" in lines[0]
    info = run_cli("info", str(run / "trajectory.mzt"))
    assert info.returncode == 0 and "steps      5" in info.stdout, info.stdout + info.stderr
    traj = read_trajectory(run / "trajectory.mzt")
    assert traj.steps == 5 and sorted(traj.checkpoints) == [2, 4] and traj.final_fingerprint is None

    again = _launch(_torchrun(), tmp_path, base, run, "resume", "-")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run / "trajectory.mzt").read_bytes() == (tmp_path / "ref" / "trajectory.mzt").read_bytes()
    assert_weights(run / "final", tmp_path / "ref" / "final")


@pytest.mark.slow
def test_two_ranks_resume_a_momentum_buffer_run_to_the_uninterrupted_bytes(base: Path, tmp_path: Path) -> None:
    """Under torchrun rank 0 reads the records before the checkpoint and every rank rebuilds its m from them."""
    rule = json.dumps({"mezo_rule": "mezo-momentum-buffer", "mezo_momentum": 0.5})
    ref = _launch(_torchrun(), tmp_path, base, tmp_path / "ref", "new", "-", rule)
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "run"
    cut = _launch(_torchrun(), tmp_path, base, run, "new", "0:SIGTERM:3", rule)
    assert cut.returncode == 0 and read_trajectory(run / "trajectory.mzt").steps == 4, cut.stderr[-3000:]
    again = _launch(_torchrun(), tmp_path, base, run, "resume", "-", rule)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run / "trajectory.mzt").read_bytes() == (tmp_path / "ref" / "trajectory.mzt").read_bytes()
    assert_weights(run / "final", tmp_path / "ref" / "final")


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(base: Path, tmp_path: Path) -> None:
    """As when torchrun passes a SIGTERM on: the file is closed on a step every rank took, and rebuilds."""
    out = tmp_path / "run"
    done = _launch(_torchrun(), tmp_path, base, out, "new", "0:SIGTERM:3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stopped by SIGTERM after 4 steps, on every rank" in done.stderr
    traj = read_trajectory(out / "trajectory.mzt")
    assert traj.steps == 4 and traj.final_fingerprint is not None
    reconstruct(plan(base, traj), tmp_path / "rebuilt")
    assert_weights(out / "final", tmp_path / "rebuilt")
