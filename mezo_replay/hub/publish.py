"""Publishing a trajectory on the Hugging Face Hub, the way a PEFT adapter is published.

A `.mzt` file is useless without its base model, so it goes up with a model card whose metadata names
the base (`base_model`, `base_model_relation: adapter`) and whose body says how to rebuild the weights:

    url = push_to_hub("run.mzt", "me/tiny-gpt2-sst2")            # run.mzt + README.md at the root
    push_to_hub("run.mzt", "me/runs", path_in_repo="alice/run.mzt")  # alice/README.md; a root card if none
    push_to_hub("run.mzt", "me/runs", plot=True)  # + run-curves.png beside it, shown on the card

Everything happens in one commit. Hub failures (not logged in, no write access, offline) become one-line
MezoReplayError messages. huggingface_hub honours HF_TOKEN, HF_HOME, HF_ENDPOINT and HF_HUB_OFFLINE.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData

from ..rebuild.adapter import load_code, is_adapter, kind, peft_header
from ..embedded import MODEL_NAME as EMBEDDED_MODEL
from ..errors import MezoReplayError
from ..format.mzt import Trajectory, read_trajectory
from ..format.storage import storage

TAGS = ["mezo-replay", "mezo", "zeroth-order", "trajectory"]
NOT_LOGGED_IN = "not logged in: run `hf auth login` or set HF_TOKEN"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_NAME_ONLY = re.compile(r"[A-Za-z0-9][\w.-]*")
_SHA = re.compile(r"[0-9a-f]{40}")
_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}
_MEZO_PAPER = "https://arxiv.org/abs/2305.17333"
_PROJECT = "https://pypi.org/project/mezo-replay/"


# --- the card ------------------------------------------------------------------------------------

def base_on_hub(header: dict[str, Any]) -> tuple[str | None, str | None]:
    """(repo id, commit sha) of the base when it came from the Hub, else (None, None).

    The repo id comes from metadata `base_model` (minus `@revision`), else from `base.source`. It counts
    as a Hub id when it has the form org/name and either a commit sha was recorded (only a Hub snapshot
    gets one) or no such local path exists; a bare name (`gpt2`) counts only with a commit sha.
    """
    base = header.get("base") or {}
    meta = header.get("metadata") or {}
    named = meta.get("base_model") or base.get("source")
    if not isinstance(named, str) or not named:
        return None, None
    repo, _, at = named.partition("@")
    sha = base.get("revision") if isinstance(base.get("revision"), str) else None
    if sha is None and _SHA.fullmatch(at):
        sha = at
    pinned = sha is not None and _SHA.fullmatch(sha) is not None
    if ".." in repo or repo.endswith(".safetensors"):
        return None, None
    if _REPO_ID.fullmatch(repo) and (pinned or not Path(repo).exists()):
        return repo, sha
    if _NAME_ONLY.fullmatch(repo) and pinned:
        return repo, sha
    return None, None


def human_bytes(n: int) -> str:
    """Decimal units, as the Hub shows sizes: 873 bytes, 8.9 kB, 2.5 MB, 124 GB."""
    if n < 1000:
        return f"{n} bytes"
    value = float(n)
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        value /= 1000.0
        if value < 999.95 or unit == "PB":
            return f"{value:.1f} {unit}" if value < 99.95 else f"{value:.0f} {unit}"
    raise AssertionError


def tuned_bytes(header: dict[str, Any]) -> int:
    """Size of the tuned tensors as weights: sum of element count x item size."""
    return sum(math.prod(t["shape"]) * _ITEMSIZE[t["dtype"]] for t in header["tensors"])


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _number(x: float) -> str:
    return f"{x:.6g}"


def _rule_text(rule: dict[str, Any]) -> str:
    sched = rule.get("schedule") or {}
    text = (f"{rule['name']}: lr {_number(rule['lr'])}, eps {_number(rule['eps'])}, "
            f"{sched.get('name', 'constant')} schedule")
    if sched.get("total_steps"):
        text += f" over {sched['total_steps']:,} steps"
    if sched.get("warmup_steps"):
        text += f", {sched['warmup_steps']:,} warmup steps"
    text += f", weight decay {_number(rule['weight_decay'])}" if rule.get("weight_decay") else ", no weight decay"
    return text


def _last_evals(traj: Trajectory) -> list[dict[str, Any]]:
    last: dict[str, dict[str, Any]] = {}
    for e in traj.evals:
        last.pop(e["split"], None)  # keeps the order of the latest results
        last[e["split"]] = e
    return list(last.values())


def _eval_table(evals: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for e in evals:
        names += [k for k in e["metrics"] if k not in names]
    lines = ["| split | step | " + " | ".join(_cell(n) for n in names) + " |",
             "|---|---:|" + "---:|" * len(names)]
    for e in evals:
        values = [f"{e['metrics'][n]:.4g}" if n in e["metrics"] else "" for n in names]
        lines.append(f"| {_cell(e['split'])} | {e['step']:,} | " + " | ".join(values) + " |")
    return lines


def _shown_source(source: object) -> str | None:
    """The base's recorded source as a public card may show it: an absolute local path is cut to its last
    part, since the trainer's directory layout means nothing to readers and is not theirs to see."""
    if not isinstance(source, str) or not source:
        return None
    if PurePosixPath(source).is_absolute() or re.match(r"[A-Za-z]:[\\/]", source):
        return re.split(r"[\\/]", source.rstrip("/\\"))[-1] or source
    return source


def _chart_section(chart: str | None, name: str) -> list[str]:
    """The card's picture of the run: `chart` is the chart's file name beside the card (a relative link,
    which the Hub resolves in the card's folder)."""
    if chart is None:
        return []
    from ..plot import CAPTION

    return ["## Training curves", "", f"![Training loss and evaluations of {name}]({chart})", "",
            f"Recorded in the trajectory and drawn by `mezo-replay info {name} --plot {chart}`. {CAPTION}", ""]


def model_card(traj: Trajectory, *, path_in_repo: str, repo_id: str, chart: str | None = None) -> ModelCard:
    """The card of one trajectory: Hub metadata naming the base, what the file is, and how to rebuild;
    with `chart`, the file name of its training-curves image beside the card, shown in it."""
    h = traj.header
    base = h.get("base") or {}
    meta = h.get("metadata") or {}
    hub_id, sha = base_on_hub(h)
    name = PurePosixPath(path_in_repo).name
    relation = {"base_model_relation": "adapter"} if hub_id else {}  # an adapter of nothing named: omitted
    data = ModelCardData(base_model=hub_id, library_name="mezo-replay", tags=list(TAGS), **relation)

    source = _shown_source(base.get("source"))
    embedded = source == EMBEDDED_MODEL
    if hub_id is not None:
        base_link = f"[{hub_id}](https://huggingface.co/{hub_id})"
        base_cell = base_link + (f" at commit `{sha}`" if sha else " (commit not recorded)")
        title = f"# {PurePosixPath(name).stem}: a MeZO fine-tune of {hub_id}"
    elif embedded:
        base_link = f"`{EMBEDDED_MODEL}` (the tiny demo model inside the mezo-replay package)"
        base_cell = base_link
        title = f"# {PurePosixPath(name).stem}: a MeZO fine-tune of mezo-replay's demo model"
    else:
        base_link = f"`{source}`" if source else "a base model whose source was not recorded"
        base_cell = (f"`{_cell(source)}`" if source else "not recorded") + " (not a Hub repo)"
        title = f"# {PurePosixPath(name).stem}: a MeZO fine-tune"
    dtypes = ", ".join(sorted({t["dtype"] for t in h["tensors"]}))
    params = sum(math.prod(t["shape"]) for t in h["tensors"])
    gen, noise = h["generator"], h["noise"]
    sizes = storage(traj)
    stored = ", ".join(f"{kind} {n:,}" for kind, n in sizes.by_kind.items())
    rows = [
        ("Base model", base_cell),
        ("Base fingerprint", f"`{base.get('fingerprint')}`"),
        ("Steps", f"{traj.steps:,}"),
        ("File size", f"{human_bytes(traj.file_bytes)} instead of {human_bytes(tuned_bytes(h))} of tuned weights "
                      f"({len(h['tensors']):,} tensors, {params:,} parameters, {dtypes})"),
        ("Bytes per step", f"{sizes.file_bytes_per_step:.2f} for the whole file; {traj.bytes_per_step:.2f} of step "
                           f"records"),
        ("Stored (bytes)", stored + ("" if h["records"]["losses"] else "; per-step losses left out")),
        ("Update rule", _rule_text(h["rule"])),
        ("Noise", f"{noise['name']} from {gen['name']}, seed {gen['seed']}"),
    ]
    rows += [(label, _cell(meta[key])) for key, label in
             (("task", "Task"), ("objective", "Objective"), ("batch_size", "Batch size")) if meta.get(key)]
    rows.append(("Written by", _cell(h.get("creator", "?"))))

    url = f"hf://{repo_id}/{path_in_repo}"
    if is_adapter(traj):
        return _adapter_card(traj, data, rows, url, name, hub_id, sha, base_link, embedded, chart)
    if hub_id is not None:
        cmd = f"mezo-replay reconstruct hf://{hub_id}{'@' + sha if sha else ''} {url} -o tuned"
        how = ("This downloads the base, replays every step and checks the result against the fingerprint "
               "recorded when training ended; `tuned` is then a model folder that `from_pretrained(\"tuned\")` "
               "loads.")
    elif embedded:
        cmd = f"mezo-replay reconstruct {EMBEDDED_MODEL} {url} -o tuned"
        how = ("The base ships inside the mezo-replay package, so nothing else is downloaded; the result is "
               "checked against the fingerprint recorded when training ended.")
    else:
        cmd = f"mezo-replay reconstruct BASE {url} -o tuned"
        how = (f"The base is not on the Hub: obtain it ({base_link}) and pass its model folder or .safetensors "
               f"file as BASE. It must match the base fingerprint above; the result is checked against the "
               f"fingerprint recorded when training ended.")
    body = [
        title, "",
        f"`{name}` is not a set of weights but a [MeZO]({_MEZO_PAPER}) trajectory: with the base model "
        f"{base_link} it is the whole fine-tune, stored as the training settings plus one record per step "
        f"({human_bytes(traj.file_bytes)} in all, {sizes.file_bytes_per_step:.1f} bytes per step). "
        f"[mezo-replay]({_PROJECT}) replays it bit-exactly, on CPU or GPU, into the tuned weights.", "",
        "| | |", "|---|---|",
        *(f"| {label} | {value} |" for label, value in rows), "",
    ]
    evals = _last_evals(traj)
    if evals:
        body += ["## Evaluation", "", *_eval_table(evals), ""]
    body += _chart_section(chart, name)
    body += ["## Rebuild the weights", "", "```bash", "pip install mezo-replay", cmd, "```", "", how, ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def _listed(value: object) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _adapter_card(traj: Trajectory, data: ModelCardData, rows: list[tuple[str, str]], url: str, name: str,
                  hub_id: str | None, sha: str | None, base_link: str, embedded: bool,
                  chart: str | None = None) -> ModelCard:
    """The card of a PEFT trajectory: it rebuilds with no base into an adapter folder, which then loads on
    the base named in the metadata."""
    k = kind(traj)
    data.tags = [*TAGS, "peft", k]
    config = peft_header(traj)["adapter_config"]
    rows.insert(1, ("Adapter", f"peft {_cell(config.get('peft_type'))}, "
                               + ", ".join(f"{key} {_cell(_listed(config[key]))}" for key in
                                           ("r", "lora_alpha", "target_modules", "num_virtual_tokens", "task_type")
                                           if config.get(key) is not None)))
    rows.insert(2, ("Base weights fingerprint", f"`{peft_header(traj)['base_weights']}` (checked by `--merge`)"))
    folder = PurePosixPath(name).stem + "-adapter"
    of = f"of {hub_id}" if hub_id else "of mezo-replay's demo model" if embedded else ""
    body = [
        f"# {PurePosixPath(name).stem}: a MeZO {k} adapter {of}".rstrip(), "",
        f"`{name}` is a [MeZO]({_MEZO_PAPER}) trajectory of a PEFT {k} adapter for {base_link}: the training "
        f"settings plus one record per step ({human_bytes(traj.file_bytes)} in all, "
        f"{storage(traj).file_bytes_per_step:.1f} bytes per step); the adapter's starting values are drawn from "
        f"its seed. [mezo-replay]({_PROJECT}) rebuilds it, bit-exactly and without the base model, into an "
        f"adapter folder that peft loads.", "",
        "| | |", "|---|---|", *(f"| {label} | {value} |" for label, value in rows), "",
    ]
    evals = _last_evals(traj)
    if evals:
        body += ["## Evaluation", "", *_eval_table(evals), ""]
    body += _chart_section(chart, name)
    body += ["## Rebuild the adapter", "", "```bash", "pip install mezo-replay peft",
             f"mezo-replay reconstruct {url} -o {folder}", "```", "",
             "The result is checked against the fingerprint recorded when training ended. Then load it on its base:",
             "", "```python", *load_code(traj, folder), "```", ""]
    if hub_id is not None:
        body += ["Or merge it into the base (the base's weights are checked first):", "", "```bash",
                 f"mezo-replay reconstruct {url} --merge hf://{hub_id}{'@' + sha if sha else ''} -o merged", "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def root_card(repo_id: str) -> ModelCard:
    """The card of a repo that holds trajectories in folders, each with its own README.md."""
    data = ModelCardData(library_name="mezo-replay", tags=list(TAGS))
    body = (f"# {repo_id.split('/')[-1]}\n\n"
            f"This repository holds [MeZO]({_MEZO_PAPER}) fine-tunes stored as [mezo-replay]({_PROJECT}) "
            f"trajectories (`.mzt` files), one per folder. Each folder's README.md names the trajectory's base "
            f"model and gives the command that rebuilds the tuned weights:\n\n"
            f"```bash\npip install mezo-replay\n"
            f"mezo-replay reconstruct hf://BASE_REPO@SHA hf://{repo_id}/FOLDER/FILE.mzt -o tuned\n"
            f"mezo-replay reconstruct hf://{repo_id}/FOLDER/FILE.mzt -o adapter   # a PEFT (LoRA, prefix) "
            f"trajectory: no base\n```\n")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


# --- pushing -------------------------------------------------------------------------------------

def _token_known(token: str | None) -> bool:
    """Whether a token was sent (given, HF_TOKEN, or a stored login), without any network call."""
    from huggingface_hub import constants

    return bool(token or os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
                or Path(constants.HF_TOKEN_PATH).is_file())


def _first_line(text: object, limit: int = 200) -> str:
    lines = [s.strip() for s in str(text).splitlines() if s.strip()]
    line = lines[0] if lines else type(text).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _connection_errors() -> tuple[type[BaseException], ...]:
    """ConnectionError (OfflineModeIsEnabled is one) and the transport errors of the installed HTTP clients."""
    found: list[type[BaseException]] = [ConnectionError]
    for module in ("httpx2", "httpx", "requests"):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        for attr in ("TransportError", "ConnectionError", "Timeout"):
            cls = getattr(mod, attr, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                found.append(cls)
    return tuple(found)


def _hub_error(e: BaseException, repo_id: str, token: str | None) -> MezoReplayError | None:
    """The one-line message for a huggingface_hub failure, or None for an error that is not the Hub's."""
    from huggingface_hub.errors import (HfHubHTTPError, HFValidationError, LocalTokenNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError)

    if isinstance(e, LocalTokenNotFoundError):
        return MezoReplayError(NOT_LOGGED_IN)
    if isinstance(e, OfflineModeIsEnabled):
        return MezoReplayError(f"cannot push to {repo_id}: the Hub cannot be reached (HF_HUB_OFFLINE is set)")
    if isinstance(e, HFValidationError):
        return MezoReplayError(f"{repo_id!r} is not a valid Hub repo id (namespace/name): {_first_line(e)}")
    if isinstance(e, HfHubHTTPError):
        response = getattr(e, "response", None)
        status = getattr(response, "status_code", None)
        detail = _first_line(getattr(e, "server_message", None) or e)
        if status == 401 and not _token_known(token):
            return MezoReplayError(NOT_LOGGED_IN)
        if isinstance(e, RepositoryNotFoundError):
            return MezoReplayError(f"repository {repo_id} was not found and could not be created: check the "
                                   f"namespace, and that your token may write to it ({status})")
        if status == 401:
            return MezoReplayError("the Hub rejected the token (401): it is invalid or expired; run "
                                   "`hf auth login` or set HF_TOKEN")
        if status == 403:
            return MezoReplayError(f"no write access to {repo_id} (403): the token is read-only, or the namespace "
                                   f"{repo_id.split('/')[0]!r} is not yours or an organization you can write to")
        return MezoReplayError(f"the Hub refused to push to {repo_id} ({status or 'error'}): {detail}")
    if isinstance(e, _connection_errors()):
        return MezoReplayError(f"cannot push to {repo_id}: the Hub cannot be reached (no network?): {_first_line(e)}")
    return None


def _validated(path: Path) -> tuple[Trajectory, bytes]:
    """The trajectory and its exact bytes, refusing anything a replay could not use to the end."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MezoReplayError(f"{path}: cannot read: {e.strerror or e}") from None
    traj = read_trajectory(path, strict=True)  # corrupt or unsupported: a one-line TrajectoryError
    if traj.truncated:
        raise MezoReplayError(f"{path} is truncated (the file ends inside a chunk, after {traj.steps} complete "
                              f"steps): refusing to publish a damaged trajectory")
    if traj.final_fingerprint is None:
        raise MezoReplayError(f"{path} has no final fingerprint (training is still running or stopped before "
                              f"closing the file): only a finished trajectory can be published")
    if len(data) != traj.file_bytes or traj.valid_bytes != traj.file_bytes:
        raise MezoReplayError(f"{path} changed while it was read: is training still writing to it?")
    return traj, data


def repo_path(path_in_repo: str | None, file_name: str) -> str:
    """Where the trajectory goes in the repo: `path_in_repo` checked (relative, not the card), a trailing
    / keeping the file's name; the file's name at the root without it."""
    if path_in_repo is None:
        return file_name
    text = path_in_repo.replace("\\", "/").strip("/") + ("/" + file_name if path_in_repo.endswith("/") else "")
    parts = PurePosixPath(text).parts
    if not text or any(p in (".", "..") for p in parts):
        raise MezoReplayError(f"path_in_repo {path_in_repo!r} must be a relative path inside the repo")
    if parts[-1].lower() == "readme.md":
        raise MezoReplayError(f"path_in_repo {path_in_repo!r} would replace the model card")
    return "/".join(parts)


def chart_name(target: str) -> str:
    """Where `push --plot` puts the chart of the trajectory at `target`: beside it, NAME-curves.png."""
    p = PurePosixPath(target)
    return str(p.with_name(p.stem + "-curves.png"))


def push_to_hub(trajectory: str | os.PathLike[str], repo_id: str, *, path_in_repo: str | None = None,
                private: bool = False, token: str | None = None, commit_message: str | None = None,
                api: HfApi | None = None, plot: bool = False) -> str:
    """Uploads a finished trajectory and its model card to a Hub model repo in one commit; returns the
    commit URL.

    `path_in_repo` defaults to the file's name at the repo root, where the card becomes README.md. In a
    folder (`path_in_repo="alice/run.mzt"`, or `"alice/"` to keep the name) the card becomes the folder's
    README.md, and a short root README.md is added if the repo has none. The repo is created if needed.
    With `plot`, the chart of its recorded training losses and evaluations (mezo_replay.plot; needs
    matplotlib) goes beside it as NAME-curves.png and the card shows it; it is drawn before any Hub call.
    """
    path = Path(trajectory)
    traj, data = _validated(path)
    target = repo_path(path_in_repo, path.name)
    folder = str(PurePosixPath(target).parent)
    folder = "" if folder == "." else folder
    chart: tuple[str, bytes] | None = None
    if plot:
        from ..plot import Curves, chart_bytes

        name = PurePosixPath(target).name
        chart = chart_name(target), chart_bytes([Curves.of(name, traj)], "png")
    card = model_card(traj, path_in_repo=target, repo_id=repo_id,
                      chart=None if chart is None else PurePosixPath(chart[0]).name)
    if commit_message is None:
        hub_id, _ = base_on_hub(traj.header)
        commit_message = (f"Add MeZO trajectory {target} ({traj.steps:,} steps"
                          + (f" on {hub_id})" if hub_id else ")"))
    api = api or HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
        operations = [CommitOperationAdd(path_in_repo=target, path_or_fileobj=data),
                      CommitOperationAdd(path_in_repo=f"{folder}/README.md" if folder else "README.md",
                                         path_or_fileobj=str(card).encode("utf-8"))]
        if chart is not None:
            operations.append(CommitOperationAdd(path_in_repo=chart[0], path_or_fileobj=chart[1]))
        if folder and not api.file_exists(repo_id, "README.md", token=token):
            operations.append(CommitOperationAdd(path_in_repo="README.md",
                                                 path_or_fileobj=str(root_card(repo_id)).encode("utf-8")))
        info = api.create_commit(repo_id, operations=operations, commit_message=commit_message, token=token)
    except Exception as e:  # noqa: BLE001 - only the Hub's failures are translated, the rest re-raised
        mapped = _hub_error(e, repo_id, token)
        if mapped is None:
            raise
        raise mapped from None
    return str(getattr(info, "commit_url", None) or info)
