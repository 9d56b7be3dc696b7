#!/usr/bin/env python3
"""Where a trajectory's bytes go, and what a longer run of the same kind would weigh: the figures of the
README's "Sizes" section.

    python tools/trajectory_sizes.py traj.mzt                  # the table for this file
    python tools/trajectory_sizes.py traj.mzt --project 20000  # + files of 20,000 steps, written for real

A projection writes real files with the real writer: the run's header and final fingerprint, and N steps
whose gradient records and losses are drawn at random (seeded) from the run's own. Drawing breaks the
slow drift of a real loss curve, which compresses a little better, so the loss figure errs high.
Evaluations are left out (each costs about what `eval` costs in the table, divided by its count).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mezo_replay.format.mzt import TrajectoryWriter, read_trajectory  # noqa: E402
from mezo_replay.format.storage import storage  # noqa: E402


def table(path: Path) -> str:
    traj = read_trajectory(path)
    s = storage(traj)
    rows = [f"| {kind} ({s.chunks.get(kind, 0)} chunks) | {n:,} | "
            + (f"{n / traj.steps:.2f} |" if kind in ("steps", "losses") and traj.steps else " |")
            for kind, n in s.by_kind.items()]
    return "\n".join([f"{path}: {traj.steps:,} steps", "| content | bytes | per step |", "|---|---:|---:|", *rows,
                      f"| whole file | {s.file_bytes:,} | {s.file_bytes_per_step:.2f} |"])


def project(path: Path, steps: int, losses: bool, seed: int = 0) -> tuple[int, dict[str, int]]:
    traj = read_trajectory(path)
    if traj.final_fingerprint is None or (losses and traj.losses is None):
        raise SystemExit(f"{path}: needs a complete trajectory" + (" with losses" if losses else ""))
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, traj.steps, steps)
    header = {**traj.header, "records": {"losses": losses}}
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "projected.mzt"
        with TrajectoryWriter(out, header) as w:
            for i in pick:
                w.append_step(int(traj.grad_bits[i]), float(traj.losses[i]) if losses else None)
            w.write_fingerprint(traj.final_fingerprint)
        s = storage(read_trajectory(out))
    return s.file_bytes, s.by_kind


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trajectory", type=Path)
    ap.add_argument("--project", type=int, metavar="N", help="also write N-step files drawn from this run")
    args = ap.parse_args(argv)
    print(table(args.trajectory))
    if args.project:
        for losses in (True, False):
            total, kinds = project(args.trajectory, args.project, losses)
            parts = ", ".join(f"{k} {n:,}" for k, n in kinds.items())
            print(f"{args.project:,} steps, losses {'kept' if losses else 'left out'}: {total:,} bytes ({parts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
