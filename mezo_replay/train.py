"""A MeZO fine-tune of a Hugging Face causal LM on prompt/completion data, recorded as a trajectory.

The embedded default (`mezo-replay train` with no arguments) goes through exactly this path with the
tiny model and task that ship in mezo_replay/embedded, so the default run proves the real one.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import Batch, DataError, batch_order, causal_lm_loss, encode_prompt_completion, make_batch
from .errors import MezoReplayError
from .fingerprint import DTYPE_NAMES
from .optimizer import MeZO
from .safetensors_io import BaseCheckpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    model: Path
    train_examples: Sequence[dict[str, str]]
    eval_examples: Sequence[dict[str, str]]
    out: Path
    steps: int
    lr: float
    eps: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    max_length: int = 128
    prompt_key: str = "prompt"
    completion_key: str = "completion"
    dtype: str = "fp32"
    noise: str = "gaussian16"
    eval_every: int = 0
    eval_batch_size: int = 64
    overwrite: bool = False
    steps_per_chunk: int = 256
    device: str = "cpu"
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class TrainResult:
    trajectory: Path
    base: Path
    model: Any
    optimizer: MeZO
    evals: list[tuple[int, float]]
    interrupted: bool


def load_model(path: Path, dtype: str, device: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_dir():
        raise MezoReplayError(f"--model {path}: not a directory (a Hugging Face model folder is expected)")
    BaseCheckpoint.open(path)  # a clear error for a folder without (safetensors) weights, before transformers
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    return model.to(device).eval(), tokenizer


def prepare_base(model: Any, model_dir: Path, dtype: str, out: Path, overwrite: bool) -> Path:
    """The checkpoint the trajectory's base is: the model folder itself when its weights are stored in
    the training dtype, otherwise a copy saved in that dtype beside the trajectory."""
    stored = BaseCheckpoint.open(model_dir)
    wanted = DTYPE_NAMES[DTYPES[dtype]]
    if all(e.dtype == wanted for e in stored.entries.values() if e.dtype in ("F32", "BF16", "F16")):
        return model_dir
    base_dir = out.with_name(f"{out.stem}.base-{dtype}")
    if base_dir.exists() and not overwrite:
        raise MezoReplayError(f"{base_dir} exists: pass --overwrite to replace it")
    model.save_pretrained(base_dir)
    for aux in stored.aux_files():
        if aux.name not in ("config.json", "generation_config.json"):
            (base_dir / aux.name).write_bytes(aux.read_bytes())
    return base_dir


def check_names(opt: MeZO, base: Path) -> None:
    entries = BaseCheckpoint.open(base).entries
    for name in opt.names:
        if name not in entries:
            raise MezoReplayError(f"parameter {name!r} is not stored under that name in {base}; "
                                  f"reconstruct could not find it")


def evaluate(model: Any, batches: list[Batch]) -> float:
    return sum(float(causal_lm_loss(model, b)) * b.n_label_tokens for b in batches) / sum(
        b.n_label_tokens for b in batches)


def train(cfg: TrainConfig, on_step: Callable[[int, float, float | None], None] | None = None) -> TrainResult:
    """Runs cfg.steps MeZO steps; Ctrl-C stops cleanly with a complete, verifiable trajectory."""
    torch.set_flush_denormal(False)  # the spec's arithmetic keeps subnormals
    if cfg.out.exists() and not cfg.overwrite:
        raise MezoReplayError(f"{cfg.out} exists: pass --overwrite to replace it")
    if not cfg.train_examples:
        raise DataError("the training set is empty")
    model, tokenizer = load_model(cfg.model, cfg.dtype, cfg.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    keys = {"max_length": cfg.max_length, "prompt_key": cfg.prompt_key, "completion_key": cfg.completion_key}
    train_set = encode_prompt_completion(tokenizer, cfg.train_examples, **keys)
    eval_set = encode_prompt_completion(tokenizer, cfg.eval_examples, **keys)
    eval_batches = [make_batch(eval_set[i:i + cfg.eval_batch_size], pad)
                    for i in range(0, len(eval_set), cfg.eval_batch_size)]
    base = prepare_base(model, cfg.model, cfg.dtype, cfg.out, cfg.overwrite)
    opt = MeZO(model.named_parameters(), lr=cfg.lr, eps=cfg.eps, seed=cfg.seed, noise=cfg.noise)
    check_names(opt, base)
    opt.record(cfg.out, overwrite=cfg.overwrite, steps_per_chunk=cfg.steps_per_chunk,
               base_source=str(base), metadata={"task": "prompt-completion causal LM",
                                                "batch_size": str(cfg.batch_size), **cfg.metadata})
    evals: list[tuple[int, float]] = []
    if eval_batches:
        evals.append((0, evaluate(model, eval_batches)))
    interrupted = False
    try:
        for step in range(cfg.steps):
            batch = make_batch([train_set[i] for i in batch_order(len(train_set), cfg.batch_size, cfg.seed, step)],
                               pad).to(cfg.device)
            loss = opt.step(lambda: causal_lm_loss(model, batch))
            ev = None
            done = step + 1
            if eval_batches and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                ev = evaluate(model, eval_batches)
                evals.append((done, ev))
            if on_step is not None:
                on_step(done, loss, ev)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        opt.close()
    if evals and not math.isfinite(evals[-1][1]):
        raise MezoReplayError("evaluation loss is not finite: lower --lr")
    return TrainResult(cfg.out, base, model, opt, evals, interrupted)


def relpath(p: Path) -> str:
    """A path as short as it can be written from the current directory (for printed commands)."""
    try:
        rel = os.path.relpath(p)
        return rel if len(rel) < len(str(p)) else str(p)
    except ValueError:
        return str(p)
