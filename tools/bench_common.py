"""What every benchmark in tools/ shares: warm-up then the median of several timed runs, a header that
says where and when, and a byte comparison that ends the run with exit status 1 when two paths differ.

A timing on a shared 2-core VM swings by about 30% from run to run, so a single sample says little; the
median of --repeats runs after --warmup untimed ones is what the scripts print, with the spread beside it.
"""
from __future__ import annotations

import argparse
import hashlib
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MISMATCH_EXIT = 1


@dataclass
class Timing:
    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def spread(self) -> str:
        """min-max of the samples, for the reader to judge the median."""
        return f"{min(self.samples):.3g}-{max(self.samples):.3g} s over {len(self.samples)}"


def add_timing_options(ap: argparse.ArgumentParser, repeats: int = 5, warmup: int = 1, compares: bool = True) -> None:
    ap.add_argument("--repeats", type=int, default=repeats, help=f"timed runs; the median is reported (default {repeats})")
    ap.add_argument("--warmup", type=int, default=warmup, help=f"untimed runs first (default {warmup})")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, usually the cores); "
                    "on a loaded machine 1 thread avoids the spinning of idle OpenMP threads")
    if compares:
        ap.add_argument("--inject-mismatch", action="store_true",
                        help="testing: flip one bit of one path's result, to check that the comparison fails the run")


def check_timing_options(args: argparse.Namespace) -> None:
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("Error: --repeats must be at least 1 and --warmup at least 0")
    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))


def timed(fn: Callable[[Any], object], repeats: int, warmup: int, sync: Callable[[], None] = lambda: None,
          setup: Callable[[], Any] = lambda: None) -> tuple[Timing, object]:
    """(timing, the last run's result): fn(setup()) run warmup + repeats times, setup left out of the clock."""
    result = None
    for _ in range(warmup):
        fn(setup())
        sync()
    samples = []
    for _ in range(repeats):
        arg = setup()
        sync()
        start = time.perf_counter()
        result = fn(arg)
        sync()
        samples.append(time.perf_counter() - start)
    return Timing(samples), result


def header(what: str, args: argparse.Namespace, device: str = "cpu") -> str:
    import torch

    where = _cpu_name()
    if device.startswith("cuda") and torch.cuda.is_available():
        where = torch.cuda.get_device_name(device)
    return (f"{what}; {time.strftime('%Y-%m-%d')}; device {device} ({where}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; median of {args.repeats} after {args.warmup} warm-up")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]}, {len(names)} logical CPUs" if names else platform.machine()
    except OSError:
        return platform.processor() or platform.machine()


def flip_one_bit(data: bytes) -> bytes:
    """--inject-mismatch: the result of one path, one bit changed."""
    return bytes([data[0] ^ 1]) + data[1:] if data else b"\x01"


def require_same(what: str, a_name: str, a: bytes, b_name: str, b: bytes) -> None:
    """Exit 1 with one clear line when the two paths' bytes differ; print the agreement otherwise."""
    if a != b:
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        print(f"FAIL: {what}: {a_name} and {b_name} differ (first at byte {first} of {len(a)} / {len(b)}; "
              f"sha256 {hashlib.sha256(a).hexdigest()[:12]} vs {hashlib.sha256(b).hexdigest()[:12]})",
              file=sys.stderr, flush=True)
        raise SystemExit(MISMATCH_EXIT)
    print(f"bytes identical: {what}: {a_name} == {b_name} ({len(a):,} bytes)", flush=True)
