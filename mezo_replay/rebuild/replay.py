"""Reconstruction: base checkpoint + trajectory -> the fine-tuned weights, streamed tensor by tensor.

Peak memory is a few tuned tensors (plus slice-sized temporaries), never the whole model: each tuned
tensor is read, checked against the fingerprint the trajectory recorded for the base, replayed through
every step, checked against the fingerprints the trajectory recorded for that step, and written; frozen
tensors are copied as bytes. reconstruct and verify overlap those stages across neighbouring tensors
(pipeline.py: at most three tuned tensors in memory), so that a GPU's kernel is not left waiting on them.
The output appears only when everything matched (CheckpointWriter writes to a temporary sibling). A
step the trajectory recorded no fingerprint for is rebuilt only on request (`unverified`), since nothing
could tell a wrong result from a right one.
"""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MezoReplayError
from ..format.fingerprint import (DTYPE_NAMES, canonical_fingerprint_, canonicalize_nan_, checkpoint_fingerprint,
                                  tensor_fingerprint)
from ..arithmetic.initial import generate
from ..format.mzt import Trajectory, read_trajectory
from ..arithmetic.rule import MezoSGD
from ..format.safetensors_io import BaseCheckpoint, CheckpointWriter
from ..kernels.steps import StepConstants, StepTerms, replay_tensor_, step_constants
from . import pipeline, ranks, spread

Progress = Callable[[int], None]
SYNC_EVERY = 256 << 20  # bytes of tuned tensors written between syncs to disk, behind the kernel


class BaseMismatchError(MezoReplayError):
    """The base is not the one the trajectory was trained from."""


class VerificationError(MezoReplayError):
    """Replayed (or given) tensors differ from the fingerprints the trajectory recorded."""


@dataclass(frozen=True)
class ReplayPlan:
    """What a reconstruction will do, worked out (and the cheap checks done) before any heavy work."""

    base: BaseCheckpoint | None  # None for a trajectory whose tensors all start from its own values (PEFT)
    trajectory: Trajectory
    rule: MezoSGD
    steps: int
    names: list[str]
    expected: list[str] | None  # per-tensor fingerprints for `steps` (FPRT; the header's at step 0), if any
    # (c, d) of each step, shared by every tensor; (terms, d) under mezo-momentum (spec/momentum.md), whose
    # P3 subtracts several (noise step, coefficient) terms; mezo-momentum-buffer's replay_tensor_ keeps m
    constants: list[StepConstants] | list[StepTerms]
    checkpoint: str | None = None  # the checkpoint fingerprint for `steps` (ckpt chunk), if any

    @property
    def verified_by(self) -> str | None:
        """What a result for `steps` is checked against, in words; None when nothing is recorded."""
        n = len(self.names)
        if self.steps == 0:
            return f"step 0 is the base: each of the {n} tuned tensors matches its fingerprint in the trajectory"
        if self.expected is not None:
            return f"each of the {n} tuned tensors matches its fingerprint recorded for step {self.steps}"
        if self.checkpoint is not None:
            return f"the {n} tuned tensors together match the checkpoint fingerprint recorded for step {self.steps}"
        return None

    def require_fingerprint(self, escape: str | None = "--unverified") -> None:
        """Raises unless the trajectory records something to check step `steps` against; the message
        names `escape`, the option that proceeds anyway, if there is one."""
        if self.verified_by is None:
            recorded = sorted({0, *self.trajectory.fingerprints, *self.trajectory.checkpoints})
            why = " (the file is truncated)" if self.trajectory.truncated else ""
            raise VerificationError(f"the trajectory records no fingerprint for step {self.steps}{why}, so a result "
                                    f"could not be verified; it has fingerprints for steps {_listed(recorded)}: "
                                    f"pick one of those"
                                    + (f", or pass {escape}" if escape else ""))

    @property
    def element_steps(self) -> int:
        # From the header, not the base: new (init) tensors are not in the base.
        # n-SPSA: N sub-steps a step (spec/nspsa.md), each a pass over every element
        elements = sum(math.prod(t["shape"]) for t in self.trajectory.header["tensors"])
        return self.steps * self.rule.perturbations * elements


def _listed(steps: list[int]) -> str:
    shown = [str(s) for s in steps] if len(steps) <= 8 else [*map(str, steps[:3]), "...", *map(str, steps[-3:])]
    return ", ".join(shown) + (f" ({len(steps):,} in all)" if len(steps) > 8 else "")


def needs_base(traj: Trajectory) -> bool:
    """False when every tuned tensor starts from a value the trajectory holds or generates (a PEFT
    adapter): then it rebuilds from the file alone."""
    return not all(t.get("init") for t in traj.header["tensors"])


def plan(base: str | os.PathLike[str] | BaseCheckpoint | None, trajectory: str | os.PathLike[str] | Trajectory,
         step: int | None = None) -> ReplayPlan:
    """Opens both inputs and checks names, dtypes, shapes and the step count; fingerprints come later.
    `base` may be None when the trajectory needs none (`needs_base`)."""
    traj = trajectory if isinstance(trajectory, Trajectory) else read_trajectory(trajectory)
    if base is None and needs_base(traj):
        raise MezoReplayError("this trajectory tunes tensors of a base model: give the base to rebuild it")
    ckpt = base if isinstance(base, BaseCheckpoint) or base is None else BaseCheckpoint.open(base)
    steps = traj.steps if step is None else step
    if not 0 <= steps <= traj.steps:
        why = " (the file is truncated)" if traj.truncated else ""
        raise MezoReplayError(f"--step {steps} is beyond the {traj.steps} steps the trajectory holds{why}")
    names = []
    for t in traj.header["tensors"]:
        name = t["name"]
        if t.get("init"):  # a new tensor (e.g. a classifier head): its initial value is in the trajectory
            if ckpt is not None and name in ckpt.entries:
                raise BaseMismatchError(f"wrong base: {ckpt.path} already has {name!r}, which the trajectory "
                                        f"adds as a new tensor")
            names.append(name)
            continue
        assert ckpt is not None  # needs_base
        if name not in ckpt.entries:
            raise BaseMismatchError(f"wrong base: tuned tensor {name!r} is not in {ckpt.path}")
        e = ckpt.entries[name]
        if e.dtype != t["dtype"] or list(e.shape) != list(t["shape"]):
            raise BaseMismatchError(f"wrong base: tensor {name!r} is {e.dtype}{list(e.shape)} in {ckpt.path}, "
                                    f"the trajectory tuned {t['dtype']}{list(t['shape'])}")
        names.append(name)
    rule = MezoSGD.from_header(traj.header)
    expected = traj.fingerprints.get(steps)
    if steps == 0:
        expected = [t["sha256"] for t in traj.header["tensors"]]
    return ReplayPlan(ckpt, traj, rule, steps, names, expected, step_constants(rule, traj.grad_bits[:steps]),
                      traj.checkpoints.get(steps))


def read_base(p: ReplayPlan, index: int, pin_memory: bool = False) -> torch.Tensor:
    """Tuned tensor `index` as the base holds it, refused unless it is the one training started from;
    pin_memory: in page-locked memory (for an asynchronous copy to a GPU)."""
    name = p.names[index]
    entry = p.trajectory.header["tensors"][index]
    if isinstance(entry.get("init"), dict):  # generated from the run's seed (spec/init.md)
        w = generate(entry["init"], p.rule.seed, index, entry["shape"], DTYPE_NAMES[entry["dtype"]])
        if tensor_fingerprint(w) != entry["sha256"]:
            raise VerificationError(f"the generated initial value of {name!r} does not match its fingerprint in "
                                    f"the trajectory: this generator disagrees with the one that wrote the file")
        return w.pin_memory() if pin_memory else w
    if entry.get("init"):
        raw = bytearray(p.trajectory.inits[index])
        w = torch.frombuffer(raw, dtype=torch.uint8).view(DTYPE_NAMES[entry["dtype"]]).reshape(entry["shape"]) \
            if raw else torch.empty(entry["shape"], dtype=DTYPE_NAMES[entry["dtype"]])
        if tensor_fingerprint(w) != entry["sha256"]:
            raise VerificationError(f"the initial value of {name!r} in the trajectory does not match its fingerprint")
        return w.pin_memory() if pin_memory else w
    assert p.base is not None
    w = p.base.read(name, pin_memory=pin_memory)
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


def _check_all(p: ReplayPlan, fingerprints: list[str]) -> None:
    """The checkpoint fingerprint, when that is what the trajectory recorded for p.steps."""
    if p.expected is None and p.checkpoint is not None and \
            checkpoint_fingerprint(p.names, fingerprints) != p.checkpoint:
        raise VerificationError(f"the tuned tensors after {p.steps} steps do not match the trajectory's checkpoint "
                                f"fingerprint: the replay is not exact, or the file was altered")


Devices = str | torch.device | Sequence[str]  # one device, "cuda:all", or a list of devices to split over


def _devices(device: Devices) -> list[str]:
    if isinstance(device, (str, torch.device)):
        return spread.local_devices(device) if str(device) == "cuda:all" else [str(device)]
    if not device:
        raise ValueError("an empty device list")
    return [str(d) for d in device]


def _locked(progress: Progress | None) -> Progress | None:
    """progress, callable from several threads at once."""
    if progress is None:
        return None
    lock = threading.Lock()

    def report(n: int) -> None:
        with lock:
            progress(n)
    return report


def _replay_all(p: ReplayPlan, device: Devices, progress: Progress | None,
                sink: Callable[[str, torch.Tensor], None] | None = None,
                crew: ranks.Crew | None = None) -> list[str] | None:
    """Every tuned tensor replayed, checked against its fingerprint for p.steps and handed to sink, with
    reading and writing overlapped with the kernel across tensors (pipeline.run: at most pipeline.IN_FLIGHT
    tensors in memory); the bytes and the errors are those of replay_named one tensor at a time. Returns
    the result fingerprints in index order, for _check_all.

    Split (several devices, or `crew`'s ranks): the tensors are shared out by spread.assign and taken in
    spread.write_order (so a failure is the first in that order, not in index order); each part has its
    own pipeline. Under a crew only rank 0 checks and sinks; the other ranks return None."""
    fingerprints: list[str] = [""] * len(p.names)
    tensors = p.trajectory.header["tensors"]
    decays = [bool(t.get("decay")) for t in tensors]
    devices = _devices(device) if crew is None else [str(device)]
    progress = _locked(progress) if len(devices) > 1 or crew is not None else progress

    def read(index: int, pin: bool) -> torch.Tensor:
        return read_base(p, index, pin)

    def kernel(index: int, w: torch.Tensor) -> None:
        replay_tensor_(w, p.rule, index, p.constants, decay=decays[index], progress=progress)

    def finish(index: int, w: torch.Tensor) -> None:
        fingerprints[index] = canonical_fingerprint_(w)  # the bytes and hash of canonicalize_nan_, one pass
        _check(p, index, fingerprints[index])
        if sink is not None:
            sink(p.names[index], w)

    if crew is None and len(devices) == 1:
        pipeline.run(len(p.names), read, kernel, finish, devices[0])
        return fingerprints
    cost = spread.costs([t["shape"] for t in tensors])
    owner = spread.assign(cost, crew.world.size if crew is not None else len(devices))
    order = spread.write_order(cost, owner)
    if crew is None:
        spread.run(owner, order, read, kernel, finish, dict(enumerate(devices)))
        return fingerprints
    if not crew.world.main:
        crew.follow([k for k in range(len(owner)) if owner[k] == crew.world.rank], read, kernel, devices[0])
        return None

    def remote(index: int) -> torch.Tensor:
        w = crew.fetch(owner[index], index, DTYPE_NAMES[tensors[index]["dtype"]], tensors[index]["shape"])
        if progress is not None:
            progress(w.numel() * p.steps * p.rule.perturbations)  # n-SPSA: N sub-steps a step
        return w

    spread.run(owner, order, read, kernel, finish, {0: devices[0]}, remote)
    return fingerprints


def replayed(p: ReplayPlan, device: str | torch.device = "cpu",
             progress: Progress | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor after p.steps) for each tuned tensor in index order, each checked against its
    fingerprint for p.steps as it comes; a checkpoint fingerprint is checked after the last one, so a
    consumer must treat its outputs as provisional until the iterator is exhausted. For writers other
    than the checkpoint mirror (a PEFT adapter folder); one tensor is held at a time."""
    fingerprints = []
    for index, name in enumerate(p.names):
        w = replay_named(p, index, device, progress)
        fingerprints.append(tensor_fingerprint(w))
        _check(p, index, fingerprints[-1])
        yield name, w
    _check_all(p, fingerprints)


def reconstruct(p: ReplayPlan, out: str | os.PathLike[str], *, overwrite: bool = False,
                device: Devices = "cpu", progress: Progress | None = None,
                unverified: bool = False, crew: ranks.Crew | None = None) -> Path | None:
    """Writes the checkpoint at step p.steps, mirroring the base's layout; returns the output path.
    Refuses a step with no recorded fingerprint unless `unverified` (the base is checked even then).

    device: one device, or several to split the tensors over ("cuda:all": every local GPU, a thread
    each); crew: the ranks of a torchrun launch (ranks.Crew), each replaying its share on `device`, where
    rank 0 writes and returns the path and the other ranks return None. The output's bytes are the same
    in every case."""
    if not unverified:
        p.require_fingerprint()
    if p.base is None:
        raise MezoReplayError("reconstruct() mirrors a base checkpoint; a trajectory rebuilt without one is "
                              "written with mezo_replay.adapter")
    if crew is not None and not crew.world.main:
        _replay_all(p, device, None, crew=crew)
        return None
    with crew.lead() if crew is not None else nullcontext():
        return _write(p, out, overwrite, device, progress, crew)


def _write(p: ReplayPlan, out: str | os.PathLike[str], overwrite: bool, device: Devices,
           progress: Progress | None, crew: ranks.Crew | None) -> Path:
    assert p.base is not None
    metadata = {"mezo_replay.steps": str(p.steps),
                "mezo_replay.base_fingerprint": p.trajectory.header["base"]["fingerprint"]}
    new = {t["name"]: (t["dtype"], tuple(t["shape"])) for t in p.trajectory.header["tensors"] if t.get("init")}
    with CheckpointWriter(p.base, out, overwrite=overwrite, metadata=metadata, new_tensors=new,
                          config=p.trajectory.header.get("config")) as writer:
        unsynced = [0]

        def write(name: str, w: torch.Tensor) -> None:  # in the pipeline's writer thread
            writer.write(name, w)
            unsynced[0] += w.numel() * w.element_size()
            if unsynced[0] >= SYNC_EVERY:
                writer.sync()
                unsynced[0] = 0

        fingerprints = _replay_all(p, device, progress, write, crew)
        assert fingerprints is not None
        _check_all(p, fingerprints)
        tuned = set(p.names)
        for name in p.base.entries:
            if name not in tuned:
                writer.copy_from_base(name)
        return writer.commit()


def verify(p: ReplayPlan, tuned: str | os.PathLike[str] | None = None, *, device: Devices = "cpu",
           progress: Progress | None = None, crew: ranks.Crew | None = None) -> None:
    """Raises unless the base matches and the replay (or the given tuned checkpoint) matches the
    trajectory's fingerprints at p.steps. Nothing is written. device and crew split the replay as in
    reconstruct (every rank raises the same error); a given checkpoint is read by one process."""
    p.require_fingerprint(escape=None)
    if tuned is not None and (crew is not None or len(_devices(device)) > 1):
        raise MezoReplayError("checking a given output reads files and replays nothing, so it is not split: run "
                              "it as one process (without torchrun or cuda:all)")
    given = BaseCheckpoint.open(tuned) if tuned is not None else None
    if given is None:
        if crew is not None and not crew.world.main:
            _replay_all(p, device, None, crew=crew)
            return
        with crew.lead() if crew is not None else nullcontext():
            fingerprints = _replay_all(p, device, progress, crew=crew)
            assert fingerprints is not None
            _check_all(p, fingerprints)
        return
    fingerprints = []
    for index, name in enumerate(p.names):
        read_base(p, index)
        if name not in given.entries:
            raise VerificationError(f"tensor {name!r} is missing from {given.path}")
        w = given.read(name)
        if DTYPE_NAMES.get(w.dtype) != p.trajectory.header["tensors"][index]["dtype"]:
            raise VerificationError(f"tensor {name!r} in {given.path} has dtype {w.dtype}")
        if progress is not None:
            progress(w.numel() * p.steps * p.rule.perturbations)  # n-SPSA: N sub-steps a step
        fingerprints.append(tensor_fingerprint(w))
        _check(p, index, fingerprints[-1])
    _check_all(p, fingerprints)
