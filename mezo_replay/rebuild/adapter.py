"""PEFT adapters rebuilt from a trajectory alone (spec/output.md, *Adapter folder*).

A LoRA or prefix-tuning trajectory generates its tensors' starting values from its own seed
(spec/init.md), so it needs no base model to rebuild: the replayed tensors, under the names peft saves
them by, plus the adapter_config the header recorded, are a folder that `PeftModel.from_pretrained(base,
folder)` loads. The base is needed only to use the adapter, or to merge it (`merge`).

Outputs appear whole or not at all: everything is written to a temporary sibling and renamed into
place only after the last tensor matched its recorded fingerprint. Tensors are written as they come out
of the replay, so peak memory is about one tensor, and `rebuild_many` holds one trajectory at a time
whatever their number.
"""
from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import struct
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from . import replay
from ..errors import MezoReplayError, OutputExistsError, TrajectoryError
from ..format.fingerprint import DTYPE_NAMES
from ..format.mzt import Trajectory, fsync_dir, read_trajectory
from ..format.safetensors_io import replace_with

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CARD = "README.md"
TAGS = ["mezo-replay", "mezo", "zeroth-order", "peft"]
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}
_KIND_TAG = {"LORA": "lora", "PREFIX_TUNING": "prefix-tuning"}
# peft task types -> the transformers auto class that loads their base model
_AUTO_CLASS = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
               "TOKEN_CLS": "AutoModelForTokenClassification", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
               "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}

Progress = Callable[[int], None]


# --- what a trajectory is ------------------------------------------------------------------------

def is_adapter(traj: Trajectory) -> bool:
    """Whether the trajectory describes a PEFT adapter (a `peft` header key): it rebuilds into an
    adapter folder without a base."""
    return "peft" in traj.header


def peft_header(traj: Trajectory) -> dict[str, Any]:
    """The header's `peft` object, checked: the file is untrusted, and a bad one would otherwise surface
    as a peft traceback when the folder is loaded."""
    peft = traj.header.get("peft")
    where = f"{traj.path}: header 'peft'"
    if not isinstance(peft, dict):
        raise TrajectoryError(f"{where} must be an object")
    config = peft.get("adapter_config")
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise TrajectoryError(f"{where}: 'adapter_config' must be an object with a 'peft_type' string")
    if not (isinstance(peft.get("base_weights"), str) and _SHA256.fullmatch(peft["base_weights"])):
        raise TrajectoryError(f"{where}: 'base_weights' must be a sha256 in lower-case hex")
    if replay.needs_base(traj):
        raise TrajectoryError(f"{where}: every tuned tensor of an adapter needs an 'init', but "
                              f"{next(t['name'] for t in traj.header['tensors'] if not t.get('init'))!r} has none")
    return peft


def kind(traj: Trajectory) -> str:
    """'lora', 'prefix-tuning' (peft's own words, lower-cased) or 'full' for a trajectory of base weights."""
    if not is_adapter(traj):
        return "full"
    peft_type = str(peft_header(traj)["adapter_config"]["peft_type"])
    return _KIND_TAG.get(peft_type, peft_type.lower().replace("_", "-"))


def base_name(traj: Trajectory) -> str:
    """The recorded base as a user types it: `org/name@sha` or a path."""
    base = traj.header.get("base") or {}
    source = base.get("source") or "(not recorded)"
    return source + (f"@{base['revision']}" if base.get("revision") else "")


def needs_base_message(traj: Trajectory, shown: str, command: str = "reconstruct") -> str:
    """The refusal for a full-tuning trajectory given without its base, with the command to run."""
    from ..embedded import MODEL_NAME

    base = traj.header.get("base") or {}
    source = base.get("source")
    if source == MODEL_NAME:
        spelt = MODEL_NAME
    elif source and base.get("revision"):
        spelt = f"hf://{source}@{base['revision']}"
    else:
        spelt = source or "BASE"
    recorded = f"its base, {source}" + (f" at commit {base['revision']}" if base.get("revision") else "") \
        if source else "its base (whose source was not recorded)"
    tail = " -o OUT" if command == "reconstruct" else ""
    return (f"{shown} tunes the weights of {recorded}: give the base first, "
            f"`mezo-replay {command} {spelt} {shown}{tail}`")


def adapter_config(traj: Trajectory) -> dict[str, Any]:
    """adapter_config.json: the recorded config, with the base filled in from `base.source`/`revision`
    and inference_mode true, as peft's own save_pretrained writes it."""
    config = dict(peft_header(traj)["adapter_config"])
    base = traj.header["base"]
    config["base_model_name_or_path"] = base.get("source")
    config["revision"] = base.get("revision")
    config["inference_mode"] = True
    return config


# --- atomic outputs ------------------------------------------------------------------------------

def _looks_replaceable(d: Path) -> bool:
    """--overwrite replaces a whole folder: only one that is clearly a model or adapter output."""
    names = [p.name for p in d.iterdir()]
    return not names or any(n in (ADAPTER_CONFIG, "config.json") or n.endswith(".safetensors") for n in names)


def check_output(out: Path, *, overwrite: bool, folder: bool) -> None:
    """Refuses an output that exists (unless `overwrite`), whose parent is missing, or that is of the
    other kind: before any work, so a refusal costs nothing."""
    if not out.parent.is_dir():
        raise MezoReplayError(f"{out}: parent directory {out.parent} does not exist")
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    if out.is_dir() != folder:
        raise MezoReplayError(f"{out} exists and is a {'folder' if out.is_dir() else 'file'}; refusing to replace it "
                              f"with a {'folder' if folder else 'file'}")
    if folder and not _looks_replaceable(out):
        raise MezoReplayError(f"{out}: refusing to overwrite a non-empty folder that holds no adapter_config.json, "
                              f"config.json or *.safetensors")


@contextmanager
def atomic_output(out: Path, *, overwrite: bool, folder: bool) -> Iterator[Path]:
    """A temporary sibling of `out` to write into, renamed onto `out` when the block ends normally and
    removed when it raises (Ctrl-C included)."""
    check_output(out, overwrite=overwrite, folder=folder)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        for f in (tmp.iterdir() if folder else [tmp]):
            fsync_dir(f)
        fsync_dir(tmp)
        replace_with(tmp, out, overwrite)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            tmp.unlink()
        raise
    fsync_dir(out.parent)


# --- writing -------------------------------------------------------------------------------------

def _safetensors_header(entries: Sequence[dict[str, Any]], metadata: dict[str, str]) -> bytes:
    """spec/output.md: compact JSON, __metadata__ first, tensors in header order with contiguous data,
    padded with spaces to a multiple of 8 bytes."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for t in entries:
        size = math.prod(t["shape"]) * _ITEMSIZE[t["dtype"]]
        header[t["name"]] = {"dtype": t["dtype"], "shape": list(t["shape"]), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write_tensors(path: Path, p: replay.ReplayPlan, metadata: dict[str, str], device: str | torch.device,
                   progress: Progress | None) -> None:
    """Streams the replayed tensors into one safetensors file, each as it is verified."""
    entries = p.trajectory.header["tensors"]
    with open(path, "xb") as f:
        f.write(_safetensors_header(entries, metadata))
        index = 0
        for name, w in replay.replayed(p, device, progress):  # no zip(): it would keep the last tensor alive
            assert name == entries[index]["name"] and w.dtype == DTYPE_NAMES[entries[index]["dtype"]]
            f.write(w.contiguous().reshape(-1).view(torch.uint8).numpy())
            del w
            index += 1


def _metadata(p: replay.ReplayPlan) -> dict[str, str]:
    meta = {"format": "pt", "mezo_replay.steps": str(p.steps),
            "mezo_replay.base_fingerprint": p.trajectory.header["base"]["fingerprint"]}
    if is_adapter(p.trajectory):
        meta["mezo_replay.base_weights"] = peft_header(p.trajectory)["base_weights"]
    return meta


def shown_path(text: str) -> str:
    """A path as a card may show it: an absolute local path cut to its last part (the writer's
    directory layout means nothing to readers of a shared folder, and is not theirs to see)."""
    if PurePosixPath(text).is_absolute() or re.match(r"[A-Za-z]:[\\/]", text):
        return re.split(r"[\\/]", text.rstrip("/\\"))[-1] or text
    return text


def plan(traj: Trajectory, step: int | None, unverified: bool, shown: str) -> replay.ReplayPlan:
    """The replay of a trajectory that needs no base, refused (one line, naming the base and the command
    to run) for one that does; `unverified` lets a step without a recorded fingerprint through."""
    if replay.needs_base(traj):
        raise MezoReplayError(needs_base_message(traj, shown))
    if is_adapter(traj):
        peft_header(traj)
    p = replay.plan(None, traj, step)
    if not unverified:
        p.require_fingerprint()
    return p


def write_adapter(trajectory: str | os.PathLike[str] | Trajectory, out: str | os.PathLike[str], *,
                  step: int | None = None, overwrite: bool = False, unverified: bool = False,
                  device: str | torch.device = "cpu", progress: Progress | None = None,
                  rebuild_from: str | None = None) -> Path:
    """Rebuilds a trajectory that needs no base: a PEFT one into an adapter folder (adapter_config.json,
    adapter_model.safetensors, README.md), any other into one .safetensors file of its tuned tensors
    (`out` must then end in .safetensors). `rebuild_from` is how the card names the trajectory in its
    rebuild command (default: the file's name). Returns `out`."""
    traj = trajectory if isinstance(trajectory, Trajectory) else read_trajectory(trajectory)
    shown = shown_path(rebuild_from or traj.path.name)
    out = Path(out)
    p = plan(traj, step, unverified, shown)
    check_kind(traj, out)
    return _write(p, out, overwrite=overwrite, device=device, progress=progress, shown=shown)


def check_kind(traj: Trajectory, out: Path) -> None:
    """A base-less trajectory that is no adapter (e.g. a spec vector) has no adapter_config to write, and no
    model config either: its tensors go into one plain .safetensors file, named so."""
    if not is_adapter(traj) and out.suffix != ".safetensors":
        raise MezoReplayError(f"{out}: {traj.path.name} is not a PEFT adapter, so it rebuilds into one "
                              f".safetensors file of its tuned tensors: name the output *.safetensors")
    if is_adapter(traj) and out.suffix == ".safetensors":
        raise MezoReplayError(f"{out}: {traj.path.name} is a PEFT adapter, which rebuilds into a folder "
                              f"(adapter_config.json, adapter_model.safetensors): name the output without .safetensors")


def _write(p: replay.ReplayPlan, out: Path, *, overwrite: bool, device: str | torch.device,
           progress: Progress | None, shown: str) -> Path:
    traj = p.trajectory
    if not is_adapter(traj):
        with atomic_output(out, overwrite=overwrite, folder=False) as tmp:
            _write_tensors(tmp, p, _metadata(p), device, progress)
        return out
    config = adapter_config(traj)
    with atomic_output(out, overwrite=overwrite, folder=True) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / CARD).write_text(adapter_card(traj, p.steps, shown, out.name), encoding="utf-8")
        _write_tensors(tmp / ADAPTER_WEIGHTS, p, _metadata(p), device, progress)
    return out


def many_target(out_dir: Path, path: Path, adapter: bool) -> Path:
    """Where `rebuild_many` puts one trajectory's output: `<stem>/`, or `<stem>.safetensors` for no adapter."""
    return out_dir / (path.stem if adapter else path.stem + ".safetensors")


def rebuild_many(trajectories: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str], *,
                 step: int | None = None, overwrite: bool = False, unverified: bool = False,
                 device: str | torch.device = "cpu", progress: Progress | None = None,
                 on_total: Callable[[int], None] | None = None,
                 on_done: Callable[[Path, Path, replay.ReplayPlan], None] | None = None,
                 names: Sequence[str] | None = None) -> list[Path]:
    """One output per trajectory in `out_dir` (made if missing): `<stem>/` for an adapter,
    `<stem>.safetensors` otherwise, rebuilt one at a time.

    Every input is read and checked first (readable, base-less, step and fingerprint, output free,
    no two with one stem), then dropped, so a mistake in the last file costs no work and at most one
    trajectory is held in memory whatever their number. `on_total` gets the element-steps of all of
    them before the first replay (one progress bar for the lot); `on_done` gets (trajectory, output,
    plan) after each. `names` are the trajectories as the user spelt them (hf:// references), for
    messages and cards. A failure midway leaves the outputs already finished (each complete and
    verified) and nothing of the one that failed."""
    paths = [Path(t) for t in trajectories]
    shown = [shown_path(n) for n in names] if names is not None else [p.name for p in paths]
    out_dir = Path(out_dir)
    seen: dict[str, str] = {}
    for path, given in zip(paths, shown):
        if (stem := path.stem) in seen:
            raise MezoReplayError(f"two trajectories would write {out_dir / stem}: {seen[stem]} and {given} (each "
                                  f"output is named after its file's stem): rename one, or rebuild them in "
                                  f"separate calls")
        seen[stem] = given
    if out_dir.exists() and not out_dir.is_dir():
        raise MezoReplayError(f"{out_dir} exists and is not a folder: with several trajectories -o names the "
                              f"folder that gets one output each")
    if not out_dir.parent.is_dir():
        raise MezoReplayError(f"{out_dir}: parent directory {out_dir.parent} does not exist")
    total = 0
    for path, given in zip(paths, shown):
        traj = read_trajectory(path)
        total += plan(traj, step, unverified, given).element_steps
        if out_dir.is_dir():
            check_output(many_target(out_dir, path, is_adapter(traj)), overwrite=overwrite, folder=is_adapter(traj))
        del traj
    if on_total is not None:
        on_total(total)
    out_dir.mkdir(exist_ok=True)
    done = []
    for path, given in zip(paths, shown):
        traj = read_trajectory(path)
        p = plan(traj, step, unverified, given)
        target = _write(p, many_target(out_dir, path, is_adapter(traj)), overwrite=overwrite, device=device,
                        progress=progress, shown=given)
        if on_done is not None:
            on_done(path, target, p)
        done.append(target)
        del traj, p
    return done


def checked_output(traj: Trajectory, given: Path) -> Path:
    """The weights file of an output `verify` is to check: an adapter folder's adapter_model.safetensors,
    once its adapter_config.json is the one a rebuild writes (base name and revision aside: a user may
    point those at a local copy), or the .safetensors file itself."""
    if not given.is_dir():
        return given
    if not is_adapter(traj):
        raise MezoReplayError(f"{given} is a folder; {traj.path.name} rebuilds into one .safetensors file")
    try:
        found = json.loads((given / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MezoReplayError(f"{given}: no {ADAPTER_CONFIG}, so not an adapter folder") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise MezoReplayError(f"{given / ADAPTER_CONFIG} is not valid JSON: {e}") from None
    want = adapter_config(traj)
    ignored = ("base_model_name_or_path", "revision")
    if not isinstance(found, dict):
        raise MezoReplayError(f"{given / ADAPTER_CONFIG} is not a JSON object")
    differ = sorted(k for k in set(found) | set(want) if k not in ignored and found.get(k) != want.get(k))
    if differ:
        raise MezoReplayError(f"{given / ADAPTER_CONFIG} differs from the trajectory's adapter config in "
                              f"{', '.join(differ[:5])}{', ...' if len(differ) > 5 else ''}")
    return given / ADAPTER_WEIGHTS


# --- the card ------------------------------------------------------------------------------------

def auto_class(traj: Trajectory, base: Path | None = None) -> str:
    """The transformers class that loads the adapter's base: the tuned model's architecture when the
    header has its config, else the base folder's own (when there is one to look at), else by peft task
    type; a task-less adapter is a masked LM's when its template has a {mask} (label words on BERT)."""
    configs = [traj.header.get("config")]
    if base is not None:
        try:
            configs.append(json.loads((base / "config.json").read_text(encoding="utf-8")))
        except (OSError, ValueError):
            pass
    for config in configs:
        arch = ((config if isinstance(config, dict) else {}).get("architectures") or [None])[0]
        if isinstance(arch, str) and re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", arch):
            return arch
    task = peft_header(traj)["adapter_config"].get("task_type")
    if isinstance(task, str):
        return _AUTO_CLASS.get(task, "AutoModelForCausalLM")
    masked = "{mask}" in str((traj.header.get("metadata") or {}).get("template", ""))
    return "AutoModelForMaskedLM" if masked else "AutoModelForCausalLM"


def load_code(traj: Trajectory, folder: str) -> list[str]:
    """Python that loads the adapter folder on its base, for cards."""
    from ..embedded import MODEL_NAME
    from ..hub.publish import base_on_hub

    base = traj.header["base"]
    cls = auto_class(traj)
    hub_id, sha = base_on_hub(traj.header)
    if base.get("source") == MODEL_NAME:
        lines = ["from mezo_replay.embedded import MODEL_DIR  # the demo model inside the mezo-replay package",
                 f"base = {cls}.from_pretrained(MODEL_DIR)"]
    elif hub_id is not None:
        lines = [f"base = {cls}.from_pretrained({hub_id!r}" + (f", revision={sha!r})" if sha else ")")]
    else:
        lines = [f"base = {cls}.from_pretrained({(base.get('source') and shown_path(base['source'])) or 'BASE'!r})"
                 "  # the base model's folder"]
    return ["from peft import PeftModel", f"from transformers import {cls}", *lines,
            f"model = PeftModel.from_pretrained(base, {folder!r})"]


def adapter_card(traj: Trajectory, steps: int, rebuild_from: str, folder: str) -> str:
    """README.md of an adapter folder: Hub metadata naming the base, how to load it and how it was built."""
    from huggingface_hub import ModelCardData

    from ..embedded import MODEL_NAME
    from ..hub.publish import base_on_hub

    hub_id, sha = base_on_hub(traj.header)
    k = kind(traj)
    relation = {"base_model_relation": "adapter"} if hub_id else {}
    data = ModelCardData(base_model=hub_id, library_name="peft", tags=[*TAGS, k], **relation)
    source = traj.header["base"].get("source")
    base_text = (f"[{hub_id}](https://huggingface.co/{hub_id})" + (f" at commit `{sha}`" if sha else "")
                 if hub_id else f"`{MODEL_NAME}` (the demo model inside the mezo-replay package)"
                 if source == MODEL_NAME else f"`{shown_path(source)}`" if source else "a base whose source was "
                 "not recorded")
    body = [
        f"# {folder}: a MeZO {k} adapter", "",
        f"A PEFT {k} adapter for {base_text}, fine-tuned with MeZO (forward passes only) and rebuilt by "
        f"[mezo-replay](https://pypi.org/project/mezo-replay/) from the trajectory `{rebuild_from}` after "
        f"{steps:,} steps. Its tensors are bit for bit the ones training reached, checked against the "
        f"fingerprints the trajectory recorded.", "",
        "## Load", "", "```python", *load_code(traj, folder), "```", "",
        "## Rebuild", "", "The trajectory alone rebuilds this folder (no base model needed):", "",
        "```bash", f"mezo-replay reconstruct {rebuild_from} -o {folder}", "```", "",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)


# --- merging -------------------------------------------------------------------------------------

def check_merge_base(traj: Trajectory, base: str | os.PathLike[str]) -> Path:
    """The base folder to merge into, refused unless its weights are the ones the adapter was trained on."""
    from ..format.safetensors_io import BaseCheckpoint

    folder = Path(base)
    if not (folder / "config.json").is_file():
        raise MezoReplayError(f"--merge {base}: a model folder with config.json is needed (the merged model is "
                              f"loaded and saved by transformers)")
    want = peft_header(traj)["base_weights"]
    got = BaseCheckpoint.open(folder).weights_fingerprint()
    if got != want:
        raise MezoReplayError(f"--merge {base}: not the model this adapter was trained on: its weights fingerprint "
                              f"is {got}, the trajectory's (base {base_name(traj)}) is {want}")
    return folder


def check_mergeable(traj: Trajectory) -> None:
    """Only a LoRA adapter is a weight change peft can fold into its base."""
    if not is_adapter(traj):
        raise MezoReplayError(f"--merge is for PEFT adapter trajectories; {traj.path.name} tunes the base's own "
                              f"weights: rebuild it with `mezo-replay reconstruct BASE {traj.path.name} -o OUT`")
    if kind(traj) != "lora":
        raise MezoReplayError(f"--merge: a {kind(traj)} adapter adds virtual tokens, not a weight change, so it "
                              f"cannot be merged into the base; load the adapter folder with PeftModel instead")


def merge(trajectory: str | os.PathLike[str] | Trajectory, base: str | os.PathLike[str],
          out: str | os.PathLike[str], *, step: int | None = None, overwrite: bool = False,
          unverified: bool = False, device: str | torch.device = "cpu", progress: Progress | None = None) -> Path:
    """The full model with the adapter merged in by peft (PeftModel.from_pretrained + merge_and_unload +
    save_pretrained, safetensors), its config and tokenizer files beside it, written atomically to `out`.
    Not bitwise equal to the adapter's own forward pass: merging rounds W + scaling * B @ A once into
    the weight's dtype, where the adapter adds scaling * (x A^T) B^T to x W^T."""
    traj = trajectory if isinstance(trajectory, Trajectory) else read_trajectory(trajectory)
    out = Path(out)
    check_mergeable(traj)
    plan(traj, step, unverified, traj.path.name)
    check_output(out, overwrite=overwrite, folder=True)
    folder = check_merge_base(traj, base)
    import transformers
    from peft import PeftModel

    from ..training.train import DTYPES

    # the dtype the base was trained in (peft keeps the adapter itself in float32 on a bf16 model)
    dtype = DTYPES.get((traj.header.get("metadata") or {}).get("dtype", ""),
                       DTYPE_NAMES[traj.header["tensors"][0]["dtype"]])
    cls = getattr(transformers, auto_class(traj, folder), None) or transformers.AutoModelForCausalLM
    with tempfile.TemporaryDirectory(prefix="mezo-replay-adapter-") as work:
        adapter = write_adapter(traj, Path(work) / "adapter", step=step, unverified=unverified, device=device,
                                progress=progress)
        tuned = traj.header.get("config")  # the tuned model's own config (a classifier's labels), if recorded
        config = {} if tuned is None else {"config": transformers.AutoConfig.for_model(**tuned)}
        with warnings.catch_warnings():  # deprecation notices of transformers/peft internals: not the user's
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            model = cls.from_pretrained(folder, dtype=dtype, **config)
            merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        with atomic_output(out, overwrite=overwrite, folder=True) as tmp:
            merged.save_pretrained(tmp)
            for f in _carried(folder):
                if not (tmp / f.name).exists():
                    shutil.copyfile(f, tmp / f.name)
    return out


def _carried(folder: Path) -> Iterable[Path]:
    """Tokenizer and other loader files of the base folder: not its weights, config or card."""
    from ..format.safetensors_io import BaseCheckpoint

    return [f for f in BaseCheckpoint.open(folder).aux_files() if f.name not in (CARD, "config.json")]
