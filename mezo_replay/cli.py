"""The `mezo-replay` command line."""
from __future__ import annotations

import json
import math
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from tqdm.auto import tqdm

from . import __version__
from .errors import MezoReplayError

if TYPE_CHECKING:  # torch loads only when a command needs it, so --help answers at once
    from .mzt import Trajectory

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

    \b
    Five-minute tour:
      mezo-replay train                       # fine-tune the embedded tiny model, write traj.mzt
      mezo-replay info traj.mzt               # what is in it, bytes per step
      mezo-replay reconstruct BASE traj.mzt -o tuned   # the command `train` prints
      mezo-replay verify BASE traj.mzt tuned  # check any weights against the trajectory
    """


# --- train ---------------------------------------------------------------------------------------

@main.command()
@click.option("--model", type=click.Path(path_type=Path, file_okay=False),
              help="Local Hugging Face causal-LM folder. Default: the embedded tiny Llama.")
@click.option("--train-file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="JSONL with 'prompt' and 'completion' fields. Default: the embedded sentiment task.")
@click.option("--eval-file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="JSONL for evaluation, same fields. Default: the embedded task's eval split.")
@click.option("--prompt-key", default="prompt", show_default=True, help="JSONL field holding the prompt.")
@click.option("--completion-key", default="completion", show_default=True,
              help="JSONL field holding the completion (the loss is on its tokens only).")
@click.option("-o", "--out", type=click.Path(path_type=Path, dir_okay=False), default=Path("traj.mzt"),
              show_default=True, help="Trajectory file to write.")
@click.option("--steps", type=click.IntRange(1, 2**32 - 1), help="MeZO steps. [default: embedded setting]")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Learning rate (constant).")
@click.option("--eps", type=click.FloatRange(min=0, min_open=True), help="Perturbation scale.")
@click.option("--batch-size", type=click.IntRange(1), help="Examples per step.")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), help="Run seed: noise and batch order.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Parameter dtype to train in (a base in that dtype is saved if the model's differs).")
@click.option("--noise", type=click.Choice(["gaussian16", "rademacher16"]), default="gaussian16",
              show_default=True, help="Perturbation distribution (spec/noise.md).")
@click.option("--eval-every", type=click.IntRange(0), help="Evaluate every N steps (0: only at the ends).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--overwrite", is_flag=True, help="Replace an existing trajectory file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def train(model: Path | None, train_file: Path | None, eval_file: Path | None, prompt_key: str,
          completion_key: str, out: Path, steps: int | None,
          lr: float | None, eps: float | None, batch_size: int | None, seed: int | None, dtype: str, noise: str,
          eval_every: int | None, device: str, overwrite: bool, quiet: bool) -> None:
    """Fine-tune a causal LM with MeZO and record the trajectory.

    With no options it fine-tunes the tiny Llama that ships with mezo-replay on a small sentiment task
    (about a minute on two CPU cores) and prints the command that rebuilds the tuned weights.
    """
    from . import embedded
    from .data import load_jsonl
    from .mzt import read_trajectory
    from .train import TrainConfig, relpath, train as run

    d = embedded.DEFAULTS
    if quiet:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    with _user_errors():
        default_train, default_eval = embedded.load_task()
        cfg = TrainConfig(
            model=model or embedded.MODEL_DIR,
            train_examples=load_jsonl(train_file) if train_file else default_train,
            eval_examples=load_jsonl(eval_file) if eval_file else ([] if train_file else default_eval),
            out=out, steps=steps or d["steps"], lr=lr or d["lr"], eps=eps or d["eps"],
            batch_size=batch_size or d["batch_size"], seed=d["seed"] if seed is None else seed,
            max_length=d["max_length"], prompt_key=prompt_key, completion_key=completion_key, dtype=dtype,
            noise=noise,
            eval_every=d.get("eval_every", 0) if eval_every is None else eval_every,
            overwrite=overwrite, device=_device(device))
        bars: list[tqdm] = []  # made at the first step, so model loading prints before it
        smooth: list[float] = []

        def on_step(step: int, loss: float, ev: float | None) -> None:
            if not bars:
                bars.append(tqdm(total=cfg.steps, desc="MeZO", unit="step", disable=quiet, dynamic_ncols=True))
            bar = bars[0]
            smooth.append(loss)
            post = {"loss": f"{sum(smooth[-20:]) / len(smooth[-20:]):.4f}"}
            if ev is not None:
                post["eval"] = f"{ev:.4f}"
                if quiet:
                    click.echo(f"step {step}: eval loss {ev:.4f}")
            bar.set_postfix(post, refresh=False)
            bar.update(1)

        try:
            result = run(cfg, on_step)
        finally:
            for bar in bars:
                bar.close()
    traj = read_trajectory(result.trajectory)
    if result.evals:
        (s0, e0), (s1, e1) = result.evals[0], result.evals[-1]
        click.echo(f"eval loss: {e0:.4f} at step {s0} -> {e1:.4f} at step {s1}")
    if result.interrupted:
        click.echo(f"interrupted: the trajectory holds the {traj.steps} steps done so far, with their fingerprint")
    click.echo(f"wrote {relpath(result.trajectory)}: {traj.steps} steps, {traj.file_bytes:,} bytes "
               f"({traj.bytes_per_step:.2f} bytes/step of step records)")
    tuned = result.trajectory.with_name(result.trajectory.stem + "-tuned")
    cmd = ["mezo-replay", "reconstruct", relpath(result.base), relpath(result.trajectory), "-o", relpath(tuned)]
    click.echo("rebuild the tuned weights with:\n  " + shlex.join(cmd))


# --- reconstruct / verify ------------------------------------------------------------------------

@main.command()
@click.argument("base", type=click.Path(path_type=Path, exists=True))
@click.argument("trajectory", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Output: a .safetensors file for a file base, a folder for a model-folder base.")
@click.option("--step", type=click.IntRange(0), help="Rebuild the checkpoint after this many steps.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto: same bits on any.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def reconstruct(base: Path, trajectory: Path, out: Path, step: int | None, device: str, overwrite: bool,
                quiet: bool) -> None:
    """Rebuild fine-tuned weights from BASE and a TRAJECTORY (.mzt).

    BASE is a .safetensors file or a model folder (model.safetensors, or shards with
    model.safetensors.index.json). A folder output keeps config and tokenizer files, so
    `from_pretrained(OUT)` loads it. The base is checked against the trajectory's fingerprints before
    use, and the result against the fingerprints recorded when training ended; nothing is written
    unless both match.
    """
    from . import replay

    with _user_errors():
        p = replay.plan(base, trajectory, step)
        if p.trajectory.truncated:
            click.echo(f"warning: {trajectory} is truncated; using its {p.trajectory.steps} complete steps",
                       err=True)
        with _element_bar(p.element_steps, "replay", quiet) as progress:
            written = replay.reconstruct(p, out, overwrite=overwrite, device=_device(device), progress=progress)
    status = ("verified against the trajectory's fingerprint" if p.expected is not None
              else "NOT verified: the trajectory records no fingerprint for this step")
    click.echo(f"wrote {written}: {len(p.names)} tuned tensors after {p.steps} steps, {status}")


@main.command()
@click.argument("base", type=click.Path(path_type=Path, exists=True))
@click.argument("trajectory", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.argument("tuned", type=click.Path(path_type=Path, exists=True), required=False)
@click.option("--step", type=click.IntRange(0), help="Check the checkpoint after this many steps.")
@click.option("--device", default="cpu", show_default=True, help="Device for the replay.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def verify(base: Path, trajectory: Path, tuned: Path | None, step: int | None, device: str, quiet: bool) -> None:
    """Check that BASE + TRAJECTORY give the recorded weights (exit 0) or not (exit 1).

    With TUNED (a .safetensors file or model folder) its tensors are checked instead of a replay.
    """
    from . import replay

    with _user_errors():
        p = replay.plan(base, trajectory, step)
        with _element_bar(p.element_steps, "verify", quiet) as progress:
            replay.verify(p, tuned, device=_device(device), progress=progress)
    what = f"{tuned}" if tuned else "the replay"
    click.echo(f"OK: {what} matches the trajectory's fingerprint after {p.steps} steps ({len(p.names)} tensors)")


# --- info ----------------------------------------------------------------------------------------

def summary(traj: Trajectory) -> dict[str, Any]:
    h = traj.header
    params = sum(math.prod(t["shape"]) for t in h["tensors"])
    out: dict[str, Any] = {
        "path": str(traj.path), "steps": traj.steps, "file_bytes": traj.file_bytes,
        "step_bytes": traj.step_bytes, "bytes_per_step": traj.bytes_per_step,
        "complete": traj.final_fingerprint is not None and not traj.truncated and traj.corrupt is None,
        "truncated": traj.truncated,
        "corrupt": None if traj.corrupt is None else vars(traj.corrupt),
        "fingerprint_steps": sorted(traj.fingerprints),
        "base": h["base"], "creator": h["creator"], "generator": h["generator"], "noise": h["noise"],
        "rule": h["rule"], "tensors": len(h["tensors"]), "parameters": params,
        "dtypes": sorted({t["dtype"] for t in h["tensors"]}), "metadata": h["metadata"],
    }
    if traj.losses is not None and traj.steps:
        k = max(1, traj.steps // 10)
        out["loss_first"] = float(traj.losses[:k].mean())
        out["loss_last"] = float(traj.losses[-k:].mean())
    return out


@main.command()
@click.argument("trajectory", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
def info(trajectory: Path, as_json: bool) -> None:
    """Summarise a trajectory (.mzt): steps, size, base, settings, damage.

    A truncated file is summarised with the steps that can be recovered; a corrupt one too, with exit
    status 1 and the damaged chunk named.
    """
    from .mzt import read_trajectory

    with _user_errors():
        traj = read_trajectory(trajectory, strict=False)
    s = summary(traj)
    if as_json:
        click.echo(json.dumps(s, indent=1))
    else:
        r = s["rule"]
        state = ("complete, final fingerprint recorded" if s["complete"] else
                 f"truncated: {s['steps']} steps recoverable" if s["truncated"] else
                 "corrupt" if s["corrupt"] else "no final fingerprint (training still running, or stopped hard)")
        lines = [
            f"{trajectory}: MeZO trajectory written by {s['creator']}",
            f"  steps      {s['steps']:,} ({state})",
            f"  size       {s['file_bytes']:,} bytes; step records {s['step_bytes']:,} bytes = "
            f"{s['bytes_per_step']:.2f} bytes/step",
            f"  base       {s['base']['source'] or '(source not recorded)'}"
            + (f" @ {s['base']['revision']}" if s["base"].get("revision") else ""),
            f"             fingerprint {s['base']['fingerprint']}",
            f"  tuned      {s['tensors']:,} tensors, {s['parameters']:,} parameters ({', '.join(s['dtypes'])})",
            f"  rule       {r['name']}: lr {r['lr']:.6g}, eps {r['eps']:.6g}, schedule {r['schedule']['name']} "
            f"(exact values: --json)",
            f"  noise      {s['noise']['name']} from {s['generator']['name']}, seed {s['generator']['seed']}",
        ]
        if "loss_first" in s:
            lines.append(f"  loss       {s['loss_first']:.4f} (first 10% of steps) -> {s['loss_last']:.4f} (last 10%)")
        lines += [f"  meta       {k}: {v}" for k, v in s["metadata"].items()]
        click.echo("\n".join(lines))
    if traj.corrupt is not None:
        c = traj.corrupt
        _fail(f"{trajectory}: chunk {c.index} ({c.type}) at byte offset {c.offset} is corrupt: {c.reason}; "
              f"{traj.steps} steps before it are recoverable")
