"""Where a MeZO training step's time goes: a torch.profiler trace of a few steps after warm-up.

    python tools/profile_train_step.py --device cuda --shape opt-1.3b --dtype bf16 --batch 16 --seq 256
    python tools/profile_train_step.py --device cpu --shape tiny --dtype fp32 --batch 2 --seq 8

Same model and batch as tools/bench_train_step.py. Printed per profiled step:
* the split of the step's host time between the two forwards (the closure), the noise passes (the
  optimizer's calls into kernels/steps.py), writing the record, and the rest (the gradient's host
  arithmetic, Python), each annotated here by wrapping those calls; on CUDA also the device time of each;
* the top kernels by self device time (CUDA) or the top ops by self CPU time (CPU);
* on CUDA, host gaps: the device idle between consecutive kernels (the GPU waiting for the host to launch
  work), the total and the largest few with the kernels on either side and the op that launched the next;
  on the CPU, the step's time outside any torch op (Python, and the compiled kernel, which is no torch op);
* host synchronisations: reads of a tensor's value from Python (item, float, int, bool, tolist, numpy of a
  tensor on the profiled device, counted by wrapping those methods) on either device, and on CUDA the
  synchronising runtime calls and device-to-host copies the trace shows.

--step queued (the default) profiles `opt.queue_step(closure)`, the step fit() takes on a GPU between
evaluations; --step fused `step(closure, settle=False)`; --step settled the three-pass step. Timings under the
profiler are inflated by its own overhead (most on the CPU, where every op is recorded); the shares and
counts are what to read. Nothing is compared byte for byte here; bench_train_step.py does that.
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import functools
import json
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import header  # noqa: E402
from bench_train_step import add_model_options, build  # noqa: E402

from mezo_replay import MeZO  # noqa: E402
from mezo_replay.training import optimizer as optimizer_module  # noqa: E402
from mezo_replay.kernels.steps import set_backend  # noqa: E402

STEP, FORWARD, RECORD = "mezo step", "forward", "record"
PASSES = ("perturb_all_", "restore_update_all_", "update_perturb_all_")  # what optimizer.py calls per step
READS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


@dataclass
class Event:
    name: str
    cat: str
    start: float  # microseconds
    end: float
    tid: object
    correlation: int | None


def load_trace(path: Path) -> list[Event]:
    """The complete ('X') events of a chrome trace written by torch.profiler."""
    events = []
    for e in json.loads(path.read_text()).get("traceEvents", []):
        if e.get("ph") == "X" and "dur" in e:
            args = e.get("args") or {}
            events.append(Event(e.get("name", ""), e.get("cat", ""), float(e["ts"]), float(e["ts"]) + float(e["dur"]),
                                e.get("tid"), args.get("correlation")))
    return events


def within(events: list[Event], lo: float, hi: float) -> list[Event]:
    return [e for e in events if lo <= e.start and e.end <= hi]


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, reach = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total


def innermost_op(ops_by_tid: dict, tid: object, t: float) -> str:
    """The name of the innermost torch op on thread `tid` running at host time t (the launcher)."""
    best = None
    for op in ops_by_tid.get(tid, ()):
        if op.start <= t <= op.end and (best is None or op.end - op.start < best.end - best.start):
            best = op
    return best.name if best else "(no torch op: Python or a kernel call)"


def annotated(events: list[Event], name: str) -> list[Event]:
    return [e for e in events if e.cat == "user_annotation" and e.name == name]


def report(events: list[Event], cuda: bool, reads: list[int], top: int, gaps_shown: int) -> None:
    steps = sorted((e for e in events if e.cat == "user_annotation" and e.name.startswith(STEP)), key=lambda e: e.start)
    ops = [e for e in events if e.cat == "cpu_op"]
    n = len(steps)
    if not n:
        raise SystemExit("Error: the trace holds no step annotations (is the profiler working on this build?)")
    host_ms = sum(s.end - s.start for s in steps) / n / 1e3
    parts = {name: annotated(events, name) for name in (FORWARD, *PASSES, RECORD)}
    print(f"\nhost time per step {host_ms:.2f} ms:")
    accounted = 0.0
    for name, found in parts.items():
        mine = [e for s in steps for e in within(found, s.start, s.end)]
        if mine:
            ms = sum(e.end - e.start for e in mine) / n / 1e3
            accounted += ms
            print(f"  {name:<22}{ms:>9.2f} ms {ms / host_ms:>5.0%}  ({len(mine) / n:.0f} calls)")
    rest = host_ms - accounted
    print(f"  {'the rest':<22}{rest:>9.2f} ms {rest / host_ms:>5.0%}  (reading the losses, the gradient, Python)")
    print(f"value reads from Python per step (item/float/int/bool/tolist/numpy of a {'CUDA' if cuda else 'CPU'} "
          f"tensor): {_per_step(reads)}")
    if cuda:
        _device_report(events, steps, parts, ops, n, top, gaps_shown)
    else:
        _cpu_report(steps, ops, n, host_ms, top)


def _per_step(counts: list[int]) -> str:
    return ", ".join(str(c) for c in counts) + f" (steps 1..{len(counts)})"


def _cpu_report(steps: list[Event], ops: list[Event], n: int, host_ms: float, top: int) -> None:
    print("host synchronisations: n/a on the CPU (a value read there is a plain memory read; on CUDA each one "
          "waits for the queue)")
    tid = steps[0].tid
    outside = 0.0
    for s in steps:
        mine = [(o.start, o.end) for o in within(ops, s.start, s.end) if o.tid == tid]
        outside += (s.end - s.start) - union_length(mine)
    outside_ms = outside / n / 1e3
    print(f"time outside any torch op per step: {outside_ms:.2f} ms ({outside_ms / host_ms:.0%}): Python, the "
          "compiled noise kernel (a ctypes call, no torch op) and file writes")
    # self time: an op's duration less its direct children's, on its thread
    self_us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for s in steps:
        by_tid: dict[object, list[Event]] = defaultdict(list)
        for o in within(ops, s.start, s.end):
            by_tid[o.tid].append(o)
        for group in by_tid.values():
            for o, own in _self_times(group):
                self_us[o.name] += own
                calls[o.name] += 1
    _print_top("top ops by self CPU time", self_us, calls, n, host_ms, top)


def _self_times(group: list[Event]) -> list[tuple[Event, float]]:
    """(op, self time) for ops on one thread: nesting by containment, as the profiler nests them."""
    group = sorted(group, key=lambda e: (e.start, -e.end))
    out: list[list] = []
    stack: list[list] = []
    for o in group:
        while stack and stack[-1][0].end < o.end:
            stack.pop()
        entry = [o, o.end - o.start]
        if stack:
            stack[-1][1] -= o.end - o.start
        stack.append(entry)
        out.append(entry)
    return [(o, max(0.0, own)) for o, own in out]


def _print_top(title: str, total_us: dict, calls: dict, n: int, step_ms: float, top: int) -> None:
    print(f"\n{title} (per step; share of the step's {step_ms:.2f} ms)")
    print(f"{'ms':>9}{'share':>7}{'calls':>7}  name")
    for name, us in sorted(total_us.items(), key=lambda kv: -kv[1])[:top]:
        ms = us / n / 1e3
        print(f"{ms:>9.3f}{ms / step_ms:>7.1%}{calls[name] / n:>7.0f}  {name[:110]}")


def _device_report(events, steps, parts, ops, n, top, gaps_shown) -> None:
    runtime = [e for e in events if e.cat == "cuda_runtime" or e.cat == "cuda_driver"]
    launch_of = {e.correlation: e for e in runtime if e.correlation is not None}
    step_starts = [s.start for s in steps]

    def step_of(host_t: float) -> int | None:
        i = bisect.bisect_right(step_starts, host_t) - 1
        return i if i >= 0 and host_t <= steps[i].end else None

    ops_by_tid: dict[object, list[Event]] = defaultdict(list)
    for o in ops:
        ops_by_tid[o.tid].append(o)
    ranges = sorted((e.start, e.end, name) for name, found in parts.items() for e in found)

    def part_of(host_t: float) -> str:
        """The annotated part of the step (forward, a noise pass, record) whose call launched the work."""
        i = bisect.bisect_right(ranges, (host_t, float("inf"), "")) - 1
        return ranges[i][2] if i >= 0 and ranges[i][0] <= host_t <= ranges[i][1] else "other"

    work = []  # (device event, its launch, step index)
    for e in events:
        if e.cat in DEVICE_CATS:
            launch = launch_of.get(e.correlation)
            k = step_of(launch.start) if launch else None
            if k is not None:
                work.append((e, launch, k))
    if not work:
        print("no device activity attributed to the steps (was CUDA profiling available?)")
        return
    work.sort(key=lambda w: w[0].start)
    span_ms = (max(w[0].end for w in work) - work[0][0].start) / n / 1e3
    busy = union_length([(w[0].start, w[0].end) for w in work]) / n / 1e3
    print(f"device per step: span {span_ms:.2f} ms, busy {busy:.2f} ms ({busy / span_ms:.0%}), idle "
          f"{span_ms - busy:.2f} ms; busy by the part of the step that launched the work:")
    by_part: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for e, launch, _ in work:
        by_part[part_of(launch.start)].append((e.start, e.end))
    for name, spans in sorted(by_part.items(), key=lambda kv: -union_length(kv[1])):
        ms = union_length(spans) / n / 1e3
        print(f"  {name:<22}{ms:>9.2f} ms {ms / span_ms:>5.0%}  ({len(spans) / n:.0f} kernels and copies)")

    gaps = []  # (idle us, previous work, next work, its launch, step)
    reach, prev = work[0][0].end, work[0]
    for w in work[1:]:
        if w[0].start > reach:
            gaps.append((w[0].start - reach, prev[0], w[0], w[1], w[2]))
        if w[0].end >= reach:
            reach, prev = w[0].end, w
    per_step = [0.0] * n
    for g in gaps:
        per_step[g[4]] += g[0]
    print(f"host gaps (device idle between consecutive kernels, counted in the step of the kernel after): "
          f"{sum(per_step) / n / 1e3:.2f} ms per step; by step " + ", ".join(f"{x / 1e3:.2f}" for x in per_step)
          + f" ms; {len(gaps) / n:.0f} gaps per step")
    print(f"largest {gaps_shown} gaps:")
    for idle, before, after, launch, k in sorted(gaps, key=lambda g: -g[0])[:gaps_shown]:
        print(f"  {idle / 1e3:8.3f} ms  step {k + 1}: after {before.name[:50]!r} before {after.name[:50]!r}, "
              f"launched in {part_of(launch.start)} by {innermost_op(ops_by_tid, launch.tid, launch.start)[:50]!r}")

    sync_counts = []
    for s in steps:
        counts: dict[str, int] = defaultdict(int)
        for r in within(runtime, s.start, s.end):
            if r.name in SYNC_CALLS or r.name.startswith("cudaMemcpy") and r.name not in ("cudaMemcpyAsync",):
                counts[r.name] += 1
        sync_counts.append(counts)
    dtoh = [0] * n
    for e, _, k in work:
        if e.cat == "gpu_memcpy" and "DtoH" in e.name:
            dtoh[k] += 1
    print("host synchronisations per step: " + "; ".join(
        f"step {k + 1}: " + (", ".join(f"{name} {c}" for name, c in sorted(cs.items())) or "no sync call")
        + f", DtoH copies {dtoh[k]}" for k, cs in enumerate(sync_counts)))

    self_us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for e, _, _ in work:
        self_us[e.name] += e.end - e.start
        calls[e.name] += 1
    _print_top("top kernels by self device time", self_us, calls, n, span_ms, top)


def _annotated(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def annotate_passes(opt: MeZO):
    """Names the optimizer's noise passes and record writes in the trace (they are no torch ops on the CPU
    kernel's path, so the trace would not show them otherwise). Only names are added: the same calls run."""
    saved = {name: getattr(optimizer_module, name) for name in PASSES if hasattr(optimizer_module, name)}
    writer = opt.writer
    try:
        for name, fn in saved.items():
            setattr(optimizer_module, name, _annotated(name, fn))
        if writer is not None:
            writer.append_step = _annotated(RECORD, writer.append_step)
        yield
    finally:
        for name, fn in saved.items():
            setattr(optimizer_module, name, fn)
        if writer is not None:
            del writer.append_step


@contextlib.contextmanager
def count_reads(device: torch.device):
    """Counts reads of a value of a tensor on `device` from Python (each one a host sync on CUDA)."""
    counter = [0]
    saved = {name: getattr(torch.Tensor, name) for name in READS}
    own = {name for name in READS if name in vars(torch.Tensor)}  # the rest are inherited: delete the shims

    def counting(fn):
        @functools.wraps(fn)
        def wrapper(t, *args, **kwargs):
            if t.device.type == device.type:
                counter[0] += 1
            return fn(t, *args, **kwargs)
        return wrapper

    try:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, counting(fn))
        yield counter
    finally:
        for name, fn in saved.items():
            if name in own:
                setattr(torch.Tensor, name, fn)
            else:
                delattr(torch.Tensor, name)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(ap)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (default 3)")
    ap.add_argument("--warmup", type=int, default=2, help="unprofiled steps first (default 2)")
    ap.add_argument("--step", choices=["settled", "fused", "queued"], default="queued",
                    help="settled: step(closure), three passes; fused: step(closure, settle=False), two passes, "
                         "one host read; queued: queue_step(closure), two passes, the host never waits (what fit "
                         "does on a GPU between evaluations) (default: queued)")
    ap.add_argument("--top", type=int, default=15, help="rows of the top kernels / ops (default 15)")
    ap.add_argument("--gaps", type=int, default=8, help="largest host gaps shown (default 8)")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--trace", help="also keep the chrome trace here (open in chrome://tracing or Perfetto)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("Error: --steps must be at least 1 and --warmup at least 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    set_backend(args.backend)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("Error: --device cuda but torch sees no CUDA device")
    model, ids = build(args)

    def closure() -> torch.Tensor:
        with record_function(FORWARD):
            return model(input_ids=ids, labels=ids).loss.float()

    work = Path(tempfile.mkdtemp(prefix="profile_train_step."))
    opt = MeZO(model.named_parameters(), lr=1e-7, eps=1e-3, seed=0)
    opt.record(work / "profile.mzt")  # a real run writes its records: that is part of the step
    def one_step() -> None:
        if args.step == "queued":
            opt.queue_step(closure)
        else:
            opt.step(closure, settle=args.step == "settled")

    for _ in range(args.warmup):
        one_step()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    reads: list[int] = []
    with profile(activities=activities) as prof, annotate_passes(opt):
        for k in range(args.steps):
            with record_function(f"{STEP} {k + 1}"), count_reads(torch.device(args.device)) as counter:
                one_step()
            reads.append(counter[0])
        if cuda:
            torch.cuda.synchronize()
    opt.settle()
    opt.close()
    trace = Path(args.trace) if args.trace else work / "trace.json"
    prof.export_chrome_trace(str(trace))

    class Timing:  # header() reads repeats and warmup
        repeats, warmup = args.steps, args.warmup

    params = sum(p.numel() for p in model.parameters())
    what = {"settled": "settled three-pass step, step(closure)",
            "fused": "fused two-pass step, step(closure, settle=False)",
            "queued": "queued two-pass step, queue_step(closure)"}[args.step]
    print(header(f"profile of {args.steps} MeZO steps, {what}: {args.shape} ({params:,} params) {args.dtype}, "
                 f"batch {args.batch} x {args.seq}, backend {args.backend}", Timing, args.device).replace(
                     "median of", "profiled").replace("warm-up", "warm-up steps"))
    report(load_trace(trace), cuda, reads, args.top, args.gaps)
    if args.trace:
        print(f"\nchrome trace: {trace}")


if __name__ == "__main__":
    main()
