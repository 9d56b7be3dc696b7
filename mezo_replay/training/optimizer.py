"""`MeZO`: a torch.optim-style optimizer whose every step can be replayed bit for bit from its trajectory.

    opt = MeZO(model.named_parameters(), lr=1e-6, eps=1e-3, seed=0)
    opt.record("run.mzt", base_source="my-org/base-model")
    for batch in data:
        loss = opt.step(lambda: loss_fn(model, batch))   # forward passes only; no backward
    opt.close()                                          # writes the final fingerprint

A step may leave its update pending (`step(closure, settle=False)`): the next step applies it in the same
pass over the weights as its own first perturbation, so a run of steps costs two passes per step instead
of three, with the same bytes. `settle()` applies a pending update alone; everything here that reads the
weights settles first, and so must a caller that reads them between such steps.

Named parameters are required because a trajectory addresses tensors by name (spec/selection.md).
The optimizer owns the in-place arithmetic of spec/rule.md, so training and replay share it.

Parameters may be FSDP2's (DTensors sharded on dim 0, `fully_shard`): each rank then passes over its local
shards only, with the global element index of each shard's first element (shards.local_shard_offset), and
gets exactly the bytes one device would; fingerprints stream the shards to one rank (shards.fingerprints),
so every rank must call what computes them (construction, `fingerprints`, `close`) together.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .. import __version__
from ..errors import MezoReplayError
from ..format.fingerprint import DTYPE_NAMES, base_fingerprint, canonicalize_nan_, tensor_fingerprint
from ..arithmetic.initial import generate
from ..format.mzt import TrajectoryWriter
from ..arithmetic.device_grad import device_coefficient
from ..arithmetic.rule import AdamHost, AdamStep, MezoSGD, Schedule
from ..kernels.steps import (perturb_all_, restore_adam_all_, restore_buffer_all_, restore_terms_all_,
                             restore_update_all_, update_perturb_all_)
from . import shards
from .layerwise import block_of, layerwise_exponents

Closure = Callable[[], "torch.Tensor | float"]


def default_no_decay(name: str, p: torch.Tensor) -> bool:
    """MeZO's rule (no decay on biases and layer norms), also catching norms by shape: 1-d tensors."""
    lowered = name.lower()
    return p.dim() < 2 or any(s in lowered for s in ("bias", "layer_norm", "layernorm"))


class NonFiniteLossError(MezoReplayError):
    """A loss was inf or NaN; the step was recorded as a zero update so file and weights still agree."""


def _hold(loss: torch.Tensor | float) -> torch.Tensor | float:
    """Keeps a closure's loss for reading after the second forward, without waiting for the device.

    A one-element floating tensor is copied (asynchronously, on its device) to float32, or float64 for a
    float64 loss: exact for every floating dtype, so the host later reads the very value float(loss)
    would have given. It is a copy because a compiled model (CUDA graphs) may reuse its output's memory in
    the next forward. Anything else is read now, as before (float() raises what it always raised)."""
    if isinstance(loss, torch.Tensor) and loss.is_floating_point() and loss.numel() == 1:
        dtype = torch.float64 if loss.dtype == torch.float64 else torch.float32
        return loss.detach().reshape(()).to(dtype, copy=True)
    return float(loss)


def _read(plus: torch.Tensor | float, minus: torch.Tensor | float) -> tuple[float, float]:
    """Both losses as binary64 floats, with one host synchronisation where both live on one device."""
    if isinstance(plus, torch.Tensor) and isinstance(minus, torch.Tensor) and \
            plus.device == minus.device and plus.dtype == minus.dtype:
        a, b = torch.stack((plus, minus)).tolist()
        return a, b
    return float(plus), float(minus)


@dataclass(frozen=True)
class _HostStep:
    """One step's record as the host computes it, and what the step must do."""

    bits: int
    c: float
    loss: float  # the mean of the two losses
    failed: bool  # a non-finite loss or a diverged step: recorded as a zero update
    error: NonFiniteLossError | None  # what the step raises (raise mode, or a diverged step in skip mode)


class _Unread:
    """A queued step's record (bits, loss+, loss-, stop) copied to the host behind the device's queue."""

    def __init__(self, t: int, host: torch.Tensor, event: Any) -> None:
        self.t, self.host, self.event = t, host, event

    @classmethod
    def send(cls, t: int, record: torch.Tensor) -> _Unread:
        if record.device.type != "cuda":
            return cls(t, record.cpu(), None)
        host = torch.empty(record.shape, dtype=record.dtype, pin_memory=True)
        host.copy_(record, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return cls(t, host, event)

    def values(self) -> list[float]:
        if self.event is not None:
            self.event.synchronize()  # waits for this copy only, not for the work queued after it
        return self.host.tolist()


class MeZO:
    """MeZO-SGD (spec/rule.md `mezo-sgd`), or MeZO with momentum (spec/momentum.md), over named tensors.

    Each `step(closure)` calls the closure twice (at w + eps z and w - eps z), so the closure must
    compute the loss on the same batch each time and must not change the weights.

    grad_codec picks how each step's projected gradient is recorded, and so what the step applies (the
    replay is exact with each): "bf16", "fp8" (E4M3 times grad_scale, saturating) or "sign" (ZO-SignSGD,
    +-grad_scale or 0); grad_scale is a power of two, 1 if not given (spec/rule.md).

    rule="mezo-momentum" adds memory-free heavy-ball momentum (spec/momentum.md): each step's update is
    the sum over the last `momentum_window` records of momentum^k * lr_t * gq * z, with every z
    regenerated, so no state buffer is kept. A pending update is applied in the next step's first pass, as
    for mezo-sgd; its steps are never queued on the device: queue_step refuses them.
    rule="mezo-momentum-buffer" is the state-buffer form: one float32 buffer per tuned tensor (`states`),
    4 bytes per tuned parameter more, one noise draw per step; fused and never queued the same way.

    perturbations=N > 1 (mezo-sgd only) is n-SPSA (spec/nspsa.md): each step calls the closure 2N times on
    the same batch, records N projected gradients and applies their average (lr_t / N each), replayable
    exactly like the rest; the step returns the mean of its 2N losses. Never queued on the device either.
    rule="mezo-adam-buffer" and "mezo-adam" are MeZO-Adam (spec/adam.md), beta1 = `momentum`, `beta2`,
    `adam_eps` (delta): the buffer form keeps m and v in `states` (8 bytes per tuned parameter more), the
    window form recomputes both from the last `momentum_window` records; fused and never queued the same way.
    layerwise (spec/layerwise.md) scales each tensor's perturbation (2^perturb_exp) and step (2^step_exp) by
    powers of two recorded in its header entry, so replay stays exact: "perturbation", "step" or "both"
    choose them from the weights as they are at construction (the base; layerwise_blocks="layer" gives each
    decoder layer one exponent), or pass them (per tuned tensor in order, or a mapping by name).
    """

    def __init__(self, params: Iterable[tuple[str, torch.Tensor]], *, lr: float, eps: float = 1e-3,
                 seed: int = 0, noise: str = "gaussian16", schedule: Schedule | None = None,
                 weight_decay: float = 0.0, no_decay: Callable[[str, torch.Tensor], bool] | None = None,
                 on_nonfinite: Literal["raise", "skip"] = "raise", grad_codec: str = "bf16",
                 grad_scale: float | None = None, rule: str = "mezo-sgd", momentum: float = 0.9,
                 momentum_window: int = 16, perturbations: int = 1, beta2: float = 0.999,
                 adam_eps: float = 1e-8,
                 layerwise: str | Sequence[tuple[int, int]] | Mapping[str, tuple[int, int]] = "none",
                 layerwise_blocks: str = "tensor") -> None:
        chosen: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for item in params:
            if isinstance(item, torch.Tensor) or not isinstance(item, tuple) or len(item) != 2:
                raise TypeError("MeZO needs (name, tensor) pairs: pass model.named_parameters()")
            name, p = item
            if not p.requires_grad or id(p) in seen:  # frozen, or a tied alias already listed
                continue
            if p.dtype not in DTYPE_NAMES:
                raise TypeError(f"{name}: MeZO tunes float32, bfloat16 and float16 tensors, not {p.dtype}")
            if name in chosen:
                raise ValueError(f"duplicate parameter name {name!r}")
            seen.add(id(p))
            chosen[name] = p
        if not chosen:
            raise ValueError("no trainable floating-point parameters to tune")
        self.names = sorted(chosen, key=lambda n: n.encode("utf-8"))
        self.params = [chosen[n] for n in self.names]
        self.sharded = any(shards.is_dtensor(p) for p in self.params)  # FSDP2: passes over local shards
        exponents = self._layerwise(layerwise, eps, layerwise_blocks)
        self.rule = MezoSGD.create(lr=lr, eps=eps, seed=seed, noise=noise, schedule=schedule,
                                   weight_decay=weight_decay, grad_encoding=grad_codec, grad_scale=grad_scale,
                                   rule=rule, momentum=momentum, window=momentum_window,
                                   perturbations=perturbations, beta2=beta2, adam_eps=adam_eps, exponents=exponents)
        exempt = no_decay or default_no_decay
        self.decay = [bool(self.rule.weight_decay) and not exempt(n, p) for n, p in zip(self.names, self.params)]
        self.on_nonfinite = on_nonfinite
        self.step_count = 0
        self.last_grad_bits: int | None = None
        self._history: list[int] = []  # mezo-momentum: the records of the last `window` steps, oldest first
        # mezo-momentum-buffer: each tuned tensor's float32 m (flat), +0 before step 0 (spec/momentum.md)
        # (sharded: this rank's shard of it, like the passes' tensors)
        self.states: list[torch.Tensor] = [torch.zeros(t.numel(), dtype=torch.float32, device=t.device)
                                           for t in self.local_tensors()[0]] if self.rule.buffered else []
        if self.rule.adam and not self.rule.adam_window:  # mezo-adam-buffer: m then v, float32, per tensor
            self.states = [torch.zeros(2 * t.numel(), dtype=torch.float32, device=t.device)
                           for t in self.local_tensors()[0]]
        self._adam = AdamHost(self.rule) if self.rule.adam else None
        self.writer: TrajectoryWriter | None = None
        self.writer_records_losses = True
        # (step, c, d, go) of an update not yet applied; c and go are device tensors after a queued step, and
        # c is a tuple of (noise step, coefficient) terms under mezo-momentum (spec/momentum.md)
        self._pending: tuple[int, Any, float, torch.Tensor | None] | None = None
        self._unread: _Unread | None = None  # the record of a queued step, on its way to the host
        self._abandoned = False  # see abandon()
        self._base_fingerprints = self.fingerprints()

    def _layerwise(self, layerwise: str | Sequence[tuple[int, int]] | Mapping[str, tuple[int, int]],
                   eps: float, blocks: str) -> list[tuple[int, int]]:
        """(perturb_exp, step_exp) per tuned tensor (spec/layerwise.md): a mode of training/layerwise.py
        computed from the weights as they are now (the base), per tensor or per decoder layer (`blocks`), or
        given (a sequence in tuned-tensor order, or a mapping by name with absent names 0)."""
        if isinstance(layerwise, str):
            if layerwise == "none":
                return []
            if self.sharded:
                raise MezoReplayError("layer-wise scaling computes each tensor's rms from the whole tensor; "
                                      "FSDP2-sharded parameters are not supported yet")
            eps_q = MezoSGD.create(lr=1.0, eps=eps, seed=0).eps  # the stored eps, whose range bounds eps_k
            groups = None if blocks == "tensor" else [block_of(n, blocks) for n in self.names]
            return layerwise_exponents([p.detach() for p in self.params], layerwise, eps_q, groups)
        if isinstance(layerwise, Mapping):
            if unknown := set(layerwise) - set(self.names):
                raise ValueError(f"layer-wise exponents for {sorted(unknown)}, which are not tuned parameters")
            return [tuple(layerwise.get(n, (0, 0))) for n in self.names]  # type: ignore[misc]
        pairs = [tuple(x) for x in layerwise]
        if len(pairs) != len(self.names):
            raise ValueError(f"{len(pairs)} layer-wise exponent pairs for {len(self.names)} tuned tensors")
        return pairs  # type: ignore[return-value]

    # -- the step ---------------------------------------------------------------------------------

    def local_tensors(self) -> tuple[list[torch.Tensor], list[int] | None]:
        """(tensors, starts): what the element passes run on. Whole tensors and None, or for FSDP2
        parameters this rank's local shards and their global element starts. Derived on every call: FSDP2
        may swap a parameter's local storage (at its lazy initialisation, the first forward)."""
        if not self.sharded:
            return [p.data for p in self.params], None
        laid = [shards.local_shard_offset(p) for p in self.params]
        return [t.detach() for _, t in laid], [s for s, _ in laid]

    @property
    def pending(self) -> bool:
        """Whether the last step's update waits for the next step's first pass (or settle())."""
        return self._pending is not None

    @torch.no_grad()
    def settle(self) -> None:
        """Applies a pending update alone, so the weights equal a replay of the recorded steps; a no-op
        if none is pending. The same bytes as if that step had been taken with settle=True. After a queued
        step (see `queue_step`) it first writes that step's record, and raises its NonFiniteLossError, if
        any, once the weights are settled."""
        landed = self._land()
        if self._pending is not None:
            t, c, d, _ = self._pending
            self._pending = None  # first: a pass that fails half-way must never be applied a second time
            tensors, starts = self.local_tensors()
            if isinstance(c, AdamStep):  # spec/adam.md
                restore_adam_all_(tensors, self.states, self.rule, c, t, self.decay, starts=starts)
            elif isinstance(c, tuple):  # a multi-term update (mezo-momentum)
                restore_terms_all_(tensors, self.rule, t, c, d, self.decay, starts=starts)
            elif self.rule.buffered:
                restore_buffer_all_(tensors, self.states, self.rule, t, c, d, self.decay, starts=starts)
            else:
                restore_update_all_(tensors, self.rule, t, c, d, self.decay, starts=starts)
        if landed is not None and landed[2] is not None:
            raise landed[2]

    @torch.no_grad()
    def step(self, closure: Closure, *, settle: bool = True) -> float:
        """One MeZO step; returns the mean of the two losses measured.

        settle=False leaves this step's update pending (see `settle`): the next step applies it fused
        with its +eps perturbation, one pass over the weights instead of two. The weights then hold the
        second perturbation, not the model's weights, until the next step or settle(). A step that fails
        (non-finite loss, diverged) is always settled before its error is raised, as it always was.

        The losses are read together after the second forward: reading the first one before would make
        the host wait for the device while the second forward could already be queued."""
        self.flush()  # after queued steps: their last record first (a wait, as this step makes anyway)
        if self.rule.perturbations > 1:
            return self._step_perturbations(closure, settle)
        eps = self.rule.eps
        t = self.step_count
        tensors, starts = self.local_tensors()
        self._first_pass(tensors, t, starts)
        plus = _hold(closure())
        perturb_all_(tensors, self.rule, t, -2.0 * eps, starts=starts)
        minus = _hold(closure())
        loss_plus, loss_minus = _read(plus, minus)  # the step's one host synchronisation
        h = self._host_step(t, loss_plus, loss_minus)
        self._record(h)
        self._pending = (t, self._adam_step(t) if self._adam is not None else self._terms(t) if self.rule.window
                         else h.c, self.rule.decay(t), None)
        self.step_count += 1
        if settle or h.failed:  # a failed step is settled (its zero update applied) before anything else
            self.settle()
        if h.error is not None:
            raise h.error
        return h.loss

    def _step_perturbations(self, closure: Closure, settle: bool) -> float:
        """An n-SPSA step (spec/nspsa.md): perturbation j of step t is sub-step u = N t + j, with its own
        noise, P1 (fused with the restore of the perturbation before, or with the pending update of the step
        before) and P2; the last one's P3 subtracts all N terms. The 2N losses are read once, at the end:
        no perturbation's passes depend on them."""
        n, eps, t = self.rule.perturbations, self.rule.eps, self.step_count
        tensors, starts = self.local_tensors()
        held = []
        for j in range(n):
            u = n * t + j
            if j == 0:
                self._first_pass(tensors, u, starts)
            else:  # the plain restore of sub-step u - 1 (no terms, no decay) and P1 of u, in one pass
                restore_terms_all_(tensors, self.rule, u - 1, (), 0.0, self.decay, starts=starts, then_perturb=True)
            plus = _hold(closure())
            perturb_all_(tensors, self.rule, u, -2.0 * eps, starts=starts)
            held.append((plus, _hold(closure())))
        losses = [_read(plus, minus) for plus, minus in held]
        bits, terms, failures = [], [], []
        for j, (lp, lm) in enumerate(losses):
            try:  # a perturbation that fails (non-finite g, a diverged c_j) records +0, as a failed step does
                b = self.rule.encode_grad((lp - lm) / (2.0 * eps))
                c = self.rule.perturbation_coefficient(t, b)
            except ValueError as e:
                b, c = 0, 0.0
                failures.append(f"perturbation {j}: {e} (losses {lp:g}, {lm:g})")
            bits.append(b)
            terms.append((n * t + j, c))
        loss = sum(lp + lm for lp, lm in losses) / (2.0 * n)
        error = None
        if failures and (self.on_nonfinite == "raise" or math.isfinite(loss)):
            error = NonFiniteLossError(f"step {t}: " + "; ".join(failures) + "; recorded as zero updates")
        if self.writer is not None:
            self.writer.append_step(bits, loss if self.writer_records_losses else None)
        self.last_grad_bits = tuple(bits)  # type: ignore[assignment]  # n-SPSA: the step's N records
        self._pending = (n * t + n - 1, tuple(terms), self.rule.decay(t), None)
        self.step_count += 1
        if settle or failures:
            self.settle()
        if error is not None:
            raise error
        return loss

    def _host_step(self, t: int, loss_plus: float, loss_minus: float) -> _HostStep:
        """Step t's record from its two losses, in binary64 on the host (spec/rule.md): a non-finite loss or
        a diverged step gives bits 0 and c 0 (no gradient step), and the error it must raise, if any."""
        bits, c, failure = 0, 0.0, None
        try:
            bits = self.rule.encode_grad((loss_plus - loss_minus) / (2.0 * self.rule.eps))
            c = self.rule.coefficient(t, bits)
        except ValueError as e:
            bits, c, failure = 0, 0.0, e
        loss = (loss_plus + loss_minus) / 2.0
        error = None
        if failure is not None and (self.on_nonfinite == "raise" or math.isfinite(loss)):
            error = NonFiniteLossError(f"step {t}: {failure}; recorded as a zero update "
                                       f"(losses {loss_plus:g}, {loss_minus:g})")
        return _HostStep(bits, c, loss, failure is not None, error)

    def _record(self, h: _HostStep) -> None:
        if self.writer is not None:
            self.writer.append_step(h.bits, h.loss if self.writer_records_losses else None)
        self.last_grad_bits = h.bits
        if self.rule.window or self.rule.adam_window:
            self._history = [*self._history, h.bits][-(self.rule.window or self.rule.adam_window):]
        elif self.rule.adam:
            self._history = [h.bits]

    def _terms(self, t: int) -> tuple[tuple[int, float], ...]:
        """Step t's multi-term update from the recorded history (its own record last)."""
        return self.rule.terms(t, self._history)

    def _adam_step(self, t: int) -> AdamStep:
        """Step t's Adam constants (spec/adam.md) from the recorded history (its own record last)."""
        assert self._adam is not None
        return self._adam.step(t, self._history)

    def load_history(self, grad_bits: Sequence[int]) -> None:
        """The records of the steps already taken (all of them, or at least the last window): what a
        resumed mezo-momentum run needs for its next steps' terms. A no-op for mezo-sgd."""
        if self.rule.window or self.rule.adam_window:
            self._history = [int(b) for b in grad_bits][-(self.rule.window or self.rule.adam_window):]

    def _first_pass(self, tensors: list[torch.Tensor], t: int, starts: list[int] | None = None) -> None:
        """P1 of step t, fused with the pending update of the step before when there is one."""
        if self._pending is not None:
            pt, c, d, go = self._pending
            self._pending = None  # as in settle(): never applied twice
            if isinstance(c, AdamStep):  # spec/adam.md: its P3, then P1 of t, in one pass
                restore_adam_all_(tensors, self.states, self.rule, c, pt, self.decay, then_perturb=True, starts=starts)
            elif isinstance(c, tuple):  # mezo-momentum: its multi-term P3, then P1 of t, in one pass
                restore_terms_all_(tensors, self.rule, pt, c, d, self.decay, then_perturb=True, starts=starts)
            elif self.rule.buffered:
                restore_buffer_all_(tensors, self.states, self.rule, pt, c, d, self.decay, then_perturb=True,
                                    starts=starts)
            else:
                update_perturb_all_(tensors, self.rule, pt, c, d, self.decay, go=go,
                                    starts=starts)  # P3 of step pt, P1 of t
        else:
            perturb_all_(tensors, self.rule, t, self.rule.eps, starts=starts)

    @torch.no_grad()
    def queue_step(self, closure: Closure) -> tuple[int, float] | None:
        """One step that never makes the host wait for the device: for GPU training loops (fit uses it).

        Its projected gradient and coefficient are computed on the device (arithmetic/device_grad.py, the
        host's bits exactly), its update stays pending with the coefficient on the device, and its record
        travels to the host asynchronously. The host reads it during the next step, after that step's first
        pass and first forward are queued, so the device is never left idle waiting for the host; then
        the record is written, and that earlier step's (steps done, mean loss) is returned. A step that
        must stop the run (a non-finite loss in raise mode, a diverged step) makes the next first pass
        skip its perturbation on the device, so when its NonFiniteLossError is raised here one step late,
        the weights are that step's settled weights, as step() leaves them; the queued forward is discarded.
        settle() (and everything that reads the weights) completes the last queued step.
        Momentum steps are refused: mezo-momentum's terms come from the host's records, and neither form's
        update has a device-side fused pass (use step())."""
        if self.rule.stateful:
            raise MezoReplayError(f"queue_step takes mezo-sgd steps only, not {self.rule.name}'s: use step()")
        if self.rule.perturbations > 1:
            raise MezoReplayError(f"queue_step takes one perturbation a step, not {self.rule.perturbations} "
                                  f"(n-SPSA): use step()")
        eps = self.rule.eps
        t = self.step_count
        tensors, starts = self.local_tensors()
        self._first_pass(tensors, t, starts)
        plus = _hold(closure())
        landed = self._land()  # step t-1's record: its device work finished while this forward was queued
        if landed is not None and landed[2] is not None:
            raise landed[2]  # the first pass skipped step t's P1: the weights are step t-1's, settled
        perturb_all_(tensors, self.rule, t, -2.0 * eps, starts=starts)
        minus = _hold(closure())
        device = tensors[0].device
        lp, lm = (x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64, device=device)
                  for x in (plus, minus))
        bits, c, failed = device_coefficient(lp, lm, self.rule, t)
        if self.on_nonfinite == "skip":  # skip goes on past a non-finite loss, not past a diverged step
            failed = failed & torch.isfinite(lp.double() + lm.double())
        # the kernels read c and go where the weights are (a loss may come back on another device)
        self._pending = (t, c.to(device), self.rule.decay(t), (~failed).to(device))
        self._unread = _Unread.send(t, torch.stack((bits.double(), lp.double(), lm.double(), failed.double())))
        self.step_count += 1
        return landed[:2] if landed is not None else None

    def flush(self) -> tuple[int, float] | None:
        """Writes the record of the last queued step, waiting for the device, and returns its (steps done,
        mean loss); None if no record waits. That step's NonFiniteLossError is raised with the weights
        settled, as step() would have left them."""
        landed = self._land()
        if landed is None:
            return None
        if landed[2] is not None:
            self.settle()
            raise landed[2]
        return landed[0], landed[1]

    def _land(self) -> tuple[int, float, NonFiniteLossError | None] | None:
        """Writes the record of the last queued step, waiting for it if need be: (steps done, mean loss,
        the error that step must raise or None); None if no record was outstanding."""
        if self._unread is None:
            return None
        unread, self._unread = self._unread, None
        t, (bits_f, loss_plus, loss_minus, stop) = unread.t, unread.values()
        h = self._host_step(t, loss_plus, loss_minus)  # the file has always held the host's bits
        if h.bits != int(bits_f) or (h.error is not None) != bool(stop):  # a guard: the weights took the device's
            raise MezoReplayError(f"step {t}: the device's projected gradient ({int(bits_f):#06x}, stop "
                                  f"{bool(stop)}) differs from the host's ({h.bits:#06x}); please report this")
        self._record(h)
        return t + 1, h.loss, h.error

    # -- trajectory -------------------------------------------------------------------------------

    def fingerprints(self) -> list[str]:
        """SHA-256 of each tuned tensor as a replay would give it (a pending update is applied first).
        Sharded (FSDP2): every rank must call it; each gets the whole tensors' fingerprints, no rank holding
        more than its shards and one slice in transit."""
        self.settle()
        if self.sharded:
            return shards.fingerprints(self.params)
        return [tensor_fingerprint(p.detach()) for p in self.params]

    def header(self, *, base_source: str | None = None, base_revision: str | None = None,
               metadata: Mapping[str, str] | None = None, record_losses: bool = True,
               new_tensors: Collection[str] | Mapping[str, Any] = (), config: Mapping[str, Any] | None = None,
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The HEAD of a trajectory starting from the weights as they were when this optimizer was made.

        `new_tensors` names tuned tensors absent from the base (a new classification head): their initial
        values travel in the trajectory. A mapping gives each one's `init` entry instead: True (stored in
        INIT chunks), or a generated value (spec/init.md, made with mezo_replay.arithmetic.initial), which costs no
        bytes; the parameter must then already hold exactly that value. `config` is the tuned model's config.json when it differs from the
        base's, so that a reconstruction loads as the right model class. `extra` adds top-level header keys
        that do not change replayed bits (e.g. `peft`, the adapter's description)."""
        self.settle()  # the initial values checked below are read from the weights
        if self.step_count:
            raise MezoReplayError("a trajectory must start before the first step")
        if unknown := set(new_tensors) - set(self.names):
            raise ValueError(f"new_tensors {sorted(unknown)} are not tuned parameters")
        tensors = [{"name": n, "dtype": DTYPE_NAMES[p.dtype], "shape": list(p.shape), "sha256": fp}
                   for n, p, fp in zip(self.names, self.params, self._base_fingerprints)]
        if self.rule.weight_decay:
            for entry, decay in zip(tensors, self.decay):
                entry["decay"] = decay
        for k, entry in enumerate(tensors):  # layer-wise exponents (spec/layerwise.md): the non-zero ones
            entry.update(self.rule.tensor_fields(k))
        inits = new_tensors if isinstance(new_tensors, Mapping) else dict.fromkeys(new_tensors, True)
        for k, (name, p) in enumerate(zip(self.names, self.params)):
            spec = inits.get(name)
            if isinstance(spec, Mapping) and tensor_fingerprint(
                    generate(spec, self.rule.seed, k, p.shape, p.dtype)) != self._base_fingerprints[k]:
                raise ValueError(f"{name} did not start from the initial value {dict(spec)} it is recorded with")
        for entry in tensors:
            if entry["name"] in inits:
                entry["init"] = inits[entry["name"]] if inits[entry["name"]] is True else dict(inits[entry["name"]])
        more = {**({"config": dict(config)} if config is not None else {}), **dict(extra or {})}
        return {
            "creator": f"mezo-replay {__version__}",
            **self.rule.header_fields(),
            "tensors": tensors,
            "base": {"fingerprint": base_fingerprint(self.names, self._base_fingerprints),
                     "source": base_source, "revision": base_revision},
            "records": {"losses": record_losses},
            "metadata": dict(metadata or {}),
            **more,
        }

    def record(self, path: str | os.PathLike[str], *, overwrite: bool = False, steps_per_chunk: int = 256,
               compact: bool = True, **header_args: Any) -> TrajectoryWriter:
        """Starts writing every step to a new `.mzt` file; see `header` for the arguments. With `compact`,
        close() merges the per-flush chunks once the run has ended (format/compact.py)."""
        header = self.header(**header_args)  # settles: the INIT chunks below read the weights
        for k, entry in enumerate(header["tensors"]):  # before the file exists
            if entry.get("init") is True and shards.is_dtensor(self.params[k]):
                raise MezoReplayError(f"{entry['name']}: a new tensor is stored whole in the trajectory, and "
                                      f"this rank holds only its shard (FSDP2)")
        self.writer = TrajectoryWriter(path, header, overwrite=overwrite, steps_per_chunk=steps_per_chunk,
                                       compact=compact)
        self.writer_records_losses = bool(header["records"]["losses"])
        for k, entry in enumerate(header["tensors"]):
            if entry.get("init") is True:
                t = self.params[k].detach().cpu().contiguous().reshape(-1)
                self.writer.write_init(k, t.view(torch.uint8).numpy().tobytes())
        return self.writer

    def attach(self, writer: TrajectoryWriter, steps_done: int) -> None:
        """Continues an existing trajectory (resume): the weights must already equal a replay of its
        `steps_done` steps, which is how train.py's resume leaves them."""
        self.settle()  # a pending update belongs to the steps before; the new ones start from settled weights
        if writer.steps != steps_done:
            raise ValueError(f"the trajectory holds {writer.steps} steps, not {steps_done}")
        self.writer, self.writer_records_losses, self.step_count = writer, writer.records_losses, steps_done

    def close(self, *, compact: bool | None = None) -> None:
        """Ends the trajectory with the fingerprint of the weights as they are now (NaNs made canonical);
        a pending update is applied first, so the weights left behind are the trained ones. A queued
        step's error (see `queue_step`) is raised after the trajectory is closed. `compact`: whether the
        file's chunks are merged now (default: the writer's setting; never after a step's error)."""
        error: NonFiniteLossError | None = None
        try:
            self.settle()
        except NonFiniteLossError as e:
            error = e
        for t in self.local_tensors()[0]:
            canonicalize_nan_(t)
        if self.sharded and not self._abandoned:  # a collective: ranks without the file join it too
            fps = self.fingerprints()
            if self.writer is not None:
                self.writer.write_fingerprint(fps)
        elif self.writer is not None:
            self.writer.write_fingerprint(self.fingerprints())
        if self.writer is not None:
            self.writer.close(compact=False if error is not None else compact)
            self.writer = None
        if error is not None:
            raise error

    def abandon(self) -> None:
        """Closes the trajectory without a final fingerprint (the steps recorded stay valid): after a second
        Ctrl-C or a lost rank, when the weights may be half-stepped and, sharded, the other ranks may never
        join the fingerprint's collectives. A later close() writes nothing."""
        self._abandoned = True
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close(compact=False)

    def __enter__(self) -> MeZO:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(compact=None if exc[0] is None else False)
