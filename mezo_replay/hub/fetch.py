"""Where a model comes from: a local folder, a .safetensors file with a config folder, or a Hugging Face
Hub id resolved through the Hugging Face cache.

A Hub id is pinned to the commit sha it resolved to, and both are recorded in the trajectory: a base
named only by repo id could change under the trajectory. huggingface_hub honours HF_HOME, HF_HUB_CACHE,
HF_HUB_OFFLINE and HF_TOKEN by itself.
"""
from __future__ import annotations

import atexit
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import MezoReplayError

# Files a model needs besides its weights; pickled weights are never fetched.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@dataclass(frozen=True)
class ModelSource:
    path: Path  # a folder from_pretrained can load
    source: str  # what the user named: a path or a repo id
    revision: str | None  # the commit sha of a Hub snapshot
    weights: Path  # the base checkpoint: the folder, or the single .safetensors file the user gave


def _looks_like_repo_id(spec: str) -> bool:
    name = spec.split("@", 1)[0]
    return bool(_REPO_ID.fullmatch(name)) and not Path(name).exists()


def resolve_model(spec: str | Path, config: Path | None = None) -> ModelSource:
    """A local folder, a .safetensors file (with `config`: a folder holding config.json and the tokenizer),
    or `org/name[@revision]` from the Hub cache (downloaded unless HF_HUB_OFFLINE=1)."""
    path = Path(spec)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise MezoReplayError(f"--model {path}: a model folder or a .safetensors file is expected")
        if config is None or not (config / "config.json").is_file():
            raise MezoReplayError(f"--model {path} is a bare weights file: pass --config with a folder holding "
                                  f"its config.json and tokenizer")
        view = Path(tempfile.mkdtemp(prefix="mezo-replay-model-"))  # links only, removed at exit
        atexit.register(shutil.rmtree, view, ignore_errors=True)
        for f in config.iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json", ".bin")):
                (view / f.name).symlink_to(f.resolve())
        (view / "model.safetensors").symlink_to(path.resolve())
        return ModelSource(view, str(path), None, path)
    if path.is_dir():
        return ModelSource(path, str(path), None, path)
    if isinstance(spec, str) and _looks_like_repo_id(spec):
        repo, _, revision = spec.partition("@")
        return _from_hub(repo, revision or None, f"--model {spec} (no such local folder; as a Hub id)")
    raise MezoReplayError(f"--model {spec}: no such folder or file, and not a Hugging Face repo id")


def _from_hub(repo_id: str, revision: str | None, what: str) -> ModelSource:
    from huggingface_hub import snapshot_download

    with _hub_errors(what):
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILES))
    sha = folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else None
    return ModelSource(folder, repo_id, sha, folder)


# --- hf:// references: trajectories and bases on the Hub -------------------------------------------

HF_SCHEME = "hf://"


@dataclass(frozen=True)
class HubRef:
    """`hf://org/name[@revision][/path/in/repo]` (a single-name repo needs its @revision: hf://gpt2@main/...)."""

    repo_id: str
    revision: str | None
    path: str | None

    def __str__(self) -> str:
        return HF_SCHEME + self.repo_id + (f"@{self.revision}" if self.revision else "") + (
            f"/{self.path}" if self.path else "")


def parse_hf(spec: str) -> HubRef | None:
    """The reference in an hf:// string, None for anything else (a local path)."""
    if not spec.startswith(HF_SCHEME):
        return None
    parts = spec[len(HF_SCHEME):].strip("/").split("/")
    n = 1 if "@" in parts[0] else 2
    if len(parts) < n or not all(parts[:n]):
        raise MezoReplayError(f"{spec}: expected hf://org/name[@revision][/path/in/repo]")
    repo, _, revision = "/".join(parts[:n]).partition("@")
    if not _REPO_ID.fullmatch(repo):
        raise MezoReplayError(f"{spec}: {repo!r} is not a Hugging Face repo id")
    return HubRef(repo, revision or None, "/".join(parts[n:]) or None)


@contextmanager
def _hub_errors(what: str) -> Iterator[None]:
    """huggingface_hub's errors as one line each, saying what to do."""
    from huggingface_hub import errors as e

    try:
        yield
    except e.LocalEntryNotFoundError:
        raise MezoReplayError(f"{what}: not in the Hugging Face cache, and the Hub cannot be reached "
                              f"(HF_HUB_OFFLINE or no network)") from None
    except e.RepositoryNotFoundError:
        raise MezoReplayError(f"{what}: no such repository (or it is private or gated: set HF_TOKEN to a token "
                              f"with access)") from None
    except e.RevisionNotFoundError:
        raise MezoReplayError(f"{what}: no such revision") from None
    except e.EntryNotFoundError:
        raise MezoReplayError(f"{what}: no such file in the repository") from None
    except e.HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        hint = " (check HF_TOKEN)" if status in (401, 403) else ""
        raise MezoReplayError(f"{what}: the Hub refused{hint}: {str(err).splitlines()[0]}") from None


def fetch_trajectory(ref: HubRef) -> Path:
    """The local path of a trajectory on the Hub (downloaded, or from the cache when offline)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    with _hub_errors(str(ref)):
        if ref.path:
            return Path(hf_hub_download(ref.repo_id, ref.path, revision=ref.revision))
        folder = Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=["*.mzt", "**/*.mzt"]))
    found = sorted(folder.rglob("*.mzt"))
    if len(found) != 1:
        names = ", ".join(str(p.relative_to(folder)) for p in found[:10]) or "none"
        raise MezoReplayError(f"{ref}: name the trajectory as hf://{ref.repo_id}/PATH; the repo holds {names}")
    return found[0]


def fetch_base(ref: HubRef, recorded_revision: str | None) -> tuple[Path, str | None]:
    """A base model snapshot: by default the commit the trajectory records, and never another one."""
    revision = ref.revision or recorded_revision
    source = _from_hub(ref.repo_id, revision, str(ref))
    if recorded_revision and source.revision and source.revision != recorded_revision:
        raise MezoReplayError(f"{ref}: resolves to commit {source.revision}, but the trajectory was trained on "
                              f"commit {recorded_revision} of its base: use hf://{ref.repo_id}@{recorded_revision}")
    path = source.path / ref.path if ref.path else source.path
    if not path.exists():
        raise MezoReplayError(f"{ref}: no such file or folder in the snapshot")
    return path, source.revision


def list_trajectories(repo: str) -> list[tuple[str, Path]]:
    """(path in repo, local file) of every .mzt in a repo (downloaded, or from the cache when offline)."""
    from huggingface_hub import snapshot_download

    ref = parse_hf(repo) or HubRef(*(repo.split("@", 1) if "@" in repo else (repo, None)), None)
    with _hub_errors(str(ref)):
        folder = Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=["*.mzt", "**/*.mzt"]))
    return [(str(p.relative_to(folder)), p) for p in sorted(folder.rglob("*.mzt"))]


def load_trajectory(repo_id: str, path: str | None = None, *, revision: str | None = None):  # noqa: ANN201
    """Read a trajectory from the Hub, like `from_pretrained`: `load_trajectory("org/runs", "alice/run.mzt")`."""
    from ..format.mzt import read_trajectory

    return read_trajectory(fetch_trajectory(HubRef(repo_id, revision, path)))
