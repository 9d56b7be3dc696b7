"""`MeZOTrainer`: a transformers.Trainer whose steps are MeZO steps, recorded as a trajectory.

    trainer = MeZOTrainer(model=model, args=TrainingArguments("out", learning_rate=1e-6, max_steps=1000),
                          train_dataset=ds, mezo_eps=1e-3)          # records out/trajectory.mzt
    trainer.train()

Why a subclass and not a callback: a Trainer step is forward, backward, optimizer step, and MeZO has no
backward. So the step itself is replaced (training_step runs mezo_replay's MeZO, two forwards without
gradients), and Trainer's optimizer and scheduler become stand-ins that only keep its bookkeeping working
(the logged learning rate, checkpoints of optimizer state); they never touch the weights.

Everything a trajectory cannot replay is refused when the trainer is made, in one line: gradient
accumulation, AMP autocast, a torch optimizer of the user's, DeepSpeed/FSDP, a learning-rate schedule that
mezo_replay's Schedule does not compute exactly. Under torchrun or `accelerate launch` (data parallel) each
rank computes the loss on its share of the batch; the closure combines the per-rank (loss sum, count) pairs
in rank order (distributed.combine), so every rank derives the same projected gradient, applies the same
update, and rank 0 alone writes the file. DDP's wrapping is harmless: no backward, so no gradient traffic.

Resume (train(resume_from_checkpoint=...)) trusts Trainer for the weights, state and data position and
checks the weights against the trajectory's `ckpt` record of that step, instead of replaying every step
from the base: one hash pass. The file is cut back to that record, which is where an uninterrupted run's
file stood when it saved that checkpoint, so the continued file is that run's, byte for byte.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
import zstandard
from transformers import Trainer

from ..arithmetic.rule import MezoSGD, Schedule
from ..errors import MezoReplayError
from ..format.filelock import FileLock
from ..format.fingerprint import checkpoint_fingerprint
from ..format import compact
from ..format.mzt import (CHUNK_HEAD, CKPT, PREAMBLE, TrajectoryWriter, _write_all, create_locked,
                          read_trajectory)
from . import distributed
from .data_parallel import PeerLost, all_or_none, any_stop, lost, talking
from .defaults import MEZO_DEFAULTS
from .optimizer import MeZO, NonFiniteLossError
from ..kernels.steps import replay_tensor_, step_constants

#: Trainer's schedule names that mezo_replay's Schedule computes exactly (without warmup: Trainer warms up
#: as t/w from 0, the rule as (t+1)/(w+1)).
EXACT_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant",
                   "constant_with_warmup": "constant"}


_TIMINGS = ("runtime", "samples_per_second", "steps_per_second")

_logger = transformers.utils.logging.get_logger(__name__)


class _StandIn(torch.optim.Optimizer):
    """What Trainer and accelerate see as the optimizer: one dummy parameter, a learning rate for the
    scheduler to scale and the log to show, and a step that does nothing (the MeZO step has happened)."""

    def __init__(self, lr: float) -> None:
        super().__init__([torch.nn.Parameter(torch.zeros(()))], {"lr": lr})

    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        return None


class MeZOTrainer(Trainer):
    """A transformers.Trainer that tunes with MeZO-SGD and records a replayable trajectory.

    The rule's settings come from TrainingArguments: learning_rate, seed, weight_decay (MeZO's no-decay
    rule: biases, norms and 1-d tensors), lr_scheduler_type linear/cosine/constant without warmup over
    max_steps (or `mezo_schedule`, which replaces them). `mezo_grad_codec`/`mezo_grad_scale` choose how each
    step's gradient is recorded (MeZO's grad_codec/grad_scale: "bf16", "fp8", "sign"); `mezo_rule`,
    `mezo_momentum`, `mezo_momentum_window` the update rule (MeZO's rule/momentum/momentum_window:
    "mezo-sgd", "mezo-momentum", "mezo-momentum-buffer"; spec/momentum.md; or "mezo-adam", "mezo-adam-buffer"
    with `mezo_momentum` as beta1 and `mezo_beta2`, `mezo_adam_eps`: spec/adam.md); `mezo_perturbations` N > 1
    makes each step n-SPSA (MeZO's perturbations, spec/nspsa.md: 2N forwards a step, N records);
    `mezo_layerwise` ("perturbation", "step", "both") and `mezo_layerwise_blocks` ("tensor", "layer") scale
    each tensor's perturbation and step by powers of two chosen from the base weights (spec/layerwise.md; a
    resumed run takes the exponents the file recorded). `trajectory`
    defaults to <output_dir>/trajectory.mzt;
    `base_source` (what `reconstruct` will need as its base) defaults to the model's name_or_path.
    Each step runs with the model in eval mode, as the MeZO reference trainer does: dropout would make
    the two forwards of a step measure different functions."""

    def __init__(self, *args: Any, mezo_eps: float = MEZO_DEFAULTS["eps"], trajectory: str | os.PathLike[str] | None = None,
                 mezo_noise: str = "gaussian16", mezo_schedule: Schedule | None = None, record_losses: bool = True,
                 overwrite_trajectory: bool = False, base_source: str | None = None,
                 on_nonfinite: Literal["raise", "skip"] = "raise", mezo_grad_codec: str = "bf16",
                 mezo_grad_scale: float | None = None, mezo_rule: str = "mezo-sgd", mezo_momentum: float = 0.9,
                 mezo_momentum_window: int = 16, mezo_perturbations: int = 1, mezo_beta2: float = 0.999,
                 mezo_adam_eps: float = 1e-8, mezo_layerwise: str = "none", mezo_layerwise_blocks: str = "tensor",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mezo_eps, self.mezo_noise, self.mezo_schedule = mezo_eps, mezo_noise, mezo_schedule
        self.mezo_grad_codec, self.mezo_grad_scale = mezo_grad_codec, mezo_grad_scale
        self.mezo_rule, self.mezo_momentum, self.mezo_momentum_window = mezo_rule, mezo_momentum, mezo_momentum_window
        self.mezo_perturbations = mezo_perturbations
        self.mezo_beta2, self.mezo_adam_eps = mezo_beta2, mezo_adam_eps
        self.mezo_layerwise, self.mezo_layerwise_blocks = mezo_layerwise, mezo_layerwise_blocks
        self.record_losses, self.overwrite_trajectory = record_losses, overwrite_trajectory
        self.on_nonfinite = on_nonfinite
        self.trajectory_path = Path(trajectory) if trajectory is not None else \
            Path(self.args.output_dir or ".") / "trajectory.mzt"
        self.base_source = base_source
        self.mezo: MeZO | None = None
        self._world = distributed.World()
        self._in_step = False
        self._resuming = False
        self._signalled = False  # SIGTERM under torchrun/accelerate: every rank stops after the same step
        _refuse_unreplayable(self)

    # -- optimizer and schedule: stand-ins -----------------------------------------------------------

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = _StandIn(self.args.learning_rate)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int,
                         optimizer: torch.optim.Optimizer | None = None) -> torch.optim.lr_scheduler.LRScheduler:
        """The rule's own multipliers, so that the logged learning rate is the one each step uses."""
        if self.lr_scheduler is None:
            schedule = self.mezo_schedule or Schedule(EXACT_SCHEDULES[_kind(self.args)], 0, int(num_training_steps))
            self._schedule = schedule.validated()
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, lambda t: schedule.multiplier(t))
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _clip_grad_norm(self, model: Any) -> None:  # no gradients to clip
        return None

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> None:
        return None

    # -- the step ------------------------------------------------------------------------------------

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        """One MeZO step on this batch (this rank's share of it); returns the step's mean loss, the same
        on every rank. num_items_in_batch is not used: each rank's loss is its own mean, weighted by its own
        count when the ranks' losses are combined."""
        if self.mezo is None:
            self._start(model)
        assert self.mezo is not None
        model.eval()
        inputs = self._prepare_inputs(inputs)
        count = self._count(inputs)
        world = self._world

        def closure() -> torch.Tensor:
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs)
            if loss.numel() > 1:  # nn.DataParallel: one loss per GPU
                loss = loss.mean()
            if not world.distributed:
                return loss
            total = loss.double() * count if count else torch.zeros((), dtype=torch.float64, device=loss.device)
            return distributed.combine(total, count, world)

        self._in_step = True  # until the step returns or settles on a failure, the weights may be perturbed
        try:
            loss = self.mezo.step(closure)
        except NonFiniteLossError:
            self._in_step = False
            raise
        self._in_step = False
        if world.distributed and any_stop(self._signalled, world):
            self.control.should_training_stop = True  # Trainer ends after this step, closing the file
            if world.main:
                _logger.warning(f"MeZOTrainer: stopped by SIGTERM after {self.mezo.step_count} steps, on every rank; "
                                f"{self.trajectory_path} is closed there")
        return torch.tensor(loss, dtype=torch.float32, device=self.args.device)

    def _check_free(self) -> None:
        if self.trajectory_path.exists() and not self.overwrite_trajectory:
            raise MezoReplayError(f"MeZOTrainer: {self.trajectory_path} already exists: pass "
                                  "overwrite_trajectory=True, another trajectory=, or train(resume_from_checkpoint=...) "
                                  "to continue it")

    def _count(self, inputs: dict[str, Any]) -> int:
        """What this rank's loss is a mean over: its label tokens when it has labels (after the causal
        shift), else its rows."""
        labels = inputs.get("labels") if isinstance(inputs, dict) else None
        if isinstance(labels, torch.Tensor) and not labels.is_floating_point() and labels.dim() >= 2:
            if getattr(self, "_loss_shifts_labels", False):
                labels = labels[..., 1:]
            return int(labels.ne(-100).sum())
        for v in (inputs.values() if isinstance(inputs, dict) else ()):
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return int(v.shape[0])
        return 1

    def _start(self, model: torch.nn.Module) -> None:
        """The optimizer over the unwrapped model's parameters (a trajectory addresses tensors by the
        model's own names, not DDP's `module.` ones), made at the first step so that it sees the weights
        as training starts (after DDP's broadcast from rank 0, after a resumed checkpoint's weights are
        loaded); every rank checks it holds the same settings and weights; rank 0 starts the file, or
        continues it from the resumed checkpoint's step (_continue)."""
        world = self._world = distributed.current()
        at = int(self.state.global_step) if self._resuming else 0
        if self._resuming and at >= self.state.max_steps:  # every rank alike: no collective needed
            raise MezoReplayError(f"MeZOTrainer: the checkpoint is at step {at}, the end of the run (max_steps="
                                  f"{self.state.max_steps}): nothing to resume (Trainer would take a step past it)")
        inner = self.accelerator.unwrap_model(model)
        schedule = getattr(self, "_schedule", None) or self.mezo_schedule
        layerwise: Any = self.mezo_layerwise
        if layerwise != "none" and self._resuming:  # the base's exponents as the file recorded them: the
            recorded = None                          # checkpoint's weights are not the base (spec/layerwise.md)
            with all_or_none(world):
                if world.main:
                    recorded = {t["name"]: (t.get("perturb_exp", 0), t.get("step_exp", 0))
                                for t in read_trajectory(self.trajectory_path).header["tensors"]}
            layerwise = distributed.broadcast(recorded, world)
        opt = MeZO(inner.named_parameters(), lr=self.args.learning_rate, eps=self.mezo_eps, seed=self.args.seed,
                   noise=self.mezo_noise, schedule=schedule, weight_decay=self.args.weight_decay,
                   on_nonfinite=self.on_nonfinite, grad_codec=self.mezo_grad_codec, grad_scale=self.mezo_grad_scale,
                   rule=self.mezo_rule, momentum=self.mezo_momentum, momentum_window=self.mezo_momentum_window,
                   perturbations=self.mezo_perturbations, beta2=self.mezo_beta2, adam_eps=self.mezo_adam_eps,
                   layerwise=layerwise, layerwise_blocks=self.mezo_layerwise_blocks)
        source, revision = self.base_source, None
        if source is None:
            config = getattr(inner, "config", None)
            source = getattr(inner, "name_or_path", None) or getattr(config, "_name_or_path", None) or None
            if source and os.path.isdir(source):  # a local base: named from the trajectory's folder
                source = os.path.relpath(source, self.trajectory_path.parent)
            elif source:  # a Hub id: the commit it was loaded at, when transformers kept it
                commit = getattr(config, "_commit_hash", None)
                revision = commit if isinstance(commit, str) and re.fullmatch(r"[0-9a-f]{40}", commit) else None
        metadata = {"trainer": f"MeZOTrainer (transformers {transformers.__version__})",
                    "batch_size": str(self._train_batch_size * world.size),
                    **({"world_size": str(world.size), "parallel": "data"} if world.distributed else {}),
                    **({"base_model": source} if source else {})}  # world_size/parallel as spec/metadata.md says
        described = dict(base_source=source, base_revision=revision, metadata=metadata,
                         record_losses=self.record_losses)
        header = opt.header(**described)  # resumed: its base fingerprints are those of the checkpoint's weights
        with talking():
            distributed.agree("settings or weights", header, world)
        writer, records = None, None
        with all_or_none(world):  # a refusal on rank 0 stops every rank here, not at their next collective
            if world.main and self._resuming:
                fps = [t["sha256"] for t in header["tensors"]]  # the weights as loaded, hashed once by MeZO()
                writer, records = _continue(self.trajectory_path, header, at, opt.names, fps)
            elif world.main:
                opt.record(self.trajectory_path, overwrite=self.overwrite_trajectory, **described)
        if self._resuming and opt.rule.stateful:  # the same on every rank
            with talking():
                _restore_momentum(opt, distributed.broadcast(records, world))
        if writer is not None:
            opt.attach(writer, at)
        else:
            opt.step_count = at  # every rank takes the steps; rank 0 alone writes them
        self.mezo = opt

    # -- the run, the end of a run, checkpoints ------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs: Any) -> Any:
        """Trainer's train(), recording the trajectory, closed (final fingerprint) at its end.

        resume_from_checkpoint (a checkpoint folder, or True for the last in output_dir): Trainer loads
        that checkpoint's weights, state and data position; the trajectory is cut back to the checkpoint's
        step and continued, so the run ends on the same file and weights as one never interrupted.
        Under torchrun, a rank that loses another (killed, crashed) raises PeerLost, one line, keeping
        every step recorded; a SIGTERM (torchrun passes it on) stops every rank after the same step."""
        resume = None if resume_from_checkpoint is False else resume_from_checkpoint
        world = distributed.current()
        with all_or_none(world):
            if resume is None:
                if world.main:
                    self._check_free()
            else:
                _refuse_unresumable(self)
                if world.main and not self.trajectory_path.exists():
                    raise MezoReplayError(f"MeZOTrainer: cannot resume: {self.trajectory_path} does not exist (the "
                                          "trajectory the checkpoints were saved with; pass it as trajectory=)")
        self.mezo, self._resuming, self._signalled = None, resume is not None, False
        try:
            with self._sigterm_stops(world):
                out = super().train(resume_from_checkpoint=resume, trial=trial,
                                    ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        except BaseException as e:
            self._abandon()
            if world.distributed and _lost_contact(e):
                raise self._lost(e) from None
            raise
        self._close()
        return out

    @contextmanager
    def _sigterm_stops(self, world: distributed.World) -> Iterator[None]:
        """Under a launcher, SIGTERM (torchrun sends it to every rank when it stops, or when one rank died)
        ends the run after the current step, on every rank alike (training_step's any_stop), with a
        complete file; if a rank died, its peers meanwhile fail in their next collective, with one line."""
        if not world.distributed or threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: object) -> None:
            self._signalled = True

        previous = signal.signal(signal.SIGTERM, handler)
        try:
            yield
        except BaseException as e:
            if not _lost_contact(e):  # else the launcher's SIGTERM would often kill this rank before its line
                signal.signal(signal.SIGTERM, previous)  # is printed; its SIGKILL follows if it does not exit
            raise
        else:
            signal.signal(signal.SIGTERM, previous)

    def _lost(self, e: BaseException) -> PeerLost:
        steps = self.mezo.step_count if self.mezo is not None else int(self.state.global_step)
        held = f"{self.trajectory_path} holds" if self._world.main else "rank 0's trajectory holds"
        why = e if isinstance(e, PeerLost) else lost(e)
        text = str(why).split(": ", 1)[-1] if str(why).startswith("rank ") else str(why)
        return PeerLost(f"rank {self._world.rank}: {text} after {steps} steps; {held} the steps recorded until "
                        f"then: train(resume_from_checkpoint=True) continues it from the last Trainer checkpoint")

    def _finalize_training(self, *args: Any, **kwargs: Any) -> Any:
        """Closes the trajectory before Trainer's end of training, which may load the best checkpoint's
        weights (load_best_model_at_end): the final fingerprint is the last step's. A run resumed at its
        last step (at an epoch's end, else Trainer takes one more) took no step: _start refuses it."""
        if self.mezo is None and self._resuming:
            self._start(self.model_wrapped)
        self._close()
        return super()._finalize_training(*args, **kwargs)

    def _close(self) -> None:
        if self.mezo is not None:
            self.mezo.close()

    def _abandon(self) -> None:
        """After an error: the file keeps every recorded step; the final fingerprint is written only when
        the weights are known to be a replay of them (not when a step was cut in the middle)."""
        opt = self.mezo
        if opt is None or opt.writer is None:
            return
        if self._in_step:
            writer, opt.writer = opt.writer, None
            writer.close(compact=False)
        else:
            opt.close(compact=False)  # kept as flushed: a resume cuts it back at a checkpoint's chunk

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Trainer's log; evaluation results (its `eval_` keys, without timings) also go into the
        trajectory, at the step they were measured after, so the file tells how the run went."""
        opt = self.mezo
        if opt is not None and opt.writer is not None:
            metrics = {k[len("eval_"):]: float(v) for k, v in logs.items()
                       if k.startswith("eval_") and not k.endswith(_TIMINGS) and type(v) in (int, float)
                       and math.isfinite(v)}
            if metrics:
                opt.writer.add_eval(opt.step_count, "eval", metrics)
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """A checkpoint fingerprint in the trajectory too, so `reconstruct --step` is verified at every
        Trainer checkpoint; and the file is flushed up to it."""
        opt = self.mezo
        if opt is not None and opt.writer is not None:
            opt.writer.add_checkpoint(opt.step_count, checkpoint_fingerprint(opt.names, opt.fingerprints()))
            opt.writer.flush()
        super()._save_checkpoint(model, trial)


def _refuse_unreplayable(t: MeZOTrainer) -> None:
    """One line for the first setting a trajectory could not replay exactly (or MeZO cannot run with)."""
    a = t.args
    why = None
    if a.gradient_accumulation_steps != 1:
        why = (f"gradient_accumulation_steps={a.gradient_accumulation_steps}: a MeZO step has no gradient to "
               "accumulate; raise per_device_train_batch_size instead")
    elif a.fp16 or a.bf16:
        why = ("fp16/bf16 mixed precision: MeZO tunes the weights in their own dtype; load the model in "
               "torch.bfloat16 or float16 instead of autocasting")
    elif t.optimizer is not None or t.lr_scheduler is not None or getattr(t, "optimizer_cls_and_kwargs", None):
        why = "an optimizer or scheduler was given: MeZOTrainer steps with mezo_replay's MeZO only"
    elif t.is_deepspeed_enabled or t.is_fsdp_enabled:
        why = "DeepSpeed/FSDP: MeZOTrainer runs data parallel (torchrun/accelerate with DDP) only"
    elif max(getattr(t, f"get_{k}_size", lambda: 1)() for k in ("tp", "cp", "sp")) > 1:
        why = "tensor/context/sequence parallelism: MeZOTrainer runs data parallel only"
    elif a.load_best_model_at_end and not hasattr(Trainer, "_finalize_training"):
        why = "load_best_model_at_end needs transformers 5 (the trajectory must close on the last step's weights)"
    elif _is_peft(t.model):
        why = "a peft model: its tensors are not in the base checkpoint; use `mezo-replay train --peft`"
    elif t.mezo_schedule is None:
        kind = _kind(a)
        if kind not in EXACT_SCHEDULES:
            why = (f"lr_scheduler_type={kind!r}: mezo_replay computes linear, cosine and constant exactly; "
                   "choose one of them or pass mezo_schedule=Schedule(...)")
        elif a.get_warmup_steps(1 << 20):
            why = ("warmup: Trainer warms up as t/w, the trajectory's rule as (t+1)/(w+1); set warmup_steps=0 or "
                   "pass mezo_schedule=Schedule(name, warmup_steps, total_steps)")
        elif a.lr_scheduler_kwargs:
            why = f"lr_scheduler_kwargs={a.lr_scheduler_kwargs!r}: the trajectory's schedules take none"
    if why is None:
        try:  # the rule's own checks (lr, eps, seed, noise, weight decay), now rather than at the first step
            MezoSGD.create(lr=a.learning_rate, eps=t.mezo_eps, seed=a.seed, noise=t.mezo_noise,
                           schedule=t.mezo_schedule, weight_decay=a.weight_decay)
        except (ValueError, TypeError) as e:
            why = str(e)
    if why is not None:
        raise MezoReplayError(f"MeZOTrainer: {why}")


def _refuse_unresumable(t: MeZOTrainer) -> None:
    """Settings under which Trainer's resumed run would not take the uninterrupted run's batches."""
    if t.args.ignore_data_skip:
        raise MezoReplayError("MeZOTrainer: ignore_data_skip=True: a resumed run would take other batches than the "
                              "interrupted one did, and its trajectory would not be that run's; unset it to resume")


def _continue(path: Path, fresh: dict[str, Any], at: int, names: list[str],
              fps: list[str]) -> tuple[TrajectoryWriter, list[int]]:
    """Rank 0 of a resumed run: reopens the trajectory at the checkpoint's step `at`.

    Trainer has loaded the checkpoint's weights; their checkpoint fingerprint must be the one the file
    recorded when that checkpoint was saved (one SHA-256 pass, no replay), and the run's settings those
    of the file's header. What the file holds past that `ckpt` chunk (steps, evals after the checkpoint,
    a final fingerprint) is cut off: the resumed run records it again, and since the file up to that
    chunk is exactly what an uninterrupted run had written by then, it ends on the same bytes.
    Also returns the records of steps 0..at-1, which a momentum rule's next steps reach back into."""
    lock = FileLock.acquire(path)
    try:
        traj = read_trajectory(path)
        if diffs := _differences(traj.header, _as_recorded(fresh, traj.header)):
            raise MezoReplayError(f"MeZOTrainer cannot resume {path}: it was recorded with other settings: "
                                  + "; ".join(f"{k} {_shown(a)} in the file, {_shown(b)} now" for k, a, b in diffs[:4]))
        if at not in traj.checkpoints:
            saved = ", ".join(map(str, sorted(traj.checkpoints))) or "none"
            raise MezoReplayError(f"MeZOTrainer cannot resume {path} at step {at}: it records no Trainer checkpoint "
                                  f"there (its checkpoints: {saved}): the checkpoint was saved with another trajectory=")
        if traj.checkpoints[at] != checkpoint_fingerprint(names, fps):
            raise MezoReplayError(f"MeZOTrainer cannot resume {path} at step {at}: the checkpoint's weights are not "
                                  f"those the trajectory recorded at that step")
        cut = _end_of_checkpoint(path, at, traj.valid_bytes)
        try:
            _check_prefix(path, cut, at)
        except MezoReplayError:
            # a finished file was compacted: its ckpt chunks follow the merged steps. Rebuilt as it stood
            # at that checkpoint (compacted), it ends on the same bytes as an uninterrupted run once closed
            if (prefix := compact.through_checkpoint(path, at, traj.valid_bytes)) is None:
                raise
            f, new = create_locked(path, lambda f: _write_all(f, prefix), overwrite=True, replacing=lock)
            f.close()
            lock.release()  # the replaced file's; `new` locks the file that now has the name
            lock = new
            cut = traj.file_bytes = len(prefix)
        if cut < traj.file_bytes:
            with open(path, "r+b") as f:
                f.truncate(cut)
                os.fsync(f.fileno())
        writer = TrajectoryWriter.open_append(path, lock=lock, compact=True)
    except BaseException:
        lock.release()
        raise
    return writer, traj.grad_bits[:at].tolist()  # n-SPSA files: a list of N records a step


def _restore_momentum(opt: MeZO, records: list[int]) -> None:
    """A resumed momentum run's state from the records before the checkpoint (spec/momentum.md): the window
    form's last K records; the buffer form's m, which depends on the noise and the records only, never on the
    weights, so replaying those steps onto a scratch copy rebuilds it exactly (one tensor at a time)."""
    opt.load_history(records)
    if (opt.rule.buffered or opt.states) and records:  # mezo-adam-buffer's m and v likewise (spec/adam.md)
        constants = step_constants(opt.rule, records)
        tensors, starts = opt.local_tensors()
        for k, t in enumerate(tensors):
            replay_tensor_(torch.zeros_like(t), opt.rule, k, constants, decay=opt.decay[k],
                           start=starts[k] if starts else 0, state=opt.states[k])


def _end_of_checkpoint(path: Path, step: int, end: int) -> int:
    """The byte offset just after the first `ckpt` chunk of `step` (format.md's chunk layout)."""
    with open(path, "rb") as f:
        data = f.read(end)
    offset, dctx = PREAMBLE.size, zstandard.ZstdDecompressor()
    while offset + CHUNK_HEAD.size <= len(data):
        length, ctype, _ = CHUNK_HEAD.unpack_from(data, offset)
        after = offset + CHUNK_HEAD.size + length
        if ctype == b"ckpt" and CKPT.unpack(dctx.decompress(data[offset + CHUNK_HEAD.size:after]))[0] == step:
            return after
        offset = after
    raise MezoReplayError(f"MeZOTrainer cannot resume {path}: no checkpoint chunk for step {step}")


def _check_prefix(path: Path, cut: int, at: int) -> None:
    """Before cutting: the file up to `cut` must be a trajectory of exactly `at` steps (a checkpoint record
    written after later steps cannot be resumed from without losing them)."""
    with tempfile.TemporaryDirectory() as tmp:
        head = Path(tmp) / "head.mzt"
        with open(path, "rb") as f:
            head.write_bytes(f.read(cut))
        steps = read_trajectory(head).steps
    if steps != at:
        raise MezoReplayError(f"MeZOTrainer cannot resume {path} at step {at}: its checkpoint record for that step "
                              f"follows {steps} steps")


def _as_recorded(fresh: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """The header a resumed run would have written at the start: `fresh` describes the checkpoint's
    weights as the base, so the file's base fingerprints stand in for them (the checkpoint fingerprint
    check ties the two); `creator` (the writing version) does not change a step."""
    mine = json.loads(json.dumps(copy.deepcopy(fresh)))
    mine["creator"] = old.get("creator")
    if len(mine.get("tensors", [])) == len(old.get("tensors", [])):
        for t, o in zip(mine["tensors"], old["tensors"]):
            t["sha256"] = o.get("sha256")
    mine.setdefault("base", {})["fingerprint"] = (old.get("base") or {}).get("fingerprint")
    return mine


def _differences(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(a.keys() | b.keys(), key=str) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for k, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{prefix}{k}.")]
    return [] if a == b else [(prefix.rstrip("."), a, b)]


def _shown(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else json.dumps(value)


def _lost_contact(e: BaseException) -> bool:
    """Whether an error is a failed collective (a rank died or stopped answering): torch raises those as
    RuntimeError (DistError, or gloo's plain 'Connection reset by peer'), from our collectives, DDP's
    buffer broadcast in a forward, or Trainer's own gathers."""
    if isinstance(e, PeerLost):
        return True
    if not isinstance(e, RuntimeError):
        return False
    dist_error = getattr(torch.distributed, "DistError", None)
    return (dist_error is not None and isinstance(e, dist_error)) or bool(re.search(
        r"Connection (reset|closed|refused)|Broken pipe|[Tt]imed out", str(e)))


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _kind(args: Any) -> str:
    """lr_scheduler_type as its name (TrainingArguments turns it into a SchedulerType enum)."""
    return str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
