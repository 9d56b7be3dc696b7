"""Task formats: how examples become batches, and the number MeZO minimises on a batch.

MeZO evaluates the objective twice per step on the same batch and steps on the difference, so every
objective here is a float32 scalar computed without gradients and bit-identical on repeated calls
with the same weights (no sampling, no order-dependent accumulation).

* ``lm``: plain causal language modelling on a text column.
* ``prompt-completion``: cross-entropy of the completion tokens given the prompt.
* ``label-words``: MeZO's prompt-based classification: each class is one vocabulary token (a "label
  word"), and the class scores are the logits of those tokens after the prompt.  Besides
  cross-entropy, MeZO can minimise non-differentiable objectives here (1 - accuracy, 1 - macro-F1).
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F

from .data import (
    IGNORE_INDEX,
    Batch,
    DataError,
    Encoded,
    _accepts_logits_to_keep,
    _ids,
    completion_nll,
    encode_prompt_completion,
    make_batch,
    n_appended_specials,
)

__all__ = ["KINDS", "OBJECTIVES", "Task", "check_objective", "check_template_fits_model", "class_counts", "make_task",
           "macro_f1", "macro_f1_of_counts"]

KINDS = ("lm", "prompt-completion", "label-words", "classify-head")
OBJECTIVES = ("ce", "accuracy", "f1")
_SUPPORTED = {"lm": ("ce",), "prompt-completion": ("ce",), "label-words": OBJECTIVES, "classify-head": OBJECTIVES}


class Task(Protocol):
    kind: str
    objectives: tuple[str, ...]  # the objectives this kind supports

    def encode(self, tokenizer, examples: Sequence[Mapping[str, Any]]) -> list[Encoded]: ...
    def make_batch(self, encoded: Sequence[Encoded], pad_id: int) -> Batch: ...
    def objective(self, model, batch: Batch, objective: str) -> torch.Tensor: ...
    def objective_sum(self, model, batch: Batch, objective: str) -> tuple[torch.Tensor, int]: ...
    def objective_counts(self, model, batch: Batch) -> torch.Tensor: ...
    def evaluate(self, model, batches: Sequence[Batch]) -> dict[str, float]: ...
    def metadata(self) -> dict[str, str]: ...


def check_objective(kind: str, objective: str) -> None:
    """ValueError unless ``objective`` is one ``kind`` supports: call it before training starts."""
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}; choose one of: {', '.join(KINDS)}")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of: {', '.join(OBJECTIVES)}")
    if objective not in _SUPPORTED[kind]:
        raise ValueError(f"objective {objective!r} needs a classification task (label-words, classify-head); "
                         f"task {kind!r} supports: {', '.join(_SUPPORTED[kind])}")


def macro_f1(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Macro-F1 (float32) over the classes that occur in ``pred`` or ``target``, like
    scikit-learn's ``f1_score(average="macro")``: a class absent from both has no defined F1."""
    return macro_f1_of_counts(class_counts(pred, target, n_classes))


def class_counts(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(3, n_classes) int64: true positives, predictions and targets of each class. Macro-F1 is not a
    sum over rows, but these counts are: ranks that each hold part of a batch add them up (exactly, they
    are integers) and get the whole batch's F1 from macro_f1_of_counts."""
    return torch.stack((torch.bincount(target[pred == target], minlength=n_classes),
                        torch.bincount(pred, minlength=n_classes), torch.bincount(target, minlength=n_classes)))


def macro_f1_of_counts(counts: torch.Tensor) -> torch.Tensor:
    """Macro-F1 (float32) from class_counts (or a sum of them)."""
    tp = counts[0].float()
    denom = (counts[1] + counts[2]).float()  # = 2TP + FP + FN
    present = denom > 0
    return (2 * tp[present] / denom[present]).mean()


# ---------------------------------------------------------------------------------------------
# Columns and templates
# ---------------------------------------------------------------------------------------------

def _template_fields(template: str) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"template {template!r}: {e}") from None
    fields = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        base = re.split(r"[.\[]", name, maxsplit=1)[0]
        if not base or base.isdigit():
            raise ValueError(f"template {template!r}: fields must name columns, like {{text}}")
        fields.append(base)
    return list(dict.fromkeys(fields))


def check_template_fits_model(template: str | None, kind: str, masked: bool,
                              examples: Sequence[Mapping[str, Any]], model: str = "the model") -> None:
    """A {mask} template is only filled in for a masked LM under label-words; anywhere else it would
    fail as a missing 'mask' column, which hides the cause (the model or the task). A real column named
    'mask' is left alone."""
    if template is None or "mask" not in _template_fields(template):
        return
    if (masked and kind == "label-words") or all("mask" in ex for ex in examples):
        return
    if not masked:
        raise DataError(f"--template uses {{mask}}, but {model} is not a masked LM (no mask token / no "
                        f"masked-LM head): for a causal LM end the template where the label word goes, "
                        f"e.g. '{{sentence}} It was', or use a masked LM such as FacebookAI/roberta-base")
    raise DataError(f"--template uses {{mask}}, which only the label-words task fills in (task {kind!r} "
                    f"reads no mask token): use --task label-words, or drop {{mask}} from the template")


def _check_columns(examples: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """All examples are checked before any tokenisation, so a typo fails in a second, not after."""
    for i, ex in enumerate(examples):
        for c in columns:
            if c not in ex:
                present = ", ".join(repr(k) for k in list(ex)[:10]) or "none"
                raise DataError(f"example {i} has no {c!r} column (its columns: {present})")


def _texts(examples: Sequence[Mapping[str, Any]], key: str, template: str | None) -> list[str]:
    """The column ``key`` of each example, or ``template`` filled with the example's columns."""
    out = []
    for i, ex in enumerate(examples):
        if template is not None:
            try:
                out.append(template.format_map(ex))
            except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
                raise DataError(f"example {i}: template {template!r} does not apply: "
                                f"{type(e).__name__}: {e}") from None
        elif isinstance(ex[key], str):
            out.append(ex[key])
        else:
            raise DataError(f"example {i}: column {key!r} must be a string, "
                            f"found {type(ex[key]).__name__}")
    return out


def _source_columns(key: str, template: str | None) -> list[str]:
    return _template_fields(template) if template is not None else [key]


# ---------------------------------------------------------------------------------------------
# Token-level cross-entropy: lm and prompt-completion
# ---------------------------------------------------------------------------------------------

class _TokenCE:
    """Shared by the kinds whose loss is the mean cross-entropy of the labelled tokens."""
    kind: str
    objectives = ("ce",)

    def make_batch(self, encoded: Sequence[Encoded], pad_id: int) -> Batch:
        return make_batch(encoded, pad_id)

    @torch.no_grad()
    def objective(self, model, batch: Batch, objective: str = "ce") -> torch.Tensor:
        check_objective(self.kind, objective)
        total, n = completion_nll(model, batch)
        return total / n

    @torch.no_grad()
    def objective_sum(self, model, batch: Batch, objective: str = "ce") -> tuple[torch.Tensor, int]:
        """(sum of the scored tokens' cross-entropies (float32), their number): a rank's part of a batch
        split over ranks, whose parts add up to the whole batch's mean. A part may score no token."""
        check_objective(self.kind, objective)
        if not bool((batch.labels[:, 1:] != IGNORE_INDEX).any()):
            return torch.zeros((), device=next(model.parameters()).device), 0
        return completion_nll(model, batch)

    def objective_counts(self, model, batch: Batch) -> torch.Tensor:
        raise ValueError(f"task {self.kind!r} has no count-based objective")

    @torch.no_grad()
    def evaluate(self, model, batches: Sequence[Batch]) -> dict[str, float]:
        """Token-weighted over all batches: the loss of the eval set, whatever its batching."""
        if not batches:
            raise ValueError("evaluate needs at least one batch")
        total, n = 0.0, 0
        for b in batches:
            t, k = completion_nll(model, b)
            total, n = total + float(t), n + k
        return {"loss": total / n}


@dataclass
class LanguageModeling(_TokenCE):
    """Every token after the first is predicted; texts longer than max_length are cut on the right."""
    text_key: str = "text"
    template: str | None = None
    max_length: int = 128
    kind: str = "lm"

    def encode(self, tokenizer, examples: Sequence[Mapping[str, Any]]) -> list[Encoded]:
        _check_columns(examples, _source_columns(self.text_key, self.template))
        texts = _texts(examples, self.text_key, self.template)
        out = []
        for i, ids in enumerate(_ids(tokenizer, texts)):
            ids = ids[:self.max_length]
            if len(ids) < 2:
                raise DataError(f"example {i}: the text {texts[i][:40]!r} encodes to "
                                f"{len(ids)} token(s); at least 2 are needed to predict one")
            out.append(Encoded(ids, list(ids)))
        return out

    def metadata(self) -> dict[str, str]:
        src = {"template": self.template} if self.template is not None else {"text_key": self.text_key}
        return {"task": self.kind, **src, "max_length": str(self.max_length)}


@dataclass
class PromptCompletion(_TokenCE):
    """data.encode_prompt_completion, with an optional template building the prompt."""
    prompt_key: str = "prompt"
    completion_key: str = "completion"
    template: str | None = None
    max_length: int = 128
    kind: str = "prompt-completion"

    def encode(self, tokenizer, examples: Sequence[Mapping[str, Any]]) -> list[Encoded]:
        _check_columns(examples, _source_columns(self.prompt_key, self.template)
                       + [self.completion_key])
        prompts = _texts(examples, self.prompt_key, self.template)
        rows = [{"\0prompt": p, self.completion_key: ex[self.completion_key]}
                for p, ex in zip(prompts, examples)]
        pairs = encode_prompt_completion(tokenizer, rows, max_length=self.max_length,
                                         prompt_key="\0prompt", completion_key=self.completion_key)
        return [Encoded(ids, labels) for ids, labels in pairs]

    def metadata(self) -> dict[str, str]:
        src = {"template": self.template} if self.template is not None else {"prompt_key": self.prompt_key}
        return {"task": self.kind, **src, "completion_key": self.completion_key,
                "max_length": str(self.max_length)}


# ---------------------------------------------------------------------------------------------
# Classification by label words
# ---------------------------------------------------------------------------------------------

class _Classification:
    """Objectives and metrics from class scores, shared by the label-words and classify-head tasks."""
    kind: str

    @property
    def n_classes(self) -> int:
        raise NotImplementedError

    def scores(self, model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def objective(self, model, batch: Batch, objective: str = "ce") -> torch.Tensor:
        check_objective(self.kind, objective)
        scores, target = self.scores(model, batch)
        if objective == "ce":
            return F.cross_entropy(scores, target)
        pred = scores.argmax(-1)
        if objective == "accuracy":
            return 1 - (pred == target).float().mean()
        return 1 - macro_f1(pred, target, self.n_classes)

    @torch.no_grad()
    def objective_sum(self, model, batch: Batch, objective: str = "ce") -> tuple[torch.Tensor, int]:
        """(sum over the rows, rows) of the per-row objective: cross-entropy, or errors for accuracy.
        f1 is not a sum over rows: see objective_counts."""
        check_objective(self.kind, objective)
        if objective == "f1":
            raise ValueError("objective 'f1' is not a sum over rows: combine objective_counts instead")
        scores, target = self.scores(model, batch)
        if objective == "ce":
            return F.cross_entropy(scores, target, reduction="sum"), len(target)
        return (scores.argmax(-1) != target).sum().float(), len(target)

    @torch.no_grad()
    def objective_counts(self, model, batch: Batch) -> torch.Tensor:
        """class_counts of the batch's predictions: what the f1 objective of a batch split over ranks adds up."""
        scores, target = self.scores(model, batch)
        return class_counts(scores.argmax(-1), target, self.n_classes)

    @torch.no_grad()
    def evaluate(self, model, batches: Sequence[Batch]) -> dict[str, float]:
        """Over the whole eval set (F1 is not an average of per-batch F1s)."""
        if not batches:
            raise ValueError("evaluate needs at least one batch")
        ce, preds, targets = 0.0, [], []
        for b in batches:
            scores, target = self.scores(model, b)
            ce += float(F.cross_entropy(scores, target, reduction="sum"))
            preds.append(scores.argmax(-1).cpu())
            targets.append(target.cpu())
        pred, target = torch.cat(preds), torch.cat(targets)
        return {"loss": ce / len(target), "accuracy": float((pred == target).double().mean()),
                "f1": float(macro_f1(pred, target, self.n_classes))}



@dataclass
class LabelWords(_Classification):
    """Class c's score is the logit of label word c at the prompt's last position (causal LM), or at
    its mask token (masked LM: MeZO's RoBERTa setting, e.g. template "{sentence} It was {mask}.")."""
    labels: tuple[str, ...]  # label values (as str), in class order
    words: tuple[str, ...]
    word_ids: tuple[int, ...]
    label_key: str = "label"
    prompt_key: str = "prompt"
    template: str | None = None
    max_length: int = 128
    kind: str = "label-words"
    mask_id: int | None = None  # masked LM: score at this token instead of the last one
    objectives = OBJECTIVES

    @property
    def n_classes(self) -> int:
        return len(self.words)

    def encode(self, tokenizer, examples: Sequence[Mapping[str, Any]]) -> list[Encoded]:
        columns = _source_columns(self.prompt_key, self.template)
        if self.mask_id is not None:
            columns = [c for c in columns if c != "mask"]
            examples = [{**ex, "mask": tokenizer.mask_token} for ex in examples]
        _check_columns(examples, columns + [self.label_key])
        index = {v: c for c, v in enumerate(self.labels)}
        classes = []
        for i, ex in enumerate(examples):
            value = ex[self.label_key]
            if str(value) not in index:
                raise DataError(f"example {i}: label {value!r} (column {self.label_key!r}) is not "
                                f"one of the known labels {list(self.labels)}")
            classes.append(index[str(value)])
        prompts = _texts(examples, self.prompt_key, self.template)
        n_post = n_appended_specials(tokenizer)
        bos = getattr(tokenizer, "bos_token_id", None)
        out = []
        for i, (ids, cls) in enumerate(zip(_ids(tokenizer, prompts), classes)):
            if self.mask_id is not None:
                if ids.count(self.mask_id) != 1:
                    raise DataError(f"example {i}: the prompt {prompts[i][:60]!r} must hold exactly one mask "
                                    f"token (put {{mask}} in --template)")
                if len(ids) > self.max_length:
                    raise DataError(f"example {i}: the prompt is {len(ids)} tokens, over --max-length "
                                    f"{self.max_length}")
                out.append(Encoded(ids, [IGNORE_INDEX] * len(ids), cls))
                continue
            ids = ids[:len(ids) - n_post]  # the label word continues the prompt: no EOS before it
            if not ids:
                raise DataError(f"example {i}: the prompt {prompts[i][:40]!r} encodes to no tokens")
            if len(ids) > self.max_length:  # cut the prompt's start, keeping a BOS (as MeZO does)
                keep = 1 if bos is not None and ids[0] == bos else 0
                ids = ids[:keep] + ids[len(ids) - self.max_length + keep:]
            out.append(Encoded(ids, [IGNORE_INDEX] * len(ids), cls))
        return out

    def make_batch(self, encoded: Sequence[Encoded], pad_id: int) -> Batch:
        return make_batch(encoded, pad_id)

    def scores(self, model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, n_classes) float32 label-word logits and the class labels, on the model's device.

        With right padding the last prompt token of row r is at ``attention_mask[r].sum() - 1``;
        logits are computed at those positions only where the model supports ``logits_to_keep``."""
        if batch.class_labels is None:
            raise ValueError("the batch has no class labels: build it with the label-words task")
        device = next(model.parameters()).device
        input_ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        words = torch.tensor(self.word_ids, dtype=torch.long, device=device)
        if self.mask_id is not None:
            at = (input_ids == self.mask_id).int().argmax(1)
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            rows = logits[torch.arange(len(at), device=device), at]
            return rows.index_select(-1, words).float(), batch.class_labels.to(device)
        last = mask.sum(1) - 1
        keep = torch.unique(last)  # sorted
        if _accepts_logits_to_keep(type(model)):
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False,
                           logits_to_keep=keep).logits
        else:
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            logits = logits.index_select(1, keep)
        rows = logits[torch.arange(len(last), device=device), torch.searchsorted(keep, last)]
        return rows.index_select(-1, words).float(), batch.class_labels.to(device)

    def metadata(self) -> dict[str, str]:
        src = {"template": self.template} if self.template is not None else {"prompt_key": self.prompt_key}
        return {"task": self.kind, **src, "label_key": self.label_key,
                "label_words": json.dumps(dict(zip(self.labels, self.words))),
                "max_length": str(self.max_length)}


@dataclass
class ClassifyHead(_Classification):
    """A sequence classifier's own head (AutoModelForSequenceClassification): the head is new, so its
    initial values travel in the trajectory. Classes are the distinct label values, sorted."""
    labels: tuple[str, ...]
    text_key: str = "text"
    label_key: str = "label"
    template: str | None = None
    max_length: int = 128
    kind: str = "classify-head"
    objectives = OBJECTIVES

    @property
    def n_classes(self) -> int:
        return len(self.labels)

    def encode(self, tokenizer, examples: Sequence[Mapping[str, Any]]) -> list[Encoded]:
        _check_columns(examples, _source_columns(self.text_key, self.template) + [self.label_key])
        index = {v: c for c, v in enumerate(self.labels)}
        texts = _texts(examples, self.text_key, self.template)
        out = []
        for i, (ex, ids) in enumerate(zip(examples, _ids(tokenizer, texts))):
            value = str(ex[self.label_key])
            if value not in index:
                raise DataError(f"example {i}: label {value!r} (column {self.label_key!r}) is not one of the "
                                f"labels seen in training {list(self.labels)}")
            ids = ids[:self.max_length]
            if not ids:
                raise DataError(f"example {i}: the text {texts[i][:40]!r} encodes to no tokens")
            out.append(Encoded(ids, [IGNORE_INDEX] * len(ids), index[value]))
        return out

    def make_batch(self, encoded: Sequence[Encoded], pad_id: int) -> Batch:
        return make_batch(encoded, pad_id)

    def scores(self, model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.class_labels is None:
            raise ValueError("the batch has no class labels: build it with the classify-head task")
        device = next(model.parameters()).device
        logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
        return logits.float(), batch.class_labels.to(device)

    def metadata(self) -> dict[str, str]:
        src = {"template": self.template} if self.template is not None else {"text_key": self.text_key}
        return {"task": self.kind, **src, "label_key": self.label_key, "labels": json.dumps(list(self.labels)),
                "max_length": str(self.max_length)}


def _label_words(tokenizer, label_words: Mapping[Any, str],
                 ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...]]:
    """(labels as str, words, token ids), checked: each word one token, all tokens distinct."""
    labels = tuple(str(k) for k in label_words)
    words = tuple(label_words.values())
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ValueError(f"label_words needs at least two distinct labels, got {list(labels)}")
    word_ids = []
    for label, word in zip(labels, words):
        if not isinstance(word, str) or not word:
            raise DataError(f"label {label!r}: the label word must be a non-empty string, got {word!r}")
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise DataError(f"label word {word!r} (label {label!r}) is {len(ids)} tokens "
                            f"{tokenizer.convert_ids_to_tokens(ids)}, not one: pick a single-token "
                            f"word (a leading space often matters)")
        word_ids.append(ids[0])
    if len(set(word_ids)) != len(word_ids):
        raise DataError(f"label words {list(words)} do not map to distinct tokens {word_ids}")
    return labels, words, tuple(word_ids)


def make_task(kind: str, *, tokenizer, text_key: str = "text", prompt_key: str = "prompt",
              completion_key: str = "completion", template: str | None = None,
              label_key: str = "label", label_words: Mapping[Any, str] | None = None,
              max_length: int = 128, masked: bool = False, labels: Sequence[str] | None = None) -> Task:
    """The task of ``kind``.  ``template`` (e.g. "Review: {text} Sentiment:") builds the text (lm)
    or prompt (other kinds) from the example's columns instead of reading one column.  Label words
    are checked against ``tokenizer`` here, before any data is read; ``encode`` must be given the
    same tokenizer."""
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}; choose one of: {', '.join(KINDS)}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if template is not None:
        _template_fields(template)
    if (label_words is not None) != (kind == "label-words"):
        raise ValueError("label_words are required by, and only used by, the label-words task")
    if kind == "classify-head":
        if labels is None or len(set(labels)) < 2:
            raise DataError(f"classify-head needs at least two distinct labels, got {list(labels or [])}")
        return ClassifyHead(tuple(str(v) for v in labels), text_key, label_key, template, max_length)
    if masked and kind != "label-words":
        raise ValueError(f"a masked language model supports the label-words task, not {kind!r}")
    mask_id = None
    if masked:
        if tokenizer.mask_token is None or template is None or "{mask}" not in template:
            raise ValueError("a masked language model needs a tokenizer with a mask token and a --template "
                             "with {mask} where the label word goes, e.g. '{sentence} It was {mask}.'")
        mask_id = tokenizer.mask_token_id
    if kind == "lm":
        return LanguageModeling(text_key, template, max_length)
    if kind == "prompt-completion":
        return PromptCompletion(prompt_key, completion_key, template, max_length)
    labels, words, word_ids = _label_words(tokenizer, label_words)
    return LabelWords(labels, words, word_ids, label_key, prompt_key, template, max_length, mask_id=mask_id)
