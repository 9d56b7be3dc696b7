"""Peak memory of MeZO training steps against plain inference on the same batch, side by side.

A random-init model of a given shape (default: OPT-1.3B; `llama-*` shapes build a LlamaForCausalLM) is
built in each of two fresh processes; one runs forward passes only (the baseline), the other runs MeZO
steps (two forwards and three in-place noise passes each, recording a trajectory). The figure is the peak
memory of that phase above what the process held once the model was built: torch.cuda.max_memory_allocated
on CUDA, the resident set sampled every 2 ms on the CPU.

With --peft lora both processes wrap the model with peft (get_peft_model, LoraConfig r=--lora-r on q_proj
and v_proj) and MeZO tunes the adapter's parameters only; the baseline is inference of that same wrapped
model, and the adapter's size is printed beside the difference (the issue's bound: training peak <=
inference + adapter).

    python tools/bench_train_memory.py [--device cuda] [--dtype bf16] [--batch 16] [--seq 256] [--steps 3]
    python tools/bench_train_memory.py --shape llama-70m --peft lora --dtype fp32 --batch 4 --seq 128 --steps 2

Each figure is the median over --repeats pairs of fresh processes. --warmup steps (or forward pairs) run
in the child before the sampling starts; the default is none, so that one-time allocations (the noise
table, the trajectory writer, the allocator's first growth) count, as they would in a real run. Nothing
is compared byte for byte here: inference and training do not produce comparable bytes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import add_timing_options, check_timing_options, header  # noqa: E402

SHAPES = {  # hidden, layers, heads, ffn, vocabulary
    "tiny": (64, 2, 4, 128, 1024),  # for the tests that keep these scripts running
    "opt-125m": (768, 12, 12, 3072, 50272),
    "opt-350m-ish": (1024, 24, 16, 4096, 50272),
    "opt-1.3b": (2048, 24, 32, 8192, 50272),
    "llama-tiny": (64, 2, 4, 128, 1024),
    "llama-70m": (512, 8, 8, 2048, 32000),  # 66M parameters: big enough that activations and weights matter
}

CHILD = r"""
import json, os, sys, tempfile, threading, time, torch, transformers as tf
from mezo_replay import MeZO
a = json.loads(sys.argv[1])
torch.manual_seed(0)
h, n, heads, ffn, vocab = a["shape"]
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a["dtype"]]
if a["arch"] == "llama":
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                         intermediate_size=ffn, max_position_embeddings=2048)
    cls = tf.LlamaForCausalLM
else:
    cfg = tf.OPTConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, ffn_dim=ffn,
                       max_position_embeddings=2048, word_embed_proj_dim=h)
    cls = tf.OPTForCausalLM
with torch.device(a["device"]):
    model = cls(cfg).to(dtype).eval()
    if a["peft"] == "lora":
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=a["lora_r"], lora_alpha=2 * a["lora_r"], lora_dropout=0.0,
                                                           target_modules=["q_proj", "v_proj"]))
        model.eval()
ids = torch.randint(0, vocab, (a["batch"], a["seq"]), generator=torch.Generator().manual_seed(1)).to(a["device"])
def loss():
    return model(input_ids=ids, labels=ids).loss.float()
cuda = a["device"].startswith("cuda")
sync = torch.cuda.synchronize if cuda else (lambda: None)
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
if a["mode"] == "inference":
    def work(k):
        with torch.no_grad():
            for _ in range(2 * k):
                loss()
else:
    opt = []  # made at the first step, inside the measurement unless --warmup steps come first
    def work(k):
        if k and not opt:
            opt.append(MeZO(model.named_parameters(), lr=1e-6, eps=1e-3, seed=0))
            opt[0].record(tempfile.mktemp(suffix=".mzt"))
        for _ in range(k):
            opt[0].step(loss)
work(a["warmup"])
sync()
if cuda:
    torch.cuda.reset_peak_memory_stats()
before = torch.cuda.memory_allocated() if cuda else rss()
peak_rss, done = [before], threading.Event()
def sample():
    while not done.is_set():
        peak_rss[0] = max(peak_rss[0], rss())
        time.sleep(0.002)
sampler = threading.Thread(target=sample)
if not cuda:
    sampler.start()
largest = max(p.numel() * p.element_size() for p in model.parameters())
tuned = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
start = time.perf_counter()
work(a["steps"])
if a["mode"] == "mezo":
    opt[0].close()  # the final fingerprint, as a real run ends
sync()
elapsed = time.perf_counter() - start
done.set()
if not cuda:
    sampler.join()
peak = torch.cuda.max_memory_allocated() if cuda else peak_rss[0]
print(json.dumps({"peak": peak - before, "held": before, "largest": largest, "seconds": elapsed, "tuned": tuned,
                  "params": sum(p.numel() for p in model.parameters())}))
"""


def run(mode: str, args: argparse.Namespace) -> dict:
    spec = {"mode": mode, "shape": SHAPES[args.shape], "dtype": args.dtype, "device": args.device,
            "batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
            "arch": "llama" if args.shape.startswith("llama") else "opt", "peft": args.peft, "lora_r": args.lora_r}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"Error: the {mode} child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="opt-1.3b", choices=list(SHAPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--peft", choices=["none", "lora"], default="none",
                    help="lora: MeZO tunes a peft LoRA adapter (q_proj, v_proj) of the model, not the model")
    ap.add_argument("--lora-r", type=int, default=8)
    add_timing_options(ap, repeats=3, warmup=0, compares=False)
    args = ap.parse_args(argv)
    check_timing_options(args)
    pairs = [(run("inference", args), run("mezo", args)) for _ in range(args.repeats)]
    med = {k: {f: statistics.median(p[i][f] for p in pairs) for f in ("peak", "seconds")}
           for i, k in enumerate(("inference", "mezo"))}
    mezo = pairs[0][1]
    gib = 2**30
    what = (f"LoRA r={args.lora_r} on q_proj, v_proj by peft ({mezo['tuned']:,} bytes tuned)" if args.peft == "lora"
            else "full tuning")
    print(header(f"peak memory, {args.shape} ({mezo['params']:,} params, random init), {what}, {args.dtype}, batch "
                 f"{args.batch} x {args.seq}, {args.steps} MeZO steps vs {2 * args.steps} forwards, each pair in fresh "
                 f"processes", args, args.device))
    print(f"model and process before the runs: {mezo['held'] / gib:.3f} GiB")
    print(f"{'run':<24}{'peak above that, GiB':>22}{'seconds':>10}  spread of peaks")
    names = (("inference (baseline)", "MeZO steps") if args.peft == "none"
             else ("inference, LoRA model", "MeZO-LoRA steps"))
    for name, key, i in ((names[0], "inference", 0), (names[1], "mezo", 1)):
        peaks = [p[i]["peak"] / gib for p in pairs]
        print(f"{name:<24}{med[key]['peak'] / gib:>22.3f}{med[key]['seconds']:>10.1f}  "
              f"{min(peaks):.3f}-{max(peaks):.3f} GiB over {len(peaks)}")
    diff = med['mezo']['peak'] - med['inference']['peak']
    print(f"MeZO - inference = {diff / gib:+.3f} GiB (medians); largest tensor {mezo['largest'] / gib:.3f} GiB")
    if args.peft == "lora":
        noise = max(max(p[i]["peak"] for p in pairs) - min(p[i]["peak"] for p in pairs) for i in (0, 1))
        verdict = ("holds" if diff <= mezo["tuned"] else
                   f"within the run-to-run spread of the peaks ({noise / 2**20:.1f} MiB)" if diff <= mezo["tuned"] + noise
                   else "does NOT hold")
        print(f"adapter: {mezo['tuned']:,} bytes ({mezo['tuned'] / 2**20:.2f} MiB); MeZO-LoRA peak <= inference peak + "
              f"adapter: {verdict} ({diff / 2**20:+.2f} MiB vs {mezo['tuned'] / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
