"""Tests of mezo_replay.training.data and of the embedded model/task."""

from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from mezo_replay.training.data import (
    IGNORE_INDEX,
    Batch,
    DataError,
    batch_order,
    causal_lm_loss,
    encode_prompt_completion,
    load_jsonl,
    make_batch,
)

# ---------------------------------------------------------------------------------------------
# A tiny word-level tokenizer with known ids.
# ---------------------------------------------------------------------------------------------

WORDS = ["<bos>", "<eos>", "<pad>", "<unk>", "the", "soup", "was", "cold", "Sentiment:", "bad",
         "good", "Review:", "."]
ID = {w: i for i, w in enumerate(WORDS)}


def word_tokenizer(*, bos: bool = True, eos: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(ID), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    single = " ".join((["<bos>"] if bos else []) + ["$A"] + (["<eos>"] if eos else []))
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<bos>", ID["<bos>"]), ("<eos>", ID["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def wtok():
    return word_tokenizer()


def test_encode_exact_ids_and_labels(wtok):
    ex = [{"prompt": "the soup was cold Sentiment:", "completion": " bad"}]
    (ids, labels), = encode_prompt_completion(wtok, ex, max_length=32)
    want = [ID[w] for w in ["<bos>", "the", "soup", "was", "cold", "Sentiment:", "bad"]]
    assert ids == want
    assert labels == [IGNORE_INDEX] * 6 + [ID["bad"]]


def test_encode_multi_token_completion_and_custom_keys(wtok):
    ex = [{"q": "the soup", "a": " was cold ."}]
    (ids, labels), = encode_prompt_completion(wtok, ex, max_length=32, prompt_key="q",
                                              completion_key="a")
    assert ids == [ID["<bos>"], ID["the"], ID["soup"], ID["was"], ID["cold"], ID["."]]
    assert labels == [IGNORE_INDEX] * 3 + [ID["was"], ID["cold"], ID["."]]


def test_encode_appended_eos_is_a_completion_token():
    tok = word_tokenizer(bos=False, eos=True)
    (ids, labels), = encode_prompt_completion(
        tok, [{"prompt": "the soup", "completion": " good"}], max_length=32)
    assert ids == [ID["the"], ID["soup"], ID["good"], ID["<eos>"]]
    assert labels == [IGNORE_INDEX, IGNORE_INDEX, ID["good"], ID["<eos>"]]


def test_encode_truncates_prompt_from_the_left_keeping_bos(wtok):
    ex = [{"prompt": "Review: the soup was cold . Sentiment:", "completion": " bad"}]
    (ids, labels), = encode_prompt_completion(wtok, ex, max_length=4)
    assert ids == [ID["<bos>"], ID["."], ID["Sentiment:"], ID["bad"]]
    assert labels == [IGNORE_INDEX] * 3 + [ID["bad"]]
    # A completion longer than the room left is cut on the right.
    ex = [{"prompt": "Review:", "completion": " the soup was cold"}]
    (ids, labels), = encode_prompt_completion(wtok, ex, max_length=3)
    assert ids == [ID["<bos>"], ID["the"], ID["soup"]]
    assert labels == [IGNORE_INDEX, ID["the"], ID["soup"]]


@pytest.mark.parametrize("example, key", [({"completion": " bad"}, "prompt"),
                                          ({"prompt": "the soup"}, "completion")])
def test_missing_key_is_a_clear_value_error(wtok, example, key):
    with pytest.raises(ValueError, match=rf"example 1 has no '{key}' field") as info:
        encode_prompt_completion(wtok, [{"prompt": "the", "completion": " bad"}, example],
                                 max_length=8)
    assert isinstance(info.value, DataError)


def test_empty_or_non_string_completion_rejected(wtok):
    with pytest.raises(DataError, match="empty completion"):
        encode_prompt_completion(wtok, [{"prompt": "the", "completion": ""}], max_length=8)
    with pytest.raises(DataError, match="must be a string"):
        encode_prompt_completion(wtok, [{"prompt": "the", "completion": 3}], max_length=8)


def test_make_batch_right_pads_and_masks():
    encoded = [([0, 5, 6, 7], [-100, -100, 6, 7]), ([0, 9], [-100, 9])]
    b = make_batch(encoded, pad_id=2)
    assert isinstance(b, Batch)
    assert b.input_ids.tolist() == [[0, 5, 6, 7], [0, 9, 2, 2]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert b.labels.tolist() == [[-100, -100, 6, 7], [-100, 9, -100, -100]]
    assert b.input_ids.dtype == b.attention_mask.dtype == b.labels.dtype == torch.long
    assert b.n_label_tokens == 3
    with pytest.raises(ValueError):
        make_batch([], pad_id=0)
    with pytest.raises(ValueError):
        make_batch([([1, 2], [1])], pad_id=0)


def test_load_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "completion": " b"}\n\n{"prompt": "c", "completion": " d"}\n',
                 encoding="utf-8")
    assert load_jsonl(p) == [{"prompt": "a", "completion": " b"},
                             {"prompt": "c", "completion": " d"}]
    p.write_text('{"prompt": "a"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:2"):
        load_jsonl(p)
    p.write_text('[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match="JSON object"):
        load_jsonl(p)


# ---------------------------------------------------------------------------------------------
# batch_order
# ---------------------------------------------------------------------------------------------

def test_batch_order_is_a_pure_function_of_seed_and_step():
    n, bs, seed = 37, 8, 1234
    fresh = batch_order(n, bs, seed, 11)
    for step in range(30):  # lots of other calls in between (and cache churn)
        batch_order(n, bs, seed, step)
        batch_order(n + 1, bs, seed + 1, step)
    assert batch_order(n, bs, seed, 11) == fresh
    # A resumed run that starts at step 11 gets the same batch as one that ran 0..10 first.
    assert [batch_order(n, bs, seed, s) for s in range(11, 14)] == \
        [batch_order(n, bs, seed, s) for s in range(0, 14)][11:]


def test_batch_order_epochs_are_permutations_and_depend_on_seed():
    n, bs = 40, 8
    for seed in (0, 1, 2**64 - 1):
        for epoch in range(3):
            seen = [i for s in range(epoch * 5, epoch * 5 + 5) for i in batch_order(n, bs, seed, s)]
            assert sorted(seen) == list(range(n))
    e0 = [i for s in range(5) for i in batch_order(n, bs, 0, s)]
    e1 = [i for s in range(5, 10) for i in batch_order(n, bs, 0, s)]
    other_seed = [i for s in range(5) for i in batch_order(n, bs, 1, s)]
    assert e0 != list(range(n)) and e0 != e1 and e0 != other_seed


def test_batch_order_straddles_epochs_and_small_data_sets():
    n, bs, seed = 10, 4, 7
    stream = [i for s in range(5) for i in batch_order(n, bs, seed, s)]  # 20 = two epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    big = batch_order(3, 7, seed, 0)  # batch larger than the data set
    assert len(big) == 7 and sorted(big[:3]) == [0, 1, 2] and sorted(big[3:6]) == [0, 1, 2]


GOLDEN_10_4_0_0 = [0, 9, 1, 6]
GOLDEN_1000_3_BIG_1234 = [377, 16, 45]


def test_batch_order_golden_values():
    # Pins the algorithm (SplitMix64 hash sort) so resumed runs keep their batches across versions.
    assert batch_order(10, 4, 0, 0) == GOLDEN_10_4_0_0
    assert batch_order(1000, 3, 2**63 + 5, 1234) == GOLDEN_1000_3_BIG_1234


def test_batch_order_rejects_bad_arguments():
    for args in [(0, 1, 0, 0), (5, 0, 0, 0), (5, 1, -1, 0), (5, 1, 2**64, 0), (5, 1, 0, -1)]:
        with pytest.raises(ValueError):
            batch_order(*args)


# ---------------------------------------------------------------------------------------------
# Loss and the embedded model
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedded():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mezo_replay.embedded import MODEL_DIR

    tok = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True,
                                                 dtype=torch.float32)
    model.eval()
    return tok, model


def test_embedded_files_and_task():
    from mezo_replay.embedded import DEFAULTS, LABEL_WORDS, MODEL_DIR, TASK_DIR, load_task

    for name in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json"]:
        assert (MODEL_DIR / name).is_file(), name
    assert (MODEL_DIR / "model.safetensors").stat().st_size < 3_500_000
    assert json.loads((MODEL_DIR / "config.json").read_text())["model_type"] == "llama"
    train, evals = load_task()
    assert 200 <= len(train) <= 2000 and 50 <= len(evals) <= 500
    for ex in train + evals:
        assert ex["prompt"].startswith("Review: ") and ex["prompt"].endswith(" Sentiment:")
        assert ex["completion"] in LABEL_WORDS
    assert not {ex["prompt"] for ex in train} & {ex["prompt"] for ex in evals}
    assert (TASK_DIR / "train.jsonl").is_file()
    assert {"lr", "eps", "batch_size", "steps", "max_length", "seed"} <= set(DEFAULTS)


def test_embedded_model_loads_offline_and_gives_finite_loss(embedded):
    from mezo_replay.embedded import DEFAULTS, LABEL_WORDS, load_task

    tok, model = embedded
    assert tok.bos_token_id is not None and tok.pad_token_id is not None
    assert tok.eos_token_id is not None
    for w in LABEL_WORDS:
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1
    train, _ = load_task()
    enc = encode_prompt_completion(tok, train[:8], max_length=DEFAULTS["max_length"])
    for ids, labels in enc:
        assert ids[0] == tok.bos_token_id
        assert sum(l != IGNORE_INDEX for l in labels) == 1 and labels[-1] == ids[-1]
    batch = make_batch(enc, tok.pad_token_id)
    loss = causal_lm_loss(model, batch)
    assert loss.dtype == torch.float32 and loss.ndim == 0 and not loss.requires_grad
    assert math.isfinite(loss.item()) and 0.0 < loss.item() < 20.0


def test_causal_lm_loss_matches_full_logits_and_ignores_padding(embedded):
    from mezo_replay.embedded import load_task

    tok, model = embedded
    _, evals = load_task()
    enc = encode_prompt_completion(tok, evals[:5], max_length=128)
    batch = make_batch(enc, tok.pad_token_id)
    loss = causal_lm_loss(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    # Each example alone (no padding) gives the same per-token losses: mean of singles == batch.
    singles = [causal_lm_loss(model, make_batch([e], tok.pad_token_id)).item() for e in enc]
    assert loss.item() == pytest.approx(sum(singles) / len(singles), rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Data sources: load_examples / load_splits
# ---------------------------------------------------------------------------------------------

import sys  # noqa: E402
import types  # noqa: E402

from mezo_replay.training.data import Encoded, load_examples, load_splits  # noqa: E402

ROWS = [{"text": "good, really", "label": 1}, {"text": 'said "no"', "label": 0}]
STR_ROWS = [{k: str(v) for k, v in r.items()} for r in ROWS]


def one_line_error(fn, *args, match: str, **kw) -> str:
    with pytest.raises(DataError, match=match) as info:
        fn(*args, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_load_examples_local_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    (tmp_path / "a.json").write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in ROWS), encoding="utf-8")
    (tmp_path / "one.json").write_text(json.dumps(ROWS[0]), encoding="utf-8")
    # A BOM (as spreadsheet programs write), a quoted comma, quotes and a blank line.
    (tmp_path / "a.csv").write_text('\ufefftext,label\n"good, really",1\n\n"said ""no""",0\n',
                                    encoding="utf-8")
    (tmp_path / "a.tsv").write_text('text\tlabel\ngood, really\t1\n"said ""no"""\t0\n',
                                    encoding="utf-8")
    assert load_examples(tmp_path / "a.jsonl") == ROWS
    assert load_examples(str(tmp_path / "a.json")) == ROWS
    assert load_examples(tmp_path / "lines.json") == ROWS
    assert load_examples(tmp_path / "one.json") == ROWS[:1]
    assert load_examples(tmp_path / "a.csv") == STR_ROWS  # CSV values are strings
    assert load_examples(tmp_path / "a.tsv") == STR_ROWS
    assert load_examples(tmp_path / "a.jsonl", split="ignored") == ROWS


def test_load_examples_file_errors(tmp_path):
    one_line_error(load_examples, tmp_path / "nope.jsonl", match="nope.jsonl: no such file")
    # Path-like or file-like strings are files, not Hugging Face data set names.
    one_line_error(load_examples, "missing.csv", match="missing.csv: no such file")
    one_line_error(load_examples, str(tmp_path / "x" / "nope"), match="no such file")
    (tmp_path / "d.txt").write_text("hello\n")
    one_line_error(load_examples, tmp_path / "d.txt", match=r"unknown file type '\.txt'.*\.jsonl")
    one_line_error(load_examples, tmp_path, match="is a directory")
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": oops}\n', encoding="utf-8")
    one_line_error(load_examples, p, match=r"bad\.jsonl:4: not valid JSON")
    p = tmp_path / "bad.json"
    p.write_text('[\n  {"text": "a"},\n  {"text": }\n]\n', encoding="utf-8")
    one_line_error(load_examples, p, match=r"bad\.json:3: not valid JSON")
    p.write_text('[{"text": "a"}, 3]', encoding="utf-8")
    one_line_error(load_examples, p, match="element 1 of the array is int")
    p = tmp_path / "bad.csv"
    p.write_text("text,label\na,1\nb,0,extra\n", encoding="utf-8")
    one_line_error(load_examples, p, match=r"bad\.csv:3: 3 fields, but the header has 2")
    p.write_bytes(b"text\n\xff\xfe\n")
    one_line_error(load_examples, p, match="not UTF-8")


def test_parquet(tmp_path, monkeypatch):
    path = tmp_path / "a.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
    else:
        pq.write_table(pa.Table.from_pylist(ROWS), path)
        assert load_examples(path) == ROWS
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    one_line_error(load_examples, path, match=r"needs pyarrow: pip install pyarrow")


def test_hugging_face_name_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    for name in ("org/name", "sst2", "glue:sst2"):
        one_line_error(load_examples, name, match=r"pip install datasets")
        one_line_error(load_splits, name, match=r"pip install datasets")


class FakeSplit(list):
    def to_list(self):
        return [dict(r) for r in self]


def fake_datasets(monkeypatch, splits: dict[str, dict[str, list]]):
    """A stand-in for the datasets package: {name: {split: rows}}; records its calls."""
    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        if path not in splits:
            raise FileNotFoundError(f"Dataset '{path}' doesn't exist on the Hub\nor cannot be accessed")
        dd = {k: FakeSplit(v) for k, v in splits[path].items()}
        return dd if split is None else dd[split]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hugging_face_splits(monkeypatch):
    tr, va, te = [{"x": 1}], [{"x": 2}], [{"x": 3}]
    calls = fake_datasets(monkeypatch, {"org/a": {"train": tr, "validation": va, "test": te},
                                        "b": {"train": tr, "test": te}, "c": {"test": te},
                                        "d": {"train": tr}, "e": {"train": []}})
    assert load_examples("org/a:cfg", split="test") == te
    assert calls[-1] == ("org/a", "cfg", "test")
    assert load_examples("b") == tr and calls[-1] == ("b", None, "train")
    assert load_splits("org/a") == (tr, va)
    assert load_splits("b") == (tr, te)
    assert load_splits("d") == (tr, [])  # no eval split: no eval set
    assert load_splits("org/a", eval_split_names=("test",)) == (tr, te)
    assert load_splits("d", "b") == (tr, te)  # a Hugging Face eval source: its first eval split
    one_line_error(load_splits, "d", "d", match=r"d: has none of the splits \['validation'")
    one_line_error(load_splits, "c", match=r"c: has no 'train' split \(its splits: \['test'\]\)")
    one_line_error(load_splits, "e", match="the training set e is empty")
    one_line_error(load_examples, "org/missing", match=r"org/missing: cannot load .*FileNotFoundError")


def test_load_splits_local(tmp_path):
    train, ev, empty = tmp_path / "t.jsonl", tmp_path / "e.csv", tmp_path / "empty.jsonl"
    train.write_text(json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    ev.write_text("text,label\nx,0\n", encoding="utf-8")
    empty.write_text("\n", encoding="utf-8")
    assert load_splits(train) == ([ROWS[0]], [])
    assert load_splits(str(train), str(ev)) == ([ROWS[0]], [{"text": "x", "label": "0"}])
    one_line_error(load_splits, empty, match=r"the training set .*empty\.jsonl is empty")
    one_line_error(load_splits, train, empty, match=r"the eval set .*empty\.jsonl is empty")
    one_line_error(load_splits, train, tmp_path / "no.jsonl", match="no such file")


def test_make_batch_carries_class_labels():
    b = make_batch([Encoded([0, 5, 6], [-100] * 3, 1), Encoded([0, 9], [-100] * 2, 0)], pad_id=2)
    assert b.class_labels.tolist() == [1, 0] and b.class_labels.dtype == torch.long
    assert b.to("cpu").class_labels.tolist() == [1, 0]
    assert make_batch([Encoded([0, 5], [-100, 5])], pad_id=2).class_labels is None
    with pytest.raises(ValueError, match="class label"):
        make_batch([Encoded([0], [-100], 1), ([0], [-100])], pad_id=2)
