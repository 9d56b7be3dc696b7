"""Replay throughput (element-steps per second) of every path on one device, measured in the same run on
the same tensor, with their bytes compared: on the CPU the compiled kernel beside the torch path and the
numpy reference; on CUDA the Triton kernel (and its native-bf16 variant) beside the torch path, with the
ratio to the roofline of tools/roofline.py.

    python tools/bench_replay.py [--elements N] [--steps T] [--dtype BF16] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mezo_replay import reference as R
from mezo_replay.rule import MezoSGD, encode_grad
from mezo_replay import cpu_kernel, triton_kernels
from mezo_replay.steps import replay_tensor_, set_backend, step_constants

TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=1 << 20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", default="BF16", choices=list(TORCH))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--noise", default="gaussian16", choices=["gaussian16", "rademacher16"])
    ap.add_argument("--clock-ghz", type=float, default=1.98, help="for the roofline (CUDA)")
    args = ap.parse_args()
    sgd = MezoSGD.create(lr=1e-6, eps=1e-3, seed=1, noise=args.noise)
    rng = np.random.default_rng(0)
    grads = [encode_grad(float(g)) for g in rng.standard_normal(args.steps)]
    w = (torch.randn(args.elements, generator=torch.Generator().manual_seed(0)) * 0.02).to(TORCH[args.dtype])

    cuda = args.device.startswith("cuda")
    constants = step_constants(sgd, grads)

    def timed(backend: str, native_bf16: bool = False, isa: str | None = None) -> tuple[float, torch.Tensor]:
        set_backend(backend)
        t = w.clone().to(args.device)
        if native_bf16:
            def run(x, cs):
                triton_kernels.apply_(x, 0, sgd, 0, 0, triton_kernels.REPLAY, constants=cs, native_bf16=True)
        elif isa:  # one kernel call on one thread, with this instruction set
            def run(x, cs):
                cpu_kernel.apply_(x, 0, sgd, 0, 0, cpu_kernel.REPLAY, constants=cs, isa=isa)
        else:
            def run(x, cs):
                replay_tensor_(x, sgd, 0, cs)
        run(t[:1 << 16].clone(), constants)  # warm-up: compiles the kernels, uploads the constants
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        run(t, constants)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, t

    torch_s, t = timed("torch")
    fast = []  # (name, seconds) of the kernels, each checked byte for byte against the torch path
    if args.device == "cpu" and cpu_kernel.available():
        fast.append((f"compiled cpu, {cpu_kernel.isas()[-1]}", timed("compiled")))
        for isa in reversed(cpu_kernel.isas()):
            fast.append((f"  {isa}, 1 thread", timed("compiled", isa=isa)))
    if triton_kernels.available() and (cuda or triton_kernels.interpreting()):  # interpreted: a logic check
        fast.append(("triton", timed("triton")))
        if args.dtype == "BF16" and cuda:
            fast.append(("triton native-bf16", timed("triton", native_bf16=True)))
    for name, (_, out) in fast:
        assert torch.equal(out.view(torch.uint8), t.view(torch.uint8)), f"{name} and torch disagree"

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
    ceiling = None
    if cuda and fast:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from roofline import roofline

        sms = torch.cuda.get_device_properties(args.device).multi_processor_count
        ceiling = roofline(args.dtype, args.noise, sms=sms, clock_ghz=args.clock_ghz)[0]
        print(f"roofline (tools/roofline.py, {sms} SMs at {args.clock_ghz} GHz): {ceiling:.3e} element-steps/s")
    print(f"{'path':<26}{'element-steps/s':>18}{'vs numpy':>10}{'vs torch':>10}{'of roofline':>13}")
    print(f"{'numpy reference':<26}{es / ref_s:>18.3e}{1.0:>10.2f}{torch_s / ref_s:>10.2f}{'':>13}")
    print(f"{'torch ' + args.device:<26}{es / torch_s:>18.3e}{ref_s / torch_s:>10.2f}{1.0:>10.2f}{'':>13}")
    for name, (s, _) in fast:
        roof = f"{es / s / ceiling:>13.0%}" if ceiling and name.startswith("triton") else f"{'':>13}"
        print(f"{name:<26}{es / s:>18.3e}{ref_s / s:>10.2f}{torch_s / s:>10.2f}{roof}")
    print(f"bytes identical: every path against torch; torch against the numpy reference on the first "
          f"{n_ref} elements: {same}")


if __name__ == "__main__":
    main()
