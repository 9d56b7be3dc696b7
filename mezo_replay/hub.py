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
from dataclasses import dataclass
from pathlib import Path

from .errors import MezoReplayError

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
        return _from_hub(*spec.split("@", 1)) if "@" in spec else _from_hub(spec, None)
    raise MezoReplayError(f"--model {spec}: no such folder or file, and not a Hugging Face repo id")


def _from_hub(repo_id: str, revision: str | None) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILES))
    except LocalEntryNotFoundError:
        raise MezoReplayError(f"--model {repo_id}: no such local folder; as a Hub id it is not in the Hugging Face "
                              f"cache, and the Hub cannot be reached (HF_HUB_OFFLINE or no network)") from None
    except RepositoryNotFoundError:
        raise MezoReplayError(f"--model {repo_id}: no such repository on the Hub (or it is private: set HF_TOKEN)"
                              ) from None
    except HfHubHTTPError as e:
        raise MezoReplayError(f"--model {repo_id}: the Hub refused: {str(e).splitlines()[0]}") from None
    sha = folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else None
    return ModelSource(folder, repo_id, sha, folder)
