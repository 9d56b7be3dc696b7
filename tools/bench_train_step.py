"""Training step time of mezo-replay's MeZO against the reference MeZO step (tools/mezo_baseline.py),
side by side in one process on one random-init model, with two plain forwards (the floor: a MeZO step
is two forwards plus its noise passes) and each one's peak memory above the loaded model.

    python tools/bench_train_step.py --device cuda --shape opt-1.3b --dtype bf16 --batch 16 --seq 256

The perturbation share is (step - two forwards) / step: the time spent on noise and updates.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_memory import SHAPES  # noqa: E402
from mezo_baseline import ReferenceMeZO  # noqa: E402

from mezo_replay import MeZO  # noqa: E402
from mezo_replay.steps import set_backend  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="opt-1.3b", choices=list(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per path, after one warm-up")
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()
    set_backend(args.backend)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    h, n, heads, ffn = SHAPES[args.shape]
    cfg = tf.OPTConfig(vocab_size=50272, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, ffn_dim=ffn,
                       max_position_embeddings=2048, word_embed_proj_dim=h)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = tf.OPTForCausalLM(cfg).to(dtype).eval()
    ids = torch.randint(0, 50272, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(args.device)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def loss() -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss.float()

    def two_forwards(_: object) -> None:
        with torch.no_grad():
            loss()
            loss()

    def timed(step: object) -> tuple[float, float]:
        """Median seconds per step and the peak allocation above the model, over --steps steps."""
        step(loss)  # warm-up: kernels compiled, allocator settled
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated() if cuda else 0
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step(loss)
            sync()
            times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated() - held) if cuda else float("nan")
        return statistics.median(times), peak

    ours = MeZO(model.named_parameters(), lr=1e-7, eps=1e-3, seed=0)
    ours.record(Path(tempfile.mkdtemp()) / "bench.mzt")
    rows = {"two forwards (floor)": timed(two_forwards), "mezo-replay MeZO": timed(ours.step)}
    ours.close()
    rows["reference MeZO"] = timed(ReferenceMeZO(model.named_parameters(), lr=1e-7, eps=1e-3).step)

    params = sum(p.numel() for p in model.parameters())
    floor = rows["two forwards (floor)"][0]
    ref = rows["reference MeZO"][0]
    gib = 2**30
    print(f"{args.shape} ({params / 1e9:.2f}B params, random init) {args.dtype} on {args.device}, batch {args.batch} "
          f"x {args.seq}, median of {args.steps} steps; {time.strftime('%Y-%m-%d')}")
    print(f"{'path':<24}{'ms/step':>10}{'vs reference':>14}{'perturbation share':>20}{'peak GiB':>10}")
    for name, (s, peak) in rows.items():
        share = "" if name.startswith("two") else f"{(s - floor) / s:>19.0%}"
        print(f"{name:<24}{s * 1e3:>10.1f}{ref / s:>13.2f}x{share:>20}{peak / gib:>10.3f}")


if __name__ == "__main__":
    main()
