"""Tests of mezo_replay.training.tasks on the embedded tiny Llama and its real byte-level BPE tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from mezo_replay.training import tasks as T
from mezo_replay.training.data import (IGNORE_INDEX, DataError, causal_lm_loss, encode_prompt_completion,
                              make_batch)
from mezo_replay.training.tasks import OBJECTIVES, check_objective, check_template_fits_model, macro_f1, make_task

from .test_data import ID, word_tokenizer

WORDS = {"0": " terrible", "1": " great"}
TEMPLATE = "Review: {text} Sentiment:"


@pytest.fixture(scope="module")
def tok_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mezo_replay.embedded import MODEL_DIR

    tok = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True,
                                                 dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def reviews():
    """The embedded eval set as a classification data set: {"text", "label"} rows."""
    from mezo_replay.embedded import load_task

    _, evals = load_task()
    rows = [{"text": e["prompt"][len("Review: "):-len(" Sentiment:")],
             "label": int(e["completion"] == " great"), "completion": e["completion"]}
            for e in evals[:24]]
    assert {r["label"] for r in rows} == {0, 1}
    return rows


def label_words_task(tok, **kw):
    return make_task("label-words", tokenizer=tok, template=TEMPLATE, label_words=WORDS, **kw)


def hand_scores(model, tok, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Label-word logits computed the obvious way: each prompt alone, full logits, last position."""
    word_ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in WORDS.values()]
    scores = []
    with torch.no_grad():
        for r in rows:
            ids = tok(TEMPLATE.format(**r), return_tensors="pt")["input_ids"]
            scores.append(model(input_ids=ids).logits[0, -1, word_ids].float())
    return torch.stack(scores), torch.tensor([r["label"] for r in rows])


def reference_macro_f1(pred: list[int], true: list[int]) -> float:
    f1s = []
    for c in sorted(set(pred) | set(true)):
        tp = sum(p == t == c for p, t in zip(pred, true))
        fp = sum(p == c != t for p, t in zip(pred, true))
        fn = sum(t == c != p for p, t in zip(pred, true))
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s)


# ---------------------------------------------------------------------------------------------
# label-words
# ---------------------------------------------------------------------------------------------

def test_label_words_objectives_equal_hand_computation(tok_model, reviews):
    tok, model = tok_model
    task = label_words_task(tok)
    enc = task.encode(tok, reviews)
    batch = task.make_batch(enc, tok.pad_token_id)
    assert batch.attention_mask.sum(1).unique().numel() > 1  # really padded
    assert batch.class_labels.tolist() == [r["label"] for r in reviews]
    scores, target = hand_scores(model, tok, reviews)
    ce = task.objective(model, batch, "ce")
    assert ce.dtype == torch.float32 and ce.ndim == 0 and not ce.requires_grad
    assert ce.item() == pytest.approx(F.cross_entropy(scores, target).item(), rel=1e-5)
    pred = scores.argmax(-1)
    assert torch.equal(task.objective(model, batch, "accuracy"), 1 - (pred == target).float().mean())
    f1 = reference_macro_f1(pred.tolist(), target.tolist())
    assert task.objective(model, batch, "f1").item() == pytest.approx(1 - f1, abs=1e-6)
    ev = task.evaluate(model, [batch])
    assert set(ev) == {"loss", "accuracy", "f1"}
    assert ev["accuracy"] == pytest.approx((pred == target).double().mean().item())
    assert ev["f1"] == pytest.approx(f1, abs=1e-6)
    assert ev["loss"] == pytest.approx(ce.item(), rel=1e-5)


def test_label_words_evaluate_is_over_the_whole_set(tok_model, reviews):
    tok, model = tok_model
    task = label_words_task(tok)
    enc = task.encode(tok, reviews)
    whole = task.evaluate(model, [task.make_batch(enc, tok.pad_token_id)])
    parts = task.evaluate(model, [task.make_batch(enc[i:i + 5], tok.pad_token_id)
                                  for i in range(0, len(enc), 5)])
    assert parts == pytest.approx(whole, rel=1e-5)


def test_label_words_encoding(tok_model):
    tok, _ = tok_model
    task = make_task("label-words", tokenizer=tok, label_words={0: " terrible", 1: " great"},
                     prompt_key="sentence", max_length=4)
    (e,) = task.encode(tok, [{"sentence": "the soup was cold and bland.", "label": "1"}])
    full = tok("the soup was cold and bland.")["input_ids"]
    assert full[0] == tok.bos_token_id and len(full) > 4
    assert e.input_ids == [tok.bos_token_id] + full[-3:]  # cut on the left, BOS kept
    assert e.labels == [IGNORE_INDEX] * 4 and e.label == 1  # int keys and str values agree
    # A tokenizer that appends EOS: the label word follows the prompt, so no EOS in between.
    wtok = word_tokenizer(eos=True)
    task = make_task("label-words", tokenizer=wtok, label_words={"neg": "bad", "pos": "good"})
    (e,) = task.encode(wtok, [{"prompt": "the soup Sentiment:", "label": "neg"}])
    assert e.input_ids == [ID["<bos>"], ID["the"], ID["soup"], ID["Sentiment:"]] and e.label == 0
    assert task.word_ids == (ID["bad"], ID["good"])


@pytest.mark.parametrize("arch", ["gpt2", "no-logits-to-keep"])
def test_label_words_other_models(tok_model, reviews, arch, monkeypatch):
    import transformers as tf

    tok, model = tok_model
    if arch == "gpt2":
        torch.manual_seed(0)
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2,
                                                 n_head=4, n_positions=64)).eval()
    else:
        monkeypatch.setattr(T, "_accepts_logits_to_keep", lambda _: False)
    task = label_words_task(tok)
    batch = task.make_batch(task.encode(tok, reviews[:6]), tok.pad_token_id)
    scores, target = hand_scores(model, tok, reviews[:6])
    got = task.objective(model, batch, "ce").item()
    assert got == pytest.approx(F.cross_entropy(scores, target).item(), rel=1e-5)


def test_macro_f1_known_values():
    pred, true = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1])
    # class 0: 2*1/(2+1+0); class 1: 2*2/(4+0+1); class 2 occurs nowhere and is left out.
    assert macro_f1(pred, true, 3).item() == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert macro_f1(pred, true, 3).dtype == torch.float32
    assert macro_f1(torch.tensor([1, 1]), torch.tensor([0, 0]), 2).item() == 0.0
    assert macro_f1(true, true, 2).item() == 1.0


# ---------------------------------------------------------------------------------------------
# lm and prompt-completion
# ---------------------------------------------------------------------------------------------

def test_lm_loss_is_mean_ce_over_real_tokens(tok_model, reviews):
    tok, model = tok_model
    task = make_task("lm", tokenizer=tok)
    rows = [{"text": r["text"]} for r in reviews[:6]]
    enc = task.encode(tok, rows)
    for e, r in zip(enc, rows):
        assert e.input_ids == tok(r["text"])["input_ids"] == e.labels
    batch = task.make_batch(enc, tok.pad_token_id)
    assert (batch.labels == torch.where(batch.attention_mask.bool(), batch.input_ids,
                                        IGNORE_INDEX)).all()
    # One example alone is exactly what the model's own loss computes.
    ids = torch.tensor([enc[0].input_ids])
    with torch.no_grad():
        own = model(input_ids=ids, labels=ids).loss.item()
    single = task.objective(model, task.make_batch(enc[:1], tok.pad_token_id), "ce")
    assert single.item() == pytest.approx(own, rel=1e-5)
    # Padding does not count: the batch is the token-weighted mean of the single examples.
    n = [len(e.input_ids) - 1 for e in enc]
    singles = [task.objective(model, task.make_batch([e], tok.pad_token_id), "ce").item()
               for e in enc]
    want = sum(s * k for s, k in zip(singles, n)) / sum(n)
    assert task.objective(model, batch, "ce").item() == pytest.approx(want, rel=1e-5)
    assert task.evaluate(model, [batch])["loss"] == pytest.approx(want, rel=1e-5)
    # A template builds the text from columns.
    t2 = make_task("lm", tokenizer=tok, template="Review: {text}")
    assert t2.encode(tok, rows[:1])[0].input_ids == tok("Review: " + rows[0]["text"])["input_ids"]


def test_prompt_completion_matches_data_module_and_template(tok_model, reviews):
    tok, model = tok_model
    direct = [{"prompt": TEMPLATE.format(**r), "completion": r["completion"]} for r in reviews]
    task = make_task("prompt-completion", tokenizer=tok)
    enc = task.encode(tok, direct)
    pairs = encode_prompt_completion(tok, direct, max_length=128)
    assert [(e.input_ids, e.labels) for e in enc] == pairs
    batch = task.make_batch(enc, tok.pad_token_id)
    assert torch.equal(task.objective(model, batch, "ce"),
                       causal_lm_loss(model, make_batch(pairs, tok.pad_token_id)))
    templated = make_task("prompt-completion", tokenizer=tok, template=TEMPLATE)
    assert templated.encode(tok, reviews) == enc
    loss = task.evaluate(model, [task.make_batch(enc[:10], tok.pad_token_id),
                                 task.make_batch(enc[10:], tok.pad_token_id)])["loss"]
    assert loss == pytest.approx(task.objective(model, batch, "ce").item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Every kind: determinism, objective validation, bad inputs
# ---------------------------------------------------------------------------------------------

CASES = [("lm", {}, ["ce"]), ("prompt-completion", {"template": TEMPLATE}, ["ce"]),
         ("label-words", {"template": TEMPLATE, "label_words": WORDS}, list(OBJECTIVES))]


@pytest.mark.parametrize("kind, kw, objectives", CASES)
def test_objective_is_bit_identical_on_repeat(tok_model, reviews, kind, kw, objectives):
    tok, model = tok_model
    task = make_task(kind, tokenizer=tok, **kw)
    assert task.objectives == tuple(objectives)
    batch = task.make_batch(task.encode(tok, reviews[:8]), tok.pad_token_id)
    for objective in objectives:
        a = task.objective(model, batch, objective)
        b = task.objective(model, batch, objective)
        assert a.dtype == torch.float32 and a.ndim == 0
        assert a.view(torch.int32).item() == b.view(torch.int32).item()
    assert set(task.metadata()) >= {"task", "max_length"} and task.metadata()["task"] == kind


def test_unknown_or_unsupported_objective_and_kind(tok_model, reviews):
    tok, model = tok_model
    with pytest.raises(ValueError, match="lm, prompt-completion, label-words"):
        make_task("classify", tokenizer=tok)
    with pytest.raises(ValueError, match="ce, accuracy, f1"):
        check_objective("label-words", "mse")
    with pytest.raises(ValueError, match="needs a classification task.*supports: ce"):
        check_objective("prompt-completion", "f1")
    task = make_task("lm", tokenizer=tok)
    batch = task.make_batch(task.encode(tok, reviews[:2]), tok.pad_token_id)
    with pytest.raises(ValueError, match="needs a classification task"):
        task.objective(model, batch, "accuracy")
    with pytest.raises(ValueError, match="label_words"):
        make_task("label-words", tokenizer=tok)
    with pytest.raises(ValueError, match="label_words"):
        make_task("lm", tokenizer=tok, label_words=WORDS)
    with pytest.raises(ValueError, match="fields must name columns"):
        make_task("lm", tokenizer=tok, template="{} was")


def one_line(excinfo) -> str:
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


@pytest.mark.parametrize("kind, kw, missing", [
    ("lm", {}, "text"), ("lm", {"template": "{sentence} {title}"}, "title"),
    ("prompt-completion", {}, "prompt"), ("prompt-completion", {"template": "{sentence}"}, "completion"),
    ("label-words", {"template": "{sentence}", "label_words": WORDS, "label_key": "y"}, "y"),
    ("label-words", {"label_words": WORDS}, "prompt")])
def test_missing_column_names_it_and_the_columns_present(tok_model, kind, kw, missing):
    tok, _ = tok_model
    task = make_task(kind, tokenizer=tok, **kw)
    full = {k: "x" for k in ("text", "title", "prompt", "completion", "sentence")}
    rows = [{**full, "y": 1, "label": 0}, {"sentence": "fine", "label": 1, "answer": " great"}]
    with pytest.raises(DataError) as info:
        task.encode(tok, rows)
    assert one_line(info) == (f"example 1 has no {missing!r} column "
                              f"(its columns: 'sentence', 'label', 'answer')")


def test_bad_label_words_and_values(tok_model, reviews):
    tok, _ = tok_model
    with pytest.raises(DataError) as info:
        make_task("label-words", tokenizer=tok, label_words={"0": " terrible", "1": "wonderful"})
    assert "label word 'wonderful' (label '1') is 2 tokens ['w', 'onderful']" in one_line(info)
    with pytest.raises(DataError, match="distinct tokens"):
        make_task("label-words", tokenizer=tok, label_words={"0": " great", "1": " great"})
    task = label_words_task(tok)
    with pytest.raises(DataError) as info:
        task.encode(tok, reviews[:2] + [{"text": "ok", "label": 2}])
    assert one_line(info) == ("example 2: label 2 (column 'label') is not one of "
                              "the known labels ['0', '1']")
    with pytest.raises(DataError, match="column 'text' must be a string"):
        make_task("lm", tokenizer=tok).encode(tok, [{"text": 3}])
    with pytest.raises(DataError, match="at least 2 are needed"):
        make_task("lm", tokenizer=tok).encode(tok, [{"text": ""}])


def test_mask_template_on_a_model_that_fills_no_mask():
    """{mask} is filled only for a masked LM under label-words; elsewhere the cause is named, not a column."""
    rows = [{"sentence": "fine", "label": 1}]
    mask = "{sentence} It was {mask}."
    with pytest.raises(DataError) as info:
        check_template_fits_model(mask, "label-words", False, rows, "./my-llama")
    message = one_line(info)
    assert message.startswith("--template uses {mask}, but ./my-llama is not a masked LM (no mask token")
    assert "'{sentence} It was'" in message and "roberta" in message and "column" not in message
    with pytest.raises(DataError, match="only the label-words task fills in .*task 'classify-head'"):
        check_template_fits_model(mask, "classify-head", True, rows, "./bert")
    check_template_fits_model(mask, "label-words", True, rows)  # MeZO's RoBERTa setting
    check_template_fits_model("{sentence} It was", "label-words", False, rows)
    check_template_fits_model(None, "lm", False, rows)
    check_template_fits_model(mask, "lm", False, [{"sentence": "a", "mask": "b"}])  # a real 'mask' column
