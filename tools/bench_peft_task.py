"""Full tuning vs LoRA vs prefix tuning by MeZO on the embedded task (the tiny Llama and its sentiment
data): eval loss after the same number of steps, trajectory bytes per step, and a rebuild check.

Each mode runs the real CLI in a fresh process, `mezo-replay train --steps S --lr LR [--peft ...] --log
run.jsonl -o run.mzt` with the embedded defaults otherwise (batch 16, eps 1e-3, seed 0), and its eval
loss (and accuracy, when the task reports it) at step 0 and at the end is read from the JSON log. Every
trajectory is then rebuilt from the file (a PEFT one with no base, full tuning onto the embedded base)
and checked against the final fingerprint training recorded: the run fails (exit 1) if any rebuild
differs from the weights training ended with. Training is deterministic, so one run per setting is the
figure; wall-clock seconds are printed for scale only (the machine is shared).

    python tools/bench_peft_task.py [--steps 500] [--modes full,lora,prefix] [--lr-full 5e-5]
        [--lr-lora 1e-3] [--lr-prefix 1e-2] [--lora-r 8 --lora-alpha 16 --num-virtual-tokens 10]

A mode may be given several learning rates (--lr-lora 1e-4,1e-3): each is a row.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import MISMATCH_EXIT  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LR = {"full": "5e-5", "lora": "1e-3", "prefix": "1e-2"}


def peft_args(mode: str, args: argparse.Namespace) -> list[str]:
    if mode == "lora":
        return ["--peft", "lora", "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha)]
    if mode == "prefix":
        return ["--peft", "prefix", "--num-virtual-tokens", str(args.num_virtual_tokens)]
    return []


def train(folder: Path, mode: str, lr: str, args: argparse.Namespace) -> dict:
    out, log = folder / f"{mode}-{lr}.mzt", folder / f"{mode}-{lr}.jsonl"
    cmd = [sys.executable, "-m", "mezo_replay", "train", "--steps", str(args.steps), "--lr", lr, "--eval-every",
           str(args.eval_every), "-q", "-o", out.name, "--log", log.name, *peft_args(mode, args)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=folder)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"Error: {' '.join(cmd[2:])} failed (exit {proc.returncode}): "
                         f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.stdout[-500:]}")
    evals = [r for r in map(json.loads, log.read_text().splitlines()) if r.get("event") == "eval"]
    return {"mode": mode, "lr": lr, "out": out, "seconds": seconds, "first": evals[0], "last": evals[-1],
            "command": "mezo-replay " + " ".join(cmd[3:])}


def check(r: dict, inject: bool) -> tuple[int, int, float, int]:
    """Rebuilds r's trajectory and checks it against its final fingerprint; (file bytes, tuned parameters,
    step-record bytes per step, tensors). Exit 1 on a mismatch."""
    import math

    import torch

    from mezo_replay import embedded
    from mezo_replay.rebuild import replay
    from mezo_replay.format.fingerprint import tensor_fingerprint
    from mezo_replay.format.mzt import read_trajectory

    traj = read_trajectory(r["out"])
    params = sum(math.prod(t["shape"]) for t in traj.header["tensors"])
    final = traj.final_fingerprint
    if final is None:
        raise SystemExit(f"Error: {r['out'].name} records no final fingerprint")
    if replay.needs_base(traj):
        p = replay.plan(embedded.local_path(traj.header["base"]["source"]), traj)
    else:
        p = replay.plan(None, traj)
    got = []
    try:
        for index, name in enumerate(p.names):
            w = replay.replay_named(p, index)
            if inject and index == 0:
                w.reshape(-1).view(torch.int32 if w.element_size() == 4 else torch.int16)[0] ^= 1
            got.append(tensor_fingerprint(w))
    except replay.MezoReplayError as e:
        raise SystemExit(f"Error: rebuilding {r['out'].name}: {e}") from None
    if got != final:
        bad = next(i for i, (a, b) in enumerate(zip(got, final)) if a != b)
        print(f"FAIL: {r['mode']} lr {r['lr']}: the rebuild of {p.names[bad]!r} differs from the weights training "
              f"ended with (fingerprint {got[bad][:12]} vs {final[bad][:12]})", file=sys.stderr, flush=True)
        raise SystemExit(MISMATCH_EXIT)
    return r["out"].stat().st_size, params, traj.bytes_per_step, len(p.names)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--eval-every", type=int, default=0, help="0: evaluate at the start and the end only")
    ap.add_argument("--modes", default="full,lora,prefix")
    for mode in DEFAULT_LR:
        ap.add_argument(f"--lr-{mode}", default=DEFAULT_LR[mode], help=f"comma-separated (default {DEFAULT_LR[mode]})")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=int, default=16)
    ap.add_argument("--num-virtual-tokens", type=int, default=10)
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the training processes")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--inject-mismatch", action="store_true",
                    help="testing: flip one bit of the first rebuilt tensor, to check that the comparison fails")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.steps < 1 or not modes or any(m not in DEFAULT_LR for m in modes):
        raise SystemExit("Error: --steps must be at least 1 and --modes a comma-separated subset of full,lora,prefix")
    print(f"embedded task (tiny Llama, sentiment), MeZO {args.steps} steps per run, embedded defaults otherwise "
          f"(batch 16, eps 1e-3, seed 0); LoRA r={args.lora_r} alpha={args.lora_alpha} on peft's default targets; "
          f"prefix {args.num_virtual_tokens} virtual tokens; {time.strftime('%Y-%m-%d')}; load "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    metric = None
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for mode in modes:
            for lr in getattr(args, f"lr_{mode}").split(","):
                r = train(Path(tmp), mode, lr.strip(), args)
                size, params, step_bytes, tensors = check(r, args.inject_mismatch)
                metric = metric or next((k for k in r["last"] if k not in ("event", "step", "loss")), None)
                rows.append((r, size, params, step_bytes, tensors))
                print(f"  ran: {r['command']} ({r['seconds']:.0f} s); rebuilt from the trajectory"
                      f"{' alone' if mode != 'full' else ' and the base'}: {tensors} tensor{'s' * (tensors != 1)} equal "
                      f"training's end "
                      f"(final fingerprint)", flush=True)
    extra = f"{metric + ' start -> end':>22}" if metric else ""
    print(f"{'mode':<8}{'lr':>8}{'tuned params':>14}{'eval loss start -> end':>25}{extra}{'file bytes':>12}"
          f"{'bytes/step':>12}{'step records B/step':>21}{'train s':>9}")
    for r, size, params, step_bytes, _ in rows:
        f, l_ = r["first"], r["last"]
        m = f"{f.get(metric, float('nan')):>12.3f} -> {l_.get(metric, float('nan')):<6.3f}" if metric else ""
        print(f"{r['mode']:<8}{r['lr']:>8}{params:>14,}{f['loss']:>15.3f} -> {l_['loss']:<6.3f}{m}{size:>12,}"
              f"{size / args.steps:>12.2f}{step_bytes:>21.2f}{r['seconds']:>9.0f}")
    print("bytes identical: every rebuild equals the weights its training ended with (final fingerprints)")


if __name__ == "__main__":
    main()
