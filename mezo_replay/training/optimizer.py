"""`MeZO`: a torch.optim-style optimizer whose every step can be replayed bit for bit from its trajectory.

    opt = MeZO(model.named_parameters(), lr=1e-6, eps=1e-3, seed=0)
    opt.record("run.mzt", base_source="my-org/base-model")
    for batch in data:
        loss = opt.step(lambda: loss_fn(model, batch))   # forward passes only; no backward
    opt.close()                                          # writes the final fingerprint

Named parameters are required because a trajectory addresses tensors by name (spec/selection.md).
The optimizer owns the in-place arithmetic of spec/rule.md, so training and replay share it.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Literal

import torch

from .. import __version__
from ..errors import MezoReplayError
from ..format.fingerprint import DTYPE_NAMES, base_fingerprint, canonicalize_nan_, tensor_fingerprint
from ..arithmetic.initial import generate
from ..format.mzt import TrajectoryWriter
from ..arithmetic.rule import MezoSGD, Schedule, encode_grad
from ..kernels.steps import perturb_all_, restore_update_all_

Closure = Callable[[], "torch.Tensor | float"]


def default_no_decay(name: str, p: torch.Tensor) -> bool:
    """MeZO's rule (no decay on biases and layer norms), also catching norms by shape: 1-d tensors."""
    lowered = name.lower()
    return p.dim() < 2 or any(s in lowered for s in ("bias", "layer_norm", "layernorm"))


class NonFiniteLossError(MezoReplayError):
    """A loss was inf or NaN; the step was recorded as a zero update so file and weights still agree."""


class MeZO:
    """MeZO-SGD (spec/rule.md `mezo-sgd`) over named tensors.

    Each `step(closure)` calls the closure twice (at w + eps z and w - eps z), so the closure must
    compute the loss on the same batch each time and must not change the weights.
    """

    def __init__(self, params: Iterable[tuple[str, torch.Tensor]], *, lr: float, eps: float = 1e-3,
                 seed: int = 0, noise: str = "gaussian16", schedule: Schedule | None = None,
                 weight_decay: float = 0.0, no_decay: Callable[[str, torch.Tensor], bool] | None = None,
                 on_nonfinite: Literal["raise", "skip"] = "raise") -> None:
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
        self.rule = MezoSGD.create(lr=lr, eps=eps, seed=seed, noise=noise, schedule=schedule,
                                   weight_decay=weight_decay)
        exempt = no_decay or default_no_decay
        self.decay = [bool(self.rule.weight_decay) and not exempt(n, p) for n, p in zip(self.names, self.params)]
        self.on_nonfinite = on_nonfinite
        self.step_count = 0
        self.last_grad_bits: int | None = None
        self.writer: TrajectoryWriter | None = None
        self.writer_records_losses = True
        self._base_fingerprints = self.fingerprints()

    # -- the step ---------------------------------------------------------------------------------

    def _perturb(self, scale: float) -> None:
        perturb_all_([p.data for p in self.params], self.rule, self.step_count, scale)

    @torch.no_grad()
    def step(self, closure: Closure) -> float:
        """One MeZO step; returns the mean of the two losses measured."""
        eps = self.rule.eps
        self._perturb(eps)
        loss_plus = float(closure())
        self._perturb(-2.0 * eps)
        loss_minus = float(closure())
        t = self.step_count
        d = self.rule.decay(t)
        bits, failure = 0, None
        try:
            bits = encode_grad((loss_plus - loss_minus) / (2.0 * eps))
            c = self.rule.coefficient(t, bits)
        except ValueError as e:  # non-finite loss or a diverged step: no gradient step, and say so
            bits, c, failure = 0, 0.0, e
        restore_update_all_([p.data for p in self.params], self.rule, t, c, d, self.decay)
        loss = (loss_plus + loss_minus) / 2.0
        if self.writer is not None:
            self.writer.append_step(bits, loss if self.writer_records_losses else None)
        self.step_count += 1
        self.last_grad_bits = bits
        if failure is not None and (self.on_nonfinite == "raise" or math.isfinite(loss)):
            raise NonFiniteLossError(f"step {self.step_count - 1}: {failure}; recorded as a zero update "
                                     f"(losses {loss_plus:g}, {loss_minus:g})")
        return loss

    # -- trajectory -------------------------------------------------------------------------------

    def fingerprints(self) -> list[str]:
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
        if self.step_count:
            raise MezoReplayError("a trajectory must start before the first step")
        if unknown := set(new_tensors) - set(self.names):
            raise ValueError(f"new_tensors {sorted(unknown)} are not tuned parameters")
        tensors = [{"name": n, "dtype": DTYPE_NAMES[p.dtype], "shape": list(p.shape), "sha256": fp}
                   for n, p, fp in zip(self.names, self.params, self._base_fingerprints)]
        if self.rule.weight_decay:
            for entry, decay in zip(tensors, self.decay):
                entry["decay"] = decay
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
               **header_args: Any) -> TrajectoryWriter:
        """Starts writing every step to a new `.mzt` file; see `header` for the arguments."""
        header = self.header(**header_args)
        self.writer = TrajectoryWriter(path, header, overwrite=overwrite, steps_per_chunk=steps_per_chunk)
        self.writer_records_losses = bool(header["records"]["losses"])
        for k, entry in enumerate(header["tensors"]):
            if entry.get("init") is True:
                t = self.params[k].detach().cpu().contiguous().reshape(-1)
                self.writer.write_init(k, t.view(torch.uint8).numpy().tobytes())
        return self.writer

    def attach(self, writer: TrajectoryWriter, steps_done: int) -> None:
        """Continues an existing trajectory (resume): the weights must already equal a replay of its
        `steps_done` steps, which is how train.py's resume leaves them."""
        if writer.steps != steps_done:
            raise ValueError(f"the trajectory holds {writer.steps} steps, not {steps_done}")
        self.writer, self.writer_records_losses, self.step_count = writer, writer.records_losses, steps_done

    def close(self) -> None:
        """Ends the trajectory with the fingerprint of the weights as they are now (NaNs made canonical)."""
        for p in self.params:
            canonicalize_nan_(p.data)
        if self.writer is not None:
            self.writer.write_fingerprint(self.fingerprints())
            self.writer.close()
            self.writer = None

    def __enter__(self) -> MeZO:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
