"""A MeZO fine-tune of a Hugging Face language model (causal or masked), recorded as a trajectory, crash-safe and resumable.

The embedded default (`mezo-replay train` with no arguments) goes through exactly this path with the
tiny model and task that ship in mezo_replay/embedded, so the default run proves the real one.

Crash safety comes from the file format (append-only, checksummed chunks, flushed every
`flush_every` steps) and from stopping only between steps: SIGINT and SIGTERM set a flag that the loop
reads after each step, so the weights in memory always equal a replay of the recorded steps, and the
final fingerprint can be written. A resumed run replays the recorded steps onto the base, checks them,
and continues with the same batches (data.batch_order is a pure function of seed and step), so it ends
on the same bytes as a run that was never interrupted.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from . import embedded
from .defaults import MEZO_DEFAULTS
from .data import Batch, DataError, batch_order
from .errors import MezoReplayError
from .fingerprint import DTYPE_NAMES
from .hub import resolve_model
from .mzt import TrajectoryWriter, read_trajectory
from .optimizer import MeZO
from .rule import Schedule
from .safetensors_io import BaseCheckpoint
from .steps import replay_tensor_, step_constants
from .tasks import Task, check_objective, check_template_fits_model, make_task

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    model: str | Path  # a folder, a .safetensors file (with `config`), or a Hub id org/name[@revision]
    train_examples: Sequence[dict[str, Any]]
    eval_examples: Sequence[dict[str, Any]]
    out: Path
    steps: int = MEZO_DEFAULTS["steps"]
    lr: float = MEZO_DEFAULTS["lr"]
    eps: float = MEZO_DEFAULTS["eps"]
    batch_size: int = MEZO_DEFAULTS["batch_size"]
    seed: int = 0
    task: str = "prompt-completion"
    task_options: dict[str, Any] = field(default_factory=dict)  # make_task keyword arguments
    objective: str = "ce"
    max_length: int = 128
    dtype: str = "fp32"
    noise: str = "gaussian16"
    schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    tune: Sequence[str] = ()
    freeze: Sequence[str] = ()
    eval_every: int = 0
    eval_batch_size: int = 64
    flush_every: int = 256
    record_losses: bool = True  # False: no `loss` chunks (a smaller file; replay does not need them)
    resume: bool = False
    overwrite: bool = False
    device: str = "cpu"
    config: Path | None = None  # the config/tokenizer folder of a bare .safetensors model
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class StepReport:
    step: int
    steps: int
    loss: float
    lr: float
    trajectory_bytes: int
    evals: dict[str, float] | None = None


@dataclass
class TrainResult:
    trajectory: Path
    base: Path
    model: Any
    optimizer: MeZO
    evals: list[tuple[int, dict[str, float]]]
    resumed_from: int
    interrupted: bool


def load_model(path: Path, dtype: str, device: str, labels: Sequence[str] | None = None,
               seed: int = 0) -> tuple[Any, Any, bool]:
    """(model, tokenizer, masked): a causal LM, a masked LM when the folder's config says so, or, with
    `labels`, a sequence classifier whose new head is initialised from `seed`."""
    import transformers as tf

    if not path.is_dir():
        raise MezoReplayError(f"--model {path}: not a directory (a Hugging Face model folder is expected)")
    BaseCheckpoint.open(path)  # a clear error for a folder without (safetensors) weights, before transformers
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    masked = any(a.endswith("ForMaskedLM") for a in tf.AutoConfig.from_pretrained(path).architectures or [])
    if labels is not None:
        torch.manual_seed(seed)  # the head's initial values are recorded anyway; this keeps reruns equal
        model = tf.AutoModelForSequenceClassification.from_pretrained(
            path, dtype=DTYPES[dtype], num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={v: k for k, v in enumerate(labels)})
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    else:
        auto = tf.AutoModelForMaskedLM if masked else tf.AutoModelForCausalLM
        model = auto.from_pretrained(path, dtype=DTYPES[dtype])
    model = model.to(device).eval()
    if torch.device(device).type == "cpu":
        in_memory_(model)
    return model, tokenizer, masked


@torch.no_grad()
def in_memory_(model: Any) -> None:
    """Copies every parameter and buffer into ordinary memory. from_pretrained leaves CPU weights
    memory-mapped from the safetensors file, so the first forward passes page the checkpoint in from
    disk, tensor by tensor (9x slower than later ones on SmolLM2-135M from a cold disk, issue 14):
    that cost would land inside the first training steps and the first evaluation. Copying pays it
    here, as one sequential read. `p.data = ...` keeps tied weights tied (they share one Parameter)."""
    for p in model.parameters():
        p.data = p.data.clone()
    for b in model.buffers():
        b.data = b.data.clone()


def prepare_base(folder: Path, weights: Path, dtype: str, out: Path, overwrite: bool) -> Path:
    """The checkpoint the trajectory's base is: the model's own weights (folder or file) when they are
    stored in the training dtype, otherwise a copy of them cast to that dtype (round to nearest even, as
    from_pretrained casts), saved beside the trajectory with the folder's config and tokenizer."""
    from safetensors.torch import save_file

    stored = BaseCheckpoint.open(weights)
    floats = ("F32", "BF16", "F16")
    wanted = DTYPE_NAMES[DTYPES[dtype]]
    if all(e.dtype == wanted for e in stored.entries.values() if e.dtype in floats):
        return weights
    base_dir = out.with_name(f"{out.stem}.base-{dtype}")
    if base_dir.exists() and not overwrite:
        raise MezoReplayError(f"{base_dir} exists: pass --overwrite to replace it")
    base_dir.mkdir(exist_ok=True)
    tensors = {n: stored.read(n).to(DTYPES[dtype]) if e.dtype in floats else stored.read(n)
               for n, e in stored.entries.items()}
    save_file(tensors, str(base_dir / "model.safetensors"), metadata={"format": "pt"})
    for aux in BaseCheckpoint.open(folder).aux_files():
        (base_dir / aux.name).write_bytes(aux.read_bytes())
    return base_dir


def select_parameters(model: Any, tune: Sequence[str], freeze: Sequence[str]) -> None:
    """--tune keeps only parameters matching a pattern, --freeze drops those matching one. A pattern is
    a glob matched anywhere in the name ('layers.*.self_attn' picks every layer's attention)."""
    names = [n for n, _ in model.named_parameters()]
    for flag, patterns in (("--tune", tune), ("--freeze", freeze)):
        for pat in patterns:
            if not any(fnmatch.fnmatchcase(n, f"*{pat}*") for n in names):
                raise MezoReplayError(f"{flag} {pat!r} matches no parameter (e.g. {names[0]!r})")
    for name, p in model.named_parameters():
        chosen = not tune or any(fnmatch.fnmatchcase(name, f"*{pat}*") for pat in tune)
        if any(fnmatch.fnmatchcase(name, f"*{pat}*") for pat in freeze):
            chosen = False
        p.requires_grad_(chosen)


def new_tensors(opt: MeZO, base: Path, allowed: bool) -> list[str]:
    """Tuned parameters the base lacks: a classifier's new head (allowed), or a naming problem (not)."""
    entries = BaseCheckpoint.open(base).entries
    missing = [n for n in opt.names if n not in entries]
    if missing and not allowed:
        raise MezoReplayError(f"parameter {missing[0]!r} is not stored under that name in {base}; "
                              f"reconstruct could not find it")
    return missing


def _resume(opt: MeZO, path: Path, flush_every: int) -> int:
    """Replays the trajectory's steps onto the optimizer's (base) weights, checks them, and reopens the
    file for appending. Refuses a trajectory from another base or other settings."""
    traj = read_trajectory(path)
    fresh = opt.header()
    old = traj.header
    for key in ("generator", "noise", "rule"):
        if old[key] != fresh[key]:
            diff = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in _differences(old[key], fresh[key]))
            raise MezoReplayError(f"--resume refused: {path} was trained with other settings ({key} {diff})")
    old_names = [t["name"] for t in old["tensors"]]
    if old_names != opt.names:
        raise MezoReplayError(f"--resume refused: {path} tunes {len(old_names)} tensors, these settings "
                              f"{len(opt.names)} (check --tune/--freeze)")
    if [t["sha256"] for t in old["tensors"]] != [t["sha256"] for t in fresh["tensors"]] or \
            [t.get("decay") for t in old["tensors"]] != [t.get("decay") for t in fresh["tensors"]]:
        raise MezoReplayError(f"--resume refused: the model is not the base {path} was trained from "
                              f"(fingerprint mismatch)")
    n = traj.steps
    constants = step_constants(opt.rule, traj.grad_bits)
    for k, p in enumerate(opt.params):
        replay_tensor_(p.data, opt.rule, k, constants, decay=opt.decay[k])
    expected = traj.fingerprints.get(n)
    if expected is not None and expected != opt.fingerprints():
        raise MezoReplayError(f"--resume: replaying {path} does not reproduce its fingerprint at step {n}")
    opt.attach(TrajectoryWriter.open_append(path, steps_per_chunk=flush_every), n)
    return n


def _differences(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(a.keys() | b.keys(), key=str)
                for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [(prefix.rstrip("."), a, b)]


class _StopFlag:
    """SIGINT/SIGTERM end the run after the current step; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.set = False

    def __call__(self, signum: int, frame: object) -> None:
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set = True


@contextmanager
def _stop_on_signals() -> Iterator[_StopFlag]:
    flag = _StopFlag()
    previous = {s: signal.signal(s, flag) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def fit(opt: MeZO, steps: int, closure_for: Callable[[int], Callable[[], torch.Tensor | float]], *,
        after_step: Callable[[int, float], None] | None = None) -> bool:
    """Runs `opt` from its current step to `steps`, then closes it (writing the final fingerprint).

    The loop `mezo-replay train` uses, for people who bring their own model and data: `closure_for(t)`
    returns the closure of step t (the loss on step t's batch); `after_step(done, loss)` runs after each
    step. SIGINT and SIGTERM stop it cleanly between steps, so the trajectory always ends complete and
    verifiable; returns True if a signal stopped it. A second Ctrl-C interrupts mid-step: the recorded
    steps stay valid, but no final fingerprint is written for half-stepped weights.
    """
    interrupted = False
    try:
        with _stop_on_signals() as stop:
            for step in range(opt.step_count, steps):
                loss = opt.step(closure_for(step))
                if after_step is not None:
                    after_step(step + 1, loss)
                if stop.set:
                    interrupted = True
                    break
    except KeyboardInterrupt:
        if opt.writer is not None:
            opt.writer.close()
            opt.writer = None
        raise
    finally:
        opt.close()
    return interrupted


def train(cfg: TrainConfig, on_step: Callable[[StepReport], None] | None = None,
          log: IO[str] | None = None) -> TrainResult:
    """Runs MeZO until cfg.steps steps are recorded; returns with a complete, verifiable trajectory."""
    torch.set_flush_denormal(False)  # the spec's arithmetic keeps subnormals
    if cfg.resume and not cfg.out.exists():
        raise MezoReplayError(f"--resume {cfg.out}: no such file")
    if not cfg.resume and cfg.out.exists() and not cfg.overwrite:
        raise MezoReplayError(f"{cfg.out} exists: pass --overwrite to replace it, or --resume to continue it")
    if not cfg.train_examples:
        raise DataError("the training set is empty")
    check_objective(cfg.task, cfg.objective)
    src = resolve_model(embedded.local_path(cfg.model), cfg.config)
    source = embedded.portable_name(src.path) or src.source  # never the package's absolute path
    labels = None
    if cfg.task == "classify-head":
        key = cfg.task_options.get("label_key", "label")
        if not all(key in ex for ex in cfg.train_examples):
            raise DataError(f"classify-head: some training examples have no {key!r} column")
        labels = sorted({str(ex[key]) for ex in cfg.train_examples})
    model, tokenizer, masked = load_model(src.path, cfg.dtype, cfg.device, labels, cfg.seed)
    check_template_fits_model(cfg.task_options.get("template"), cfg.task, masked,
                              [*cfg.train_examples, *cfg.eval_examples], source)
    task: Task = make_task(cfg.task, tokenizer=tokenizer, max_length=cfg.max_length, masked=masked,
                           labels=labels, **cfg.task_options)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_set = task.encode(tokenizer, cfg.train_examples)
    eval_set = task.encode(tokenizer, cfg.eval_examples) if cfg.eval_examples else []
    eval_batches = [task.make_batch(eval_set[i:i + cfg.eval_batch_size], pad)
                    for i in range(0, len(eval_set), cfg.eval_batch_size)]
    select_parameters(model, cfg.tune, cfg.freeze)
    base = prepare_base(src.path, src.weights, cfg.dtype, cfg.out, cfg.overwrite or cfg.resume)
    schedule = Schedule(cfg.schedule, cfg.warmup_steps, cfg.steps if cfg.schedule != "constant" or
                        cfg.warmup_steps else 0)
    opt = MeZO(model.named_parameters(), lr=cfg.lr, eps=cfg.eps, seed=cfg.seed, noise=cfg.noise,
               schedule=schedule.validated(), weight_decay=cfg.weight_decay)
    added = new_tensors(opt, base, allowed=labels is not None)
    if cfg.resume:
        start = _resume(opt, cfg.out, cfg.flush_every)
        if start >= cfg.steps:
            opt.close()
            raise MezoReplayError(f"--resume: {cfg.out} already holds {start} steps (--steps {cfg.steps})")
    else:
        start = 0
        meta = {"task": cfg.task, "objective": cfg.objective, "batch_size": str(cfg.batch_size),
                "max_length": str(cfg.max_length), "examples": str(len(train_set)), **task.metadata(),
                "base_model": source + (f"@{src.revision}" if src.revision else ""), **cfg.metadata}
        same = base == src.weights  # else: a copy cast to the training dtype, named by its path from the
        # trajectory's folder (it is saved beside it), which stays true when both are moved together
        opt.record(cfg.out, overwrite=cfg.overwrite, steps_per_chunk=cfg.flush_every,
                   base_source=source if same else os.path.relpath(base, cfg.out.parent),
                   base_revision=src.revision if same else None,
                   metadata=meta, new_tensors=added, record_losses=cfg.record_losses,
                   config=json.loads(model.config.to_json_string()) if labels is not None else None)

    def evaluate(step: int) -> dict[str, float]:
        metrics = task.evaluate(model, eval_batches)
        assert opt.writer is not None
        opt.writer.add_eval(step, "eval", metrics)
        evals.append((step, metrics))
        _log(log, {"event": "eval", "step": step, **metrics})
        return metrics

    evals: list[tuple[int, dict[str, float]]] = []
    started = time.monotonic()

    def closure_for(step: int) -> Callable[[], torch.Tensor]:
        idx = batch_order(len(train_set), cfg.batch_size, cfg.seed, step)
        batch: Batch = task.make_batch([train_set[i] for i in idx], pad).to(cfg.device)
        return lambda: task.objective(model, batch, cfg.objective)

    def after_step(done: int, loss: float) -> None:
        metrics = None
        if eval_batches and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
            metrics = evaluate(done)
        size = os.path.getsize(cfg.out)
        lr = opt.rule.lr_at(done - 1)
        _log(log, {"event": "step", "step": done, "loss": loss, "lr": lr, "trajectory_bytes": size,
                   "elapsed_s": round(time.monotonic() - started, 3)})
        if on_step is not None:
            on_step(StepReport(done, cfg.steps, loss, lr, size, metrics))

    if eval_batches and start == 0:
        evaluate(0)
    interrupted = fit(opt, cfg.steps, closure_for, after_step=after_step)
    if evals and not all(math.isfinite(v) for v in evals[-1][1].values()):
        raise MezoReplayError("evaluation is not finite: lower --lr")
    return TrainResult(cfg.out, base, model, opt, evals, start, interrupted)


def _log(stream: IO[str] | None, record: dict[str, Any]) -> None:
    if stream is not None:
        stream.write(json.dumps(record) + "\n")
        stream.flush()


def relpath(p: Path) -> str:
    """A path as short as it can be written from the current directory (for printed commands)."""
    try:
        rel = os.path.relpath(p)
        return rel if len(rel) < len(str(p)) else str(p)
    except ValueError:
        return str(p)
