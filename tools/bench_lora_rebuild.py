"""Base-less rebuild of an OPT-1.3B-shaped LoRA adapter from its trajectory alone, against the same
element-steps as one plain tensor, and (--adapters) many per-user adapters rebuilt one after another.

The adapter is r=8 on q_proj and v_proj of 24 layers of hidden size 2048, as peft names it
(`base_model.model.model.decoder.layers.N.self_attn.q_proj.lora_A.weight`): 96 float32 tensors, A
(8, 2048) drawn by `uniform16(1/sqrt(2048))`, B (2048, 8) zeros, 1,572,864 parameters, so that a
trajectory of T steps is 1,572,864 x T element-steps (3.1e10 for the issue's 20,000 steps). No base model
is read: every tensor starts from a generated value.

The trajectory holds T synthetic projected gradients (normal, scale --grad-scale, as bf16 bits) written
with the library's writer (`--record synthetic`, the default), and its final fingerprint is computed by one
untimed rebuild and appended, so every timed rebuild is checked against it. `--record mezo` records real
MeZO steps instead (a cheap quadratic closure; the optimizer's per-step path writes the fingerprint), which
checks the rebuild against training itself; it costs a kernel call per tensor and phase and step, so it
is for small T. Either way the run fails (exit 1) if two timed rebuilds give different bytes, or if the
first --check-elements elements of the first A and first B tensor differ from the plain torch path's
replay of them (on the same device).

    python tools/bench_lora_rebuild.py [--steps 20000] [--repeats 3]        # the issue's figure
    python tools/bench_lora_rebuild.py --adapters 10,100 --steps 200       # per-user adapters, memory

--adapters N[,M...]: N trajectories of different seeds, each rebuilt with replay.replayed and saved as
safetensors into a folder of its own, one after another in a fresh process per count; prints the total
time against N x the time of one (measured alone in the same process) and the process's peak resident set
above what it held before the first rebuild, which stays flat when memory is bounded by one adapter.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import add_timing_options, check_timing_options, flip_one_bit, header, require_same, timed  # noqa: E402

from mezo_replay.rebuild import replay  # noqa: E402
from mezo_replay.format.fingerprint import tensor_fingerprint  # noqa: E402
from mezo_replay.arithmetic.initial import generate, kaiming_uniform_bound, uniform16, zeros  # noqa: E402
from mezo_replay.format.mzt import TrajectoryWriter, read_trajectory  # noqa: E402
from mezo_replay.training.optimizer import MeZO  # noqa: E402
from mezo_replay.arithmetic.rule import encode_grad  # noqa: E402
from mezo_replay.kernels.steps import replay_tensor_, set_backend  # noqa: E402

TARGET_S = 30.0  # the figure for 3.1e10 element-steps on 2 CPU cores
SYNTHETIC_BASE = hashlib.sha256(b"mezo-replay bench: synthetic OPT-1.3B-shaped base").hexdigest()


def lora_specs(layers: int, hidden: int, r: int) -> dict[str, tuple[tuple[int, int], dict]]:
    """name -> (shape, init) of peft's LoRA tensors on q_proj and v_proj of an OPT decoder."""
    out = {}
    for i in range(layers):
        for module in ("q_proj", "v_proj"):
            stem = f"base_model.model.model.decoder.layers.{i}.self_attn.{module}"
            out[f"{stem}.lora_A.weight"] = ((r, hidden), uniform16(kaiming_uniform_bound(hidden)))
            out[f"{stem}.lora_B.weight"] = ((hidden, r), zeros())
    return out


def peft_extra(r: int) -> dict:
    return {"peft": {"adapter_config": {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
                                        "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "bias": "none",
                                        "base_model_name_or_path": None, "revision": None},
                     "base_weights": SYNTHETIC_BASE}}


def optimizer(specs: dict, seed: int, lr: float) -> MeZO:
    """MeZO over the adapter's tensors, each holding its generated initial value (index = sorted order)."""
    names = sorted(specs, key=lambda n: n.encode("utf-8"))
    params = [(n, generate(specs[n][1], seed, k, specs[n][0], torch.float32).requires_grad_(True))
              for k, n in enumerate(names)]
    return MeZO(params, lr=lr, eps=1e-3, seed=seed)


def make_trajectory(path: Path, args: argparse.Namespace, seed: int, device: str = "cpu") -> None:
    specs = lora_specs(args.layers, args.hidden, args.r)
    opt = optimizer(specs, seed, args.lr)
    header_args = dict(new_tensors={n: init for n, (_, init) in specs.items()}, extra=peft_extra(args.r),
                       base_source="synthetic:opt-1.3b-shape", metadata={"peft": "lora", "bench": "lora_rebuild"})
    if args.record == "mezo":
        opt.record(path, steps_per_chunk=1024, record_losses=False, **header_args)
        targets = [torch.randn(p.shape, generator=torch.Generator().manual_seed(seed * 1000 + k)) * 0.05
                   for k, p in enumerate(opt.params)]

        def closure() -> float:  # a cheap loss of the adapter's tensors only
            return sum(float((p - t).square().sum()) for p, t in zip(opt.params, targets))

        for _ in range(args.steps):
            opt.step(closure)
        opt.close()
        return
    h = opt.header(record_losses=False, **header_args)
    del opt
    rng = np.random.default_rng(seed)
    with TrajectoryWriter(path, h, steps_per_chunk=1024) as w:
        for g in rng.standard_normal(args.steps) * args.grad_scale:
            w.append_step(encode_grad(float(g)))
    fps = [tensor_fingerprint(t) for _, t in replay.replayed(replay.plan(None, path), device)]  # untimed
    w = TrajectoryWriter.open_append(path)
    w.write_fingerprint(fps)
    w.close()


def rebuild(path: Path, device: str = "cpu") -> tuple[bytes, int]:
    """sha256 over every rebuilt tensor (each checked against the final fingerprint) and the element-steps."""
    p = replay.plan(None, path)
    if p.expected is None:
        raise SystemExit("Error: the trajectory records no final fingerprint")
    h = hashlib.sha256()
    for name, t in replay.replayed(p, device):
        h.update(name.encode() + b"\0" + t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest(), p.element_steps


def torch_prefix(path: Path, index: int, n: int, device: str) -> tuple[str, bytes, bytes]:
    """(name, first n elements rebuilt on `device` by the default path, the same by the plain torch path).

    The torch path runs on `device` too: on a GPU it is a second implementation beside the Triton kernel,
    and it keeps gpu_check's stage short (on the CPU it takes about 20 s per tensor over 20,000 steps,
    its per-step costs, and the compiled CPU kernel is not built on the device machine)."""
    traj = read_trajectory(path)
    p = replay.plan(None, traj)
    entry = traj.header["tensors"][index]
    w0 = replay.read_base(p, index).reshape(-1)
    n = min(n, w0.numel())
    got = replay.replay_named(p, index, device).reshape(-1)[:n]
    w = w0[:n].clone().to(device)
    set_backend("torch")
    try:
        replay_tensor_(w, p.rule, index, p.constants)
    finally:
        set_backend("auto")
    return entry["name"], got.view(torch.uint8).numpy().tobytes(), w.cpu().view(torch.uint8).numpy().tobytes()


def one_tensor_baseline(path: Path, args: argparse.Namespace):
    """The same element-steps as one contiguous F32 tensor through replay_tensor_: the kernel alone."""
    traj = read_trajectory(path)
    p = replay.plan(None, traj)
    n = sum(int(np.prod(t["shape"])) for t in traj.header["tensors"])
    w0 = (torch.randn(n, generator=torch.Generator().manual_seed(0)) * 0.02)
    return timed(lambda w: replay_tensor_(w, p.rule, 0, p.constants) or w, args.repeats, args.warmup, sync(args.device),
                 setup=lambda: w0.clone().to(args.device))


def sync(device: str):
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--device", default="cpu", help="where the rebuild runs (cpu, cuda); the torch-path check runs "
                    "on the CPU")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--grad-scale", type=float, default=20.0, help="std of the synthetic projected gradients")
    ap.add_argument("--record", choices=["synthetic", "mezo"], default="synthetic")
    ap.add_argument("--check-elements", type=int, default=4096)
    ap.add_argument("--no-baseline", action="store_true", help="skip the one-tensor baseline")
    ap.add_argument("--adapters", type=lambda s: [int(x) for x in s.split(",")],
                    help="comma-separated counts: per-user adapters rebuilt one after another, a process per count")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    add_timing_options(ap, repeats=3)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    check_timing_options(args)
    if args.steps < 1 or args.layers < 1 or args.hidden < 1 or args.r < 1:
        raise SystemExit("Error: --steps, --layers, --hidden and --r must be at least 1")
    folder = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        if args.adapters:
            adapters(folder, args)
        else:
            single(folder, args)
    finally:
        shutil.rmtree(folder)


def single(folder: Path, args: argparse.Namespace) -> None:
    path = folder / "lora.mzt"
    start = time.perf_counter()
    make_trajectory(path, args, seed=1, device=args.device)
    made_s = time.perf_counter() - start
    traj = read_trajectory(path)
    n_params = sum(int(np.prod(t["shape"])) for t in traj.header["tensors"])
    size = path.stat().st_size
    print(header(f"base-less LoRA rebuild, {len(traj.header['tensors'])} F32 tensors (r={args.r} on q_proj, v_proj "
                 f"of {args.layers} layers, hidden {args.hidden}), {n_params:,} parameters x {args.steps:,} steps",
                 args, args.device))
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1, 5, 15 min), "
          f"{os.cpu_count()} CPUs")
    print(f"trajectory: {size:,} bytes ({size / args.steps:.2f} bytes/step), {args.record} steps, made in "
          f"{made_s:.1f} s; its final fingerprint "
          + ("was written by training (MeZO steps)" if args.record == "mezo" else "by one untimed rebuild"))
    digests, cpu = [], []

    def run(_: object) -> int:
        start = time.process_time()
        d, es = rebuild(path, args.device)
        cpu.append(time.process_time() - start)
        digests.append(d)
        return es

    timing, es = timed(run, args.repeats, args.warmup, sync(args.device))
    cpu_s = float(np.median(cpu[-args.repeats:]))
    rows = [("rebuild: plan(None) + replayed, all tensors, fingerprint-checked", timing)]
    if not args.no_baseline:
        rows.append((f"baseline: one {n_params:,}-element F32 tensor, replay_tensor_", one_tensor_baseline(path, args)[0]))
    print(f"{'path':<70}{'median s':>10}{'element-steps/s':>18}  spread")
    for name, t in rows:
        print(f"{name:<70}{t.median:>10.3f}{es / t.median:>18.3e}  {t.spread()}")
    if len(rows) > 1:
        print(f"rebuild / baseline time: {rows[0][1].median / rows[1][1].median:.2f}")
    print(f"peak resident set: {peak_rss() / 2**20:.0f} MiB")
    runs = digests[-args.repeats:]
    for k, d in enumerate(runs[1:], 1):
        require_same("rebuilt adapter, sha256 over all tensors", f"run {k + 1}", d, "run 1", runs[0])
    a_index = 0  # sorted names: layers.0.self_attn.q_proj.lora_A, then .lora_B
    for index in (a_index, a_index + 1):
        name, got, ref = torch_prefix(path, index, args.check_elements, args.device)
        if args.inject_mismatch:
            got = flip_one_bit(got)
        require_same(f"first {len(got) // 4:,} elements of {name}", "rebuild", got,
                     "torch path" if args.device == "cpu" else f"torch path on {args.device}", ref)
    cores = len(os.sched_getaffinity(0))
    if args.device == "cpu":
        print(f"CPU time of a rebuild (all threads, median): {cpu_s:.2f} s, {es / cpu_s:.3e} element-steps per "
              f"CPU-second; derived for {cores} otherwise idle cores: {cpu_s / cores:.2f} s, "
              f"{es / cpu_s * cores:.3e} element-steps/s")
    need = 3.1e10 / TARGET_S
    small = "" if es >= 1e10 else " (a small run: fixed costs weigh more than at 3.1e10)"
    print(f"target (CPU): 3.1e10 element-steps in {TARGET_S:g} s, {need:.3e} element-steps/s; measured on {args.device} "
          f"{es / timing.median:.3e}: {'met' if es / timing.median >= need else 'MISSED'}{small}")


def adapters(folder: Path, args: argparse.Namespace) -> None:
    most = max(args.adapters)
    trajs = folder / "trajs"
    trajs.mkdir()
    start = time.perf_counter()
    for k in range(most):
        make_trajectory(trajs / f"user{k:04d}.mzt", args, seed=100 + k)
    made_s = time.perf_counter() - start
    n_params = sum(int(np.prod(s)) for s, _ in lora_specs(args.layers, args.hidden, args.r).values())
    size = sum(f.stat().st_size for f in trajs.iterdir())
    print(header(f"per-user LoRA adapters rebuilt one after another, {n_params:,} parameters x {args.steps:,} steps "
                 f"each, saved as safetensors folders, a fresh process per count", args))
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1, 5, 15 min), "
          f"{os.cpu_count()} CPUs")
    print(f"trajectories: {most}, {size:,} bytes in all ({size // most:,} each), made in {made_s:.1f} s")
    print(f"{'adapters':>9}{'total s':>10}{'one s':>8}{'total / (N x one)':>19}{'element-steps/s':>18}"
          f"{'RSS before MiB':>16}{'peak above it MiB':>19}")
    digests: dict[str, bytes] = {}
    for count in args.adapters:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                             os.environ.get("PYTHONPATH", "")])}
        if args.threads is not None:
            env["OMP_NUM_THREADS"] = str(args.threads)
        out_dir = folder / f"out{count}"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child",
               json.dumps({"trajs": str(trajs), "count": count, "out": str(out_dir)})]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise SystemExit(f"Error: the rebuild of {count} adapters failed:\n{proc.stderr[-2000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        way = r["way"]
        print(f"{count:>9}{r['total']:>10.2f}{r['one']:>8.3f}{r['total'] / (count * r['one']):>19.2f}"
              f"{r['element_steps'] / r['total']:>18.3e}{r['before'] / 2**20:>16.0f}"
              f"{(r['peak'] - r['before']) / 2**20:>19.1f}", flush=True)
        mine = {name: hashlib.sha256((out_dir / name / "adapter_model.safetensors").read_bytes()).digest()
                for name in sorted(os.listdir(out_dir))}
        if args.inject_mismatch and count == args.adapters[-1]:
            mine["user0000"] = flip_one_bit(mine["user0000"])
        if digests:
            both = sorted(set(digests) & set(mine))
            require_same(f"sha256 of adapter_model.safetensors of {both[0]} .. {both[-1]} ({len(both)} adapters)",
                         f"the {count}-adapter run", b"".join(mine[n] for n in both),
                         "the first run", b"".join(digests[n] for n in both))
        digests = {**mine, **digests}
    print(f"rebuilt by: {way}")
    print("every adapter rebuilt in more than one run has the same bytes each time; each was checked against its "
          "trajectory's final fingerprint as it was rebuilt")


def child(args: argparse.Namespace) -> None:
    """One count of --adapters in a fresh process: rebuild, save, and report time and memory. Through
    mezo_replay.rebuild.adapter.rebuild_many (adapter folders, one call for all) where this checkout has it, else
    replay.replayed and a safetensors file per adapter."""
    spec = json.loads(args.child)
    paths = sorted(Path(spec["trajs"]).glob("*.mzt"))[:spec["count"]]
    out = Path(spec["out"])
    try:
        from mezo_replay.rebuild.adapter import rebuild_many

        way = "mezo_replay.rebuild.adapter.rebuild_many, one call"

        def run(group: list[Path], where: Path) -> int:
            plans = []
            rebuild_many(group, where, on_done=lambda _t, _o, p: plans.append(p.element_steps))
            return sum(plans)
    except ImportError:
        from safetensors.torch import save_file

        way = "replay.replayed + safetensors save_file per adapter (mezo_replay.rebuild.adapter is not in this checkout)"

        def run(group: list[Path], where: Path) -> int:
            es = 0
            for path in group:
                p = replay.plan(None, path)
                (where / path.stem).mkdir(parents=True, exist_ok=True)
                save_file(dict(replay.replayed(p)), str(where / path.stem / "adapter_model.safetensors"))
                es += p.element_steps
            return es

    run(paths[:1], out.with_name(out.name + "-warm"))  # imports, kernel load, page cache
    before = current_rss()
    start = time.perf_counter()
    run(paths[:1], out.with_name(out.name + "-one"))
    one_s = time.perf_counter() - start
    start = time.perf_counter()
    es = run(paths, out)
    total = time.perf_counter() - start
    print(json.dumps({"total": total, "one": one_s, "element_steps": es, "before": before, "peak": peak_rss(),
                      "way": way}))


if __name__ == "__main__":
    main()
