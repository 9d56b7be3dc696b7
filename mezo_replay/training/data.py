"""Data for causal language models: loading, prompt/completion encoding, batching, batch order, loss.

The loss MeZO measures is the mean cross-entropy of the completion tokens given the prompt
(MeZO's prompt-based fine-tuning), so an example is encoded as ``input_ids`` for prompt +
completion with ``labels`` equal to the input ids on the completion tokens and -100 elsewhere.
"""

from __future__ import annotations

import csv
import functools
import inspect
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from ..errors import MezoReplayError

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "DataError",
    "Encoded",
    "batch_order",
    "causal_lm_loss",
    "completion_nll",
    "encode_prompt_completion",
    "load_examples",
    "load_jsonl",
    "load_splits",
    "make_batch",
]


class DataError(MezoReplayError, ValueError):
    """A data set or example that cannot be used (missing key, bad JSON line, empty completion)."""


class Encoded(NamedTuple):
    """One encoded example; ``label`` is the class index for classification tasks (else None)."""
    input_ids: list[int]
    labels: list[int]  # -100 where no token is scored
    label: int | None = None


@dataclass
class Batch:
    input_ids: torch.Tensor  # (batch, seq) int64
    attention_mask: torch.Tensor  # (batch, seq) int64, 1 on real tokens, 0 on padding
    labels: torch.Tensor  # (batch, seq) int64, -100 outside the completion and on padding
    class_labels: torch.Tensor | None = None  # (batch,) int64 class indices (classification tasks)

    def to(self, device) -> "Batch":
        cls = None if self.class_labels is None else self.class_labels.to(device)
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     self.labels.to(device), cls)

    @property
    def n_label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------------------------
# Loading and encoding
# ---------------------------------------------------------------------------------------------

def load_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file: one JSON object per line; blank lines are skipped."""
    rows: list[dict] = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, "
                                f"found {type(row).__name__}")
            rows.append(row)
    return rows


def _load_json(path: Path) -> list[dict]:
    """A JSON array of objects; JSON lines saved as .json and a single object are read too (as the
    Hugging Face json loader does), since both are common under that extension."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            return load_jsonl(path)
        raise DataError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    data = [data] if isinstance(data, dict) else data
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, found {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: element {i} of the array is {type(row).__name__}, "
                            f"expected a JSON object")
    return data


def _load_csv(path: Path, delimiter: str = ",") -> list[dict]:
    """A CSV file with a header row; every value is a string (labels too: compare them via str)."""
    rows: list[dict] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                return rows
            if len(set(header)) != len(header):
                raise DataError(f"{path}:1: repeated column names in the header {header}")
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path}:{reader.line_num}: {len(row)} fields, "
                                    f"but the header has {len(header)}")
                rows.append(dict(zip(header, row)))
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: bad CSV: {e}") from None
    return rows


def _load_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet files needs pyarrow: pip install pyarrow") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow's errors have no common base worth naming
        raise DataError(f"{path}: not a readable parquet file: {_one_line(e)}") from e


_LOADERS = {".jsonl": load_jsonl, ".json": _load_json, ".csv": _load_csv,
            ".tsv": lambda p: _load_csv(p, "\t"), ".parquet": _load_parquet}
_EXTS = ", ".join(_LOADERS)
# A missing path with one of these suffixes is a missing file, not a Hugging Face data set name.
_FILE_SUFFIXES = set(_LOADERS) | {".txt", ".gz", ".zip", ".xz", ".bz2", ".zst", ".arrow", ".xlsx"}
_HF_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _is_local(source: str | os.PathLike) -> bool:
    if isinstance(source, os.PathLike) or os.path.exists(os.path.expanduser(source)):
        return True
    return (not _HF_NAME.fullmatch(source)
            or Path(source.partition(":")[0]).suffix.lower() in _FILE_SUFFIXES)


def _hf_load(source: str, split: str | None) -> Any:
    """``datasets.load_dataset`` on "name" or "name:config"; it honours HF_HUB_OFFLINE and HF_HOME."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source!r} is not a local file, and reading Hugging Face data sets needs "
                        f"the datasets package: pip install datasets") from None
    name, _, config = source.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # network, missing data set/config/split: all one-line user errors
        what = f" (split {split!r})" if split else ""
        raise DataError(f"{source}: cannot load the Hugging Face data set{what}: "
                        f"{_one_line(e)}") from e


def _rows(ds: Any) -> list[dict]:
    return ds.to_list() if hasattr(ds, "to_list") else [dict(r) for r in ds]


def load_examples(source: str | os.PathLike, *, split: str | None = None) -> list[dict]:
    """The examples (dicts of columns) of a local .jsonl/.json/.csv/.tsv/.parquet file or of a
    Hugging Face data set "name", "org/name" or "name:config" (split ``split``, default "train").

    An existing path, a path-like string or a known file extension means a local file, where
    ``split`` is ignored; anything else shaped like a Hub name goes to ``datasets``."""
    if not _is_local(source):
        return _rows(_hf_load(str(source), split or "train"))
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; expected a data file ({_EXTS})")
    loader = _LOADERS.get(path.suffix.lower())
    if loader is None:
        raise DataError(f"{path}: unknown file type {path.suffix or '(no extension)'!r}; "
                        f"expected one of {_EXTS} or a Hugging Face data set name")
    try:
        return loader(path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None


def load_splits(train: str | os.PathLike, eval: str | os.PathLike | None = None, *,
                eval_split_names: Sequence[str] = ("validation", "eval", "test"),
                ) -> tuple[list[dict], list[dict]]:
    """The (train, eval) examples; an empty eval list means no evaluation.

    A local ``train`` file has no splits: ``eval`` is a second source or none.  A Hugging Face
    ``train`` gives its "train" split and, unless ``eval`` names another source, the first of
    ``eval_split_names`` it has (none: no eval set).  A Hugging Face ``eval`` source gives the
    first of ``eval_split_names`` it has."""
    def first_eval(dd: Any, source: str, required: bool) -> list[dict]:
        for name in eval_split_names:
            if name in dd:
                return _rows(dd[name])
        if required:
            raise DataError(f"{source}: has none of the splits {list(eval_split_names)} "
                            f"(its splits: {list(dd)})")
        return []

    if _is_local(train):
        train_rows, eval_rows = load_examples(train), []
    else:
        dd = _hf_load(str(train), None)
        if "train" not in dd:
            raise DataError(f"{train}: has no 'train' split (its splits: {list(dd)})")
        train_rows = _rows(dd["train"])
        eval_rows = first_eval(dd, str(train), False) if eval is None else []
    if eval is not None:
        eval_rows = (load_examples(eval) if _is_local(eval)
                     else first_eval(_hf_load(str(eval), None), str(eval), True))
        if not eval_rows:
            raise DataError(f"the eval set {eval} is empty")
    if not train_rows:
        raise DataError(f"the training set {train} is empty")
    return train_rows, eval_rows


def _get_text(example: Mapping[str, str], key: str, index: int) -> str:
    try:
        value = example[key]
    except KeyError:
        keys = ", ".join(repr(k) for k in list(example)[:10]) or "none"
        raise DataError(f"example {index} has no {key!r} field (its fields: {keys}); "
                        f"choose the field with the prompt/completion key options") from None
    if not isinstance(value, str):
        raise DataError(f"example {index}: field {key!r} must be a string, "
                        f"found {type(value).__name__}")
    return value


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of several texts, with the tokenizer's special tokens (one batched call)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]


def n_appended_specials(tokenizer) -> int:
    """How many special tokens the tokenizer appends after every text (e.g. an EOS): they end a
    text, so a prompt that is to be continued must not carry them."""
    (tail,) = _ids(tokenizer, [""])
    bos = getattr(tokenizer, "bos_token_id", None)
    n_pre = 0
    while n_pre < len(tail) and tail[n_pre] == bos:
        n_pre += 1
    return len(tail) - n_pre


def encode_prompt_completion(
    tokenizer,
    examples: Sequence[Mapping[str, str]],
    *,
    max_length: int,
    prompt_key: str = "prompt",
    completion_key: str = "completion",
) -> list[tuple[list[int], list[int]]]:
    """Encode examples as ``(input_ids, labels)`` pairs for a causal LM.

    ``input_ids`` is the tokenization of ``prompt + completion`` with the tokenizer's own special
    tokens (e.g. a leading BOS); ``labels`` equals ``input_ids`` on the completion tokens and is
    -100 on the prompt.  The completion starts at the first token where the tokenization of the
    whole text departs from the tokenization of the prompt alone, so a token that merges across the
    boundary counts as completion, and trailing special tokens the tokenizer appends (e.g. an EOS)
    are labelled too.

    Sequences longer than ``max_length`` lose prompt tokens from the left (after a leading BOS,
    which is kept), as MeZO does; if the completion alone does not fit, it is cut on the right.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    bos = getattr(tokenizer, "bos_token_id", None)
    prompts, completions = [], []
    for i, ex in enumerate(examples):
        prompt = _get_text(ex, prompt_key, i)
        completion = _get_text(ex, completion_key, i)
        if not completion:
            raise DataError(f"example {i}: empty completion (field {completion_key!r})")
        prompts.append(prompt)
        completions.append(completion)
    # Special tokens the tokenizer appends to every text (an EOS) are not part of the prompt.
    n_post = n_appended_specials(tokenizer)
    fulls = _ids(tokenizer, [p + c for p, c in zip(prompts, completions)])
    heads = _ids(tokenizer, prompts)
    out: list[tuple[list[int], list[int]]] = []
    for i, (full, head, completion) in enumerate(zip(fulls, heads, completions)):
        if n_post:
            head = head[:-n_post]
        start = 0
        for a, b in zip(full, head):
            if a != b:
                break
            start += 1
        if start >= len(full):
            raise DataError(f"example {i}: the completion {completion!r} encodes to no tokens")
        keep_first = 1 if (bos is not None and full[0] == bos and start > 0) else 0
        if len(full) > max_length:
            n_completion = len(full) - start
            room = max_length - keep_first
            if n_completion >= room:
                # Keep a BOS and the start of the completion; no prompt left.
                ids = full[:keep_first] + full[start:start + room]
                start = keep_first
            else:
                n_prompt_kept = room - n_completion
                ids = (full[:keep_first] + full[start - n_prompt_kept:start] + full[start:])
                start = keep_first + n_prompt_kept
            full = ids
        labels = [IGNORE_INDEX] * start + full[start:]
        out.append((full, labels))
    return out


def make_batch(encoded: Sequence[Encoded | tuple[Sequence[int], Sequence[int]]],
               pad_id: int) -> Batch:
    """Stack encoded examples (``Encoded`` or ``(input_ids, labels)`` pairs) into one right-padded
    batch; right padding is what lets a task find each row's last real position from the mask."""
    if len(encoded) == 0:
        raise ValueError("make_batch needs at least one example")
    classes = [e[2] if len(e) > 2 else None for e in encoded]
    if len({c is None for c in classes}) > 1:
        raise ValueError("either every example of a batch has a class label or none has")
    width = max(len(e[0]) for e in encoded)
    n = len(encoded)
    input_ids = torch.full((n, width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(encoded):
        ids, lab = e[0], e[1]
        if len(ids) != len(lab):
            raise ValueError(f"example {row}: {len(ids)} input ids but {len(lab)} labels")
        if len(ids) == 0:
            raise ValueError(f"example {row} is empty")
        k = len(ids)
        input_ids[row, :k] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[row, :k] = 1
        labels[row, :k] = torch.as_tensor(list(lab), dtype=torch.long)
    cls = None if classes[0] is None else torch.tensor(classes, dtype=torch.long)
    return Batch(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                 class_labels=cls)


# ---------------------------------------------------------------------------------------------
# Batch order
# ---------------------------------------------------------------------------------------------

_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    # uint64 array arithmetic wraps modulo 2**64 (no overflow warnings for arrays).
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the examples in one epoch: indices sorted by a SplitMix64 hash key.

    Defined by integer arithmetic alone, so it does not depend on NumPy's random generators
    (whose streams NumPy does not promise to keep across versions)."""
    key = _splitmix64(_splitmix64(seed) ^ epoch)
    keys = _splitmix64_array(np.arange(n_examples, dtype=np.uint64) ^ np.uint64(key))
    perm = np.argsort(keys, kind="stable")
    perm.flags.writeable = False
    return perm


def batch_order(n_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The example indices of step ``step``'s batch: a pure function of its arguments.

    The examples form an endless stream of epochs, each a fresh permutation of
    ``range(n_examples)`` determined by ``(seed, epoch)``; step ``s`` takes stream positions
    ``s*batch_size .. (s+1)*batch_size - 1``, so a batch may straddle two epochs.  A resumed run
    gets the same batches without replaying earlier steps.
    """
    for name, v in (("n_examples", n_examples), ("batch_size", batch_size)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if int(step) != step or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    if int(seed) != seed or not 0 <= seed <= _M64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    n_examples, batch_size, seed, step = int(n_examples), int(batch_size), int(seed), int(step)
    first = step * batch_size
    out: list[int] = []
    pos = first
    while pos < first + batch_size:
        epoch, offset = divmod(pos, n_examples)
        take = min(n_examples - offset, first + batch_size - pos)
        perm = _epoch_permutation(n_examples, seed, epoch)
        out.extend(int(i) for i in perm[offset:offset + take])
        pos += take
    return out


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def _accepts_logits_to_keep(forward_type: type) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(forward_type.forward).parameters
    except (TypeError, ValueError):
        return False


def completion_nll(model, batch: Batch) -> tuple[torch.Tensor, int]:
    """Sum of the completion tokens' negative log-likelihoods (float32) and their count.

    Runs with gradients enabled if the caller has them enabled; logits are only computed at the
    positions that predict a completion token when the model supports ``logits_to_keep``."""
    device = next(model.parameters()).device
    input_ids = batch.input_ids.to(device)
    attention_mask = batch.attention_mask.to(device)
    labels = batch.labels.to(device)
    # Position t predicts token t+1.
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    n = int(mask.sum())
    if n == 0:
        raise ValueError("batch has no completion tokens to score")
    predicting = mask.any(dim=0).nonzero().squeeze(1)  # sequence positions t (0..seq-2)
    if _accepts_logits_to_keep(type(model)):
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                    logits_to_keep=predicting)
        logits = out.logits  # (batch, len(predicting), vocab)
    else:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        logits = out.logits.index_select(1, predicting)
    tgt = target.index_select(1, predicting)
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok_nll = -logp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    total = tok_nll.masked_fill(tgt == IGNORE_INDEX, 0.0).sum()
    return total, n


@torch.no_grad()
def causal_lm_loss(model, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the completion tokens of the batch (a float32 scalar tensor)."""
    total, n = completion_nll(model, batch)
    return total / n
