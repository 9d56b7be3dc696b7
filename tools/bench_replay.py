"""Replay throughput (element-steps per second) of the torch path and the compiled CPU kernel beside the
numpy reference, measured in the same run on the same tensor, with the bytes of all three compared.

    python tools/bench_replay.py [--elements N] [--steps T] [--dtype BF16] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mezo_replay import reference as R
from mezo_replay.rule import MezoSGD, encode_grad
from mezo_replay import cpu_kernel
from mezo_replay.steps import replay_tensor_, set_backend, step_constants

TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=1 << 20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", default="BF16", choices=list(TORCH))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    sgd = MezoSGD.create(lr=1e-6, eps=1e-3, seed=1)
    rng = np.random.default_rng(0)
    grads = [encode_grad(float(g)) for g in rng.standard_normal(args.steps)]
    w = (torch.randn(args.elements, generator=torch.Generator().manual_seed(0)) * 0.02).to(TORCH[args.dtype])

    def timed(backend: str) -> tuple[float, torch.Tensor]:
        set_backend(backend)
        t = w.clone().to(args.device)
        replay_tensor_(t[:1024].clone(), sgd, 0, step_constants(sgd, grads[:1]))  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        replay_tensor_(t, sgd, 0, step_constants(sgd, grads))
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start, t

    torch_s, t = timed("torch")
    compiled = None
    if args.device == "cpu" and cpu_kernel.available():
        compiled = timed("compiled")
        assert torch.equal(compiled[1].view(torch.uint8), t.view(torch.uint8)), "backends disagree"

    n_ref = min(args.elements, 1 << 16)  # the reference is slow: time it on a prefix
    bits = w[:n_ref].contiguous().view(torch.int16 if args.dtype != "F32" else torch.int32).numpy()
    bits = bits.view(R.BITS_DTYPE[args.dtype]).copy()
    start = time.perf_counter()
    ref = R.replay(bits, args.dtype, seed=sgd.seed, k=0, noise_name=sgd.noise, rule=sgd.header_fields()["rule"], grads=grads)
    ref_s = (time.perf_counter() - start) * args.elements / n_ref

    got = t[:n_ref].cpu().contiguous().view(torch.int16 if args.dtype != "F32" else torch.int32).numpy()
    same = bool((got.view(R.BITS_DTYPE[args.dtype]) == ref).all())
    es = args.elements * args.steps
    print(f"device={args.device} dtype={args.dtype} elements={args.elements} steps={args.steps} "
          f"threads={torch.get_num_threads()}")
    print(f"{'path':<22}{'element-steps/s':>18}{'ratio':>8}")
    print(f"{'numpy reference':<22}{es / ref_s:>18.3e}{1.0:>8.2f}")
    print(f"{'torch ' + args.device:<22}{es / torch_s:>18.3e}{ref_s / torch_s:>8.2f}")
    if compiled is not None:
        print(f"{'compiled cpu':<22}{es / compiled[0]:>18.3e}{ref_s / compiled[0]:>8.2f}"
              f"   ({torch_s / compiled[0]:.2f}x the torch path; identical bytes)")
    print(f"bytes identical on the first {n_ref} elements: {same}")


if __name__ == "__main__":
    main()
