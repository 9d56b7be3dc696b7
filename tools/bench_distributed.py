"""Data-parallel or sharded `mezo-replay train` against the number of processes: step time and memory per rank.

For each world size, torchrun starts that many processes (gloo on the CPU, nccl with --device cuda), each
running the real `train()` (mezo_replay.training.train) on the embedded sentiment task with the same global
batch: every rank holds the whole model and takes its share of each batch, so the forwards shrink with
the world size and the weights' passes (perturb, update) do not. Printed per world size: the median step
time on rank 0 after --warmup steps, the speedup over the first world size, and each rank's peak memory
(resident set on the CPU, torch.cuda.max_memory_allocated on a GPU): data parallelism replicates the model,
so it stays about one model per rank.

With --shard (FSDP2, `train --shard`) each rank holds 1/N of every parameter and gathers one layer at a time
for the forwards: the table adds each rank's resident memory after the last step (`now`: the peak still
holds the whole model every rank loads before sharding it), the parameter bytes the rank holds, and the
largest unit FSDP2 gathers (a decoder layer, or the root's embeddings and norm), so that memory can be read
against model/N + largest unit. World size 1 is then the one-process run (--shard needs two or more).

    python tools/bench_distributed.py                                  # embedded tiny Llama, worlds 1,2,4
    python tools/bench_distributed.py --shape llama-20m --batch 16 --steps 12 --worlds 1,2
    python tools/bench_distributed.py --device cuda --worlds 1,2,4,8 --shape llama-70m   # GPUs, nccl
    python tools/bench_distributed.py --shard --shape llama-20m --worlds 1,2,4         # sharded (FSDP2)

Each rank uses one CPU thread (torchrun's OMP_NUM_THREADS=1), so on a machine with C cores the speedup
cannot pass C. Nothing is compared byte for byte here (tests/test_distributed_train.py does that): the
world size changes the projected gradient's rounding, not the file's validity.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SHAPES = {  # hidden, layers, heads, ffn (the embedded tokenizer's vocabulary, random weights)
    "llama-20m": (512, 6, 8, 1536),
    "llama-70m": (768, 10, 12, 3072),
}

CHILD = r"""
import json, os, resource, sys, time, torch
from pathlib import Path
from mezo_replay import embedded
from mezo_replay.training.train import TrainConfig, train
a = json.loads(sys.argv[1])
train_examples, _ = embedded.load_task()
marks = []
shard = a["shard"] and int(os.environ.get("WORLD_SIZE", "1")) > 1
cfg = TrainConfig(model=a["model"], train_examples=train_examples, eval_examples=[], out=Path(a["dir"]) / "run.mzt",
                  steps=a["steps"], lr=a["lr"], batch_size=a["batch"], device=a["device"], overwrite=True,
                  eval_every=0, flush_every=a["steps"], shard=shard, offload=a["offload"] if shard else None)
result = train(cfg, on_step=lambda r: marks.append(time.perf_counter()))
rank = result.world.rank
cuda = a["device"].startswith("cuda")
peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
now = torch.cuda.memory_allocated() if cuda else \
    int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
params = list(result.model.parameters())
model_bytes = sum(p.numel() * p.element_size() for p in params)
local = lambda p: p.to_local() if hasattr(p, "to_local") else p
held_bytes = sum(local(p).numel() * p.element_size() for p in params)
blocks = set(getattr(result.model, "_no_split_modules", None) or ())
units = [m for m in result.model.modules() if blocks & {c.__name__ for c in type(m).__mro__}]  # FSDP subclasses
in_units = {id(p) for m in units for p in m.parameters()}
sizes = [sum(p.numel() * p.element_size() for p in m.parameters()) for m in units]
sizes.append(sum(p.numel() * p.element_size() for p in params if id(p) not in in_units))  # the root's own
with open(Path(a["dir"]) / f"rank{rank}.json", "w") as f:
    json.dump({"rank": rank, "world_size": result.world.size, "peak": peak, "now": now, "marks": marks,
               "model_bytes": model_bytes, "held_bytes": held_bytes, "unit_bytes": max(sizes), "shard": shard}, f)
"""


def make_model(shape: str, folder: Path) -> Path:
    """A random-init Llama of `shape` with the embedded tokenizer, saved as a Hugging Face folder."""
    import shutil

    import torch
    import transformers as tf

    from mezo_replay import embedded

    hidden, layers, heads, ffn = SHAPES[shape]
    base = tf.AutoConfig.from_pretrained(embedded.MODEL_DIR)
    cfg = tf.LlamaConfig(vocab_size=base.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=ffn,
                         max_position_embeddings=256, bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id,
                         pad_token_id=base.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded.MODEL_DIR / name, folder / name)
    return folder


def run_world(n: int, args: argparse.Namespace, model: str, work: Path) -> dict:
    folder = work / f"world{n}"
    folder.mkdir()
    spec = {"model": model, "steps": args.steps, "lr": args.lr, "batch": args.batch, "device": args.device,
            "dir": str(folder), "shard": args.shard, "offload": args.offload}
    (work / "child.py").write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                          str(work / "child.py"), json.dumps(spec)], capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"Error: the {n}-process run failed:\n{out.stderr[-4000:]}")
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(n)]
    marks = ranks[0]["marks"]
    gaps = [b - a for a, b in zip(marks, marks[1:])][args.warmup:]
    if not gaps:
        raise SystemExit("Error: --steps must exceed --warmup + 1 (step times are gaps between steps)")
    return {"world_size": n, "step_s": statistics.median(gaps), "spread_s": [min(gaps), max(gaps)],
            "peak_mib": [r["peak"] / 2**20 for r in ranks], "model_mib": ranks[0]["model_bytes"] / 2**20,
            "now_mib": [r["now"] / 2**20 for r in ranks], "held_mib": [r["held_bytes"] / 2**20 for r in ranks],
            "unit_mib": ranks[0]["unit_bytes"] / 2**20, "parallel": "shard" if ranks[0]["shard"] else
            ("data" if n > 1 else "none"), "wall_s": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="1,2,4", help="world sizes to run, comma-separated (default 1,2,4)")
    ap.add_argument("--shape", default="embedded", choices=["embedded", *SHAPES],
                    help="the embedded tiny Llama (1.6M parameters), or a random-init Llama of that size")
    ap.add_argument("--batch", type=int, default=16, help="global batch: split over the processes (default 16)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2, help="step gaps left out of the median (default 2)")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per process)")
    ap.add_argument("--shard", action="store_true", help="train --shard (FSDP2) at world sizes above 1")
    ap.add_argument("--offload", choices=["cpu"], help="with --shard: FSDP2's CPU offload")
    ap.add_argument("--json", action="store_true", help="print the rows as one JSON line after the table")
    args = ap.parse_args(argv)
    if args.offload and not args.shard:
        raise SystemExit("Error: --offload cpu needs --shard")
    worlds = [int(w) for w in args.worlds.split(",")]
    if min(worlds) < 1 or args.batch < max(worlds) or args.warmup < 0:
        raise SystemExit("Error: world sizes must be at least 1 and at most --batch, --warmup at least 0")
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = "mezo-replay:embedded/tiny-llama" if args.shape == "embedded" else \
            str(make_model(args.shape, work / "model"))
        rows = [run_world(n, args, model, work) for n in worlds]
    cores = os.cpu_count()
    mode = "sharded (FSDP2" + (", CPU offload)" if args.offload else ")") if args.shard else "data-parallel"
    print(f"{mode} train, {args.shape}, global batch {args.batch}; {time.strftime('%Y-%m-%d')}; device "
          f"{args.device} ({cores} CPU cores), torch {torch.__version__}; median of {args.steps - 1 - args.warmup} "
          f"step gaps on rank 0 after {args.warmup}")
    print(f"{'world':>5} {'step ms':>9} {'spread ms':>15} {'speedup':>8} {'peak MiB per rank':>30} {'model MiB':>10}"
          + (f" {'now MiB per rank':>30} {'held MiB':>9} {'unit MiB':>9}" if args.shard else ""))
    for row in rows:
        lo, hi = row["spread_s"]
        peaks = ", ".join(f"{p:.0f}" for p in row["peak_mib"])
        line = (f"{row['world_size']:>5} {1e3 * row['step_s']:>9.1f} {f'{1e3 * lo:.1f}-{1e3 * hi:.1f}':>15} "
                f"{rows[0]['step_s'] / row['step_s']:>7.2f}x {peaks:>30} {row['model_mib']:>10.1f}")
        if args.shard:
            line += (f" {', '.join(f'{p:.0f}' for p in row['now_mib']):>30} {max(row['held_mib']):>9.1f} "
                     f"{row['unit_mib']:>9.1f}")
        print(line)
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
