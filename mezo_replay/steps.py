"""Applying the rule's phases to whole tensors, slice by slice, for training and for replay alike.

Training and replay run this same code, so they cannot disagree. Slicing bounds the temporaries
(noise and Philox words) to a few slices' worth, whatever the tensor's size, and is invisible in the
result because every element's noise depends only on its own index (spec/generator.md).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from .noise import noise
from .rule import MezoSGD, perturb_, restore_update_


def default_slice(device: torch.device) -> int:
    return 1 << 24 if device.type == "cuda" else 1 << 18


def _flat_slices(w: torch.Tensor, size: int) -> Iterator[tuple[int, torch.Tensor]]:
    flat = w.view(-1)
    for start in range(0, flat.numel(), size):
        yield start, flat[start:start + size]


def _in_place(w: torch.Tensor, fn: Callable[[torch.Tensor], None]) -> None:
    """Runs fn on a contiguous view; element indices are row-major whatever w's strides are."""
    if w.is_contiguous():
        fn(w)
    else:
        work = w.contiguous()
        fn(work)
        w.copy_(work)


def perturb_tensor_(w: torch.Tensor, rule: MezoSGD, step: int, index: int, scale: float,
                    slice_size: int | None = None) -> None:
    """P1 (scale = eps) or P2 (scale = -2 eps) of one step on one tuned tensor."""
    size = slice_size or default_slice(w.device)

    def run(t: torch.Tensor) -> None:
        for start, s in _flat_slices(t, size):
            perturb_(s, noise(rule.noise, rule.seed, step, index, start, s.numel(), t.device), scale)

    _in_place(w, run)


def restore_update_tensor_(w: torch.Tensor, rule: MezoSGD, step: int, index: int, c: float,
                           slice_size: int | None = None) -> None:
    """P3 of one step on one tuned tensor."""
    size = slice_size or default_slice(w.device)

    def run(t: torch.Tensor) -> None:
        for start, s in _flat_slices(t, size):
            z = noise(rule.noise, rule.seed, step, index, start, s.numel(), t.device)
            restore_update_(s, z, rule.eps, c)

    _in_place(w, run)


def replay_tensor_(w: torch.Tensor, rule: MezoSGD, index: int, coefficients: Sequence[float], *,
                   first_step: int = 0, slice_size: int | None = None,
                   progress: Callable[[int], None] | None = None) -> None:
    """Steps first_step, first_step+1, ... of one tuned tensor, in place.

    Each slice runs all its steps before the next slice starts, so the noise of a step is drawn once
    for its three phases and the slice stays in cache. `progress` is called with element-steps done.
    """
    size = slice_size or default_slice(w.device)

    def run(t: torch.Tensor) -> None:
        for start, s in _flat_slices(t, size):
            for j, c in enumerate(coefficients):
                z = noise(rule.noise, rule.seed, first_step + j, index, start, s.numel(), t.device)
                perturb_(s, z, rule.eps)
                perturb_(s, z, -2.0 * rule.eps)
                restore_update_(s, z, rule.eps, c)
            if progress is not None:
                progress(s.numel() * len(coefficients))

    _in_place(w, run)
