"""--model as a Hub id through a local cache in the Hub's own layout (HF_HUB_OFFLINE=1: no Hub is
reachable here), and as a bare .safetensors file with --config."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from mezo_replay import embedded
from mezo_replay.format.mzt import read_trajectory
from tests.test_train_tasks import make_model

SHA = "0123456789abcdef0123456789abcdef01234567"


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mezo_replay", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def fake_cache(root: Path, repo: str, files: Path) -> Path:
    """models--org--name/{refs/main, snapshots/<sha>/...}: the layout huggingface_hub reads offline."""
    d = root / ("models--" + repo.replace("/", "--"))
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text(SHA)
    shutil.copytree(files, d / "snapshots" / SHA)
    (d / "blobs").mkdir()
    return d


def data(tmp: Path) -> Path:
    rows = embedded.load_task()[0][:16]
    (tmp / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp / "d.jsonl"


def test_hub_id_from_the_cache_records_repo_and_sha(tmp_path):
    make_model("llama", tmp_path / "src")
    fake_cache(tmp_path / "hub", "acme/tiny-llama", tmp_path / "src")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    data(tmp_path)
    r = cli("train", "--model", "acme/tiny-llama", "--data", "d.jsonl", "--steps", "3", "--batch-size", "4", "-q",
            cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    h = read_trajectory(tmp_path / "traj.mzt").header
    assert h["base"]["source"] == "acme/tiny-llama" and h["base"]["revision"] == SHA
    assert h["metadata"]["base_model"] == f"acme/tiny-llama@{SHA}"
    cmd = shlex.split(r.stdout.strip().splitlines()[-1])
    assert SHA in cmd[2]  # the snapshot folder
    r2 = cli(*cmd[1:], "-q", cwd=tmp_path)
    assert r2.returncode == 0 and "verified" in r2.stdout, r2.stderr
    r3 = cli("train", "--model", "acme/tiny-llama@" + SHA, "--data", "d.jsonl", "--steps", "1", "-q", "-o", "b.mzt",
             cwd=tmp_path, env=env)
    assert r3.returncode == 0, r3.stderr


def test_hub_id_offline_without_cache_is_a_clear_error(tmp_path):
    data(tmp_path)
    r = cli("train", "--model", "acme/absent", "--data", "d.jsonl", "--steps", "1", "-q", cwd=tmp_path,
            env={"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1 and "not in the Hugging Face cache" in r.stderr and "no such local folder" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "traj.mzt").exists()


def test_safetensors_file_with_config(tmp_path):
    src = make_model("gpt2", tmp_path / "src")
    weights = tmp_path / "weights.safetensors"
    shutil.move(src / "model.safetensors", weights)
    data(tmp_path)
    r = cli("train", "--model", "weights.safetensors", "--data", "d.jsonl", "--steps", "3", "--batch-size", "4",
            "-q", cwd=tmp_path)
    assert r.returncode == 1 and "--config" in r.stderr
    r = cli("train", "--model", "weights.safetensors", "--config", "src", "--data", "d.jsonl", "--steps", "3",
            "--batch-size", "4", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cmd = shlex.split(r.stdout.strip().splitlines()[-1])
    assert cmd[2] == "weights.safetensors" and cmd[-1].endswith(".safetensors")
    r2 = cli(*cmd[1:], "-q", cwd=tmp_path)
    assert r2.returncode == 0 and "verified" in r2.stdout, r2.stderr
