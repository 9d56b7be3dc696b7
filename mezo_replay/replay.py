"""Reconstruction: base checkpoint + trajectory -> the fine-tuned weights, streamed tensor by tensor.

Peak memory is about one tuned tensor (plus slice-sized temporaries), never the whole model: each tuned
tensor is read, checked against the fingerprint the trajectory recorded for the base, replayed through
every step, checked against the final fingerprint, and written; frozen tensors are copied as bytes.
The output appears only when everything matched (CheckpointWriter writes to a temporary sibling).
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MezoReplayError
from .fingerprint import DTYPE_NAMES, canonicalize_nan_, tensor_fingerprint
from .mzt import Trajectory, read_trajectory
from .rule import MezoSGD
from .safetensors_io import BaseCheckpoint, CheckpointWriter
from .steps import StepConstants, replay_tensor_, step_constants

Progress = Callable[[int], None]


class BaseMismatchError(MezoReplayError):
    """The base is not the one the trajectory was trained from."""


class VerificationError(MezoReplayError):
    """Replayed (or given) tensors differ from the fingerprints the trajectory recorded."""


@dataclass(frozen=True)
class ReplayPlan:
    """What a reconstruction will do, worked out (and the cheap checks done) before any heavy work."""

    base: BaseCheckpoint
    trajectory: Trajectory
    rule: MezoSGD
    steps: int
    names: list[str]
    expected: list[str] | None  # fingerprints recorded for `steps`, if any
    constants: list[StepConstants]  # (c, d) of each step, shared by every tensor

    @property
    def element_steps(self) -> int:
        return self.steps * sum(math.prod(self.base.entry(n).shape) for n in self.names)


def plan(base: str | os.PathLike[str] | BaseCheckpoint, trajectory: str | os.PathLike[str] | Trajectory,
         step: int | None = None) -> ReplayPlan:
    """Opens both inputs and checks names, dtypes, shapes and the step count; fingerprints come later."""
    traj = trajectory if isinstance(trajectory, Trajectory) else read_trajectory(trajectory)
    ckpt = base if isinstance(base, BaseCheckpoint) else BaseCheckpoint.open(base)
    steps = traj.steps if step is None else step
    if not 0 <= steps <= traj.steps:
        why = " (the file is truncated)" if traj.truncated else ""
        raise MezoReplayError(f"--step {steps} is beyond the {traj.steps} steps the trajectory holds{why}")
    names = []
    for t in traj.header["tensors"]:
        name = t["name"]
        if t.get("init"):  # a new tensor (e.g. a classifier head): its initial value is in the trajectory
            if name in ckpt.entries:
                raise BaseMismatchError(f"wrong base: {ckpt.path} already has {name!r}, which the trajectory "
                                        f"adds as a new tensor")
            names.append(name)
            continue
        if name not in ckpt.entries:
            raise BaseMismatchError(f"wrong base: tuned tensor {name!r} is not in {ckpt.path}")
        e = ckpt.entries[name]
        if e.dtype != t["dtype"] or list(e.shape) != list(t["shape"]):
            raise BaseMismatchError(f"wrong base: tensor {name!r} is {e.dtype}{list(e.shape)} in {ckpt.path}, "
                                    f"the trajectory tuned {t['dtype']}{list(t['shape'])}")
        names.append(name)
    rule = MezoSGD.from_header(traj.header)
    return ReplayPlan(ckpt, traj, rule, steps, names, traj.fingerprints.get(steps),
                      step_constants(rule, traj.grad_bits[:steps]))


def read_base(p: ReplayPlan, index: int) -> torch.Tensor:
    """Tuned tensor `index` as the base holds it, refused unless it is the one training started from."""
    name = p.names[index]
    entry = p.trajectory.header["tensors"][index]
    if entry.get("init"):
        raw = bytearray(p.trajectory.inits[index])
        w = torch.frombuffer(raw, dtype=torch.uint8).view(DTYPE_NAMES[entry["dtype"]]).reshape(entry["shape"]) \
            if raw else torch.empty(entry["shape"], dtype=DTYPE_NAMES[entry["dtype"]])
        if tensor_fingerprint(w) != entry["sha256"]:
            raise VerificationError(f"the initial value of {name!r} in the trajectory does not match its fingerprint")
        return w
    w = p.base.read(name)
    if tensor_fingerprint(w) != p.trajectory.header["tensors"][index]["sha256"]:
        raise BaseMismatchError(f"wrong base: tensor {name!r} in {p.base.path} differs from the one the "
                                f"trajectory was trained from (fingerprint mismatch)")
    return w


def replay_named(p: ReplayPlan, index: int, device: str | torch.device = "cpu",
                 progress: Progress | None = None) -> torch.Tensor:
    """Tuned tensor `index` of the plan after its steps."""
    w = read_base(p, index)
    w = w.to(device)
    replay_tensor_(w, p.rule, index, p.constants, decay=bool(p.trajectory.header["tensors"][index].get("decay")),
                   progress=progress)
    return canonicalize_nan_(w.cpu())


def _check(p: ReplayPlan, index: int, fingerprint: str) -> None:
    if p.expected is not None and p.expected[index] != fingerprint:
        raise VerificationError(f"tensor {p.names[index]!r} after {p.steps} steps does not match the "
                                f"trajectory's fingerprint: the replay is not exact, or the file was altered")


def reconstruct(p: ReplayPlan, out: str | os.PathLike[str], *, overwrite: bool = False,
                device: str | torch.device = "cpu", progress: Progress | None = None) -> Path:
    """Writes the checkpoint at step p.steps, mirroring the base's layout; returns the output path."""
    metadata = {"mezo_replay.steps": str(p.steps),
                "mezo_replay.base_fingerprint": p.trajectory.header["base"]["fingerprint"]}
    new = {t["name"]: (t["dtype"], tuple(t["shape"])) for t in p.trajectory.header["tensors"] if t.get("init")}
    with CheckpointWriter(p.base, out, overwrite=overwrite, metadata=metadata, new_tensors=new,
                          config=p.trajectory.header.get("config")) as writer:
        for index, name in enumerate(p.names):
            w = replay_named(p, index, device, progress)
            _check(p, index, tensor_fingerprint(w))
            writer.write(name, w)
        tuned = set(p.names)
        for name in p.base.entries:
            if name not in tuned:
                writer.copy_from_base(name)
        return writer.commit()


def verify(p: ReplayPlan, tuned: str | os.PathLike[str] | None = None, *, device: str | torch.device = "cpu",
           progress: Progress | None = None) -> None:
    """Raises unless the base matches and the replay (or the given tuned checkpoint) matches the
    trajectory's fingerprints at p.steps. Nothing is written."""
    if p.expected is None:
        raise VerificationError(f"the trajectory records no fingerprint for step {p.steps}: nothing to verify "
                                f"against" + (" (the file is truncated)" if p.trajectory.truncated else ""))
    given = BaseCheckpoint.open(tuned) if tuned is not None else None
    for index, name in enumerate(p.names):
        if given is None:
            w = replay_named(p, index, device, progress)
        else:
            read_base(p, index)
            if name not in given.entries:
                raise VerificationError(f"tensor {name!r} is missing from {given.path}")
            w = given.read(name)
            if DTYPE_NAMES.get(w.dtype) != p.trajectory.header["tensors"][index]["dtype"]:
                raise VerificationError(f"tensor {name!r} in {given.path} has dtype {w.dtype}")
            if progress is not None:
                progress(w.numel() * p.steps)
        _check(p, index, tensor_fingerprint(w))
