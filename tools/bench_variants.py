"""Training variants side by side on real tasks: eval loss against forward passes, bytes per step, training
memory and rebuild cost, each variant a fresh `mezo-replay train` and the `reconstruct` it prints.

A variant is a name and the extra `train` arguments that make it (VARIANTS below): the gradient codecs
(`--grad-codec bf16|fp8|sign`, `--grad-scale 2^k`), the update rules (`--optimizer mezo-momentum`, the
memory-free window, `mezo-momentum-buffer`, `mezo-adam`, `mezo-adam-buffer`), n-SPSA (`--perturbations N`,
trained for steps / N steps so that every variant spends the same forward passes) and layer-wise scaling
(`--layerwise perturbation|step`); a new rule is new entries. An entry whose option this
checkout's `mezo-replay train --help` does not offer is listed as skipped, with the option it needs, so the
table says what was left out rather than failing.

Tasks (the embedded tiny Llama on both; nothing is downloaded):

* ``embedded``: the default task, the review sentiment set that ships in the package, loss = cross-entropy of
  the completion token over the whole vocabulary (`train` with no task options).
* ``label-words``: the same reviews recast as MeZO's own prompt-based classification (its SST-2 setting:
  '{sentence} It was' and the label words ' terrible'/' great', `--task label-words`), loss = cross-entropy
  over the two label words, with accuracy and F1 evaluated. A different objective, prompt and code path
  (the label-words task) than the default, through the same CLI a user runs.

For every task and variant: `train --eval-every E` in a child process whose peak resident set is read from
os.wait4 (the kernel's ru_maxrss of that process alone); then `mezo-replay info --json` of the trajectory
gives the evaluations (x = training forward passes, 2 per step), the step-record and whole-file bytes per
step and the tuned parameter count; then the `reconstruct` command train printed is timed (--repeats runs
after --warmup, median; `--overwrite -q` added) beside the same command with `--step 0`, which loads,
checks and writes without replaying a step. The rebuild cost is tuned parameters x steps / seconds: of the
whole command by wall clock, and of the replay alone by CPU time (the child's user + system seconds from
os.wait4, whole minus step 0, **derived**): on a shared machine a process's CPU time swings far less than
its wall time, and the difference of two wall times of a few seconds each is mostly noise. With N
threads a CPU-second is about 1/N of a wall second of the replay. `reconstruct` checks the rebuilt
tensors against the final fingerprint training recorded; the run fails (exit 1, one FAIL line) if one does
not verify. Training is deterministic, so one training run per variant is the figure; its wall-clock
seconds and memory are single samples. Every figure is printed beside its ratio to the first variant
(bf16, the default codec).

    python tools/bench_variants.py [--tasks embedded,label-words] [--variants bf16,fp8,sign-x8]
        [--steps 1000] [--label-words-steps 500] [--repeats 3] [--out docs/variants_DATE.png] [--quick]
        [--backend torch]

--backend passes `reconstruct --backend` to the timed rebuilds: the momentum window replays K terms a step,
which the compiled C kernel (auto on the CPU) serves from cached noise and the torch path regenerates.

--out draws each task's chart with `mezo-replay info A.mzt B.mzt ... --plot PATH --x-axis forward-passes`
(one colour per variant): the first task's at PATH, the others' at PATH with _TASK before the suffix.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import MISMATCH_EXIT, Timing, add_timing_options, check_timing_options  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Variant:
    name: str
    args: tuple[str, ...]
    needs: str | None = None  # a `train --help` word without which the variant is skipped
    perturbations: int = 1  # n-SPSA: 2N forward passes a step, so it trains steps / N steps (equal passes)


#: The first is the baseline every ratio is taken against.
VARIANTS: tuple[Variant, ...] = (
    Variant("bf16", ("--grad-codec", "bf16")),  # the default codec
    Variant("fp8", ("--grad-codec", "fp8", "--grad-scale", "1")),
    Variant("sign-x4", ("--grad-codec", "sign", "--grad-scale", "4")),
    Variant("sign-x8", ("--grad-codec", "sign", "--grad-scale", "8")),
    Variant("sign-x16", ("--grad-codec", "sign", "--grad-scale", "16")),
    # The momentum rules at the baseline's effective step: heavy ball with beta B sums the last steps' terms
    # with weights 1, B, B^2, ..., so lr is divided by that sum (1/(1-B) = 10 for the buffer; 8.15 over the
    # window's 16 terms) to keep lr x sum at 5e-5. Short sweeps (docs/BENCHMARKS.md) found no gain from
    # momentum at an equal effective step, and a larger one gains exactly what mezo-sgd gains with that lr.
    Variant("mom-window", ("--optimizer", "mezo-momentum", "--momentum", "0.9", "--momentum-window", "16",
                           "--lr", "6.1e-6"), needs="mezo-momentum"),
    Variant("mom-buffer", ("--optimizer", "mezo-momentum-buffer", "--momentum", "0.9", "--lr", "5e-6"),
            needs="mezo-momentum-buffer"),
    Variant("mom-window-fp8", ("--optimizer", "mezo-momentum", "--momentum", "0.9", "--momentum-window", "16",
                               "--lr", "6.1e-6", "--grad-codec", "fp8"), needs="mezo-momentum"),
    # MeZO-Adam: its step is lr-sized whatever g's scale, so its lr is its own; beta2 0.9 and lr 6e-4 were the
    # best of a sweep on the embedded task (spec/adam.md notes; the torch default beta2 0.999 trails there).
    Variant("adam-buffer", ("--optimizer", "mezo-adam-buffer", "--momentum", "0.9", "--beta2", "0.9",
                            "--lr", "6e-4"), needs="mezo-adam-buffer"),
    Variant("adam-window", ("--optimizer", "mezo-adam", "--momentum", "0.9", "--beta2", "0.9",
                            "--momentum-window", "16", "--lr", "6e-4"), needs="mezo-adam"),
    # n-SPSA at equal forward passes (steps / N) with lr x N: N averaged estimates make a step N times safer.
    Variant("nspsa-2", ("--perturbations", "2", "--lr", "1e-4"), needs="--perturbations", perturbations=2),
    Variant("nspsa-4", ("--perturbations", "4", "--lr", "2e-4"), needs="--perturbations", perturbations=4),
    # Layer-wise scaling: the expected step of tensor k grows by 4^e_k (perturbation), so lr is lowered.
    Variant("layerwise-perturbation", ("--layerwise", "perturbation", "--lr", "2e-5"), needs="--layerwise"),
    Variant("layerwise-step", ("--layerwise", "step", "--lr", "2.5e-5"), needs="--layerwise"),
)

TASKS = ("embedded", "label-words")
LABEL_WORDS = '{"0": " terrible", "1": " great"}'


@dataclass
class Run:
    task: str
    variant: Variant
    steps: int
    traj: Path
    train_seconds: float
    peak_rss: int  # bytes
    info: dict = field(default_factory=dict)
    rebuild: Timing | None = None  # wall seconds of the whole printed command
    rebuild_cpu: Timing | None = None  # its CPU seconds
    fixed_cpu: Timing | None = None  # CPU seconds of the same at --step 0

    @property
    def params(self) -> int:
        return self.info["parameters"]

    def evals(self) -> list[tuple[int, dict]]:
        return [(e["step"], e["metrics"]) for e in self.info["evals"] if e.get("split", "eval") == "eval"]


def cli() -> list[str]:
    return [sys.executable, "-m", "mezo_replay"]


def child_env(args: argparse.Namespace) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def fail(line: str) -> None:
    print(f"FAIL: {line}", file=sys.stderr, flush=True)
    raise SystemExit(MISMATCH_EXIT)


def run_child(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str, float, int, float]:
    """(exit status, stdout + stderr, wall seconds, peak resident bytes, CPU seconds) of that process alone:
    os.wait4's rusage, which getrusage(RUSAGE_CHILDREN) would mix with every earlier child's."""
    with tempfile.TemporaryFile("w+") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        return proc.returncode, out.read(), seconds, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def task_args(task: str, folder: Path) -> list[str]:
    if task == "embedded":
        return []
    from mezo_replay import embedded

    train, ev = embedded.load_task()
    for split, rows in (("train", train), ("eval", ev)):
        path = folder / f"reviews.{split}.jsonl"
        if not path.exists():
            path.write_text("".join(json.dumps({
                "sentence": r["prompt"].removeprefix("Review: ").removesuffix(" Sentiment:"),
                "label": int(r["completion"] == " great")}) + "\n" for r in rows))
    return ["--data", str(folder / "reviews.train.jsonl"), "--eval-data", str(folder / "reviews.eval.jsonl"),
            "--task", "label-words", "--template", "{sentence} It was", "--label-words", LABEL_WORDS,
            "--lr", "5e-5"]


def train(task: str, variant: Variant, steps: int, folder: Path, args: argparse.Namespace) -> tuple[Run, str]:
    out = folder / f"{variant.name}.mzt"
    every = args.eval_every or max(1, steps // 10)  # the baseline's evaluation interval, in its steps
    steps = max(1, steps // variant.perturbations)  # the same training forward passes as the others
    eval_every = every // math.gcd(every, variant.perturbations)  # evaluated at the others' forward passes
    cmd = [*cli(), "train", *task_args(task, folder), "--steps", str(steps), "--eval-every", str(eval_every),
           "-q", "--overwrite", "-o", out.name, *variant.args]
    rc, text, seconds, rss, _ = run_child(cmd, folder, child_env(args))
    if rc:
        raise SystemExit(f"Error: {task}/{variant.name}: train failed (exit {rc}): "
                         f"{text.strip().splitlines()[-1] if text.strip() else ''}")
    lines = text.splitlines()
    try:
        printed = lines[[i for i, s in enumerate(lines) if s.startswith("rebuild the tuned weights")][-1] + 1].strip()
    except IndexError:
        raise SystemExit(f"Error: {task}/{variant.name}: train printed no reconstruct command") from None
    return Run(task, variant, steps, out, seconds, rss), printed


def time_rebuild(run: Run, printed: str, folder: Path, args: argparse.Namespace) -> None:
    """Times the printed reconstruct command, and the same at --step 0 (the fixed cost: load, check, write;
    left out with --quick)."""
    words = shlex.split(printed)
    if words[:2] != ["mezo-replay", "reconstruct"]:
        raise SystemExit(f"Error: unexpected rebuild command printed by train: {printed}")
    base = [*cli(), *words[1:], "--overwrite", "-q", *(["--backend", args.backend] if args.backend else [])]
    env = child_env(args)
    for extra in ([], ["--step", "0"])[:1 if args.quick else 2]:
        samples, cpu = [], []
        for i in range(args.warmup + args.repeats):
            rc, text, seconds, _, cpu_seconds = run_child(base + extra, folder, env)
            if rc or "verified" not in text:
                fail(f"{run.task}/{run.variant.name}: `{printed}{' --step 0' if extra else ''}` did not verify "
                     f"(exit {rc}): {text.strip().splitlines()[-1] if text.strip() else ''}")
            if i >= args.warmup:
                samples.append(seconds)
                cpu.append(cpu_seconds)
        if extra:
            run.fixed_cpu = Timing(cpu)
        else:
            run.rebuild, run.rebuild_cpu = Timing(samples), Timing(cpu)


def ratio(x: float, base: float) -> str:
    return f"{x / base:.2f}x" if base else "-"


def fmt_rate(x: float) -> str:
    return f"{x:.2e}" if x > 0 else "n/a"


def report(task: str, runs: list[Run], skipped: list[Variant]) -> None:
    b = runs[0]
    steps = b.steps
    metric = next((k for _, m in b.evals() for k in m if k != "loss"), None)
    print(f"\n{task}: {steps} steps ({2 * steps} training forward passes; n-SPSA with N perturbations: steps / N, "
          f"bytes per step / N), {b.params:,} tuned parameters; "
          f"ratios against {b.variant.name}")
    head = (f"{'variant':<24}{'eval loss end':>15}{'':>7}{'best':>8}" + (f"{metric + ' end':>14}" if metric else "")
            + f"{'step B/step':>13}{'':>7}{'file B/step':>13}{'':>7}{'train peak RSS':>16}{'':>7}{'train s':>9}"
            f"{'rebuild s':>11}{'elt-steps/s':>13}{'':>7}{'CPU s':>7}{'step-0 CPU s':>14}{'replay/CPU-s':>14}{'':>7}")
    print(head)

    def row(r: Run) -> tuple[float, ...]:
        ev = r.evals()
        loss, best = ev[-1][1]["loss"], min(m["loss"] for _, m in ev)
        work = r.params * r.steps * r.variant.perturbations  # element-steps replayed: N sub-steps a step
        whole = work / r.rebuild.median
        net = r.rebuild_cpu.median - r.fixed_cpu.median if r.fixed_cpu else 0.0
        replay = work / net if net > 0 else 0.0
        n = r.variant.perturbations  # bytes per 2 forward passes: an n-SPSA step's over its N perturbations
        return (loss, best, r.info["bytes_per_step"] / n, r.info["file_bytes_per_step"] / n, r.peak_rss / 2**20,
                whole, replay)

    base_row = row(b)
    for r in runs:
        loss, best, sb, fb, rss, whole, replay = row(r)
        m = f"{r.evals()[-1][1].get(metric, float('nan')):>14.4f}" if metric else ""
        print(f"{r.variant.name:<24}{loss:>15.4f}{ratio(loss, base_row[0]):>7}{best:>8.4f}{m}{sb:>13.2f}"
              f"{ratio(sb, base_row[2]):>7}{fb:>13.2f}{ratio(fb, base_row[3]):>7}{rss:>12.0f} MiB"
              f"{ratio(rss, base_row[4]):>7}{r.train_seconds:>9.0f}{r.rebuild.median:>11.2f}"
              f"{fmt_rate(whole):>13}{ratio(whole, base_row[5]):>7}{r.rebuild_cpu.median:>7.2f}"
              f"{f'{r.fixed_cpu.median:.2f}' if r.fixed_cpu else '-':>14}{fmt_rate(replay):>14}"
              f"{ratio(replay, base_row[6]) if replay and base_row[6] else '-':>7}")
    for v in skipped:
        print(f"{v.name:<24}skipped: train --help lacks {v.needs} ({' '.join(v.args)})")
    print("eval loss against training forward passes (2 per step):")
    points = [s for s, _ in b.evals()]
    print(f"{'forward passes':<24}" + "".join(f"{2 * s:>8}" for s in points))
    for r in runs:
        by_pass = {s * r.variant.perturbations: m["loss"] for s, m in r.evals()}
        print(f"{r.variant.name:<24}" + "".join(f"{by_pass[s]:>8.4f}" if s in by_pass else f"{'-':>8}" for s in points))
    spreads = "; ".join(f"{r.variant.name} {r.rebuild.spread()}" for r in runs)
    print(f"rebuild spread (whole command, wall): {spreads}")
    if b.fixed_cpu:
        spreads = "; ".join(f"{r.variant.name} {r.rebuild_cpu.spread()} / {r.fixed_cpu.spread()}" for r in runs)
        print(f"rebuild spread (CPU, whole / step 0): {spreads}")


def read_back(runs: list[Run], plot_path: Path | None, args: argparse.Namespace) -> None:
    """One `mezo-replay info --json` over a task's trajectories (and its --plot: one colour each)."""
    cmd = [*cli(), "info", "--json", *[r.traj.name for r in runs]]
    if plot_path:
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        cmd += ["--plot", str(plot_path.resolve()), "--x-axis", "forward-passes", "--overwrite"]
    proc = subprocess.run(cmd, cwd=runs[0].traj.parent, env=child_env(args), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"Error: {' '.join(cmd[3:])}: {proc.stderr.strip() or proc.stdout[-300:]}")
    infos = json.loads(proc.stdout)
    for r, info in zip(runs, infos if isinstance(infos, list) else [infos]):
        r.info = info


def available(args: argparse.Namespace) -> str:
    proc = subprocess.run([*cli(), "train", "--help"], capture_output=True, text=True, env=child_env(args))
    return proc.stdout


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", help=f"comma-separated subset of {','.join(TASKS)} (default: all; --quick: embedded)")
    ap.add_argument("--variants", default=",".join(v.name for v in VARIANTS),
                    help=f"comma-separated; the first is the baseline (known: {', '.join(v.name for v in VARIANTS)})")
    ap.add_argument("--steps", type=int, default=1000, help="steps of the embedded task (default 1000)")
    ap.add_argument("--label-words-steps", type=int, default=500, help="steps of the label-words task (default 500)")
    ap.add_argument("--eval-every", type=int, default=0, help="0: a tenth of the steps")
    ap.add_argument("--out", type=Path, help="the chart (PNG); more tasks: _TASK before the suffix")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 4 steps, the embedded task, 1 rebuild timing, no warm-up")
    ap.add_argument("--backend", choices=("auto", "torch", "compiled", "triton"),
                    help="reconstruct --backend for the timed rebuilds (default: reconstruct's own, auto)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    add_timing_options(ap, repeats=3, warmup=0, compares=False)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.label_words_steps, args.repeats, args.warmup = 4, 4, 1, 0
        args.eval_every = args.eval_every or 2
    if args.tasks is None:
        args.tasks = "embedded" if args.quick else ",".join(TASKS)
    check_timing_options(args)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    known = {v.name: v for v in VARIANTS}
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    if not tasks or any(t not in TASKS for t in tasks) or not names or min(args.steps, args.label_words_steps) < 1:
        raise SystemExit(f"Error: --tasks must be a subset of {','.join(TASKS)}, --variants not empty and the "
                         f"steps at least 1")
    if unknown := [n for n in names if n not in known]:
        raise SystemExit(f"Error: unknown variant {unknown[0]!r}; known: {', '.join(known)}")
    helptext = available(args) if any(known[n].needs for n in names) else ""
    chosen = [known[n] for n in names if not known[n].needs or known[n].needs in helptext]
    skipped = [known[n] for n in names if known[n] not in chosen]
    if not chosen:
        raise SystemExit("Error: none of the chosen variants is available in this checkout's train")
    print(f"variants of `mezo-replay train` on the embedded tiny Llama (batch 16, eps 1e-3, lr 5e-5, seed 0, "
          f"flushed every 256 steps); {time.strftime('%Y-%m-%d')}; load {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} CPUs; rebuilds (backend {args.backend or 'auto'}): median of {args.repeats} after {args.warmup} warm-up; training: one "
          f"run each (deterministic; seconds and memory single samples)", flush=True)
    task_runs: dict[str, list[Run]] = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for task in tasks:
            folder = Path(tmp) / task
            folder.mkdir()
            steps = args.steps if task == "embedded" else args.label_words_steps
            runs = []
            for v in chosen:
                run, printed = train(task, v, steps, folder, args)
                time_rebuild(run, printed, folder, args)
                runs.append(run)
                print(f"  ran: {task}/{v.name}: mezo-replay train ... {' '.join(v.args)} ({run.train_seconds:.0f} s); "
                      f"`{printed}` verified ({run.rebuild.median:.1f} s)", flush=True)
            task_runs[task] = runs
        plots = []
        for i, (task, runs) in enumerate(task_runs.items()):
            path = args.out and (args.out if i == 0 else args.out.with_name(f"{args.out.stem}_{task}{args.out.suffix}"))
            read_back(runs, path, args)
            report(task, runs, skipped)
            plots += [path] if path else []
        for path in plots:
            print(f"wrote {path}")
    print("verified: every rebuild matched the final fingerprint its training recorded (reconstruct's own check)")


if __name__ == "__main__":
    main()
