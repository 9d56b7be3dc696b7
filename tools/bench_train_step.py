"""Training step time of mezo-replay's MeZO against the reference MeZO step (tools/mezo_baseline.py),
side by side in one process on one random-init model, with two plain forwards (the floor: a MeZO step
is two forwards plus its noise passes) and each one's peak memory above the loaded model.

    python tools/bench_train_step.py --device cuda --shape opt-1.3b --dtype bf16 --batch 16 --seq 256

Each row is the median of --repeats steps after --warmup untimed ones. The perturbation share is
(step - two forwards) / step: the time spent on noise and updates. The reference step draws other noise
(torch's), so its bytes cannot be compared with ours; instead one step of mezo-replay is taken twice from
the same weights, once with the chosen backend and once with the plain torch path, and the run fails
(exit 1) unless the weights after them are identical.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import add_timing_options, check_timing_options, flip_one_bit, header, require_same, timed  # noqa: E402
from bench_train_memory import SHAPES  # noqa: E402
from mezo_baseline import ReferenceMeZO  # noqa: E402

from mezo_replay import MeZO  # noqa: E402
from mezo_replay.kernels.steps import set_backend  # noqa: E402


def weights_digest(model) -> bytes:
    """sha256 over every parameter's bytes (a 1.3B model's bytes would not fit twice in host memory)."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="opt-1.3b", choices=list(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--no-check", action="store_true", help="skip the backend-against-torch byte check")
    add_timing_options(ap)
    args = ap.parse_args(argv)
    check_timing_options(args)
    set_backend(args.backend)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    h, n, heads, ffn, vocab = SHAPES[args.shape]
    cfg = tf.OPTConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, ffn_dim=ffn,
                       max_position_embeddings=2048, word_embed_proj_dim=h)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = tf.OPTForCausalLM(cfg).to(dtype).eval()
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(args.device)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def loss() -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss.float()

    def two_forwards(_: object) -> None:
        with torch.no_grad():
            loss()
            loss()

    def measure(step) -> tuple[float, float, str]:
        """Median seconds per step, the peak allocation above the model, and the spread."""
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated() if cuda else 0
        timing, _ = timed(lambda _: step(loss), args.repeats, args.warmup, sync)
        peak = (torch.cuda.max_memory_allocated() - held) if cuda else float("nan")
        return timing.median, peak, timing.spread()

    ours = MeZO(model.named_parameters(), lr=1e-7, eps=1e-3, seed=0)
    ours.record(Path(tempfile.mkdtemp()) / "bench.mzt")
    rows = {"two forwards (floor)": measure(two_forwards), "mezo-replay MeZO": measure(ours.step)}
    ours.close()
    rows["reference MeZO"] = measure(ReferenceMeZO(model.named_parameters(), lr=1e-7, eps=1e-3).step)

    params = sum(p.numel() for p in model.parameters())
    floor, ref = rows["two forwards (floor)"][0], rows["reference MeZO"][0]
    gib = 2**30
    print(header(f"{args.shape} ({params:,} params, random init) {args.dtype}, batch {args.batch} x {args.seq}, "
                 f"backend {args.backend}", args, args.device))
    print(f"{'path':<24}{'ms/step':>10}{'vs reference':>14}{'perturbation share':>20}{'peak GiB':>10}  spread")
    for name, (s, peak, spread) in rows.items():
        share = f"{'':>20}" if name.startswith("two") else f"{(s - floor) / s:>20.0%}"
        print(f"{name:<24}{s * 1e3:>10.1f}{ref / s:>13.2f}x{share}{peak / gib:>10.3f}  {spread}")

    if not args.no_check:  # one step from the same weights, by the chosen backend and by plain torch
        start = [p.detach().clone() for p in model.parameters()]
        results = []
        for backend in (args.backend, "torch"):
            for p, s in zip(model.parameters(), start):
                p.data.copy_(s)
            set_backend(backend)
            MeZO(model.named_parameters(), lr=1e-4, eps=1e-3, seed=5).step(loss)
            results.append(weights_digest(model))
        set_backend("auto")
        got = flip_one_bit(results[0]) if args.inject_mismatch else results[0]
        require_same("sha256 of the weights after one MeZO step", f"backend {args.backend}", got, "torch path", results[1])


if __name__ == "__main__":
    main()
