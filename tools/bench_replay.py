"""Replay throughput (element-steps per second) of every path on one device, measured in the same run on
the same tensor, with their bytes compared (the run fails, exit 1, if any two differ): on the CPU the
compiled kernel beside the torch path and the numpy reference; on CUDA the Triton kernel (bfloat16 by the
hardware conversion where the GPU has one, the default, and by the spec's integer rounding, the fallback)
beside the torch path, with the ratio to the roofline of tools/roofline.py.

    python tools/bench_replay.py [--elements N] [--steps T] [--dtype BF16] [--device cpu|cuda] [--repeats 5]

Every figure is the median of --repeats timed runs after --warmup untimed ones, each on a fresh copy of
the tensor. The numpy reference is slow, so it is timed on the first --reference-elements elements and
its rate scaled to the whole tensor: that row is marked "extrapolated". Its bytes are compared on that
prefix only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import add_timing_options, check_timing_options, flip_one_bit, header, require_same, timed  # noqa: E402

from mezo_replay.kernels import cpu_kernel, triton_kernels  # noqa: E402
from mezo_replay.arithmetic import reference as R  # noqa: E402
from mezo_replay.arithmetic.rule import MezoSGD, encode_grad  # noqa: E402
from mezo_replay.kernels.steps import replay_tensor_, set_backend, step_constants  # noqa: E402

TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=1 << 20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", default="BF16", choices=list(TORCH))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--noise", default="gaussian16", choices=["gaussian16", "rademacher16"])
    ap.add_argument("--reference-elements", type=int, default=1 << 16,
                    help="elements the numpy reference is timed and compared on (default 65536)")
    ap.add_argument("--clock-ghz", type=float, default=1.98, help="for the roofline (CUDA)")
    add_timing_options(ap)
    args = ap.parse_args(argv)
    check_timing_options(args)
    sgd = MezoSGD.create(lr=1e-6, eps=1e-3, seed=1, noise=args.noise)
    rng = np.random.default_rng(0)
    grads = [encode_grad(float(g)) for g in rng.standard_normal(args.steps)]
    w = (torch.randn(args.elements, generator=torch.Generator().manual_seed(0)) * 0.02).to(TORCH[args.dtype])
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    constants = step_constants(sgd, grads)

    def path(backend: str, integer_bf16: bool = False, isa: str | None = None):
        """(timing, result bytes) of one path: replay of every step on a fresh copy of w."""
        set_backend(backend)
        if integer_bf16:
            def run(x):
                triton_kernels.apply_(x, 0, sgd, 0, 0, triton_kernels.REPLAY, constants=constants, native_bf16=False)
                return x
        elif isa:  # one kernel call on one thread, with this instruction set
            def run(x):
                cpu_kernel.apply_(x, 0, sgd, 0, 0, cpu_kernel.REPLAY, constants=constants, isa=isa)
                return x
        else:
            def run(x):
                replay_tensor_(x, sgd, 0, constants)
                return x
        timing, out = timed(run, args.repeats, args.warmup, sync, setup=lambda: w.clone().to(args.device))
        return timing, tensor_bytes(out)

    rows = [("torch " + args.device, path("torch"))]
    if args.device == "cpu" and cpu_kernel.available():
        rows.append((f"compiled cpu, {cpu_kernel.isas()[-1]}", path("compiled")))
        for isa in reversed(cpu_kernel.isas()):
            rows.append((f"  {isa}, 1 thread", path("compiled", isa=isa)))
    if triton_kernels.available() and (cuda or triton_kernels.interpreting()):  # interpreted: a logic check
        rows.append(("triton", path("triton")))
        if args.dtype == "BF16" and cuda:
            rows.append(("triton integer-bf16", path("triton", integer_bf16=True)))
    set_backend("auto")

    n_ref = min(args.elements, args.reference_elements)
    bits = w[:n_ref].contiguous().view(torch.int16 if args.dtype != "F32" else torch.int32).numpy()
    bits = bits.view(R.BITS_DTYPE[args.dtype])
    rule = sgd.header_fields()["rule"]
    ref_t, ref = timed(lambda b: R.replay(b, args.dtype, seed=sgd.seed, k=0, noise_name=sgd.noise, rule=rule,
                                          grads=grads), args.repeats, args.warmup, setup=lambda: bits.copy())
    ref_s = ref_t.median * args.elements / n_ref
    extrapolated = n_ref < args.elements

    es = args.elements * args.steps
    print(header(f"replay {args.dtype} {args.noise}, {args.elements:,} elements x {args.steps} steps", args,
                 args.device))
    ceiling = None
    if cuda and len(rows) > 1:
        from roofline import roofline

        sms = torch.cuda.get_device_properties(args.device).multi_processor_count
        ceiling = roofline(args.dtype, args.noise, sms=sms, clock_ghz=args.clock_ghz)[0]
        print(f"roofline (derived by tools/roofline.py, {sms} SMs at {args.clock_ghz} GHz): {ceiling:.3e} element-steps/s")
    torch_s = rows[0][1][0].median
    print(f"{'path':<26}{'element-steps/s':>18}{'vs numpy':>10}{'vs torch':>10}{'of roofline':>13}  spread")
    ref_name = "numpy reference" + (" *" if extrapolated else "")
    print(f"{ref_name:<26}{es / ref_s:>18.3e}{1.0:>10.2f}{torch_s / ref_s:>10.2f}{'':>13}  {ref_t.spread()}")
    for name, (t, _) in rows:
        roof = f"{es / t.median / ceiling:>13.0%}" if ceiling and name.startswith("triton") else f"{'':>13}"
        print(f"{name:<26}{es / t.median:>18.3e}{ref_s / t.median:>10.2f}{torch_s / t.median:>10.2f}{roof}  {t.spread()}")
    if extrapolated:
        print(f"* extrapolated: the numpy reference was timed on the first {n_ref:,} of {args.elements:,} elements "
              f"and its rate scaled by {args.elements / n_ref:g} (not measured on the whole tensor)")

    torch_bytes = rows[0][1][1]
    for name, (_, out) in rows[1:]:
        if args.inject_mismatch:
            out = flip_one_bit(out)
        require_same("replay", name.strip(), out, "torch", torch_bytes)
    prefix = torch_bytes[:n_ref * ref.itemsize]
    if args.inject_mismatch and len(rows) == 1:
        prefix = flip_one_bit(prefix)
    require_same(f"replay, first {n_ref:,} elements", "torch", prefix, "numpy reference", ref.tobytes())


if __name__ == "__main__":
    main()
