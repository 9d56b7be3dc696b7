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
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from transformers import Trainer

from ..arithmetic.rule import MezoSGD, Schedule
from ..errors import MezoReplayError
from ..format.fingerprint import checkpoint_fingerprint
from . import distributed
from .defaults import MEZO_DEFAULTS
from .optimizer import MeZO, NonFiniteLossError

#: Trainer's schedule names that mezo_replay's Schedule computes exactly (without warmup: Trainer warms up
#: as t/w from 0, the rule as (t+1)/(w+1)).
EXACT_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant",
                   "constant_with_warmup": "constant"}


_TIMINGS = ("runtime", "samples_per_second", "steps_per_second")


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
    max_steps (or `mezo_schedule`, which replaces them). `trajectory` defaults to <output_dir>/trajectory.mzt;
    `base_source` (what `reconstruct` will need as its base) defaults to the model's name_or_path.
    Each step runs with the model in eval mode, as the MeZO reference trainer does: dropout would make
    the two forwards of a step measure different functions."""

    def __init__(self, *args: Any, mezo_eps: float = MEZO_DEFAULTS["eps"], trajectory: str | os.PathLike[str] | None = None,
                 mezo_noise: str = "gaussian16", mezo_schedule: Schedule | None = None, record_losses: bool = True,
                 overwrite_trajectory: bool = False, base_source: str | None = None,
                 on_nonfinite: Literal["raise", "skip"] = "raise", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mezo_eps, self.mezo_noise, self.mezo_schedule = mezo_eps, mezo_noise, mezo_schedule
        self.record_losses, self.overwrite_trajectory = record_losses, overwrite_trajectory
        self.on_nonfinite = on_nonfinite
        self.trajectory_path = Path(trajectory) if trajectory is not None else \
            Path(self.args.output_dir or ".") / "trajectory.mzt"
        self.base_source = base_source
        self.mezo: MeZO | None = None
        self._world = distributed.World()
        self._in_step = False
        _refuse_unreplayable(self)
        self._check_free()

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
        return torch.tensor(loss, dtype=torch.float32, device=self.args.device)

    def _check_free(self) -> None:
        if self.trajectory_path.exists() and not self.overwrite_trajectory:
            raise MezoReplayError(f"MeZOTrainer: {self.trajectory_path} already exists: pass "
                                  "overwrite_trajectory=True or another trajectory=")

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
        as training starts (after DDP's broadcast from rank 0); every rank checks it holds the same
        settings and base weights; rank 0 starts the file."""
        self._world = distributed.current()
        inner = self.accelerator.unwrap_model(model)
        schedule = getattr(self, "_schedule", None) or self.mezo_schedule
        opt = MeZO(inner.named_parameters(), lr=self.args.learning_rate, eps=self.mezo_eps, seed=self.args.seed,
                   noise=self.mezo_noise, schedule=schedule, weight_decay=self.args.weight_decay,
                   on_nonfinite=self.on_nonfinite)
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
                    "batch_size": str(self._train_batch_size * self._world.size),
                    **({"world_size": str(self._world.size), "parallel": "data"} if self._world.distributed else {}),
                    **({"base_model": source} if source else {})}  # world_size/parallel as spec/metadata.md says
        described = dict(base_source=source, base_revision=revision, metadata=metadata,
                         record_losses=self.record_losses)
        distributed.agree("settings or base weights", opt.header(**described), self._world)
        failure = None
        if self._world.main:
            try:
                opt.record(self.trajectory_path, overwrite=self.overwrite_trajectory, **described)
            except (MezoReplayError, OSError, ValueError) as e:
                failure = e
        # the other ranks stop too (else they would wait for rank 0's first loss until the timeout)
        said = distributed.broadcast(None if failure is None else str(failure), self._world)
        if failure is not None:
            raise failure
        if said is not None:
            raise MezoReplayError(f"rank 0 could not start the trajectory: {said}")
        self.mezo = opt

    # -- the end of a run, checkpoints ---------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs: Any) -> Any:
        """Trainer's train(), recording a new trajectory that is closed (final fingerprint) at its end."""
        if resume_from_checkpoint:
            raise MezoReplayError("MeZOTrainer cannot resume from a Trainer checkpoint yet: its trajectory would "
                                  "have to continue from that step; start a new run")
        self._check_free()
        self.mezo = None
        try:
            out = super().train(resume_from_checkpoint=None, trial=trial,
                                ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        except BaseException:
            self._abandon()
            raise
        self._close()
        return out

    def _finalize_training(self, *args: Any, **kwargs: Any) -> Any:
        """Closes the trajectory before Trainer's end of training, which may load the best checkpoint's
        weights (load_best_model_at_end): the final fingerprint is the last step's."""
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
            writer.close()
        else:
            opt.close()

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


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _kind(args: Any) -> str:
    """lr_scheduler_type as its name (TrainingArguments turns it into a SchedulerType enum)."""
    return str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
