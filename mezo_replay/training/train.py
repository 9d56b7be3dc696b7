"""A MeZO fine-tune of a Hugging Face language model (causal or masked), recorded as a trajectory, crash-safe and resumable.

The embedded default (`mezo-replay train` with no arguments) goes through exactly this path with the
tiny model and task that ship in mezo_replay/embedded, so the default run proves the real one.

Crash safety comes from the file format (append-only, checksummed chunks, flushed every
`flush_every` steps) and from stopping only between steps: SIGINT and SIGTERM set a flag that the loop
reads after each step, so the weights in memory always equal a replay of the recorded steps (once a
pending update is settled, which stopping does), and the
final fingerprint can be written. A resumed run replays the recorded steps onto the base, checks them,
and continues with the same batches (data.batch_order is a pure function of seed and step), so it ends
on the same bytes as a run that was never interrupted.

With `peft` (peft_tuning.py) the tuned tensors are a peft adapter's (LoRA, prefix), starting from values the
seed regenerates: the base weights never change, no base copy is made, and the trajectory rebuilds into an
adapter without the base; a resume replays onto the regenerated start instead of the base.

With `shard` (under torchrun) the model is FSDP2's (shards.shard_model): every rank still takes its share of
each batch as in data parallel, but holds only its dim-0 shard of each parameter, and MeZO's passes run over
those shards at their global element offsets, so the trajectory is the same ordinary file a data-parallel
run writes (`parallel` `shard` instead of `data`) and rebuilds on one device to the gathered weights.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import signal
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import torch

from .. import embedded
from . import distributed
from .data import Batch, DataError, Encoded, batch_order
from .data_parallel import PeerLost, all_or_none, any_stop, batch_loss, everywhere, gather_object, talking
from .distributed import World
from .defaults import MEZO_DEFAULTS
from ..errors import CorruptChunkError, MezoReplayError
from ..format.filelock import FileLock
from ..format.fingerprint import DTYPE_NAMES, checkpoint_fingerprint
from ..hub.fetch import resolve_model
from ..format.mzt import TrajectoryWriter, read_trajectory
from .optimizer import MeZO
from .peft_tuning import PeftOptions, PeftSetup, same_dropout, wrap
from .shards import shard_model
from ..arithmetic.rule import Schedule
from ..format.safetensors_io import BaseCheckpoint
from ..kernels.steps import replay_tensor_, step_constants
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
    grad_codec: str = "bf16"  # how step records hold the projected gradient: bf16, fp8 or sign (spec/rule.md)
    grad_scale: float | None = None  # fp8 and sign: a power of two (None: 1)
    optimizer: str = "mezo-sgd"  # the rule: mezo-sgd, mezo-momentum or mezo-momentum-buffer (spec/momentum.md)
    momentum: float = 0.9  # mezo-momentum's beta
    momentum_window: int = 16  # mezo-momentum's K: the records each step's average spans
    perturbations: int = 1  # n-SPSA (spec/nspsa.md): N perturbations a step, mezo-sgd only
    beta2: float = 0.999  # mezo-adam(-buffer)'s beta2 (spec/adam.md; momentum is its beta1)
    adam_eps: float = 1e-8  # mezo-adam(-buffer)'s delta
    layerwise: str = "none"  # none, perturbation, step or both: per-tensor exponents from the base (spec/layerwise.md)
    layerwise_blocks: str = "tensor"  # tensor, or layer: one exponent per decoder layer, from all its tensors
    tune: Sequence[str] = ()
    freeze: Sequence[str] = ()
    eval_every: int = 0
    eval_batch_size: int = 64
    flush_every: int = 256
    record_losses: bool = True  # False: no `loss` chunks (a smaller file; replay does not need them)
    compact: bool = True  # merge the per-flush chunks when the run ends (format/compact.py)
    resume: bool = False
    overwrite: bool = False
    device: str = "cpu"
    config: Path | None = None  # the config/tokenizer folder of a bare .safetensors model
    metadata: dict[str, str] = field(default_factory=dict)
    checkpoint_every: int = 0  # also record a checkpoint fingerprint every N steps (besides each evaluation)
    allow_new_tensors: bool = False  # store new tensors beyond a small head (e.g. a base of another layout)
    peft: PeftOptions | None = None  # tune a peft adapter (LoRA, prefix) instead of the model's own weights
    shard: bool = False  # under torchrun: FSDP2, each rank holding a shard of every parameter (shards.py)
    offload: str | None = None  # with shard: "cpu", FSDP2's CPUOffloadPolicy


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
    base: Path  # the checkpoint the trajectory replays onto; for a PEFT run the model the adapter goes on
    model: Any
    optimizer: MeZO
    evals: list[tuple[int, dict[str, float]]]
    resumed_from: int
    interrupted: bool
    peft: PeftSetup | None = None
    world: World = field(default_factory=World)  # this process's rank; only rank 0 wrote the trajectory


def load_model(path: Path, dtype: str, device: str, labels: Sequence[str] | None = None,
               seed: int = 0, mapped: bool = False) -> tuple[Any, Any, bool]:
    """(model, tokenizer, masked): a causal LM, a masked LM when the folder's config says so, or, with
    `labels`, a sequence classifier whose new head is initialised from `seed`.

    mapped (CPU, for --shard): the parameters stay memory-mapped from the safetensors file where
    from_pretrained left them so (not when it had to cast them), so that sharding then reads only this
    rank's rows of each tensor: the process never holds the whole model in its own memory."""
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
        in_memory_(model, buffers_only=mapped)
    return model, tokenizer, masked


@torch.no_grad()
def in_memory_(model: Any, buffers_only: bool = False) -> None:
    """Copies every parameter and buffer into ordinary memory. from_pretrained leaves CPU weights
    memory-mapped from the safetensors file, so the first forward passes page the checkpoint in from
    disk, tensor by tensor (9x slower than later ones on SmolLM2-135M from a cold disk, issue 14):
    that cost would land inside the first training steps and the first evaluation. Copying pays it
    here, as one sequential read. `p.data = ...` keeps tied weights tied (they share one Parameter).
    buffers_only: the parameters stay mapped (load_model's `mapped`)."""
    for p in () if buffers_only else model.parameters():
        p.data = p.data.clone()
    for b in model.buffers():
        b.data = b.data.clone()


def prepare_base(folder: Path, weights: Path, dtype: str, out: Path, overwrite: bool, write: bool = True) -> Path:
    """The checkpoint the trajectory's base is: the model's own weights (folder or file) when they are
    stored in the training dtype, otherwise a copy of them cast to that dtype (round to nearest even, as
    from_pretrained casts), saved beside the trajectory with the folder's config and tokenizer.
    write=False only names it (the ranks other than rank 0, which writes it)."""
    from safetensors.torch import save_file

    stored = BaseCheckpoint.open(weights)
    floats = ("F32", "BF16", "F16")
    wanted = DTYPE_NAMES[DTYPES[dtype]]
    if all(e.dtype == wanted for e in stored.entries.values() if e.dtype in floats):
        return weights
    base_dir = out.with_name(f"{out.stem}.base-{dtype}")
    if not write:
        return base_dir
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


def checkpoint_names(model: Any, stored: Collection[str]) -> dict[str, str]:
    """Parameter name -> the key the base checkpoint stores it under (spec/selection.md names tensors by
    their keys in the base). Matches keys as transformers does when it loads a checkpoint: a task model
    (`bert.encoder...`) from a headless one saved without the base-model prefix (`encoder...`), and the
    reverse. Parameters the base lacks keep their name, without the prefix if the base has none, so the
    output of a reconstruction is named consistently."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    lead = prefix + "."
    headless = bool(prefix) and not any(k.startswith(lead) for k in stored)
    out: dict[str, str] = {}
    for name, _ in model.named_parameters():
        if name in stored or not prefix:
            key = name
        elif name.startswith(lead) and name[len(lead):] in stored:
            key = name[len(lead):]
        elif lead + name in stored:
            key = lead + name
        else:
            key = name[len(lead):] if headless and name.startswith(lead) else name
        out[name] = key
    if len(set(out.values())) != len(out):
        seen: dict[str, str] = {}
        for name, key in out.items():
            if key in seen:
                raise MezoReplayError(f"parameters {seen[key]!r} and {name!r} both map to {key!r} in the base")
            seen[key] = name
    return out


def head_parameters(model: Any) -> set[str]:
    """Names of the parameters outside the model's base model: the task head (classifier, score) that a
    task model adds on top of a checkpoint."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix or getattr(model, prefix, None) is None:
        return set()
    return {n for n, _ in model.named_parameters() if not n.startswith(prefix + ".")}


NEW_TENSOR_SHARE = 0.05  # new tensors beyond the head, as a share of the model's parameters, stored unasked


def new_tensors(opt: MeZO, base: Path, allowed: bool, *, head: Collection[str] = (), model_elements: int = 0,
                allow_large: bool = False) -> list[str]:
    """Tuned parameters the base lacks: a classifier's new head (allowed), or a naming problem (not).

    New tensors travel whole in the trajectory, so a base whose names do not match (another layout, a
    wrong checkpoint) would silently turn a kilobyte trajectory into a copy of the model. Beyond the
    head, at most NEW_TENSOR_SHARE of the model's parameters (e.g. BERT's pooler, which masked-LM
    checkpoints lack) are stored unless `allow_large`."""
    entries = BaseCheckpoint.open(base).entries
    missing = [n for n in opt.names if n not in entries]
    if missing and not allowed:
        raise MezoReplayError(f"parameter {missing[0]!r} is not stored under that name in {base}; "
                              f"reconstruct could not find it")
    sizes = {n: p.numel() * p.element_size() for n, p in zip(opt.names, opt.params)}
    counts = {n: p.numel() for n, p in zip(opt.names, opt.params)}
    extra = sum(counts[n] for n in missing if n not in head)
    total = model_elements or sum(counts.values())
    if missing and not allow_large and extra > NEW_TENSOR_SHARE * total:
        listed = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise MezoReplayError(
            f"{len(missing)} tuned tensors ({sum(counts[n] for n in missing):,} parameters, "
            f"{sum(sizes[n] for n in missing):,} bytes) are not in the base {base} and would be stored whole "
            f"in the trajectory: {listed}; only a small new head is expected (check --model), or pass "
            f"--allow-new-tensors to store them anyway")
    return missing


# Header facts that decide what the steps are, by the option that sets them. Metadata keys come from
# train() (spec/metadata.md); the others are paths into the generator, noise and rule objects.
STEP_SETTINGS = {
    "task": "--task", "objective": "--objective", "batch_size": "--batch-size", "max_length": "--max-length",
    "dtype": "--dtype", "template": "--template", "label_words": "--label-words", "label_key": "--label-key",
    "text_key": "--text-key", "prompt_key": "--prompt-key", "completion_key": "--completion-key",
    "labels": "--data (its labels)", "examples": "--data (its number of examples)",
    "train_data_sha256": "--data (its contents)",
    "generator.seed": "--seed", "noise.name": "--noise", "rule.lr": "--lr", "rule.eps": "--eps",
    "rule.schedule.name": "--schedule", "rule.schedule.warmup_steps": "--warmup-steps",
    "rule.schedule.total_steps": "--steps (the schedule's length)", "rule.weight_decay": "--weight-decay",
    "rule.grad_encoding": "--grad-codec", "rule.grad_scale": "--grad-scale", "rule.name": "--optimizer",
    "rule.momentum": "--momentum", "rule.window": "--momentum-window", "rule.perturbations": "--perturbations",
    "rule.beta1": "--momentum", "rule.beta2": "--beta2", "rule.adam_eps": "--adam-eps",
    "layerwise": "--layerwise", "layerwise_blocks": "--layerwise-blocks",
    "peft": "--peft", "lora_r": "--lora-r", "lora_alpha": "--lora-alpha", "lora_dropout": "--lora-dropout",
    "lora_targets": "--lora-targets", "num_virtual_tokens": "--num-virtual-tokens",
}
_SHAPES_DATA = {"task", "max_length", "template", "label_words", "label_key", "text_key", "prompt_key",
                "completion_key", "labels", "examples"}  # settings the encoded training set depends on
_PEFT_KEYS = {"peft", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "num_virtual_tokens"}
_LATER_KEYS = {"dtype", "train_data_sha256"}  # not recorded by earlier versions: compared only when present


def setting_differences(old: Mapping[str, Any], fresh: Mapping[str, Any],
                        where: tuple[str, str] = ("there", "now")) -> list[str]:
    """'OPTION OLD there, NEW now' for every recorded setting that affects the steps and differs
    (`where` names the two sides: ranks compare theirs with rank 0's)."""
    found: list[tuple[str, Any, Any]] = []
    old_meta, new_meta = old.get("metadata", {}), fresh.get("metadata", {})
    for key in STEP_SETTINGS:
        if "." in key:
            continue
        if key in _LATER_KEYS and key not in old_meta:
            continue
        if old_meta.get(key) != new_meta.get(key):
            found.append((key, old_meta.get(key), new_meta.get(key)))
    changed = {k for k, _, _ in found}
    if changed & {"task", "template"}:  # another task reads other columns; a template replaces one
        own = _SHAPES_DATA - {"task", "max_length", "examples", "template"} if "task" in changed else \
            {"text_key", "prompt_key"}
        found = [d for d in found if not (d[0] in own and None in d[1:])]
    if len(found) > 1 and found[-1][0] == "train_data_sha256" and any(k in _SHAPES_DATA for k, _, _ in found):
        found.pop()  # the encoded data differs because of a setting already named
    found = [(k, a[:12] + "...", b[:12] + "...") if k == "train_data_sha256" and a and b else (k, a, b)
             for k, a, b in found]
    for part in ("generator", "noise", "rule"):
        diffs = _differences(_filled(old[part]), _filled(fresh[part]))
        named = [d for d in diffs if d[0] == "name"]  # another sampler or rule: its own keys follow from it
        found += [(f"{part}.{k}", a, b) for k, a, b in (named or diffs)]
    if any(k == "peft" for k, _, _ in found):  # another kind of adapter, or none: its own keys follow from it
        found = [d for d in found if d[0] == "peft" or d[0] not in _PEFT_KEYS]
    if not any(k in _PEFT_KEYS for k, _, _ in found):  # the adapter's own settings, if no option named them
        old_cfg = {k: v for k, v in (old.get("peft") or {}).get("adapter_config", {}).items() if k != "peft_version"}
        new_cfg = {k: v for k, v in (fresh.get("peft") or {}).get("adapter_config", {}).items() if k != "peft_version"}
        found += [(f"adapter config {k}", a, b) for k, a, b in _differences(old_cfg, new_cfg)]
    there, now = where
    out = [f"{STEP_SETTINGS.get(k, k)} {_shown(a, b)} {there}, {_shown(b, a)} {now}" for k, a, b in found]
    old_names, new_names = [t["name"] for t in old["tensors"]], [t["name"] for t in fresh["tensors"]]
    if old_names != new_names and not any(k == "peft" for k, _, _ in found):  # else the adapter explains it
        out.append(f"--tune/--freeze: {len(old_names)} tuned tensors {there}, {len(new_names)} {now}")
    elif old_names == new_names and not any(k == "layerwise" for k, _, _ in found):  # the recorded exponents
        exps = [[(t.get("perturb_exp", 0), t.get("step_exp", 0)) for t in h["tensors"]] for h in (old, fresh)]
        if exps[0] != exps[1]:
            out.append(f"--layerwise: other per-tensor exponents {there} than {now}")
    return out


def _filled(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A header object with the schedule's omitted zeros written out, so only real differences show."""
    out = dict(obj)
    if isinstance(out.get("schedule"), dict):
        out["schedule"] = {"warmup_steps": 0, "total_steps": 0, **out["schedule"]}
    return out


def _shown(value: Any, other: Any = None) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, float):  # recorded values are rounded to fewer bits: 4 digits show what was typed
        short = f"{value:.4g}"
        return repr(value) if isinstance(other, float) and short == f"{other:.4g}" else short
    text = str(value)
    return text if text and not any(c.isspace() or c in "'\"" for c in text) else repr(text)


def _resume(opt: MeZO, path: Path, flush_every: int, fresh: Mapping[str, Any] | None = None) -> int:
    """Holds the file's writer lock from before reading it until the run ends, so a second writer (another
    --resume, a train --overwrite) fails at once instead of interleaving chunks; points a damaged file to
    `mezo-replay repair`."""
    lock = FileLock.acquire(path)
    try:
        return _resume_locked(opt, path, flush_every, lock, fresh)
    except CorruptChunkError as e:
        lock.release()
        raise MezoReplayError(f"--resume: {e}; `mezo-replay repair {path}` copies them to a new file that "
                              f"--resume continues") from None
    except BaseException:
        lock.release()
        raise


def _resume_locked(opt: MeZO, path: Path, flush_every: int, lock: FileLock,
                   fresh: Mapping[str, Any] | None = None) -> int:
    """Replays the trajectory's steps onto the optimizer's (base) weights, checks them, and reopens the
    file for appending. Refuses a trajectory from another base or with any setting that changes the
    steps (`fresh`: the header this run would write), naming every difference in one line."""
    traj = read_trajectory(path)
    _check_resumable(traj, path, fresh if fresh is not None else opt.header())
    n = traj.steps
    _replay_recorded(opt, traj.grad_bits)
    expected = traj.fingerprints.get(n)
    fps = opt.fingerprints() if expected is not None or n in traj.checkpoints else []
    _check_replayed(traj, path, opt.names, fps)
    opt.attach(TrajectoryWriter.open_append(path, steps_per_chunk=flush_every, lock=lock), n)
    return n


def _resume_ranks(opt: MeZO, path: Path, flush_every: int, fresh: Mapping[str, Any], world: World) -> int:
    """--resume under torchrun. Rank 0 locks, reads and checks the file and sends its step records to every
    rank; every rank replays them onto its replica; rank 0 checks the result against the file's
    fingerprints and reopens it for appending, and all ranks agree they hold the same weights. Only rank 0
    touches the file (it may be on rank 0's disk alone), so a resume may use another number of ranks."""
    lock: FileLock | None = None
    traj = None
    try:
        with all_or_none(world):
            if world.main:
                lock = FileLock.acquire(path)
                traj = read_trajectory(path)
                _check_resumable(traj, path, fresh)
        with talking():
            bits = distributed.broadcast(traj.grad_bits if traj is not None else None, world)
        _replay_recorded(opt, bits)
        fps = opt.fingerprints()
        with all_or_none(world):
            if traj is not None:
                _check_replayed(traj, path, opt.names, fps)
        _agree("weights after replaying the recorded steps", fps, world)
        n = len(bits)
        if lock is not None:
            opt.attach(TrajectoryWriter.open_append(path, steps_per_chunk=flush_every, lock=lock), n)
        else:
            opt.step_count = n  # no writer on this rank: it only takes the steps
        return n
    except BaseException as e:
        if lock is not None:
            lock.release()
        if isinstance(e, CorruptChunkError):
            raise everywhere(MezoReplayError(f"--resume: {e}; `mezo-replay repair {path}` copies them to a new "
                                             f"file that --resume continues")) from None
        raise


def _check_resumable(traj: Any, path: Path, fresh: Mapping[str, Any]) -> None:
    """Refuses a trajectory from another base or with any setting that changes the steps (`fresh`: the
    header this run would write), naming every difference in one line."""
    old = traj.header
    if diffs := setting_differences(old, fresh):
        raise MezoReplayError(f"--resume refused: {path} was recorded with other settings: " + "; ".join(diffs))
    if [t["sha256"] for t in old["tensors"]] != [t["sha256"] for t in fresh["tensors"]] or \
            [t.get("decay") for t in old["tensors"]] != [t.get("decay") for t in fresh["tensors"]]:
        raise MezoReplayError(f"--resume refused: the model is not the base {path} was trained from "
                              f"(fingerprint mismatch)")
    if (old.get("peft") or {}).get("base_weights") != (fresh.get("peft") or {}).get("base_weights"):
        raise MezoReplayError(f"--resume refused: the model is not the one {path}'s adapter was trained on "
                              f"(peft.base_weights fingerprint mismatch)")


def _replay_recorded(opt: MeZO, grad_bits: Any) -> None:
    """Applies recorded steps to the optimizer's (base) weights, as reconstruct would."""
    constants = step_constants(opt.rule, grad_bits)
    tensors, starts = opt.local_tensors()
    for k, t in enumerate(tensors):
        replay_tensor_(t, opt.rule, k, constants, decay=opt.decay[k], start=starts[k] if starts else 0,
                       state=opt.states[k] if opt.states else None)  # mezo-momentum-buffer: its m too
    opt.load_history(grad_bits)  # mezo-momentum: the next steps' terms reach back into these records


def _check_replayed(traj: Any, path: Path, names: Sequence[str], fps: Sequence[str]) -> None:
    """The replayed weights' fingerprints `fps` against those the file holds for its last step (if any)."""
    n = traj.steps
    expected = traj.fingerprints.get(n)
    if (expected is not None and expected != list(fps)) or \
            (n in traj.checkpoints and traj.checkpoints[n] != checkpoint_fingerprint(names, fps)):
        raise MezoReplayError(f"--resume: replaying {path} does not reproduce its fingerprint at step {n}")


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


def record_checkpoint(opt: MeZO) -> None:
    """Record the checkpoint fingerprint of the weights as they are now (format.md `ckpt`), so that
    `reconstruct --step N` can verify this step. Costs one pass of SHA-256 over the tuned tensors."""
    if opt.sharded and opt.step_count:  # a collective: every rank computes, rank 0 writes
        fps = opt.fingerprints()
        if opt.writer is not None:
            opt.writer.add_checkpoint(opt.step_count, checkpoint_fingerprint(opt.names, fps))
    elif opt.writer is not None and opt.step_count:
        opt.writer.add_checkpoint(opt.step_count, checkpoint_fingerprint(opt.names, opt.fingerprints()))


# Devices on which fit queues steps (MeZO.queue_step) where nothing reads the weights in between: there a
# host read drains the device's queue, so the next forward's launches would start on an idle device. On the
# CPU a read costs nothing, and step()'s one read per step is simpler. (Tests add "cpu" to cover the logic.)
QUEUED_DEVICES = {"cuda"}


def fit(opt: MeZO, steps: int, closure_for: Callable[[int], Callable[[], torch.Tensor | float]], *,
        after_step: Callable[[int, float], None] | None = None,
        checkpoint_every: int | Callable[[int], bool] = 0,
        reads_weights: bool | Callable[[int], bool] = True, world: World | None = None) -> bool:
    """Runs `opt` from its current step to `steps`, then closes it (writing the final fingerprint).

    The loop `mezo-replay train` uses, for people who bring their own model and data: `closure_for(t)`
    returns the closure of step t (the loss on step t's batch); `after_step(done, loss)` runs after each
    step. SIGINT and SIGTERM stop it cleanly between steps, so the trajectory always ends complete and
    verifiable; returns True if a signal stopped it. A second Ctrl-C interrupts mid-step: the recorded
    steps stay valid, but no final fingerprint is written for half-stepped weights.

    `checkpoint_every` (N, or a predicate of the step count) records a checkpoint fingerprint after
    those steps (not the last: the final fingerprint covers it), so they can be rebuilt verified.

    `reads_weights` (a bool, or a predicate of `done`) says whether anything between step `done` and the
    next reads the weights: after_step(done, loss) evaluating or saving the model, or closure_for(done).
    Where nothing does, the step's update is left pending and the next step applies it in its first
    pass (MeZO.step(settle=False)): two passes over the weights per step instead of three, with the same
    trajectory. Checkpoints, a stop and the end settle it. The default (True) settles every step, as
    fit always did, since it cannot know what the callbacks read. On a GPU such steps are also queued
    (MeZO.queue_step): the host never waits for the device, and after_step(done, loss) is called during
    step done+1, once that step's work is queued.

    `world` (data parallel, see data_parallel.py): a signal to any rank stops every rank after the same
    step, and a rank that is lost (PeerLost) ends the run like a second Ctrl-C: the recorded steps stay
    valid, with no final fingerprint (the weights may be half-stepped), and --resume continues them.
    """
    world = world if world is not None else World()
    due = checkpoint_every if callable(checkpoint_every) else (
        lambda done: bool(checkpoint_every) and done % checkpoint_every == 0)
    reads = reads_weights if callable(reads_weights) else (lambda done: bool(reads_weights))
    devices = {p.device for p in opt.params}  # one device: c and go live there, where every kernel reads them
    # mezo-momentum steps are never queued: their terms come from the host's records
    queues = len(devices) == 1 and next(iter(devices)).type in QUEUED_DEVICES and not opt.rule.stateful
    queues = queues and opt.rule.perturbations == 1  # n-SPSA steps neither: step() takes them

    def report(done: int, loss: float) -> None:
        if after_step is not None:
            after_step(done, loss)
        if done < steps and due(done):
            record_checkpoint(opt)  # fingerprints() settles

    interrupted = False
    try:
        with _stop_on_signals() as stop:
            for step in range(opt.step_count, steps):
                done = step + 1
                if queues and not reads(done):
                    # a step the host never waits for; its report comes one step late (it reads no weights)
                    earlier = opt.queue_step(closure_for(step))
                    if earlier is not None:
                        report(*earlier)
                    stopping = any_stop(stop.set, world)
                    if not (stopping or done == steps or (done < steps and due(done))):
                        continue
                    report(*opt.flush())  # type: ignore[misc]  # a queued step always leaves a record
                else:
                    if (earlier := opt.flush()) is not None:
                        report(*earlier)
                    report(done, opt.step(closure_for(step), settle=reads(done)))
                    stopping = any_stop(stop.set, world)
                if stopping:
                    interrupted = True
                    break  # close() below settles
    except (KeyboardInterrupt, PeerLost):
        with suppress(Exception):
            opt.flush()  # the last queued step is complete: its record belongs in the file
        opt.abandon()  # no final fingerprint: nor, sharded, its collectives with ranks that may be gone
        raise
    finally:
        opt.close()
    return interrupted


def train(cfg: TrainConfig, on_step: Callable[[StepReport], None] | None = None,
          log: IO[str] | None = None) -> TrainResult:
    """Runs MeZO until cfg.steps steps are recorded; returns with a complete, verifiable trajectory.

    Launched by torchrun (several ranks), it trains data parallel: every rank joins the process group,
    holds the model and takes its share of every batch (data_parallel.py); rank 0 alone writes the
    trajectory, the log and calls `on_step`. The group is left at the end if this call joined it."""
    torch.set_flush_denormal(False)  # the spec's arithmetic keeps subnormals
    joins = distributed.launched() and not (torch.distributed.is_available() and torch.distributed.is_initialized())
    world, device = distributed.init(cfg.device)
    try:
        if not world.distributed:
            return _train(cfg, world, on_step, log)
        return _train(replace(cfg, device=device), world, on_step if world.main else None,
                      log if world.main else None)
    finally:
        if joins:
            with suppress(Exception):  # after a lost rank the group may be half gone
                distributed.finish()


def _train(cfg: TrainConfig, world: World, on_step: Callable[[StepReport], None] | None,
           log: IO[str] | None) -> TrainResult:
    with all_or_none(world):  # a refusal on any rank stops every rank here, with one line from rank 0
        _check_shard(cfg, world)
        if world.distributed and cfg.batch_size < world.size:
            raise MezoReplayError(f"--batch-size {cfg.batch_size} is less than the {world.size} processes: data "
                                  f"parallel training gives each process at least one example of every batch")
        if world.main:  # the file is rank 0's alone (the others may not even see it)
            if cfg.resume and not cfg.out.exists():
                raise MezoReplayError(f"--resume {cfg.out}: no such file")
            if not cfg.resume and cfg.out.exists() and not cfg.overwrite:
                raise MezoReplayError(f"{cfg.out} exists: pass --overwrite to replace it, or --resume to continue it")
            if cfg.out.exists() and (busy := FileLock.probe(cfg.out)) is not None:
                raise busy  # another process is writing it: fail before loading anything
        if not cfg.train_examples:
            raise DataError("the training set is empty")
        check_objective(cfg.task, cfg.objective)
        if cfg.peft is not None:
            if cfg.tune or cfg.freeze:
                raise MezoReplayError(f"--peft {cfg.peft.kind} tunes the adapter's parameters only: --tune/--freeze "
                                      f"choose among the model's own weights and cannot be combined with it")
            cfg.peft.check()
        src = resolve_model(embedded.local_path(cfg.model), cfg.config)
        source = embedded.portable_name(src.path) or src.source  # never the package's absolute path
        labels = None
        if cfg.task == "classify-head":
            key = cfg.task_options.get("label_key", "label")
            if not all(key in ex for ex in cfg.train_examples):
                raise DataError(f"classify-head: some training examples have no {key!r} column")
            labels = sorted({str(ex[key]) for ex in cfg.train_examples})
        # --shard loads onto the CPU, memory-mapped: fully_shard moves each layer to the device as it shards it, so
        # no device ever holds the whole model (loading onto the GPU first would need it to fit there)
        model, tokenizer, masked = load_model(src.path, cfg.dtype, "cpu" if cfg.shard else cfg.device, labels,
                                              cfg.seed, mapped=cfg.shard)
        check_template_fits_model(cfg.task_options.get("template"), cfg.task, masked,
                                  [*cfg.train_examples, *cfg.eval_examples], source)
        task: Task = make_task(cfg.task, tokenizer=tokenizer, max_length=cfg.max_length, masked=masked,
                               labels=labels, **cfg.task_options)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        train_set = task.encode(tokenizer, cfg.train_examples)
        eval_set = task.encode(tokenizer, cfg.eval_examples) if cfg.eval_examples else []
        eval_batches = [task.make_batch(eval_set[i:i + cfg.eval_batch_size], pad)
                        for i in range(0, len(eval_set), cfg.eval_batch_size)]
        schedule = Schedule(cfg.schedule, cfg.warmup_steps, cfg.steps if cfg.schedule != "constant" or
                            cfg.warmup_steps else 0)
        stored = BaseCheckpoint.open(src.weights)
        keys = checkpoint_names(model, stored.entries)  # a cast copy keeps the names
        config = None
        if labels is not None:  # the classifier's config, so a rebuilt folder loads as the classifier
            config = json.loads(model.config.to_json_string())
            config["architectures"] = [type(model).__name__]
        adapter: PeftSetup | None = None
        extra: dict[str, Any] = {}
        if cfg.peft is not None:
            head = head_parameters(model)
            absent = {n.rsplit(".", 1)[0] for n in keys if keys[n] not in stored.entries and n not in head}
            adapter = wrap(model, cfg.peft, task=cfg.task, masked=masked, seed=cfg.seed, extra_modules=absent)
            model = adapter.model
            named: Iterator[tuple[str, Any]] = iter(adapter.params.items())
            extra = {"peft": {"adapter_config": adapter.adapter_config,
                              "base_weights": stored.weights_fingerprint()}}
        else:
            select_parameters(model, cfg.tune, cfg.freeze)
    if world.distributed:  # before the ranks part ways: sharded ranks run collectives the others would not
        _agree_layout(world, cfg)
    with all_or_none(world):
        if cfg.shard:
            model = shard_model(model, cfg.device, offload=cfg.offload == "cpu")
        if adapter is None:
            named = ((keys[n], p) for n, p in model.named_parameters())
        opt = MeZO(named, lr=cfg.lr, eps=cfg.eps, seed=cfg.seed, noise=cfg.noise, schedule=schedule.validated(),
                   weight_decay=cfg.weight_decay, grad_codec=cfg.grad_codec, grad_scale=cfg.grad_scale,
                   rule=cfg.optimizer, momentum=cfg.momentum, momentum_window=cfg.momentum_window,
                   perturbations=cfg.perturbations, beta2=cfg.beta2, adam_eps=cfg.adam_eps,
                   layerwise=cfg.layerwise, layerwise_blocks=cfg.layerwise_blocks)
        if adapter is not None:
            added: Mapping[str, Any] | list[str] = adapter.inits
        else:
            added = new_tensors(opt, src.weights, allowed=labels is not None,
                                head={keys[n] for n in head_parameters(model)},
                                model_elements=sum(p.numel() for p in model.parameters()),
                                allow_large=cfg.allow_new_tensors)
        parallel = {"world_size": str(world.size), "parallel": "shard" if cfg.shard else "data"} \
            if world.distributed else {}
        meta = {"task": cfg.task, "objective": cfg.objective, "batch_size": str(cfg.batch_size),
                "max_length": str(cfg.max_length), "examples": str(len(train_set)), **task.metadata(),
                "dtype": cfg.dtype, "train_data_sha256": data_fingerprint(train_set),
                "base_model": source + (f"@{src.revision}" if src.revision else ""),
                **(adapter.metadata() if adapter is not None else {}), **parallel,
                **({"layerwise": cfg.layerwise} if cfg.layerwise != "none" else {}),
                **({"layerwise_blocks": cfg.layerwise_blocks}
                   if cfg.layerwise != "none" and cfg.layerwise_blocks != "tensor" else {}), **cfg.metadata}
        # the header this run would write: what a resume compares with the file's, and the ranks with each other
        fresh = opt.header(metadata=meta, new_tensors=added, config=config, extra=extra) \
            if cfg.resume or world.distributed else None
    if fresh is not None:
        _agree_run(world, fresh, {"steps": cfg.steps, "resume": cfg.resume})
    if cfg.resume:
        assert fresh is not None
        if world.distributed:
            start = _resume_ranks(opt, cfg.out, cfg.flush_every, fresh, world)
        else:
            start = _resume(opt, cfg.out, cfg.flush_every, fresh)
        if opt.writer is not None:
            opt.writer.compact = cfg.compact
        if start >= cfg.steps:
            if opt.writer is not None:
                writer, opt.writer = opt.writer, None
                writer.close(compact=False)  # unlocks; writes nothing, not even a second final fingerprint
            raise everywhere(MezoReplayError(f"--resume: {cfg.out} already holds {start} steps (--steps {cfg.steps})"))
        with all_or_none(world):
            # after the checks: nothing if refused. An adapter needs no base copy: it rebuilds from the file
            # alone, and goes onto the original model (the one its adapter_config names), cast as it loads.
            base = src.path if adapter is not None else \
                prepare_base(src.path, src.weights, cfg.dtype, cfg.out, True, write=world.main)
    else:
        start = 0
        with all_or_none(world):
            base = src.path if adapter is not None else \
                prepare_base(src.path, src.weights, cfg.dtype, cfg.out, cfg.overwrite, write=world.main)
            same = adapter is not None or base == src.weights  # else: a copy cast to the training dtype, named
            # by its path from the trajectory's folder (it is saved beside it), which stays true when both move
            if world.main:
                opt.record(cfg.out, overwrite=cfg.overwrite, steps_per_chunk=cfg.flush_every, compact=cfg.compact,
                           base_source=source if same else os.path.relpath(base, cfg.out.parent),
                           base_revision=src.revision if same else None, metadata=meta, new_tensors=added,
                           record_losses=cfg.record_losses, config=config, extra=extra)

    def evaluate(step: int) -> dict[str, float]:
        """Every rank evaluates the whole eval set (the replicas are equal, and no rank waits for another
        here); rank 0 records it."""
        opt.settle()  # the model must hold its weights, not a pending step's perturbation
        with talking() if cfg.shard else nullcontext():  # sharded forwards gather from every rank
            metrics = task.evaluate(model, eval_batches)
        if opt.writer is not None:
            opt.writer.add_eval(step, "eval", metrics)
        evals.append((step, metrics))
        _log(log, {"event": "eval", "step": step, **metrics})
        return metrics

    evals: list[tuple[int, dict[str, float]]] = []
    started = time.monotonic()

    def closure_for(step: int) -> Callable[[], torch.Tensor]:
        idx = batch_order(len(train_set), cfg.batch_size, cfg.seed, step)
        if world.distributed:
            idx = idx[distributed.share(len(idx), world)]  # this rank's rows; the loss is the whole batch's
        batch: Batch = task.make_batch([train_set[i] for i in idx], pad).to(cfg.device)

        def loss() -> torch.Tensor:
            if cfg.shard:  # a lost rank fails the forward's gathers, not only the combine
                with talking():
                    return batch_loss(task, model, batch, cfg.objective, world)
            if world.distributed:
                return batch_loss(task, model, batch, cfg.objective, world)
            return task.objective(model, batch, cfg.objective)

        if adapter is not None and cfg.peft is not None and cfg.peft.dropout:
            draw = step * world.size + world.rank  # each rank its own masks (spec/metadata.md)

            def dropped() -> torch.Tensor:
                with same_dropout(model, cfg.seed, draw):
                    return loss()
            return dropped
        return loss

    def eval_due(done: int) -> bool:
        return bool(eval_batches) and bool(cfg.eval_every) and done % cfg.eval_every == 0

    def checkpoint_due(done: int) -> bool:  # evaluated weights can be rebuilt and verified
        return eval_due(done) or bool(cfg.checkpoint_every) and done % cfg.checkpoint_every == 0

    def evaluates(done: int) -> bool:  # the steps after which after_step reads the weights
        return eval_due(done) or bool(eval_batches) and done == cfg.steps

    def after_step(done: int, loss: float) -> None:
        metrics = None
        if evaluates(done):
            metrics = evaluate(done)
        if not world.main:
            return
        size = os.path.getsize(cfg.out)
        lr = opt.rule.lr_at(done - 1)
        _log(log, {"event": "step", "step": done, "loss": loss, "lr": lr, "trajectory_bytes": size,
                   "elapsed_s": round(time.monotonic() - started, 3)})
        if on_step is not None:
            on_step(StepReport(done, cfg.steps, loss, lr, size, metrics))

    try:
        if eval_batches and start == 0:
            evaluate(0)
        interrupted = fit(opt, cfg.steps, closure_for, after_step=after_step, checkpoint_every=checkpoint_due,
                          reads_weights=lambda done: evaluates(done) or done == cfg.steps, world=world)
    except PeerLost as e:
        held = f"{relpath(cfg.out)} holds" if world.main else "rank 0's trajectory holds"
        raise PeerLost(f"rank {world.rank}: {e} after {opt.step_count} steps; {held} the steps recorded until "
                       f"then: --resume continues it, with any number of processes") from None
    except MezoReplayError as e:  # e.g. a non-finite loss: the losses are the same on every rank, so is this
        raise everywhere(e) if world.distributed else e
    if world.distributed and not cfg.shard:  # a guard: the replicas must have stayed equal, and rank 0 wrote
        # its own weights (sharded, the final fingerprint is already every rank's shards, streamed to rank 0)
        final = read_trajectory(cfg.out).final_fingerprint if world.main else opt.fingerprints()
        _agree("final weights", final, world)
    if evals and not all(math.isfinite(v) for v in evals[-1][1].values()):
        raise everywhere(MezoReplayError("evaluation is not finite: lower --lr"))
    return TrainResult(cfg.out, base, model, opt, evals, start, interrupted, adapter, world)


def _check_shard(cfg: TrainConfig, world: World) -> None:
    """What --shard and --offload need, refused in one line before anything loads."""
    if cfg.offload is not None and cfg.offload != "cpu":
        raise MezoReplayError(f"--offload {cfg.offload}: only cpu is supported (FSDP2's CPU offload)")
    if cfg.offload is not None and not cfg.shard:
        raise MezoReplayError("--offload cpu offloads FSDP2's shards: it needs --shard (under torchrun)")
    if not cfg.shard:
        return
    if not world.distributed:
        raise MezoReplayError("--shard splits the model over several processes: launch with torchrun, e.g. "
                              "torchrun --nproc-per-node 2 -m mezo_replay train --shard ...")
    if cfg.peft is not None:
        raise MezoReplayError(f"--shard with --peft {cfg.peft.kind} is not supported: an adapter is small, so "
                              f"train it data parallel (without --shard)")
    if cfg.task == "classify-head":
        raise MezoReplayError("--shard with --task classify-head is not supported: the new head is stored whole "
                              "in the trajectory, and no rank holds it whole")


def _agree_layout(world: World, cfg: TrainConfig) -> None:
    """Refuses, on every rank alike, unless every rank was started with rank 0's --shard and --offload."""
    mine: dict[str, Any] = {"--shard": cfg.shard, "--offload": cfg.offload}
    ranks = gather_object(mine, world)

    def shown(option: str, value: Any) -> str:
        return f"no {option}" if value in (None, False) else option if value is True else f"{option} {value}"
    for rank, other in enumerate(ranks[1:], 1):
        if diffs := [f"{shown(k, ranks[0][k])} on rank 0, {shown(k, other[k])} on rank {rank}"
                     for k in mine if other[k] != ranks[0][k]]:
            raise everywhere(MezoReplayError(
                f"rank {rank} was started differently from rank 0: {'; '.join(diffs)}: every process must run "
                f"the same command on the same model and data"))


def _agree_run(world: World, header: Mapping[str, Any], run: Mapping[str, Any]) -> None:
    """Refuses to start unless every rank would take the same steps from the same base: the header each
    rank would write (settings and base fingerprint) and `run` (what else makes ranks wait for each other)
    are compared with rank 0's; one line names the first rank that differs and how, on every rank."""
    if not world.distributed:
        return
    mine = {"header": header, **run}
    ranks = gather_object(mine, world)
    first = ranks[0]
    for rank, other in enumerate(ranks[1:], 1):
        where = ("on rank 0", f"on rank {rank}")
        diffs = setting_differences(first["header"], other["header"], where)
        if first["header"]["base"]["fingerprint"] != other["header"]["base"]["fingerprint"]:
            diffs.append(f"the base weights (fingerprint {first['header']['base']['fingerprint'][:12]}... "
                         f"{where[0]}, {other['header']['base']['fingerprint'][:12]}... {where[1]})")
        diffs += [f"--{k} {first[k]} {where[0]}, {other[k]} {where[1]}" for k in run if first[k] != other[k]]
        if diffs:
            raise everywhere(MezoReplayError(
                f"rank {rank} was started differently from rank 0: {'; '.join(diffs)}: every process must run "
                f"the same command on the same model and data"))
    _agree("settings", mine, world)  # whatever the comparison above does not name


def _agree(what: str, value: Any, world: World) -> None:
    """distributed.agree, its refusal printed once (it is raised on every rank alike)."""
    with talking():
        try:
            distributed.agree(what, value, world)
        except MezoReplayError as e:
            raise everywhere(e) from None


def data_fingerprint(encoded: Sequence[Encoded]) -> str:
    """SHA-256 of the encoded training examples in order (spec/metadata.md): what the steps' batches are
    drawn from, after template, label words, tokenizer and max length, so a resume can refuse other data."""
    h = hashlib.sha256(b"mezo-replay train data\0")
    for e in encoded:
        h.update(json.dumps([e.input_ids, e.labels, e.label], separators=(",", ":")).encode() + b"\n")
    return h.hexdigest()


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
