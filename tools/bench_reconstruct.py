"""End-to-end reconstruct time: a local bf16 safetensors base plus a trajectory of T steps, through
`replay.reconstruct` (read, base check, replay, write), against steps x parameters.

The base is random (tensors of up to 2^23 elements, like the large matrices of a 1B-class model) and
the trajectory synthetic: T recorded projected gradients, written with the library's own writer, with
no final fingerprint (making one would cost a reconstruct), so the output is not hashed again.

    python tools/bench_reconstruct.py --params 1.3e9 --steps 20000 --device cuda      # issue 4's target
    python tools/bench_reconstruct.py --sweep --device cpu --plot docs/reconstruct_cpu.png
"""
from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from mezo_replay import replay
from mezo_replay.mzt import TrajectoryWriter
from mezo_replay.optimizer import MeZO
from mezo_replay.rule import encode_grad
from mezo_replay.steps import set_backend

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
    opt = MeZO([(k, v.requires_grad_(True)) for k, v in base.items()], lr=1e-6, eps=1e-3,
               seed=1)
    header = opt.header(record_losses=False)
    del base, opt
    rng = np.random.default_rng(0)
    with TrajectoryWriter(folder / "traj.mzt", header, steps_per_chunk=1024) as w:
        for g_ in rng.standard_normal(steps) * 10:
            w.append_step(encode_grad(float(g_)))
    return folder / "base.safetensors", folder / "traj.mzt"


def run(params: int, steps: int, device: str, workdir: Path) -> float:
    folder = Path(tempfile.mkdtemp(dir=workdir))
    try:
        base, traj = make_inputs(folder, params, steps)
        if device.startswith("cuda"):  # compile the kernels and warm the allocator outside the timing
            replay.reconstruct(replay.plan(base, traj, step=1), folder / "warm.safetensors", device=device)
        start = time.perf_counter()
        replay.reconstruct(replay.plan(base, traj), folder / "out.safetensors", device=device)
        return time.perf_counter() - start
    finally:
        shutil.rmtree(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=1.3e9)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--sweep", action="store_true", help="a grid of sizes; writes --csv and --plot")
    ap.add_argument("--csv", type=Path)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    args = ap.parse_args()
    set_backend(args.backend)
    if args.sweep:
        scale = 1 if args.device == "cpu" else 16
        grid = [(p * scale, t) for p in (1 << 20, 1 << 22, 1 << 24) for t in (100, 400, 1600)]
    else:
        grid = [(int(args.params), args.steps)]
    print(f"device={args.device} backend={args.backend} threads={torch.get_num_threads()} {time.strftime('%Y-%m-%d')}")
    print(f"{'params':>14}{'steps':>8}{'seconds':>10}{'element-steps/s':>18}")
    rows = []
    for params, steps in grid:
        seconds = run(params, steps, args.device, args.workdir)
        rows.append((params, steps, seconds))
        print(f"{params:>14,}{steps:>8}{seconds:>10.2f}{params * steps / seconds:>18.3e}", flush=True)
    if args.csv:
        with args.csv.open("w", newline="") as f:
            csv.writer(f).writerows([("params", "steps", "seconds"), *rows])
    if args.plot:
        plot(rows, args.plot, f"mezo-replay reconstruct, bf16, {args.device} ({time.strftime('%Y-%m-%d')})")


def plot(rows: list[tuple[int, int, float]], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for steps in sorted({t for _, t, _ in rows}):
        pts = sorted((p * t, s) for p, t, s in rows if t == steps)
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
