"""The `mezo-replay` command line."""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from tqdm.auto import tqdm

from . import __version__
from .errors import MezoReplayError

if TYPE_CHECKING:  # torch loads only when a command needs it, so --help answers at once
    from .format.mzt import Trajectory

FAIL = 1


def _fail(message: str) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(FAIL)


@contextmanager
def _user_errors() -> Iterator[None]:
    """User mistakes and damaged files end in one line and a non-zero exit, not a traceback."""
    try:
        yield
    except (MezoReplayError, ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        _fail(str(e))


@contextmanager
def _element_bar(total: int, desc: str, quiet: bool) -> Iterator[Callable[[int], None]]:
    with tqdm(total=total, desc=desc, unit="elt-step", unit_scale=True, disable=quiet,
              dynamic_ncols=True) as bar:
        yield bar.update


def _backend_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """--backend, shared by the commands that run the rule's arithmetic."""
    def choose(ctx: click.Context, param: click.Parameter, value: str) -> str:
        from .kernels.steps import set_backend

        set_backend(value)
        return value

    return click.option("--backend", type=click.Choice(["auto", "torch", "compiled", "triton"]), default="auto",
                        show_default=True, expose_value=False, callback=choose,
                        help="Who runs the arithmetic. auto: Triton kernels on CUDA, the compiled C kernel on "
                             "the CPU; torch: the plain torch path; compiled/triton: insist on that kernel. "
                             "Same bits whatever the choice; a missing kernel falls back to torch with a "
                             "warning.")(f)


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise), from the environment torchrun sets."""
    return int(os.environ.get("RANK", "0"))


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MezoReplayError("--device cuda: torch sees no CUDA device here")
    return name


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mezo-replay")
def main() -> None:
    """Store MeZO fine-tunes as kilobytes, and rebuild the weights bit for bit on any device.

    \b
    A MeZO fine-tune is the base model plus one (seed, projected gradient) record per step.
    `train` records those into a trajectory file (.mzt); `reconstruct` replays it on the base.
    With --peft lora|prefix the steps tune a peft adapter, which rebuilds from the file alone.
    Models: Hugging Face causal LMs, masked LMs (label words) and sequence classifiers.

    \b
    Five-minute tour:
      mezo-replay train                # the embedded tiny Llama, ~50 s on 2 CPU cores: traj.mzt
      mezo-replay info traj.mzt        # steps, whole-file bytes, what is stored, evals
      mezo-replay reconstruct mezo-replay:embedded/tiny-llama traj.mzt -o tuned   # as `train` prints
      mezo-replay verify mezo-replay:embedded/tiny-llama traj.mzt tuned   # check weights
      mezo-replay train --peft lora -o run.mzt          # a LoRA adapter instead of every weight
      mezo-replay reconstruct run.mzt -o run-adapter    # no base: PeftModel.from_pretrained(base, ...)
    """


# --- train ---------------------------------------------------------------------------------------

def _label_words(value: str | None) -> dict[str, str] | None:
    if value is None:
        return None
    try:
        words = json.loads(value)
    except json.JSONDecodeError:
        words = None
    if not isinstance(words, dict) or not all(isinstance(v, str) for v in words.values()):
        raise click.BadParameter('a JSON object from label to word, e.g. \'{"0": " terrible", "1": " great"}\'')
    return {str(k): v for k, v in words.items()}


# Defaults that differ between the embedded demo and a user's model, as --help shows them: the first
# value is MeZO's published setting (defaults.MEZO_DEFAULTS), then the demo's (embedded.DEFAULTS).
def _two_defaults(key: str) -> str:
    from .training.defaults import MEZO_DEFAULTS
    from .embedded import DEFAULTS

    def text(x: float) -> str:
        return re.sub(r"e([+-])0*(\d)", lambda m: "e" + m[1].replace("+", "") + m[2], f"{x:g}")  # 1e-06 -> 1e-6

    user, demo = MEZO_DEFAULTS[key], DEFAULTS[key]
    return text(user) if user == demo else f"{text(user)}; {text(demo)} for the embedded demo"


@main.command()
@click.option("--model", show_default="the embedded tiny Llama, mezo-replay:embedded/tiny-llama",
              help="A Hugging Face model folder, a Hub id org/name[@revision] (through the Hugging "
              "Face cache; the commit sha is recorded), or a .safetensors file with --config. A causal LM; a "
              "masked LM for label-words; any model with a sequence-classification class for classify-head.")
@click.option("--config", "config_dir", type=click.Path(path_type=Path, file_okay=False, exists=True),
              show_default="none", help="With a .safetensors --model: the folder holding its config.json and "
              "tokenizer.")
@click.option("--data", show_default="the embedded sentiment task",
              help="Training data: a .jsonl/.json/.csv/.parquet file or a Hugging Face data set "
              "name (needs `datasets`).")
@click.option("--eval-data", show_default="none; a data set's validation split, or the embedded eval set",
              help="Evaluation data (a file).")
@click.option("--task", "task_kind", type=click.Choice(["prompt-completion", "label-words", "classify-head", "lm"]),
              default="prompt-completion", show_default=True,
              help="prompt-completion: loss on the completion only; label-words: MeZO's prompt-based "
                   "classification; classify-head: a sequence classifier with a new head (its initial "
                   "values travel in the trajectory; a random head learns slowly under MeZO, so try "
                   "label-words first); lm: plain language modelling on a text column.")
@click.option("--template", show_default="none: the prompt (or text) column as it is",
              help="Build the prompt from columns, e.g. '{sentence} It was' (causal LM) or "
              "'{sentence} It was {mask}.' (masked LM).")
@click.option("--label-words", show_default="none; required by label-words",
              help='For label-words: JSON label -> word, e.g. \'{"0": " terrible", "1": " great"}\'. Label '
                   'words learn far faster under MeZO than the new random head of classify-head.')
@click.option("--text-key", default="text", show_default=True, help="Column of the text (lm, classify-head).")
@click.option("--prompt-key", default="prompt", show_default=True, help="Column of the prompt.")
@click.option("--completion-key", default="completion", show_default=True, help="Column of the completion.")
@click.option("--label-key", default="label", show_default=True,
              help="Column of the label (label-words, classify-head).")
@click.option("--objective", type=click.Choice(["ce", "accuracy", "f1"]), default="ce", show_default=True,
              help="What MeZO minimises: cross-entropy, or (label-words) 1 - accuracy or 1 - macro-F1, "
                   "which MeZO can optimise directly since it needs no gradient.")
@click.option("-o", "--out", type=click.Path(path_type=Path, dir_okay=False), default=Path("traj.mzt"),
              show_default=True, help="Trajectory file to write.")
@click.option("--resume", type=click.Path(path_type=Path, dir_okay=False, exists=True), show_default="none",
              help="Continue this trajectory: its steps are replayed onto the base, checked, and training "
                   "goes on to --steps. Settings must match the original run. A torn last chunk (a crash, a "
                   "full disk) is cut off; a corrupt file is refused: `mezo-replay repair` keeps its valid "
                   "steps.")
@click.option("--steps", type=click.IntRange(1, 2**32 - 1), show_default=_two_defaults("steps"),
              help="Total MeZO steps (MeZO's paper runs 20,000).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), show_default=_two_defaults("lr"),
              help="Peak learning rate. The default for your model is MeZO's published setting (1e-6 or "
                   "1e-7 for full fine-tuning); the tiny demo model needs far more. For a PEFT adapter: 5e-5 for "
                   "lora, 1e-3 for prefix (MeZO's PEFT settings; the demo: 1e-3 and 1e-2).")
@click.option("--eps", type=click.FloatRange(min=0, min_open=True), show_default=_two_defaults("eps"),
              help="Perturbation scale. For a PEFT adapter: 1e-2 for lora, 1e-1 for prefix (MeZO's PEFT settings).")
@click.option("--schedule", type=click.Choice(["constant", "linear", "cosine"]), default="constant",
              show_default=True, help="Learning-rate schedule after warmup.")
@click.option("--warmup-steps", type=click.IntRange(0), default=0, show_default=True,
              help="Steps of linear warmup from 0 to --lr.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Decoupled weight decay (MeZO's rule: not on biases, norms or other 1-d tensors).")
@click.option("--grad-codec", type=click.Choice(["bf16", "fp8", "sign"]), default="bf16", show_default=True,
              help="How each step's projected gradient is recorded (training applies the recorded value, so "
                   "the rebuild stays exact): bf16 (8 significant bits: 1.67 bytes/step in the demo), fp8 (E4M3 "
                   "times --grad-scale, saturating: 0.94) or sign (ZO-SignSGD: +-grad-scale, or 0: 0.17, 1.3 "
                   "bits; the finished file's chunks are merged, see --no-compact).")
@click.option("--grad-scale", type=click.FloatRange(min=0, min_open=True), show_default="1",
              help="With --grad-codec fp8 or sign, a power of two: fp8 records multiples of it up to 448 "
                   "times it; sign applies +-it, so the step is lr times it (the demo's lr, made for bf16's "
                   "|g| of about 4, wants 8 with sign).")
@click.option("--optimizer", "rule_name", type=click.Choice(["mezo-sgd", "mezo-momentum", "mezo-momentum-buffer",
                                                                 "mezo-adam", "mezo-adam-buffer"]),
              default="mezo-sgd",
              show_default=True,
              help="The update rule. mezo-momentum: heavy-ball momentum with no state buffer, each step applying "
                   "the last --momentum-window records weighted by --momentum^k with their noise regenerated "
                   "(spec/momentum.md): training memory stays at inference's; a rebuild costs that many noise "
                   "draws per step on the torch path (the C kernel caches them). mezo-momentum-buffer: the same "
                   "with a float32 buffer per tuned parameter (4 more bytes each), one noise draw per step. "
                   "mezo-adam-buffer: MeZO-Adam (spec/adam.md) with float32 m and v per tuned parameter (8 more "
                   "bytes each); mezo-adam: the same recomputed from the last --momentum-window records, no state.")
@click.option("--momentum", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.9,
              show_default=True,
              help="With --optimizer mezo-momentum or mezo-momentum-buffer: beta (stored to 16 significant bits); "
                   "with mezo-adam or mezo-adam-buffer: Adam's beta1 (stored as a multiple of 2^-24).")
@click.option("--beta2", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.999, show_default=True,
              help="With --optimizer mezo-adam or mezo-adam-buffer: Adam's beta2 (stored as a multiple of 2^-24).")
@click.option("--adam-eps", type=click.FloatRange(0, 1, min_open=True), default=1e-8, show_default=True,
              help="With --optimizer mezo-adam or mezo-adam-buffer: Adam's delta, added to the root of v, at least 2^-100 "
                   "(stored to 24 significant bits).")
@click.option("--momentum-window", type=click.IntRange(1, 64), default=16, show_default=True,
              help="With --optimizer mezo-momentum or mezo-adam: how many recorded steps each update spans (K).")
@click.option("--perturbations", type=click.IntRange(1, 64), default=1, show_default=True,
              help="n-SPSA (spec/nspsa.md; --optimizer mezo-sgd only): N perturbations a step on the same "
                   "batch, averaged into one update. Costs 2N forward passes a step and records N gradients "
                   "a step (N times the step bytes); --steps counts optimizer steps.")
@click.option("--layerwise", type=click.Choice(["none", "perturbation", "step", "both"]), default="none",
              show_default=True,
              help="Layer-wise MeZO (spec/layerwise.md; mezo-sgd with one perturbation, and the momentum rules): "
                   "scale each tuned tensor's perturbation and/or step by a "
                   "power of two 2^e near its base weights' rms (relative to the element-weighted mean exponent, "
                   "so --eps keeps its average meaning; all-zero tensors such as LoRA B get 1). perturbation: "
                   "a tensor of small weights is probed less hard, one of large weights harder, and the update "
                   "follows that direction; step: the probe is unchanged and larger weights take larger steps "
                   "(LARS-like); both. In expectation tensor k's step grows by 4^e (perturbation), 2^e (step) or "
                   "8^e (both): lower --lr (on the demo: 2e-5 for perturbation, 1e-6 for both). The exponents "
                   "are recorded per tensor, so a rebuild is as exact and as fast as without.")
@click.option("--layerwise-blocks", type=click.Choice(["tensor", "layer"]), default="tensor", show_default=True,
              help="With --layerwise: one exponent per tensor, or per decoder layer (computed from all of the "
                   "layer's tensors together and recorded on each; tensors outside the layers keep their own).")
@click.option("--tune", multiple=True, show_default="every parameter",
              help="Tune only parameters matching this glob (repeatable), e.g. 'layers.*.self_attn'.")
@click.option("--freeze", multiple=True, show_default="none",
              help="Do not tune parameters matching this glob (repeatable).")
@click.option("--peft", "peft_kind", type=click.Choice(["lora", "prefix"]), show_default="none: full tuning",
              help="Tune a PEFT adapter built with the peft library instead of the model's own weights, which "
                   "never change. lora: low-rank updates W + (alpha/r)·B·A on the --lora-targets layers; prefix: "
                   "--num-virtual-tokens learned key/value prefixes (causal LMs only). The adapter starts from "
                   "values the run seed regenerates, so the trajectory rebuilds without the base, as a PEFT "
                   "adapter folder (`mezo-replay reconstruct RUN.mzt -o RUN-adapter`). --lr and --eps have "
                   "their own defaults with it (see them).")
@click.option("--lora-r", type=click.IntRange(1), default=8, show_default=True,
              help="LoRA rank r: A is r x in, B is out x r.")
@click.option("--lora-alpha", type=click.IntRange(1), default=16, show_default=True,
              help="LoRA scale alpha: the update is (alpha/r)·B·A.")
@click.option("--lora-dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Dropout on the LoRA input while training. Both forwards of a MeZO step see the same masks "
                   "(drawn from the run seed and step), so the step measures one function; evaluation and "
                   "the rebuilt adapter use none.")
@click.option("--lora-targets", show_default="peft's choice for the architecture: q_proj,v_proj for Llama and "
              "OPT, c_attn for GPT-2, query_key_value for BLOOM, query,value for BERT",
              help="Comma-separated names of the Linear/Conv1D layers to adapt (a module's last name part, or "
                   "its full name), e.g. q_proj,k_proj,v_proj,o_proj. A name that matches nothing is refused "
                   "with the names that exist.")
@click.option("--num-virtual-tokens", type=click.IntRange(1), default=10, show_default=True,
              help="Prefix tuning: learned positions prepended to every layer's keys and values.")
@click.option("--batch-size", type=click.IntRange(1), show_default=_two_defaults("batch_size"),
              help="Examples per step.")
@click.option("--max-length", type=click.IntRange(2), show_default=_two_defaults("max_length"),
              help="Tokens per example (longer prompts are cut from the left).")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), show_default=_two_defaults("seed"),
              help="Run seed: noise and batch order.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Parameter dtype to train in (a base in that dtype is saved if the model's differs; not with "
                   "--peft, whose adapter goes onto the original model, and keeps peft's float32 adapter).")
@click.option("--noise", type=click.Choice(["gaussian16", "rademacher16"]), default="gaussian16",
              show_default=True, help="Perturbation distribution (spec/noise.md).")
@click.option("--eval-every", type=click.IntRange(0), show_default=_two_defaults("eval_every"),
              help="Evaluate every N steps (0: only at the start and the end).")
@click.option("--eval-batch-size", type=click.IntRange(1), default=64, show_default=True,
              help="Examples per forward pass when evaluating (memory only: the results do not depend on it "
                   "beyond rounding).")
@click.option("--checkpoint-every", type=click.IntRange(0), default=0, show_default=True,
              help="Record a checkpoint fingerprint every N steps (36 bytes each), so `reconstruct --step` can "
                   "rebuild those steps verified. Every evaluation records one too; 0: evaluations only.")
@click.option("--allow-new-tensors", is_flag=True,
              help="Store tuned tensors the base lacks even beyond a small new head (they travel whole in the "
                   "trajectory).")
@click.option("--flush-every", type=click.IntRange(1, 1 << 20), default=256, show_default=True,
              help="Steps per checksummed chunk: a hard crash loses at most this many steps.")
@click.option("--no-compact", "compact", is_flag=True, flag_value=False, default=True,
              help="Keep the per-flush chunks when the run ends. By default the finished file is rewritten "
                   "with them merged (same records, a smaller file); --no-compact keeps it strictly "
                   "append-only, e.g. for a tool that copies it as it grows.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--shard", is_flag=True,
              help="Under torchrun: shard the model over the processes (FSDP2), for a model that does not fit one "
                   "device. The trajectory is the same as data parallel's and rebuilds in one process.")
@click.option("--offload", type=click.Choice(["cpu"]), show_default="none",
              help="With --shard: keep the shards in CPU memory (FSDP2's CPU offload), gathered per layer.")
@click.option("--no-record-losses", "record_losses", is_flag=True, flag_value=False, default=True,
              help="Leave the per-step losses out of the trajectory (about 3 bytes a step, more than the step "
                   "records): the rebuild does not need them, but `info` then shows no loss curve. A resumed run "
                   "keeps its file's choice.")
@click.option("--log", "log_path", type=click.Path(dir_okay=False, allow_dash=True), show_default="none",
              help="Write JSON lines (one per step and per evaluation) to this file, or - for stdout.")
@click.option("--overwrite", is_flag=True, help="Replace an existing trajectory file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_backend_option
def train(model: str | None, config_dir: Path | None, data: str | None, eval_data: str | None, task_kind: str, template: str | None,
          label_words: str | None, text_key: str, prompt_key: str, completion_key: str, label_key: str,
          objective: str, out: Path, resume: Path | None, steps: int | None, lr: float | None, eps: float | None,
          schedule: str, warmup_steps: int, weight_decay: float, grad_codec: str, grad_scale: float | None,
          rule_name: str, momentum: float, beta2: float, adam_eps: float, momentum_window: int,
          perturbations: int, layerwise: str, layerwise_blocks: str, tune: tuple[str, ...],
          freeze: tuple[str, ...],
          peft_kind: str | None, lora_r: int, lora_alpha: int, lora_dropout: float, lora_targets: str | None,
          num_virtual_tokens: int, batch_size: int | None, max_length: int | None, seed: int | None, dtype: str, noise: str,
          eval_every: int | None, eval_batch_size: int, record_losses: bool, checkpoint_every: int,
          allow_new_tensors: bool, flush_every: int, compact: bool, device: str, shard: bool, offload: str | None,
          log_path: str | None, overwrite: bool, quiet: bool) -> None:
    """Fine-tune a Hugging Face model with MeZO and record the trajectory.

    The model is a causal LM (prompt-completion, label-words, lm), a masked LM (label-words with a
    {mask} template) or a sequence classifier with a new head (classify-head). With no options it
    fine-tunes the tiny Llama that ships with mezo-replay on a small sentiment task (about 50 seconds
    on two CPU cores) and prints the command that rebuilds the tuned weights. A default shown as
    "A; B for the embedded demo" is A for your --model (MeZO's published setting), B for the embedded
    tiny model.

    \b
    Examples:
      mezo-replay train --model ./my-llama --data train.jsonl --eval-data dev.jsonl --steps 20000
      mezo-replay train --model ./opt --data sst2.csv --task label-words --template '{sentence} It was' \\
          --label-words '{"0": " terrible", "1": " great"}' --objective accuracy
      mezo-replay train --resume traj.mzt --steps 20000      # after a crash or Ctrl-C
      mezo-replay train --model ./opt --data train.jsonl --peft lora --lora-r 8 --lr 1e-4 -o run.mzt
      torchrun --nproc-per-node 4 -m mezo_replay train --model ./opt --data train.jsonl   # data parallel
      torchrun --nproc-per-node 4 -m mezo_replay train --shard --model ./big --data train.jsonl   # FSDP2

    \b
    Under torchrun every process loads the model and takes its share of each batch; process 0 writes the
    trajectory (an ordinary one: it rebuilds in one process) and draws the progress bar. With --shard
    each process holds only its shard of every parameter (FSDP2) and the file is the same.
    """
    from . import embedded
    from .training.data import load_splits
    from .format.mzt import read_trajectory
    from .training.defaults import MEZO_DEFAULTS, PEFT_DEFAULTS, PEFT_DEMO_DEFAULTS
    from .training.peft_tuning import PeftOptions
    from .format.storage import storage
    from .training.data_parallel import SHOWN_BY_RANK0
    from .training.train import StepReport, TrainConfig, relpath, train as run

    demo = model is None or embedded.portable_name(embedded.local_path(model)) is not None
    d = embedded.DEFAULTS if demo else MEZO_DEFAULTS
    if peft_kind is not None:
        d = {**d, **(PEFT_DEMO_DEFAULTS if demo else PEFT_DEFAULTS)[peft_kind]}
    if quiet or _rank() != 0:  # under torchrun, process 0 alone speaks
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    with _user_errors():
        if data is None and eval_data is not None:
            raise MezoReplayError("--eval-data needs --data (without --data the embedded task is used)")
        train_examples, eval_examples = load_splits(data, eval_data) if data else embedded.load_task()
        options = {"text_key": text_key, "prompt_key": prompt_key, "completion_key": completion_key,
                   "template": template, "label_key": label_key, "label_words": _label_words(label_words)}
        cfg = TrainConfig(
            model=model or embedded.MODEL_NAME, config=config_dir, train_examples=train_examples, eval_examples=eval_examples,
            out=resume or out, steps=steps or d["steps"], lr=lr or d["lr"], eps=eps or d["eps"],
            batch_size=batch_size or d["batch_size"], seed=d["seed"] if seed is None else seed,
            task=task_kind, task_options=options, objective=objective,
            max_length=max_length or d["max_length"], dtype=dtype, noise=noise, schedule=schedule,
            warmup_steps=warmup_steps, weight_decay=weight_decay, grad_codec=grad_codec,
            grad_scale=grad_scale, optimizer=rule_name, momentum=momentum, momentum_window=momentum_window,
            beta2=beta2, adam_eps=adam_eps, perturbations=perturbations, layerwise=layerwise,
            layerwise_blocks=layerwise_blocks, tune=tune, freeze=freeze,
            eval_every=d["eval_every"] if eval_every is None else eval_every, eval_batch_size=eval_batch_size,
            record_losses=record_losses, flush_every=flush_every, compact=compact,
            resume=resume is not None, overwrite=overwrite, device=_device(device),
            checkpoint_every=checkpoint_every, allow_new_tensors=allow_new_tensors, shard=shard, offload=offload,
            peft=None if peft_kind is None else PeftOptions(
                peft_kind, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, num_virtual_tokens=num_virtual_tokens,
                targets=None if lora_targets is None else tuple(t.strip() for t in lora_targets.split(","))))
        if grad_scale is not None and grad_codec == "bf16":
            raise MezoReplayError("--grad-scale sets the step of --grad-codec fp8 or sign; bf16 records have none")
        ctx = click.get_current_context()
        given = {name for name in ("momentum", "momentum_window", "beta2", "adam_eps")
                 if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT}
        if not rule_name.startswith("mezo-adam") and given & {"beta2", "adam_eps"}:
            raise MezoReplayError("--beta2 and --adam-eps set Adam's moments: add --optimizer mezo-adam or "
                                  "mezo-adam-buffer")
        if rule_name == "mezo-adam-buffer" and "momentum_window" in given:
            raise MezoReplayError("--momentum-window sets mezo-adam's window; mezo-adam-buffer keeps m and v "
                                  "instead and has none")
        if rule_name == "mezo-sgd" and given:
            raise MezoReplayError("--momentum and --momentum-window set --optimizer mezo-momentum: add it")
        if perturbations > 1 and rule_name != "mezo-sgd":
            raise MezoReplayError(f"--perturbations (n-SPSA) applies to --optimizer mezo-sgd only, not {rule_name}")
        if rule_name == "mezo-momentum-buffer" and "momentum_window" in given:
            raise MezoReplayError("--momentum-window sets mezo-momentum's window; mezo-momentum-buffer keeps a "
                                  "buffer instead and has none")
        if layerwise == "none" and ctx.get_parameter_source("layerwise_blocks") != click.core.ParameterSource.DEFAULT:
            raise MezoReplayError("--layerwise-blocks chooses the blocks of --layerwise: add --layerwise "
                                  "perturbation, step or both")
        if peft_kind is None and (lora_targets is not None or any(
                ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT
                for name in ("lora_r", "lora_alpha", "lora_dropout", "num_virtual_tokens"))):
            raise MezoReplayError("--lora-*/--num-virtual-tokens set the adapter of --peft: add --peft lora or "
                                  "--peft prefix (without it the model's own weights are tuned)")
        bars: list[tqdm] = []  # made at the first step, so model loading prints before it

        def on_step(r: StepReport) -> None:
            if not bars:
                bars.append(tqdm(total=r.steps, initial=r.step - 1, desc="MeZO", unit="step", disable=quiet,
                                 dynamic_ncols=True))
            bar = bars[0]
            post = {"loss": f"{r.loss:.4f}", "lr": f"{r.lr:.2e}", "mzt": f"{r.trajectory_bytes / 1024:.1f}kB"}
            if r.evals is not None:
                post.update({f"eval_{k}": f"{v:.4f}" for k, v in r.evals.items()})
                if quiet and log_path != "-":
                    click.echo(f"step {r.step}: " + ", ".join(f"eval {k} {v:.4f}" for k, v in r.evals.items()))
            bar.set_postfix(post, refresh=False)
            bar.update(1)

        first = _rank() == 0  # under torchrun, the process that writes; the others print nothing
        log = None if log_path is None or not first else (sys.stdout if log_path == "-" else open(log_path, "a"))
        try:
            with _compaction_warnings_in_one_line():
                result = run(cfg, on_step, log)
        except Exception as e:
            if getattr(e, SHOWN_BY_RANK0, False) and not first:
                sys.exit(FAIL)  # process 0 prints this failure, or names the process that had it
            raise
        finally:
            for bar in bars:
                bar.close()
            if log is not None and log is not sys.stdout:
                log.close()
    if not result.world.main:
        return
    traj = read_trajectory(result.trajectory)
    say = (lambda msg: click.echo(msg, err=True)) if log_path == "-" else click.echo
    if result.resumed_from:
        start = "the adapter's generated start" if result.peft is not None else "the base"
        say(f"resumed at step {result.resumed_from}: replayed from {start} and checked")
    if traj.evals:  # from the file, so a resumed run reports the whole run
        first, last = traj.evals[0], traj.evals[-1]
        e0, e1 = first["metrics"], last["metrics"]
        say(f"eval {', '.join(f'{k} {e0[k]:.4f} -> {e1[k]:.4f}' for k in e1 if k in e0)} "
            f"(steps {first['step']} -> {last['step']})")
    if result.interrupted:
        say(f"stopped: the trajectory holds the {traj.steps} steps done so far, with their fingerprint; "
            f"continue with --resume {relpath(result.trajectory)}")
    sizes = storage(traj)
    say(f"wrote {relpath(result.trajectory)}: {traj.steps:,} steps, {traj.file_bytes:,} bytes = "
        f"{sizes.file_bytes_per_step:.2f} bytes/step ({traj.bytes_per_step:.2f} bytes/step of step records)")
    say(f"  stored: {_stored_text(sizes.as_dict())}")
    if result.peft is not None:
        tuned_n = sum(p.numel() for p in result.optimizer.params)
        total = sum(p.numel() for p in result.model.parameters())
        say(f"  tuned: {tuned_n:,} {result.peft.options.kind} adapter parameters of {total:,} "
            f"({100 * tuned_n / total:.2g}%); the base weights are unchanged")
        folder = result.trajectory.with_name(result.trajectory.stem + "-adapter")
        cmd = ["mezo-replay", "reconstruct", relpath(result.trajectory), "-o", relpath(folder)]
        say("rebuild the adapter (a PEFT folder; no base needed) with:\n  " + shlex.join(cmd))
        return
    tuned = result.trajectory.with_name(result.trajectory.stem + "-tuned" + (".safetensors" if result.base.is_file()
                                                                            else ""))
    base = embedded.portable_name(result.base) or relpath(result.base)  # works wherever the package is
    cmd = ["mezo-replay", "reconstruct", base, relpath(result.trajectory), "-o", relpath(tuned)]
    say("rebuild the tuned weights with:\n  " + shlex.join(cmd))


# --- reconstruct / verify ------------------------------------------------------------------------

def _codec_text(rule: dict) -> str:
    """The info line of the step records' grad_encoding (spec/rule.md)."""
    encoding, scale = rule.get("grad_encoding"), rule.get("grad_scale")
    scale = float(scale) if isinstance(scale, (int, float)) and not isinstance(scale, bool) else None
    if encoding == "fp8" and scale is not None:
        return f"fp8 records (E4M3 x {scale:g}, saturating at {448 * scale:g})"
    if encoding == "sign" and scale is not None:
        return f"sign records (ZO-SignSGD: +-{scale:g} or 0)"
    return "bf16 records (8 significant bits)" if encoding == "bf16" else str(encoding)


def _is_trajectory_arg(arg: str) -> bool:
    """A TRAJECTORY rather than a BASE: an hf:// reference ending in .mzt, a local name ending in .mzt
    (so a missing or damaged one is reported as a trajectory), or a file that starts with the .mzt magic
    (bytes 1-3 'MZT': an altered magic is still named as such by the reader)."""
    if arg.startswith("hf://"):
        return arg.rstrip("/").endswith(".mzt")
    path = Path(arg)
    if path.suffix == ".mzt":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(8)[1:4] == b"MZT"
    except OSError:
        return False


def _trajectory_path(trajectory: str) -> Path:
    """The local file of a TRAJECTORY argument, fetching an hf:// one through the Hugging Face cache."""
    from .hub.fetch import fetch_trajectory, parse_hf

    tref = parse_hf(trajectory)
    traj = fetch_trajectory(tref) if tref else Path(trajectory)
    if not traj.is_file():
        raise MezoReplayError(f"{trajectory}: no such trajectory file")
    return traj


def _base_path(base: str, traj: Path) -> Path:
    """The local path of a BASE argument: the embedded model's portable name, a path, or an hf:// model that
    defaults to the commit the trajectory records (another commit is refused)."""
    from .embedded import local_path
    from .hub.fetch import fetch_base, parse_hf
    from .format.mzt import read_trajectory

    base = str(local_path(base))  # the embedded model's portable name, as `train` prints it
    bref = parse_hf(base)
    if bref is None:
        if not Path(base).exists():
            raise MezoReplayError(f"{base}: no such file or folder (a Hub base is written hf://org/name)")
        return Path(base)
    recorded = read_trajectory(traj).header["base"]
    revision = recorded["revision"] if recorded["source"] == bref.repo_id else None
    return fetch_base(bref, revision)[0]


def _split_args(args: tuple[str, ...], command: str, extra: str | None = None) -> tuple[str | None, list[str]]:
    """([BASE], TRAJECTORY...) as given: BASE when the first argument is no trajectory."""
    if not args:
        raise click.UsageError("give a TRAJECTORY (.mzt), or BASE and TRAJECTORY")
    if _is_trajectory_arg(args[0]):
        return None, list(args)
    if len(args) < 2:
        raise MezoReplayError(f"{args[0]} is not a trajectory (a .mzt file or hf://org/name/PATH.mzt); a BASE "
                              f"must be followed by the TRAJECTORY trained on it")
    if len(args) > 2 and extra is None:
        raise MezoReplayError(f"with a BASE ({args[0]}) give exactly one TRAJECTORY; several trajectories rebuild "
                              f"only without one (PEFT adapters): `mezo-replay {command} A.mzt B.mzt -o OUT`")
    return args[0], list(args[1:])


def _base_given_to_adapter(shown: str, base: str, traj: Trajectory, command: str) -> str:
    from .rebuild.adapter import kind

    return (f"{shown} is a PEFT {kind(traj)} adapter: it rebuilds from the trajectory alone, so a BASE would go "
            f"unused (refused rather than ignored, since it suggests a merged model); run `mezo-replay {command} "
            f"{shown}" + (" -o OUT` for the adapter folder, or `mezo-replay reconstruct " + shown +
                          f" --merge {base} -o OUT` for the merged model" if command == "reconstruct" else "`"))


def _status(p: Any) -> str:
    return (f"verified against the trajectory: {p.verified_by}" if p.verified_by is not None else
            f"NOT verified (--unverified): the trajectory records no fingerprint for step {p.steps}")


def _done_line(traj_name: str, out: Path, p: Any) -> str:
    from .rebuild.adapter import is_adapter, kind

    t = p.trajectory
    params = sum(math.prod(x["shape"]) for x in t.header["tensors"])
    what = f"{kind(t)} adapter" if is_adapter(t) else "tuned tensors"
    n = len(p.names)
    return (f"wrote {out}: {what} from {traj_name}, {n} tensor{'s' if n != 1 else ''} ({params:,} parameters) "
            f"after {p.steps} steps")


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@main.command()
@click.argument("args", nargs=-1, metavar="[BASE] TRAJECTORY...")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Output. PEFT trajectory: an adapter folder; several: a folder that gets one adapter folder "
                   "per trajectory (named after its file); with --merge: the merged model's folder; with a BASE: a "
                   ".safetensors file for a file base, a folder for a model-folder base.")
@click.option("--merge", "merge_base", metavar="BASE", show_default="none: write the adapter",
              help="Merge a LoRA adapter into BASE (a model folder, hf://org/name or the embedded model's name) "
                   "with peft's merge_and_unload and write the full model. BASE must be the model the adapter was "
                   "trained on (its weights fingerprint is checked).")
@click.option("--step", type=click.IntRange(0), show_default="the last step",
              help="Rebuild the checkpoint after this many steps: 0, an evaluated step, a --checkpoint-every "
                   "step, or the last; others need --unverified.")
@click.option("--unverified", is_flag=True, help="Write a step the trajectory records no fingerprint for (only "
              "the base, or the generated initial values, are checked then).")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda, cuda:N, auto, or cuda:all (a full fine-tune's tensors split over every local GPU; "
                   "an adapter uses the first): same bits on any. Under torchrun each rank takes cuda:LOCAL_RANK "
                   "for cuda.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output (each adapter folder, with several).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_backend_option
def reconstruct(args: tuple[str, ...], out: Path, merge_base: str | None, step: int | None, unverified: bool,
                device: str, overwrite: bool, quiet: bool) -> None:
    """Rebuild fine-tuned weights, or PEFT adapters, from trajectories (.mzt).

    A PEFT trajectory (`train --peft lora|prefix`) needs no base: it rebuilds into an adapter folder
    (adapter_config.json, adapter_model.safetensors, README.md) that
    `PeftModel.from_pretrained(base, OUT)` loads. Several of them rebuild in one call, one at a time,
    into OUT/<name>/ each. A BASE given with a PEFT trajectory is refused: use --merge BASE for a
    merged model. A full fine-tune needs BASE first: a .safetensors file, a model folder, the
    embedded model's name or hf://org/name[@revision] (defaulting to the commit it was trained on).

    TRAJECTORY is a .mzt file or hf://org/name[@revision]/path/in/repo.mzt. Hub files come through
    the Hugging Face cache (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN apply). The result is
    checked against the fingerprints recorded for its step (the end of training, each evaluation,
    every --checkpoint-every steps) and the output appears only if it matches; an existing output is
    replaced only with --overwrite.

    A full fine-tune's tensors can be split: `--device cuda:all` over the local GPUs in this process,
    or `torchrun --nproc-per-node N -m mezo_replay reconstruct BASE TRAJECTORY -o OUT` over N ranks
    (gloo on --device cpu; with --device cuda each rank uses cuda:LOCAL_RANK), where rank 0 draws the
    bar and writes. The bytes are those of one process; an error on any rank ends every rank with it.

    \b
    Examples:
      mezo-replay reconstruct run.mzt -o run-adapter                 # PEFT: no base needed
      mezo-replay reconstruct users/*.mzt -o adapters                # adapters/<name>/ each
      mezo-replay reconstruct hf://my-org/runs/alice/run.mzt -o alice-adapter
      mezo-replay reconstruct run.mzt --merge hf://my-org/base -o merged   # full model, LoRA merged in
      mezo-replay reconstruct mezo-replay:embedded/tiny-llama traj.mzt -o tuned   # full fine-tune
      mezo-replay reconstruct hf://facebook/opt-1.3b hf://my-org/opt-sst2/run.mzt -o opt-sst2
      mezo-replay reconstruct hf://facebook/opt-1.3b run.mzt -o opt-sst2 --device cuda:all
      torchrun --nproc-per-node 8 -m mezo_replay reconstruct hf://facebook/opt-1.3b run.mzt -o opt-sst2 --device cuda
    """
    from .rebuild import adapter, replay
    from .format.mzt import read_trajectory
    from .training import distributed

    if distributed.launched():
        _reconstruct_ranks(args, out, merge_base, step, unverified, device, overwrite, quiet)
        return
    with _user_errors():
        base, trajectories = _split_args(args, "reconstruct")
        if base is not None:
            traj_path = _trajectory_path(trajectories[0])
            traj = read_trajectory(traj_path)
            if not replay.needs_base(traj):  # refused before a Hub base is fetched for nothing
                raise MezoReplayError(_base_given_to_adapter(trajectories[0], base, traj, "reconstruct"))
            if merge_base is not None:
                raise MezoReplayError(f"--merge is for PEFT adapter trajectories; {trajectories[0]} already "
                                      f"rebuilds into the full model: drop --merge")
            base_path = _base_path(base, traj_path)
            p = replay.plan(base_path, traj, step)
            if not unverified:
                p.require_fingerprint()
            dev = _devices(device)
            with _element_bar(p.element_steps, "replay", quiet) as progress:
                written = replay.reconstruct(p, out, overwrite=overwrite, device=dev, progress=progress,
                                             unverified=True)
            status = _status(p) + ("" if p.verified_by is not None else "; only the base was checked")
            _warn_truncated(trajectories[0], traj)
            click.echo(f"wrote {written}: {len(p.names)} tuned tensors after {p.steps} steps; {status}")
            return
        for arg in trajectories[1:]:
            if not _is_trajectory_arg(arg):
                raise MezoReplayError(f"{arg} is not a trajectory (a .mzt file or hf://org/name/PATH.mzt): a BASE "
                                      f"goes first, and only with a single full-tuning TRAJECTORY")
        paths = [_trajectory_path(t) for t in trajectories]
        dev = _device(device if device != "cuda:all" else _devices(device)[0])  # an adapter is small
        if len(paths) > 1:
            if merge_base is not None:
                raise MezoReplayError("--merge takes one trajectory: merge each adapter in a call of its own")
            _rebuild_many(paths, trajectories, out, step, unverified, dev, overwrite, quiet)
            return
        traj = read_trajectory(paths[0])
        if merge_base is not None:
            adapter.check_mergeable(traj)
            p = adapter.plan(traj, step, unverified, trajectories[0])
            base_path = _base_path(merge_base, paths[0])
            if quiet:
                _quiet_transformers()
            with _element_bar(p.element_steps, "replay", quiet) as progress:
                adapter.merge(traj, base_path, out, step=step, overwrite=overwrite, unverified=unverified,
                              device=dev, progress=progress)
            _warn_truncated(trajectories[0], traj)
            click.echo(f"wrote {out}: {merge_base} with the {adapter.kind(traj)} adapter of {trajectories[0]} "
                       f"merged in (after {p.steps} steps); {_status(p)}")
            return
        p = adapter.plan(traj, step, unverified, trajectories[0])
        adapter.check_kind(traj, out)
        adapter.check_output(out, overwrite=overwrite, folder=adapter.is_adapter(traj))
        with _element_bar(p.element_steps, "replay", quiet) as progress:
            adapter.write_adapter(traj, out, step=step, overwrite=overwrite, unverified=unverified, device=dev,
                                  progress=progress, rebuild_from=trajectories[0])
    _warn_truncated(trajectories[0], traj)
    click.echo(f"{_done_line(trajectories[0], out, p)}; {_status(p)}")
    if adapter.is_adapter(traj):
        click.echo(f"load it with PeftModel.from_pretrained(base, {str(out)!r}); base: {adapter.base_name(traj)}")


def _devices(device: str) -> str | list[str]:
    """--device of reconstruct and verify: cuda:all is every local GPU (one line where there is none)."""
    from .rebuild.spread import local_devices

    return local_devices(device) if device == "cuda:all" else _device(device)


def _ranks_plan(command: str, args: tuple[str, ...], step: int | None, unverified: bool) -> Any:
    """What every rank of a torchrun rebuild prepares on its own: the plan of a full fine-tune."""
    from .format.mzt import read_trajectory
    from .rebuild import replay

    base, rest = _split_args(args, command, extra="tuned" if command == "verify" else None)
    if base is None:
        raise MezoReplayError(f"under torchrun, {command} splits a full fine-tune over the ranks: give BASE and "
                              f"TRAJECTORY (PEFT adapters are small: run {command} as one process)")
    traj_path = _trajectory_path(rest[0])
    traj = read_trajectory(traj_path)
    if not replay.needs_base(traj):
        raise MezoReplayError(_base_given_to_adapter(rest[0], base, traj, command))
    if command == "verify" and len(rest) > 1:
        raise MezoReplayError("under torchrun, verify replays and splits the work; checking a given output (TUNED) "
                              "replays nothing: run it as one process")
    p = replay.plan(_base_path(base, traj_path), traj, step)
    if command == "verify":
        p.require_fingerprint(escape=None)
    elif not unverified:
        p.require_fingerprint()
    return p


def _ranks_inputs(p: Any, **extra: Any) -> dict[str, Any]:
    """What every rank must hold the same of, digested by Crew.settle."""
    t = p.trajectory
    return {"base": t.header["base"]["fingerprint"], "steps": p.steps, "names": p.names, "expected": p.expected,
            "checkpoint": p.checkpoint, "final": t.final_fingerprint, **extra}


def _under_ranks(command: str, device: str, work: Callable[[Any, Any, Any], None],
                 prepare: Callable[[], tuple[Any, dict[str, Any]]]) -> None:
    """A rebuild command under torchrun: every rank prepares (errors are shared out by Crew.settle, so every
    rank ends with the same one line), then work(world, device, crew) splits the replay; rank 0 writes."""
    from .rebuild import ranks
    from .training import distributed

    with _user_errors():
        if device == "cuda:all":
            raise MezoReplayError("--device cuda:all splits over the local GPUs in one process; under torchrun "
                                  "give --device cuda (each rank takes cuda:LOCAL_RANK) or cpu")
        world, dev = distributed.init(_device(device))
        try:
            crew = ranks.Crew(world)
            error: BaseException | None = None
            p, inputs = None, None
            try:
                p, inputs = prepare()
            except Exception as e:  # noqa: BLE001 -- every rank learns of it in settle
                error = e
            crew.settle(error, inputs)
            work(p, dev, crew)
        finally:
            distributed.finish()


def _reconstruct_ranks(args: tuple[str, ...], out: Path, merge_base: str | None, step: int | None, unverified: bool,
                       device: str, overwrite: bool, quiet: bool) -> None:
    """`torchrun ... -m mezo_replay reconstruct BASE TRAJECTORY -o OUT`: the tuned tensors split over the
    ranks (rebuild/spread.py, rebuild/ranks.py); rank 0 draws the bar and writes the bytes one process would."""
    from .rebuild import replay
    from .training.distributed import current

    def prepare() -> tuple[Any, dict[str, Any]]:
        if merge_base is not None:
            raise MezoReplayError("--merge is for PEFT adapters, which rebuild as one process: run it without "
                                  "torchrun")
        p = _ranks_plan("reconstruct", args, step, unverified)
        return p, _ranks_inputs(p, out=str(out.resolve()), overwrite=overwrite, unverified=unverified)

    def work(p: Any, dev: str, crew: Any) -> None:
        main = current().main
        with _element_bar(p.element_steps, "replay", quiet or not main) as progress:
            written = replay.reconstruct(p, out, overwrite=overwrite, device=dev, progress=progress if main else None,
                                         unverified=True, crew=crew)
        if main:
            status = _status(p) + ("" if p.verified_by is not None else "; only the base was checked")
            click.echo(f"wrote {written}: {len(p.names)} tuned tensors after {p.steps} steps, split over "
                       f"{crew.world.size} ranks; {status}")

    _under_ranks("reconstruct", device, work, prepare)


def _verify_ranks(args: tuple[str, ...], step: int | None, device: str, quiet: bool) -> None:
    """`torchrun ... -m mezo_replay verify BASE TRAJECTORY`: the replay split as for reconstruct."""
    from .rebuild import replay
    from .training.distributed import current

    def prepare() -> tuple[Any, dict[str, Any]]:
        p = _ranks_plan("verify", args, step, True)
        return p, _ranks_inputs(p)

    def work(p: Any, dev: str, crew: Any) -> None:
        main = current().main
        with _element_bar(p.element_steps, "verify", quiet or not main) as progress:
            replay.verify(p, device=dev, progress=progress if main else None, crew=crew)
        if main:
            click.echo(f"OK: the replay after {p.steps} steps, split over {crew.world.size} ranks: {p.verified_by}")

    _under_ranks("verify", device, work, prepare)


@contextmanager
def _compaction_warnings_in_one_line() -> Iterator[None]:
    """A file that could not be compacted (a full disk) is still the run's complete result: one
    `warning:` line, like the other warnings here, and exit status 0."""
    from .format.compact import CompactionWarning

    show = warnings.showwarning

    def shown(message, category, *args, **kwargs):  # type: ignore[no-untyped-def]
        if issubclass(category, CompactionWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            show(message, category, *args, **kwargs)

    warnings.showwarning = shown
    try:
        yield
    finally:
        warnings.showwarning = show


def _warn_truncated(shown: str, traj: Trajectory) -> None:
    """After a success only: a refusal stays one line."""
    if traj.truncated:
        click.echo(f"warning: {shown} is truncated; used its {traj.steps} complete steps", err=True)


def _rebuild_many(paths: list[Path], given: list[str], out: Path, step: int | None, unverified: bool, device: str,
                  overwrite: bool, quiet: bool) -> None:
    from .rebuild.adapter import rebuild_many

    bars: list[tqdm] = []

    def on_total(total: int) -> None:
        bars.append(tqdm(total=total, desc=f"replay {len(paths)}", unit="elt-step", unit_scale=True, disable=quiet,
                         dynamic_ncols=True))

    def on_done(path: Path, target: Path, p: Any) -> None:
        line = _done_line(given[paths.index(path)], target, p) + (
            f" (truncated: its {p.trajectory.steps} complete steps)" if p.trajectory.truncated else "")
        if bars and not quiet:
            bars[0].write(line)
        else:
            click.echo(line)

    try:
        done = rebuild_many(paths, out, step=step, overwrite=overwrite, unverified=unverified, device=device,
                            progress=lambda n: bars[0].update(n), on_total=on_total, on_done=on_done, names=given)
    finally:
        for bar in bars:
            bar.close()
    state = "verified against their trajectories' fingerprints" if not unverified else "(--unverified)"
    click.echo(f"rebuilt {len(done)} outputs in {out}, {state}")


@main.command()
@click.argument("args", nargs=-1, metavar="[BASE] TRAJECTORY [TUNED]")
@click.option("--step", type=click.IntRange(0), show_default="the last step",
              help="Check the checkpoint after this many steps.")
@click.option("--device", default="cpu", show_default=True,
              help="Device for the replay: cpu, cuda, cuda:N, auto, or cuda:all (split over every local GPU).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_backend_option
def verify(args: tuple[str, ...], step: int | None, device: str, quiet: bool) -> None:
    """Check that a trajectory gives the weights it recorded (exit 0) or not (exit 1).

    A PEFT trajectory is checked alone: `verify TRAJECTORY [ADAPTER]`, where ADAPTER is a folder
    `reconstruct` wrote (its adapter_config.json must match too, except the base's name and revision,
    which you may point elsewhere). A full fine-tune needs its base: `verify BASE TRAJECTORY [TUNED]`,
    TUNED a .safetensors file or model folder. Without ADAPTER or TUNED the trajectory is replayed and
    the result checked against its fingerprints; with one, that output's tensors are checked instead.
    The replay of a full fine-tune splits like reconstruct's (`--device cuda:all`, or torchrun with
    BASE TRAJECTORY); checking a given TUNED reads files on one process.

    \b
    Examples:
      mezo-replay verify run.mzt run-adapter
      mezo-replay verify mezo-replay:embedded/tiny-llama traj.mzt tuned
    """
    from .rebuild import adapter, replay
    from .format.mzt import read_trajectory
    from .training import distributed

    if distributed.launched():
        _verify_ranks(args, step, device, quiet)
        return
    with _user_errors():
        base, rest = _split_args(args, "verify", extra="tuned")
        if len(rest) > 2:
            raise MezoReplayError(f"too many arguments: {' '.join(rest[2:])}")
        traj_path = _trajectory_path(rest[0])
        traj = read_trajectory(traj_path)
        tuned = Path(rest[1]) if len(rest) > 1 else None
        if tuned is not None and not tuned.exists():
            raise MezoReplayError(f"{tuned}: no such file or folder")
        if base is not None:
            if not replay.needs_base(traj):
                raise MezoReplayError(_base_given_to_adapter(rest[0], base, traj, "verify"))
            p = replay.plan(_base_path(base, traj_path), traj, step)
        else:
            if replay.needs_base(traj):
                raise MezoReplayError(adapter.needs_base_message(traj, rest[0], "verify"))
            p = adapter.plan(traj, step, True, rest[0])
            tuned = adapter.checked_output(traj, tuned) if tuned is not None else None
        dev = _devices(device)
        if tuned is not None and isinstance(dev, list):
            dev = dev[0]  # reading a given output splits nothing
        with _element_bar(p.element_steps, "verify", quiet) as progress:
            replay.verify(p, tuned, device=dev, progress=progress)
    what = f"{rest[1]}" if len(rest) > 1 else "the replay"
    click.echo(f"OK: {what} after {p.steps} steps: {p.verified_by}")


# --- info ----------------------------------------------------------------------------------------

def _schedule_text(sched: dict[str, Any]) -> str:
    text = f"{sched['name']} schedule"
    if sched.get("total_steps"):
        text += f" over {sched['total_steps']:,} steps"
    if sched.get("warmup_steps"):
        text += f", {sched['warmup_steps']:,} warmup"
    return text


def summary(traj: Trajectory) -> dict[str, Any]:
    from .format.storage import storage

    h = traj.header
    params = sum(math.prod(t["shape"]) for t in h["tensors"])
    sizes = storage(traj)
    out: dict[str, Any] = {
        "path": str(traj.path), "steps": traj.steps, "file_bytes": traj.file_bytes,
        "file_bytes_per_step": sizes.file_bytes_per_step,
        "step_bytes": traj.step_bytes, "bytes_per_step": traj.bytes_per_step,
        "stored": sizes.as_dict() | {"losses_recorded": bool(h["records"]["losses"])},
        "complete": traj.final_fingerprint is not None and not traj.truncated and traj.corrupt is None,
        "truncated": traj.truncated,
        "corrupt": None if traj.corrupt is None else vars(traj.corrupt),
        "fingerprint_steps": sorted(traj.fingerprints),
        "base": h["base"], "creator": h["creator"], "generator": h["generator"], "noise": h["noise"],
        "rule": h["rule"], "tensors": len(h["tensors"]), "parameters": params,
        "dtypes": sorted({t["dtype"] for t in h["tensors"]}), "metadata": h["metadata"], "evals": traj.evals,
        **_parallel(h["metadata"]),
    }
    out.update(_layerwise_summary(h))
    out.update(_kind_summary(traj))
    if traj.losses is not None and traj.steps:
        k = max(1, traj.steps // 10)
        import numpy as np

        with np.errstate(over="ignore", invalid="ignore"):  # a file's losses may hold inf and -inf, 3e38s
            out["loss_first"] = float(traj.losses[:k].mean())
            out["loss_last"] = float(traj.losses[-k:].mean())
    return out


def _layerwise_summary(h: dict[str, Any]) -> dict[str, Any]:
    """spec/layerwise.md: each tuned tensor's (perturb_exp, step_exp), present only when one is not 0."""
    pairs = {t["name"]: [t.get("perturb_exp", 0), t.get("step_exp", 0)] for t in h["tensors"]}
    if not any(e or f for e, f in pairs.values()):
        return {}
    return {"layerwise": pairs}


def _layerwise_lines(s: dict[str, Any]) -> list[str]:
    if "layerwise" not in s:
        return []
    out = []
    for i, what in enumerate(("perturbation", "step")):
        values = [pair[i] for pair in s["layerwise"].values()]
        if any(values):
            out.append(f"{what} exps in [{min(values)}, {max(values)}] ({sum(1 for v in values if v)} of "
                       f"{len(values)} tensors scaled)")
    return [f"  layer-wise {'; '.join(out)} (per tensor: --json)"]


def _parallel(meta: dict[str, Any]) -> dict[str, Any]:
    """world_size and parallel (spec/metadata.md): how many processes trained it, and how they split the work;
    a file without them was trained by one process. A value that is not a decimal is shown as it is."""
    size = meta.get("world_size", "1")
    return {"world_size": int(size) if isinstance(size, str) and size.isdecimal() else size,
            "parallel": meta.get("parallel", "none")}


def _kind_summary(traj: Trajectory) -> dict[str, Any]:
    """What the trajectory tunes, and whether it needs its base to rebuild."""
    from .rebuild.adapter import is_adapter, kind, peft_header
    from .rebuild.replay import needs_base

    found: dict[str, Any] = {"needs_base": needs_base(traj), "kind": "full", "peft": None}
    if is_adapter(traj):
        try:
            found.update(kind=kind(traj), peft=peft_header(traj))
        except MezoReplayError as e:
            found.update(kind="unreadable adapter", peft_error=str(e))
    elif not found["needs_base"]:
        found["kind"] = "base-less"
    return found


_PEFT_KEYS = {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
              "modules_to_save": "whole modules", "num_virtual_tokens": "virtual tokens",
              "prefix_projection": "projection", "task_type": "task"}


def _peft_text(config: dict[str, Any]) -> str:
    """'r 8, alpha 16, dropout 0, targets q_proj, v_proj, task CAUSAL_LM': the settings that tell adapters apart."""
    parts = []
    for key, label in _PEFT_KEYS.items():
        value = config.get(key)
        if value is None or value == [] or (key == "prefix_projection" and value is False):
            continue
        shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        parts.append(f"{label} {shown}")
    return ", ".join(parts)


def _kind_lines(s: dict[str, Any], path: Path) -> list[str]:
    base = s["base"]["source"] or "(source not recorded)"
    base += f" @ {s['base']['revision']}" if s["base"].get("revision") else ""
    if s["peft"] is not None:
        config = s["peft"]["adapter_config"]
        rebuild = shlex.join(["mezo-replay", "reconstruct", str(path), "-o", path.stem + "-adapter"])
        return [f"  kind       {s['kind']} adapter (peft {config['peft_type']}): {_peft_text(config)}",
                f"  base       {base}: not needed to rebuild the adapter, only to use it",
                f"             rebuild: {rebuild}",
                f"             base weights fingerprint {s['peft']['base_weights']} (checked by --merge)",
                f"             tuned-tensor fingerprint {s['base']['fingerprint']}"]
    lines = [f"  kind       {s['kind']}" + (f": {s['peft_error']}" if "peft_error" in s else
                                           " fine-tune of the base's own weights" if s["kind"] == "full" else
                                           ": every tensor starts from values the file holds or generates; it "
                                           "rebuilds into one .safetensors file without a base"),
             f"  base       {base}" + (" (needed to rebuild)" if s["needs_base"] else ""),
             f"             fingerprint {s['base']['fingerprint']}"]
    return lines


def _stored_text(stored: dict[str, Any]) -> str:
    """'header 873, step records 1,911, losses 3,245, 11 evals 1,530, 1 fingerprint 417 (bytes)'."""
    parts = []
    for kind, n in stored["by_kind"].items():
        count = stored["chunks"].get(kind, 0)
        if kind == "init":
            parts += [f"init {t['name']} {t['stored_bytes']:,} (of {t['raw_bytes']:,} raw)"
                      for t in stored["init_tensors"]]
        elif kind in ("evals", "fingerprints"):
            parts.append(f"{count} {kind[:-1] if count == 1 else kind} {n:,}")
        else:
            parts.append(f"{ {'steps': 'step records', 'unread': 'unread tail'}.get(kind, kind)} {n:,}")
    generated = stored.get("generated_tensors") or []
    if generated:
        raw = sum(int(t["raw_bytes"]) for t in generated)
        parts.append(f"generated init {len(generated)} tensor{'s' if len(generated) != 1 else ''} 0 "
                     f"(of {raw:,} raw: drawn from the seed)")
    return ", ".join(parts) + " (bytes)"


def _json_text(value: Any) -> str:
    """--json output that every JSON parser reads: a recorded loss or metric that is not finite (a file may
    hold inf, or a mean of them overflow) becomes null, where json.dumps would write NaN or Infinity."""
    def finite(v: Any) -> Any:
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(value), indent=1, allow_nan=False)


def _info_lines(s: dict[str, Any], trajectory: Path) -> list[str]:
    r = s["rule"]
    state = ("complete, final fingerprint recorded" if s["complete"] else
             f"truncated: {s['steps']} steps recoverable" if s["truncated"] else
             "corrupt" if s["corrupt"] else "no final fingerprint (training still running, or stopped hard)")
    lines = [
        f"{trajectory}: MeZO trajectory written by {s['creator']}",
        f"  steps      {s['steps']:,} ({state})",
        f"  size       {s['file_bytes']:,} bytes = {s['file_bytes_per_step']:.2f} bytes/step; step records "
        f"{s['step_bytes']:,} bytes = {s['bytes_per_step']:.2f} bytes/step",
        f"  stored     {_stored_text(s['stored'])}",
        *_kind_lines(s, trajectory),
        f"  tuned      {s['tensors']:,} tensors, {s['parameters']:,} parameters ({', '.join(s['dtypes'])})",
        f"  rule       {r['name']}: lr {r['lr']:.6g}, eps {r['eps']:.6g}, {_schedule_text(r['schedule'])}"
        + (f", weight decay {r['weight_decay']:.6g}" if r.get("weight_decay") else "")
        + (f", beta1 {r['beta1']:.9g}, beta2 {r['beta2']:.9g}, adam_eps {r['adam_eps']:.6g}"
           + (f" over {r['window']} steps" if r.get("window") else " (state buffers m, v)")
           if r.get("beta2") else
           f", momentum {r['momentum']:.6g} over {r['window']} steps" if r.get("window") else
           f", momentum {r['momentum']:.6g} (state buffer)" if r.get("momentum") else "")
        + (f", {r['perturbations']} perturbations a step (n-SPSA)" if r.get("perturbations") else "")
        + " (exact: --json)",
        *_layerwise_lines(s),
        f"  gradient   {_codec_text(r)}",
        f"  noise      {s['noise']['name']} from {s['generator']['name']}, seed {s['generator']['seed']}",
        f"  parallel   {s['parallel']}, world_size {s['world_size']}"
        + (" (one process)" if s["parallel"] == "none" else " (processes under torchrun)"),
    ]
    if not s["stored"]["losses_recorded"]:
        lines.append("  loss       not recorded (trained with --no-record-losses)")
    if "loss_first" in s:
        lines.append(f"  loss       {s['loss_first']:.4f} (first 10% of steps) -> {s['loss_last']:.4f} (last 10%)")
    for e in s["evals"]:
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in e["metrics"].items())
        lines.append(f"  eval       step {e['step']:>7,} ({e['split']}): {metrics}")
    lines += [f"  meta       {k}: {v}" for k, v in s["metadata"].items()]
    return lines


def _corrupt_line(trajectory: Path, traj: Trajectory) -> str:
    c = traj.corrupt
    assert c is not None
    return (f"{trajectory}: chunk {c.index} ({c.type}) at byte offset {c.offset} is corrupt: {c.reason}; "
            f"{traj.steps} steps before it are recoverable")


@main.command()
@click.argument("trajectories", nargs=-1, required=True, metavar="TRAJECTORY...",
                type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON object instead of text (several trajectories: a JSON array of them).")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path, dir_okay=False), show_default="none",
              help="Also draw the recorded training losses and evaluations of every TRAJECTORY on one chart, "
                   "one colour each, into this .png, .svg or .pdf file (needs matplotlib: "
                   "pip install 'mezo-replay[plot]').")
@click.option("--x-axis", type=click.Choice(["steps", "forward-passes"]), default="steps", show_default=True,
              help="The chart's x axis: steps, or the training forward passes (2 per step; evaluations' are "
                   "not counted).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --plot file.")
def info(trajectories: tuple[Path, ...], as_json: bool, plot_path: Path | None, x_axis: str,
         overwrite: bool) -> None:
    """Summarise trajectories (.mzt): steps, size (whole file, and what is stored), base, settings, damage.

    Several trajectories are summarised one after another (a blank line between them; with --json, a
    JSON array). A truncated file is summarised with the steps that can be recovered; a corrupt one
    too, with exit status 1 and the damaged chunk named.

    --plot draws, against steps, each trajectory's per-step training loss as recorded, (L+ + L-)/2,
    the mean of the two perturbed losses of the step (light points raw, a line their centred mean over
    sqrt(steps) of them), and its evaluations (markers, dashed; losses above, other metrics in a panel
    below). What a file lacks (losses left out
    with --no-record-losses, no evaluations) is said in one line. The file is written whole (a temporary
    file renamed into place) and an existing one is replaced only with --overwrite.

    \b
    Examples:
      mezo-replay info run.mzt
      mezo-replay info a.mzt b.mzt --plot curves.png       # both runs on one chart
    """
    from .format.mzt import read_trajectory

    ctx = click.get_current_context()
    if plot_path is None:
        for name in ("x_axis", "overwrite"):
            if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT:
                raise click.UsageError(f"--{name.replace('_', '-')} goes with --plot PATH")
    with _user_errors():
        if plot_path is not None:  # refused before anything is read or drawn
            from .plot import chart_format, require_matplotlib
            from .rebuild.adapter import check_output

            chart_format(plot_path)
            check_output(plot_path, overwrite=overwrite, folder=False)
            require_matplotlib()
        trajs = [read_trajectory(t, strict=False) for t in trajectories]
    summaries = [summary(traj) for traj in trajs]
    if as_json:
        click.echo(_json_text(summaries[0] if len(summaries) == 1 else summaries))
    else:
        click.echo("\n\n".join("\n".join(_info_lines(s, t)) for s, t in zip(summaries, trajectories)))
    if plot_path is not None:
        from .plot import Curves, write_chart

        curves = [Curves.of(str(t), traj) for t, traj in zip(trajectories, trajs)]
        with _user_errors():
            write_chart(curves, plot_path, overwrite=overwrite, x_axis=x_axis)
        say = (lambda msg: click.echo(msg, err=True)) if as_json else click.echo
        for c in curves:
            note = c.missing()
            if note is not None:
                say(f"note: {note}")
        say(f"wrote {plot_path}: the training loss and evaluations of {len(curves)} "
            f"trajector{'y' if len(curves) == 1 else 'ies'} against {x_axis.replace('-', ' ')}")
    damaged = [(t, traj) for t, traj in zip(trajectories, trajs) if traj.corrupt is not None]
    for t, traj in damaged[:-1]:
        click.echo(f"Error: {_corrupt_line(t, traj)}", err=True)
    if damaged:
        _fail(_corrupt_line(*damaged[-1]))


# --- push ----------------------------------------------------------------------------------------

@main.command()
@click.argument("trajectory", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.argument("repo_id")
@click.option("--path-in-repo", help="Where the .mzt goes in the repo, e.g. users/alice/run.mzt (one trajectory "
              "per folder; the model card goes beside it). Default: the file's name, at the root.")
@click.option("--private", is_flag=True, help="Create the repo as private (if it does not exist yet).")
@click.option("--message", help="Commit message.")
@click.option("--plot", is_flag=True, help="Also upload the chart of the recorded training losses and evaluations "
              "(as `info --plot` draws it) beside the .mzt, as NAME-curves.png, and show it on the card (needs "
              "matplotlib: pip install 'mezo-replay[plot]').")
def push(trajectory: Path, repo_id: str, path_in_repo: str | None, private: bool, message: str | None,
         plot: bool) -> None:
    """Publish a trajectory on the Hugging Face Hub with a model card.

    Creates REPO_ID if needed and uploads the .mzt and a README.md card (base_model, library_name
    mezo-replay, the base's commit, steps, size, settings, evaluations, and the command that rebuilds
    the weights) in one commit. Uses your `hf auth login` token or HF_TOKEN.

    \b
    Example:
      mezo-replay push run.mzt my-org/opt-sst2-mezo --plot
      mezo-replay reconstruct hf://facebook/opt-1.3b hf://my-org/opt-sst2-mezo/run.mzt -o opt-sst2
    """
    from .hub.publish import repo_path, chart_name, push_to_hub

    with _user_errors():
        if plot:
            from .plot import require_matplotlib

            require_matplotlib()
        url = push_to_hub(trajectory, repo_id, path_in_repo=path_in_repo, private=private, commit_message=message,
                          plot=plot)
        target = repo_path(path_in_repo, trajectory.name)
    click.echo(f"pushed {trajectory} to hf://{repo_id}/{target}\n  {url}")
    if plot:
        click.echo(f"  with its chart hf://{repo_id}/{chart_name(target)}, shown on the card")


# --- ls ------------------------------------------------------------------------------------------

@main.command(name="ls")
@click.argument("repo")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
def ls(repo: str, as_json: bool) -> None:
    """List the trajectories in a Hub model repo (org/name[@revision] or hf://...): path, steps, size, base.

    Works offline from the Hugging Face cache with HF_HUB_OFFLINE=1.
    """
    from .hub.fetch import list_trajectories
    from .format.mzt import read_trajectory

    with _user_errors():
        found = list_trajectories(repo)
    rows = []
    for path, local in found:
        try:
            t = read_trajectory(local, strict=False)
        except MezoReplayError as e:
            rows.append({"path": path, "error": str(e)})
            continue
        b = t.header["base"]
        try:
            what = _kind_summary(t)["kind"]
        except MezoReplayError:
            what = "?"
        rows.append({"path": path, "steps": t.steps, "file_bytes": t.file_bytes, "complete": t.final_fingerprint
                     is not None, "base": (b["source"] or "?") + (f"@{b['revision'][:12]}" if b["revision"] else ""),
                     "kind": what})
    if as_json:
        click.echo(_json_text(rows))
        return
    if not rows:
        click.echo(f"{repo}: no .mzt trajectories")
        return
    width = max(len(r["path"]) for r in rows)
    click.echo(f"{'path':<{width}}  {'steps':>9}  {'bytes':>10}  base")
    for r in rows:
        if "error" in r:
            click.echo(f"{r['path']:<{width}}  unreadable: {r['error']}")
        else:
            mark = ("" if r["kind"] in ("full", "base-less") else f"  ({r['kind']} adapter: no base needed)") + \
                ("" if r["complete"] else "  (incomplete)")
            click.echo(f"{r['path']:<{width}}  {r['steps']:>9,}  {r['file_bytes']:>10,}  {r['base']}{mark}")


# --- repair --------------------------------------------------------------------------------------

@main.command()
@click.argument("trajectory", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("-o", "--out", type=click.Path(path_type=Path, dir_okay=False),
              help="Where the repaired copy goes.  [default: NAME-repaired.mzt beside TRAJECTORY]")
@click.option("--in-place", is_flag=True, help="Replace TRAJECTORY itself (by a rename, never half-written) "
              "instead of writing a copy; the dropped bytes are then gone.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
def repair(trajectory: Path, out: Path | None, in_place: bool, overwrite: bool) -> None:
    """Keep the longest valid prefix of a damaged trajectory (.mzt).

    A crash, a full disk or a bad copy can leave a trajectory cut short or with a corrupt chunk. Every
    chunk is checksummed, so the chunks before the first bad one are exactly what training wrote:
    repair copies them byte for byte to OUT, drops the rest, and says how many steps it kept. The copy
    is written beside OUT and renamed into place. TRAJECTORY is left as it is unless --in-place. An
    intact file is refused, and so is one that a running `train` is writing.

    `train --resume` continues a repaired file (and a merely truncated one, whose torn tail it cuts off
    itself), and ends on the same weights, bit for bit, as a run that was never interrupted.

    \b
    Example:
      mezo-replay repair run.mzt                 # writes run-repaired.mzt
      mezo-replay train --resume run-repaired.mzt --steps 1000   # with the original options
    """
    from .format.repair import repair as run

    if in_place and out is not None:
        _fail("give -o or --in-place, not both")
    with _user_errors():
        r = run(trajectory, out, in_place=in_place, overwrite=overwrite)
    click.echo(f"repaired {trajectory}{'' if in_place else f' -> {r.out}'}: kept {r.steps:,} steps "
               f"({r.kept_bytes:,} of {r.file_bytes:,} bytes); dropped {r.dropped_bytes:,} bytes: {r.damage}")
    if r.verifiable:
        click.echo(f"it ends with the fingerprint of step {r.steps}: rebuilds from it are verified")
    else:
        done = f" (verifiable checkpoints: steps {', '.join(map(str, r.fingerprint_steps))})" \
            if r.fingerprint_steps else ""
        click.echo(f"it has no fingerprint after step {r.steps}{done}: continue it with "
                   f"`mezo-replay train --resume {shlex.quote(str(r.out))}` and the original options")
