"""End to end, as a user runs it: the CLI's `mezo-replay train` on the embedded default, then the
`mezo-replay reconstruct` command it prints, each in a fresh process, timed by wall clock.

    python tools/bench_end_to_end.py [--steps 1000] [--repeats 3] [--warmup 1] [-- extra train options]

Each figure is the median of --repeats runs after --warmup untimed ones (the first run also fills the page
cache). Bytes: every run must write the same trajectory and the same rebuilt weights, and reconstruct
itself checks the rebuilt weights against the fingerprint training recorded (a mismatch exits non-zero);
any difference fails this script with exit 1.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import add_timing_options, check_timing_options, flip_one_bit, header, require_same  # noqa: E402

CLI = [sys.executable, "-m", "mezo_replay"]


def tree_digest(path: Path) -> bytes:
    """sha256 over a file, or over a folder's files in name order (names included)."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0" + f.read_bytes())
    return h.digest()


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def one_run(workdir: Path, args: argparse.Namespace) -> dict:
    """Train, then the printed rebuild command; seconds, sizes and digests."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    cmd = CLI + ["train", "--steps", str(args.steps), "-q", "-o", "traj.mzt", "--backend", args.backend, *args.train_args]
    env = None if args.threads is None else {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # torch reads it
    start = time.perf_counter()
    train = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env)
    train_s = time.perf_counter() - start
    if train.returncode:
        raise SystemExit(f"Error: train failed (exit {train.returncode}):\n{train.stderr[-2000:]}")
    printed = [line.strip() for line in train.stdout.splitlines() if line.strip().startswith("mezo-replay reconstruct")]
    if not printed:
        raise SystemExit(f"Error: train printed no reconstruct command:\n{train.stdout}")
    rebuild = CLI + shlex.split(printed[-1])[1:] + ["-q", "--backend", args.backend]
    start = time.perf_counter()
    rec = subprocess.run(rebuild, cwd=workdir, capture_output=True, text=True, env=env)
    rebuild_s = time.perf_counter() - start
    if rec.returncode:
        raise SystemExit(f"FAIL: the printed reconstruct command failed (exit {rec.returncode}), which includes the "
                         f"rebuilt weights not matching training's fingerprint:\n{rec.stderr[-2000:]}")
    out = workdir / shlex.split(printed[-1])[-1]
    traj = workdir / "traj.mzt"
    return {"train_s": train_s, "rebuild_s": rebuild_s, "traj_bytes": traj.stat().st_size,
            "out_bytes": tree_bytes(out), "traj": tree_digest(traj), "out": tree_digest(out),
            "command": shlex.join(["mezo-replay", *cmd[3:]]), "rebuild": printed[-1],
            "summary": [line for line in train.stdout.splitlines() if line.startswith(("eval", "wrote"))]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000, help="train --steps (the embedded default is 1000)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("train_args", nargs="*", help="after --: more `train` options")
    add_timing_options(ap, repeats=3)
    args = ap.parse_args(argv)
    check_timing_options(args)
    root = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        for k in range(args.warmup):
            one_run(root / f"warm{k}", args)
        runs = [one_run(root / f"run{k}", args) for k in range(args.repeats)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    first = runs[0]
    print(header(f"end to end, embedded default, train --steps {args.steps} then the printed reconstruct, "
                 f"each a fresh process", args))
    print(f"train:       {first['command']}")
    print(f"reconstruct: {first['rebuild']}")
    for line in first["summary"]:
        print(f"  {line}")
    for key, what in (("train_s", "train"), ("rebuild_s", "reconstruct")):
        xs = [r[key] for r in runs]
        per = f", {statistics.median(xs) / args.steps * 1e3:.1f} ms/step" if key == "train_s" else ""
        print(f"{what:<12} median {statistics.median(xs):8.2f} s{per}  (spread {min(xs):.2f}-{max(xs):.2f} s "
              f"over {len(xs)}; includes process start and model load)")
    print(f"trajectory   {first['traj_bytes']:,} bytes ({first['traj_bytes'] / args.steps:.2f} file bytes/step)")
    print(f"rebuilt      {first['out_bytes']:,} bytes")
    for k, r in enumerate(runs[1:], 2):
        got = flip_one_bit(r["traj"]) if args.inject_mismatch else r["traj"]
        require_same("trajectory sha256", f"run {k}", got, "run 1", first["traj"])
        require_same("rebuilt weights sha256", f"run {k}", r["out"], "run 1", first["out"])
    if args.inject_mismatch and len(runs) == 1:
        require_same("trajectory sha256", "run 1 (bit flipped)", flip_one_bit(first["traj"]), "run 1", first["traj"])
    print("rebuilt weights verified by reconstruct against the fingerprint recorded at the end of training")


if __name__ == "__main__":
    main()
