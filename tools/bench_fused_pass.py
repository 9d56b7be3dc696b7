"""Training's step-to-step pass on the CPU: the compiled kernel's fused UPDATE_PERTURB (P3 of step t and P1
of step t+1 in one pass) against RESTORE_UPDATE then PERTURB (two passes), on the same tensor, bytes
compared (exit 1 if they differ).

    python tools/bench_fused_pass.py [--elements 4194304] [--dtype BF16 F32] [--repeats 9] [--warmup 2]

Rows: one kernel call on one thread with each instruction set the CPU runs, and the library's own path
(steps.update_perturb_all_ vs restore_update_all_ + perturb_all_, slices over torch's threads). Times are
the median and the minimum of --repeats runs after --warmup, each on a fresh copy of the tensor, in CPU
seconds (the calling thread's for the one-thread rows, the process's for the threaded one): on a shared
machine CPU time is what other processes disturb least; wall time would count the time slices they take.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from mezo_replay.arithmetic.rule import MezoSGD, encode_grad
from mezo_replay.kernels import cpu_kernel, steps

TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _time(fn, w: torch.Tensor, repeats: int, warmup: int, clock) -> tuple[float, float, torch.Tensor]:
    times = []
    for i in range(warmup + repeats):
        x = w.clone()
        t0 = clock()
        fn(x)
        if i >= warmup:
            times.append(clock() - t0)
    return statistics.median(times), min(times), x


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=1 << 22)
    ap.add_argument("--dtype", nargs="+", default=["BF16", "F32"], choices=list(TORCH))
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    if not cpu_kernel.available():
        sys.exit("the compiled CPU kernel is not built")
    sgd = MezoSGD.create(lr=1e-3, eps=1e-3, seed=1, weight_decay=0.1)
    step = 5
    c, d = sgd.coefficient(step, encode_grad(-1.25)), sgd.decay(step)
    print(f"fused training pass, {args.elements:,} elements, torch threads {torch.get_num_threads()}, "
          f"CPU ms, median (min) of {args.repeats} runs")
    print(f"{'dtype':<6}{'path':<24}{'P3 then P1, ms':>18}{'fused, ms':>18}{'apart/fused':>13}")
    failed = False
    for name in args.dtype:
        w = (torch.randn(args.elements, generator=torch.Generator().manual_seed(0)) * 0.02).to(TORCH[name])
        rows = []
        for isa in reversed(cpu_kernel.isas()):
            def apart(x, isa=isa):
                cpu_kernel.apply_(x, 0, sgd, 0, step, cpu_kernel.RESTORE_UPDATE, constants=[(c, d)], isa=isa)
                cpu_kernel.apply_(x, 0, sgd, 0, step + 1, cpu_kernel.PERTURB, scale=sgd.eps, isa=isa)

            def fused(x, isa=isa):
                cpu_kernel.apply_(x, 0, sgd, 0, step, cpu_kernel.UPDATE_PERTURB, constants=[(c, d)], isa=isa)
            rows.append((f"kernel {isa}, 1 thread", apart, fused, time.thread_time))

        def lib_apart(x):
            steps.restore_update_all_([x], sgd, step, c, d, [True])
            steps.perturb_all_([x], sgd, step + 1, sgd.eps)

        rows.append(("steps (threaded)", lib_apart, lambda x: steps.update_perturb_all_([x], sgd, step, c, d, [True]),
                     time.process_time))
        for label, apart, fused, clock in rows:
            a_med, a_min, a_out = _time(apart, w, args.repeats, args.warmup, clock)
            f_med, f_min, f_out = _time(fused, w, args.repeats, args.warmup, clock)
            same = torch.equal(a_out.view(torch.uint8), f_out.view(torch.uint8))
            failed |= not same
            print(f"{name:<6}{label:<24}{a_med * 1e3:>9.2f} ({a_min * 1e3:6.2f}){f_med * 1e3:>9.2f} ({f_min * 1e3:6.2f})"
                  f"{a_med / f_med:>12.2f}x" + ("" if same else "  FAIL: bytes differ"))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
