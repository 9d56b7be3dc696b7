"""The reference MeZO step, re-created as the baseline that tools/bench_train_step.py measures against.

It follows the procedure of the MeZO paper's released trainer (Malladi et al., 2023): the noise z of a
step is never stored; before each of the four passes over the parameters the global torch generator is
re-seeded with the step's seed and z is drawn again, tensor by tensor, with torch.normal in the
parameter's dtype; each pass writes `param.data = param.data + scale * eps * z` (a new tensor, as the
original does). Passes: perturb +eps, loss; perturb -2 eps, loss; restore +eps; update with
lr * (g * z + wd * param) on tensors that decay. Its noise is torch's, so unlike mezo-replay it cannot
be replayed on another device: it is here only to be timed.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


class ReferenceMeZO:
    def __init__(self, named_params, *, lr: float, eps: float = 1e-3, weight_decay: float = 0.0, seed: int = 0):
        self.params = [(n, p) for n, p in named_params if p.requires_grad]
        self.lr, self.eps, self.wd = lr, eps, weight_decay
        self.gen = torch.Generator().manual_seed(seed)

    def _perturb(self, seed: int, scale: float) -> None:
        torch.manual_seed(seed)
        for _, p in self.params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data + scale * z * self.eps

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> float:
        seed = int(torch.randint(0, 1_000_000_000, (1,), generator=self.gen))
        self._perturb(seed, 1.0)
        loss1 = float(closure())
        self._perturb(seed, -2.0)
        loss2 = float(closure())
        self._perturb(seed, 1.0)
        g = (loss1 - loss2) / (2 * self.eps)
        torch.manual_seed(seed)
        for name, p in self.params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            if self.wd and "bias" not in name and "layer_norm" not in name and "layernorm" not in name:
                p.data = p.data - self.lr * (g * z + self.wd * p.data)
            else:
                p.data = p.data - self.lr * g * z
        return loss1
