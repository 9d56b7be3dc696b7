"""End-to-end reconstruct time: a local bf16 safetensors base plus a trajectory of T steps, through
`replay.reconstruct` (read, base check, replay, write), against steps x parameters.

The base is random (tensors of up to 2^23 elements, like the large matrices of a 1B-class model) and
the trajectory synthetic: T recorded projected gradients, written with the library's own writer, with
no final fingerprint (making one would cost a reconstruct). Instead the bytes are checked two ways, and
the run fails (exit 1) if either differs: every timed run must write the same file, and the first
--check-elements elements of its first tensor must equal the plain torch path's replay of them.

Each size is the median of --repeats timed reconstructs after --warmup untimed ones; a warm-up
reconstructs the first step only (it reads and writes the whole model, fills the page cache and, on CUDA,
compiles the kernels), so that it costs little beside a long trajectory.

    python tools/bench_reconstruct.py --params 1.3e9 --steps 20000 --device cuda      # issue 4's target
    python tools/bench_reconstruct.py --sweep --device cpu --csv docs/reconstruct_cpu.csv --plot docs/reconstruct_cpu.png
    python tools/bench_reconstruct.py --params 1.5e8 --steps 4 --stages            # where the time goes
    python tools/bench_reconstruct.py --params 1.5e8 --steps 4 --stages --in-flight 1   # the sequential loop

--stages adds one untimed-by-the-median pass that runs the stages one after the other with a clock on each
(read, base fingerprint, host->device, kernel, device->host, result fingerprint, write, commit), and prints
their sums beside the end-to-end median and the ratio end-to-end / kernel-only: 1.0 would mean every
other stage is hidden behind the kernel. --in-flight sets how many tensors the pipeline holds at once
(1: each tensor is read, replayed and written before the next is read, as before the pipeline).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import add_timing_options, check_timing_options, flip_one_bit, header, require_same, timed  # noqa: E402

from mezo_replay.format.fingerprint import canonical_fingerprint_, tensor_fingerprint  # noqa: E402
from mezo_replay.format.safetensors_io import CheckpointWriter  # noqa: E402
from mezo_replay.rebuild import pipeline, replay  # noqa: E402
from mezo_replay.format.mzt import TrajectoryWriter, read_trajectory  # noqa: E402
from mezo_replay.training.optimizer import MeZO  # noqa: E402
from mezo_replay.arithmetic.rule import MezoSGD, encode_grad  # noqa: E402
from mezo_replay.kernels.steps import replay_tensor_, set_backend, step_constants  # noqa: E402

TENSOR = 1 << 23


def make_inputs(folder: Path, params: int, steps: int, dtype: torch.dtype = torch.bfloat16) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    base, left, i = {}, params, 0
    while left > 0:
        n = min(TENSOR, left)
        base[f"layers.{i:04d}.weight"] = (torch.randn(n, generator=g) * 0.02).to(dtype)
        left -= n
        i += 1
    save_file(base, str(folder / "base.safetensors"))
    opt = MeZO([(k, v.requires_grad_(True)) for k, v in base.items()], lr=1e-6, eps=1e-3, seed=1)
    header_ = opt.header(record_losses=False)
    del base, opt
    rng = np.random.default_rng(0)
    with TrajectoryWriter(folder / "traj.mzt", header_, steps_per_chunk=1024) as w:
        for g_ in rng.standard_normal(steps) * 10:
            w.append_step(encode_grad(float(g_)))
    return folder / "base.safetensors", folder / "traj.mzt"


def torch_prefix(base: Path, traj: Path, n: int) -> bytes:
    """The first n elements of tensor 0 replayed by the plain torch path: a second path to compare with.
    Each element's noise depends only on its index, so a prefix replays on its own."""
    t = read_trajectory(traj)
    rule = MezoSGD.from_header(t.header)
    name = t.header["tensors"][0]["name"]
    with safe_open(str(base), framework="pt") as f:
        w = f.get_tensor(name).reshape(-1)[:n].clone()
    set_backend("torch")
    try:
        replay_tensor_(w, rule, 0, step_constants(rule, t.grad_bits))
    finally:
        set_backend("auto")
    return w.view(torch.uint8).numpy().tobytes()


def run(params: int, steps: int, args: argparse.Namespace) -> tuple[list[float], int, dict[str, float] | None]:
    """(timed seconds, bytes written, --stages' seconds per stage) of one size; exits 1 if the bytes disagree."""
    folder = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        base, traj = make_inputs(folder, params, steps)
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        digests = []

        out = folder / "out.safetensors"

        def once(_: object, step: int | None = None) -> Path:
            # A synthetic trajectory records no fingerprint: the bytes are checked here instead (runs agree,
            # and the first elements equal the plain torch path's).
            replay.reconstruct(replay.plan(base, traj, step=step), out, device=args.device, unverified=True)
            return out

        def digest_previous() -> None:
            """Outside the clock (timed's setup): hashing the output file is the bench's check, not the
            tool's work (for a 1.3B model, reading and hashing 2.6 GB took seconds inside the figure)."""
            if out.exists():
                with out.open("rb") as f:
                    digests.append(hashlib.file_digest(f, "sha256").digest())
                out.unlink()

        for _ in range(args.warmup):  # one step only: kernels compiled, allocator and page cache warm
            out.unlink(missing_ok=True)
            once(None, step=1)
        out.unlink(missing_ok=True)  # of step 1: not one to compare
        timing, _ = timed(once, args.repeats, 0, sync, setup=digest_previous)
        with out.open("rb") as f:
            digests.append(hashlib.file_digest(f, "sha256").digest())
        for k, d in enumerate(digests[1:], 1):
            require_same(f"reconstruct {params:,} x {steps}, sha256 of the written file", f"run {k + 1}", d, "run 1", digests[0])
        n = min(args.check_elements, params, TENSOR)
        with safe_open(str(out), framework="pt") as f:
            got = f.get_tensor("layers.0000.weight").reshape(-1)[:n].contiguous().view(torch.uint8).numpy().tobytes()
        if args.inject_mismatch:
            got = flip_one_bit(got)
        require_same(f"reconstruct {params:,} x {steps}, first {n:,} elements of tensor 0",
                     f"reconstruct ({args.backend})", got, "torch path", torch_prefix(base, traj, n))
        spent = stage_times(base, traj, steps, args.device, folder / "stages.safetensors") if args.stages else None
        return timing.samples, out.stat().st_size, spent
    finally:
        shutil.rmtree(folder)


STAGES = ("read", "base fingerprint", "host->device", "kernel", "device->host", "result fingerprint", "write",
          "commit")


def stage_times(base: Path, traj: Path, steps: int, device: str, out: Path) -> dict[str, float]:
    """Seconds spent in each stage of reconstruct, run one after the other for every tensor (the order
    of the loop reconstruct ran before the pipeline, today's code in each stage), with the device
    synchronised around each."""
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    p = replay.plan(base, traj, step=steps)
    assert p.base is not None
    spent = dict.fromkeys(STAGES, 0.0)
    clock = [time.perf_counter()]

    def lap(stage: str) -> None:
        sync()
        now = time.perf_counter()
        spent[stage] += now - clock[0]
        clock[0] = now

    with CheckpointWriter(p.base, out, metadata={"mezo_replay.steps": str(p.steps)}) as writer:
        clock[0] = time.perf_counter()
        for index, name in enumerate(p.names):
            host = p.base.read(name, pin_memory=cuda)
            lap("read")
            if tensor_fingerprint(host) != p.trajectory.header["tensors"][index]["sha256"]:
                raise SystemExit(f"FAIL: stages: base tensor {name} differs")
            lap("base fingerprint")
            w = host.to(device, non_blocking=True) if cuda else host
            lap("host->device")
            replay_tensor_(w, p.rule, index, p.constants,
                           decay=bool(p.trajectory.header["tensors"][index].get("decay")))
            lap("kernel")
            w = host.copy_(w, non_blocking=True) if cuda else w
            lap("device->host")
            canonical_fingerprint_(w)
            lap("result fingerprint")
            writer.write(name, w)
            lap("write")
            del host, w
        writer.commit()
        lap("commit")
    out.unlink()
    return spent


def print_stages(spent: dict[str, float], end_to_end: float) -> None:
    total = sum(spent.values())
    print("  stages, one after the other: " + ", ".join(f"{k} {v:.3f}" for k, v in spent.items() if v >= 5e-4)
          + f" s; sum {total:.3f} s, of which not the kernel {total - spent['kernel']:.3f} s", flush=True)
    print(f"  end to end {end_to_end:.3f} s = {end_to_end / max(spent['kernel'], 1e-9):.2f} x kernel-only "
          f"({spent['kernel']:.3f} s); the stages one after the other: {total / max(spent['kernel'], 1e-9):.2f} x",
          flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=1.3e9)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--sweep", action="store_true", help="a grid of sizes (--sweep-params x --sweep-steps)")
    ap.add_argument("--sweep-params", type=lambda s: [int(float(x)) for x in s.split(",")],
                    help="comma-separated parameter counts (default 2^20,2^22,2^24; x16 on CUDA)")
    ap.add_argument("--sweep-steps", type=lambda s: [int(x) for x in s.split(",")], default=[100, 400, 1600])
    ap.add_argument("--check-elements", type=int, default=1 << 16)
    ap.add_argument("--csv", type=Path)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--stages", action="store_true",
                    help="also time each stage in a pass that runs them one after the other (see above)")
    ap.add_argument("--in-flight", type=int, default=pipeline.IN_FLIGHT,
                    help=f"tensors the pipeline holds at once (default {pipeline.IN_FLIGHT}; 1: no overlap)")
    add_timing_options(ap, repeats=3)
    args = ap.parse_args(argv)
    check_timing_options(args)
    if args.in_flight < 1:
        raise SystemExit("Error: --in-flight must be at least 1")
    pipeline.IN_FLIGHT = args.in_flight
    set_backend(args.backend)
    if args.sweep:
        scale = 1 if args.device == "cpu" else 16
        sizes = args.sweep_params or [p * scale for p in (1 << 20, 1 << 22, 1 << 24)]
        grid = [(p, t) for p in sizes for t in args.sweep_steps]
    else:
        grid = [(int(args.params), args.steps)]
    print(header(f"reconstruct, bf16 base, synthetic trajectory, backend {args.backend}, "
                 f"{args.in_flight} tensor(s) in flight", args, args.device))
    print(f"{'params':>14}{'steps':>8}{'median s':>10}{'element-steps/s':>18}{'output bytes':>15}  spread")
    rows = []
    for params, steps in grid:
        samples, size, spent = run(params, steps, args)
        med = float(np.median(samples))
        rows.append((params, steps, med, min(samples), max(samples), len(samples)))
        print(f"{params:>14,}{steps:>8}{med:>10.3f}{params * steps / med:>18.3e}{size:>15,}  "
              f"{min(samples):.3g}-{max(samples):.3g} s over {len(samples)}", flush=True)
        if spent is not None:
            print_stages(spent, med)
    if args.csv:
        with args.csv.open("w", newline="") as f:
            csv.writer(f).writerows([("params", "steps", "median_seconds", "min_seconds", "max_seconds", "repeats"),
                                     *rows])
    if args.plot:
        plot(rows, args.plot, f"mezo-replay reconstruct, bf16, {args.device}, median of {args.repeats} "
                              f"({time.strftime('%Y-%m-%d')})")


def plot(rows: list[tuple], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for steps in sorted({r[1] for r in rows}):
        pts = sorted((r[0] * r[1], r[2]) for r in rows if r[1] == steps)
        ax.loglog([x for x, _ in pts], [y for _, y in pts], "o-", label=f"{steps} steps")
    ax.set_xlabel("steps x tuned parameters (element-steps)")
    ax.set_ylabel("reconstruct time, s (read, replay, write)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
