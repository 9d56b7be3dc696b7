#!/usr/bin/env python3
"""Build the embedded default model and task that ship inside mezo-replay.

Writes

    mezo_replay/embedded/tiny-llama/   tokenizer.json, tokenizer_config.json, config.json,
                                       generation_config.json, model.safetensors
    mezo_replay/embedded/task/         train.jsonl, eval.jsonl

Everything is generated here from templates and word lists written for this project (no
downloads, no third-party text):

* a review generator: short restaurant / hotel / film / book / gadget / shop reviews whose
  clauses all share one polarity, optionally with a neutral clause mixed in;
* the fine-tune task: "Review: <review> Sentiment:" -> " great" | " terrible";
* a pre-training corpus: the same kind of reviews followed by a verdict phrased in many other ways
  ("all in all it was lovely.", "i would call it awful." ...), plus plain descriptive and
  narrative sentences.  The task's own wording ("Review:", "Sentiment:") never appears in it, so
  the pre-trained model knows how reviews relate to verdict words but not the task's format: it
  starts poor on the task and MeZO has something real and learnable to do;
* a byte-level BPE tokenizer (tokenizers library) trained on that corpus, wrapped in
  transformers.PreTrainedTokenizerFast with bos/eos/pad tokens;
* a small LlamaForCausalLM pre-trained on the corpus with AdamW.

The script is deterministic for a given machine and library versions (fixed seeds, fixed step
counts), but the committed output need not be bit-identical across machines.

    python tools/make_embedded.py                 # everything (about two minutes on 2 cores)
    python tools/make_embedded.py --task-only     # only the jsonl files
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / "mezo_replay" / "embedded"

SEED = 20240531
N_TRAIN = 512
N_EVAL = 128
LABEL_WORDS = {1: " great", 0: " terrible"}
PROMPT_TEMPLATE = "Review: {review} Sentiment:"

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
VOCAB_SIZE = 1024

MODEL_KWARGS = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    initializer_range=0.02,
)
PRETRAIN_STEPS = 600
PRETRAIN_BATCH = 32
PRETRAIN_SEQ = 96
PRETRAIN_LR = 3e-3
PRETRAIN_WARMUP = 100

# ---------------------------------------------------------------------------------------------
# Word lists.  Each domain: subjects as (noun phrase, is_plural), positive and negative
# adjectives, positive and negative whole predicates ({be} is replaced by is/are/was/were).
# ---------------------------------------------------------------------------------------------

DOMAINS = {
    "restaurant": dict(
        subjects=[("the soup", 0), ("the pasta", 0), ("the bread", 0), ("the coffee", 0),
                  ("the salad", 0), ("the fish", 0), ("the cake", 0), ("the pizza", 0),
                  ("the curry", 0), ("the tea", 0), ("the noodles", 1), ("the fries", 1),
                  ("the waiter", 0), ("the staff", 1), ("the service", 0), ("the dining room", 0),
                  ("the portions", 1), ("the dessert", 0), ("the menu", 0), ("the chef", 0)],
        pos=["warm", "fresh", "tasty", "delicious", "friendly", "generous", "crisp", "cozy",
             "quick", "flavorful", "tender", "cheerful"],
        neg=["cold", "stale", "bland", "rude", "greasy", "soggy", "slow", "burnt", "salty",
             "tiny", "overpriced", "sticky"],
        pos_pred=["{be} cooked just right", "{be} full of flavor", "tasted like home",
                  "made us smile", "{be} worth every penny", "came out hot and fast"],
        neg_pred=["tasted like cardboard", "{be} left out too long", "made me feel sick",
                  "came out after an hour", "{be} not worth the money", "ruined the meal"],
    ),
    "hotel": dict(
        subjects=[("the room", 0), ("the bed", 0), ("the pillows", 1), ("the shower", 0),
                  ("the lobby", 0), ("the pool", 0), ("the breakfast", 0), ("the view", 0),
                  ("the front desk", 0), ("the hallway", 0), ("the towels", 1),
                  ("the manager", 0), ("the cleaners", 1), ("the balcony", 0), ("the wifi", 0)],
        pos=["clean", "quiet", "bright", "comfortable", "spacious", "spotless", "calm", "modern",
             "helpful", "lovely", "soft", "welcoming"],
        neg=["dirty", "noisy", "dark", "cramped", "smelly", "damp", "shabby", "broken",
             "unhelpful", "filthy", "stuffy", "worn"],
        pos_pred=["{be} a joy", "felt like a second home", "{be} better than the photos",
                  "let us sleep like babies", "{be} ready early", "{be} kept very tidy"],
        neg_pred=["kept us awake all night", "{be} worse than the photos", "smelled of smoke",
                  "{be} never cleaned", "{be} falling apart", "made the stay miserable"],
    ),
    "film": dict(
        subjects=[("the film", 0), ("the plot", 0), ("the acting", 0), ("the ending", 0),
                  ("the music", 0), ("the jokes", 1), ("the actors", 1), ("the story", 0),
                  ("the dialogue", 0), ("the pacing", 0), ("the hero", 0), ("the villain", 0),
                  ("the effects", 1), ("the script", 0), ("the first half", 0)],
        pos=["gripping", "funny", "moving", "clever", "beautiful", "thrilling", "charming",
             "fresh", "brilliant", "tense", "warm", "smart"],
        neg=["boring", "dull", "silly", "flat", "confusing", "predictable", "lazy", "clumsy",
             "tedious", "cheap", "shallow", "painful"],
        pos_pred=["kept me on the edge of my seat", "made the whole room laugh",
                  "{be} a real treat", "stayed with me for days", "{be} pure magic",
                  "brought tears to my eyes"],
        neg_pred=["put me to sleep", "made no sense at all", "{be} a waste of time",
                  "dragged on forever", "{be} hard to sit through", "fell apart at the end"],
    ),
    "book": dict(
        subjects=[("the book", 0), ("the novel", 0), ("the characters", 1), ("the writing", 0),
                  ("the chapters", 1), ("the author", 0), ("the cover", 0), ("the narrator", 0),
                  ("the world building", 0), ("the last chapter", 0), ("the prose", 0)],
        pos=["engaging", "vivid", "rich", "elegant", "wise", "touching", "gripping", "lively",
             "clever", "beautiful", "tender", "bold"],
        neg=["boring", "flat", "messy", "shallow", "wooden", "dull", "slow", "confusing",
             "lifeless", "preachy", "clumsy", "tiresome"],
        pos_pred=["{be} hard to put down", "kept me reading all night", "{be} a gift",
                  "made me think for weeks", "{be} a delight from start to finish"],
        neg_pred=["{be} a chore to finish", "lost me by page ten", "{be} full of mistakes",
                  "went nowhere", "{be} impossible to care about"],
    ),
    "gadget": dict(
        subjects=[("the phone", 0), ("the battery", 0), ("the screen", 0), ("the headphones", 1),
                  ("the speaker", 0), ("the charger", 0), ("the camera", 0), ("the keyboard", 0),
                  ("the buttons", 1), ("the app", 0), ("the case", 0), ("the lamp", 0),
                  ("the kettle", 0), ("the blender", 0), ("the straps", 1)],
        pos=["sturdy", "fast", "sharp", "light", "solid", "reliable", "handy", "smooth",
             "bright", "crisp", "sleek", "quiet"],
        neg=["flimsy", "slow", "buggy", "heavy", "cheap", "loud", "fragile", "faulty",
             "clunky", "dim", "useless", "broken"],
        pos_pred=["{be} worth the price", "lasted for days", "works like a charm",
                  "{be} easy to set up", "never lets me down", "{be} a smart buy"],
        neg_pred=["stopped working after a week", "{be} a waste of money", "died in two days",
                  "keeps crashing", "{be} impossible to set up", "broke the first time"],
    ),
    "shop": dict(
        subjects=[("the shop", 0), ("the delivery", 0), ("the clerk", 0), ("the prices", 1),
                  ("the parcel", 0), ("the store", 0), ("the shelves", 1), ("the checkout", 0),
                  ("the support team", 0), ("the refund", 0), ("the website", 0)],
        pos=["fast", "friendly", "fair", "tidy", "helpful", "polite", "smooth", "quick",
             "honest", "neat", "patient", "kind"],
        neg=["slow", "rude", "unfair", "messy", "unhelpful", "careless", "late", "chaotic",
             "dishonest", "sloppy", "grumpy", "confusing"],
        pos_pred=["{be} a pleasure to deal with", "arrived a day early", "{be} sorted in minutes",
                  "went out of their way for me", "{be} well organized"],
        neg_pred=["arrived two weeks late", "{be} lost twice", "never answered my emails",
                  "{be} a total mess", "charged me twice"],
    ),
}

INTENSIFIERS = ["", "", "", "very ", "really ", "quite ", "so ", "truly ", "rather ", "incredibly "]
NEUTRAL = [
    "we went on a rainy tuesday.", "i came with my sister.", "it was my first visit.",
    "we booked it a month ago.", "i bought it last spring.", "a friend told me about it.",
    "we went there after work.", "i read it on a long train ride.", "we watched it on friday night.",
    "i ordered it online.", "it was a busy evening.", "we were a group of six.",
    "my parents came along.", "it was a birthday treat.", "i had heard a lot about it.",
]

# Verdicts for the pre-training corpus: never "Sentiment:", and only sometimes the label words.
POS_VERDICT_WORDS = ["great", "great", "great", "good", "lovely", "wonderful", "excellent",
                     "fantastic", "superb", "delightful"]
NEG_VERDICT_WORDS = ["terrible", "terrible", "terrible", "bad", "awful", "poor", "dreadful",
                     "horrible", "miserable", "disappointing"]
VERDICT_TEMPLATES_AFTER = [
    "overall it was {w}.", "all in all, {w}.", "i would call it {w}.", "in short: {w}.",
    "my verdict: {w}.", "we found it {w}.", "honestly, {w}.", "the whole thing was {w}.",
    "in one word: {w}.", "to sum up, {w}.", "i thought it was {w}.", "rating: {w}.",
]
VERDICT_TEMPLATES_BEFORE = [
    "a {w} experience.", "what a {w} time.", "simply {w}.", "{w}, start to finish.",
]
REVIEW_INTROS = ["", "", "", "a guest wrote: ", "one customer said: ", "from a reader: ",
                 "notes from last week: ", "a short report. ", "my honest take. "]

# Plain sentences for the rest of the corpus.
PEOPLE = ["the girl", "the old man", "my neighbor", "the teacher", "a small boy", "the baker",
          "the farmer", "my aunt", "the pilot", "the doctor", "a young woman", "the painter",
          "the fisherman", "the student", "my brother", "the nurse"]
ANIMALS = ["the cat", "the dog", "a fox", "the horse", "a little bird", "the goat", "an owl",
           "the rabbit", "the cow", "a duck"]
PLACES = ["the park", "the market", "the river", "the station", "the library", "the garden",
          "the beach", "the hill", "the village", "the kitchen", "the old bridge", "the forest"]
THINGS = ["a red ball", "an apple", "the letter", "a warm coat", "the map", "a cup of tea",
          "the keys", "a basket of eggs", "a blue kite", "the newspaper", "a loaf of bread",
          "an umbrella", "the violin", "a box of nails"]
VERBS_PAST = ["found", "carried", "dropped", "painted", "bought", "lost", "gave away", "fixed",
              "opened", "hid", "washed", "sold"]
MOVES = ["walked to", "ran to", "drove to", "hurried to", "wandered around", "sat near",
         "waited at", "looked for"]
TIMES = ["in the morning", "at noon", "after lunch", "in the evening", "at night", "on sunday",
         "before dawn", "in the spring", "in winter", "last summer", "yesterday", "every day"]
WEATHER = ["the sky was grey.", "it rained all day.", "the sun was warm.", "snow fell softly.",
           "the wind was strong.", "the air was still.", "fog covered the town.",
           "it was a clear and cold day."]
NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


# ---------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------

def _clause(rng: random.Random, domain: dict, positive: bool, used: set) -> str:
    for _ in range(20):
        noun, plural = rng.choice(domain["subjects"])
        if noun not in used:
            break
    used.add(noun)
    be = "were" if plural else "was"
    adjs = domain["pos"] if positive else domain["neg"]
    kind = rng.random()
    if kind < 0.45:
        body = f"{be} {rng.choice(INTENSIFIERS)}{rng.choice(adjs)}"
    elif kind < 0.75:
        a, b = rng.sample(adjs, 2)
        body = f"{be} {a} and {b}"
    else:
        body = rng.choice(domain["pos_pred" if positive else "neg_pred"]).replace("{be}", be)
    return f"{noun} {body}."


def gen_review(rng: random.Random) -> tuple[str, int]:
    """One review (lower case, sentences ending in '.') and its label (1 positive, 0 negative)."""
    domain = DOMAINS[rng.choice(sorted(DOMAINS))]
    positive = rng.random() < 0.5
    used: set = set()
    n = rng.choice([1, 2, 2, 3])
    parts = [_clause(rng, domain, positive, used) for _ in range(n)]
    if rng.random() < 0.25:
        parts.insert(rng.randrange(len(parts) + 1), rng.choice(NEUTRAL))
    return " ".join(parts), int(positive)


def gen_task(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """Balanced train/eval sets of unique reviews; no eval review appears in train."""
    rng = random.Random(seed)
    seen: set = set()
    sizes = {"train": N_TRAIN, "eval": N_EVAL}
    sets = {}
    for name in ("train", "eval"):
        want = {0: sizes[name] // 2, 1: sizes[name] - sizes[name] // 2}
        out: dict[int, list[dict]] = {0: [], 1: []}
        while len(out[0]) < want[0] or len(out[1]) < want[1]:
            text, label = gen_review(rng)
            if text in seen or len(out[label]) >= want[label]:
                continue
            seen.add(text)
            out[label].append({"prompt": PROMPT_TEMPLATE.format(review=text),
                               "completion": LABEL_WORDS[label]})
        merged = out[0] + out[1]
        rng.shuffle(merged)
        sets[name] = merged
    return sets["train"], sets["eval"]


def _plain_sentence(rng: random.Random) -> str:
    k = rng.randrange(6)
    if k == 0:
        return f"{rng.choice(PEOPLE)} {rng.choice(MOVES)} {rng.choice(PLACES)} {rng.choice(TIMES)}."
    if k == 1:
        return f"{rng.choice(PEOPLE)} {rng.choice(VERBS_PAST)} {rng.choice(THINGS)} near {rng.choice(PLACES)}."
    if k == 2:
        return f"{rng.choice(ANIMALS)} slept in {rng.choice(PLACES)} {rng.choice(TIMES)}."
    if k == 3:
        return rng.choice(WEATHER)
    if k == 4:
        n = rng.randrange(len(NUMBER_WORDS))
        return f"{rng.choice(PEOPLE)} counted {NUMBER_WORDS[n]} birds over {rng.choice(PLACES)}."
    return f"{rng.choice(ANIMALS)} watched {rng.choice(PEOPLE)} {rng.choice(TIMES)}."


def gen_corpus(rng: random.Random, n_docs: int, exclude: set) -> list[str]:
    """Pre-training documents: reviews with verdicts (about 70%) and short plain stories."""
    docs = []
    while len(docs) < n_docs:
        if rng.random() < 0.7:
            text, label = gen_review(rng)
            if text in exclude:
                continue
            words = POS_VERDICT_WORDS if label else NEG_VERDICT_WORDS
            w = rng.choice(words)
            intro = rng.choice(REVIEW_INTROS)
            if rng.random() < 0.8:
                doc = f"{intro}{text} {rng.choice(VERDICT_TEMPLATES_AFTER).format(w=w)}"
            else:
                doc = f"{intro}{rng.choice(VERDICT_TEMPLATES_BEFORE).format(w=w)} {text}"
        else:
            doc = " ".join(_plain_sentence(rng) for _ in range(rng.randint(1, 4)))
        docs.append(doc)
    return docs


# ---------------------------------------------------------------------------------------------
# Tokenizer and model
# ---------------------------------------------------------------------------------------------

def build_tokenizer(corpus: list[str], task_texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The task texts are part of the tokenizer's training text so that the prompt format's words
    # ("Review", "Sentiment") get tokens; the model itself never sees them in pre-training.
    tok.train_from_iterator(corpus + task_texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=MODEL_KWARGS["max_position_embeddings"], padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    return fast


def pack_corpus(tokenizer, corpus: list[str]) -> "list[int]":
    """One long token stream: <bos> doc <eos> <bos> doc <eos> ..."""
    ids: list[int] = []
    enc = tokenizer(corpus, add_special_tokens=False)["input_ids"]
    for e in enc:
        ids.append(tokenizer.bos_token_id)
        ids.extend(e)
        ids.append(tokenizer.eos_token_id)
    return ids


def pretrain(model, stream, *, steps: int, seed: int, log_every: int = 100) -> None:
    import torch

    data = torch.tensor(stream, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=PRETRAIN_LR, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / PRETRAIN_WARMUP)
        * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)) * 0.95 + 0.05)
    model.train()
    t0 = time.time()
    running = None
    for step in range(steps):
        starts = torch.randint(0, len(data) - PRETRAIN_SEQ - 1, (PRETRAIN_BATCH,), generator=g)
        x = torch.stack([data[s:s + PRETRAIN_SEQ] for s in starts.tolist()])
        out = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = out.loss.item() if running is None else 0.95 * running + 0.05 * out.loss.item()
        if (step + 1) % log_every == 0 or step == 0:
            print(f"  pretrain step {step + 1:5d}/{steps}  loss {running:.3f}  "
                  f"({time.time() - t0:.0f}s)", flush=True)
    model.eval()


def build_model(tokenizer, *, steps: int, seed: int, corpus: list[str]):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_KWARGS,
    )
    model = LlamaForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {n:,} parameters", flush=True)
    stream = pack_corpus(tokenizer, corpus)
    print(f"corpus: {len(corpus):,} documents, {len(stream):,} tokens", flush=True)
    pretrain(model, stream, steps=steps, seed=seed)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=32)
    return model


def check_saved(model_dir: Path) -> None:
    """Reload the saved directory offline the way mezo-replay does and score one example."""
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tok("Review: the soup was warm. Sentiment: great", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    if not math.isfinite(loss) or ids[0, 0].item() != tok.bos_token_id:
        raise SystemExit(f"reloaded model check failed: loss {loss}, ids {ids.tolist()}")
    print(f"reloaded {type(tok).__name__} + {type(model).__name__}: loss {loss:.3f}")


# ---------------------------------------------------------------------------------------------

def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=EMBEDDED, help="embedded directory to write")
    ap.add_argument("--steps", type=int, default=PRETRAIN_STEPS, help="pre-training steps")
    ap.add_argument("--docs", type=int, default=30000, help="pre-training documents")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--task-only", action="store_true", help="write only the task jsonl files")
    args = ap.parse_args(argv)

    train, evals = gen_task(args.seed)
    task_dir = args.out / "task"
    write_jsonl(task_dir / "train.jsonl", train)
    write_jsonl(task_dir / "eval.jsonl", evals)
    print(f"task: {len(train)} train, {len(evals)} eval -> {task_dir}")
    if args.task_only:
        return 0

    import torch
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    def review_of(ex):  # "Review: <text> Sentiment:" -> "<text>"
        return ex["prompt"][len("Review: "):-len(" Sentiment:")]

    exclude = {review_of(ex) for ex in train + evals}
    corpus = gen_corpus(random.Random(args.seed + 1), args.docs, exclude)
    task_texts = [ex["prompt"] + ex["completion"] for ex in train]
    tokenizer = build_tokenizer(corpus, task_texts)
    for w in LABEL_WORDS.values():
        ids = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise SystemExit(f"label word {w!r} is not a single token: {ids}")

    model = build_model(tokenizer, steps=args.steps, seed=args.seed, corpus=corpus)
    model_dir = args.out / "tiny-llama"
    model_dir.mkdir(parents=True, exist_ok=True)
    for old in model_dir.iterdir():
        if old.is_file():
            old.unlink()
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    # transformers 5 writes its internal class name ("TokenizersBackend"); the public alias
    # loads the same tokenizer.json and is understood by transformers 4 as well.
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for p in model_dir.iterdir():
        p.chmod(0o644)
    check_saved(model_dir)
    for p in sorted(model_dir.iterdir()):
        print(f"  {p.name:28s} {p.stat().st_size:>10,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
