"""Pulling from the Hub: hf:// bases and trajectories, `ls`, the Python API, and every failure, against a
local cache in the Hub's own layout with HF_HUB_OFFLINE=1 (no Hub is reachable here). Real processes,
because huggingface_hub reads HF_HUB_OFFLINE when it is imported."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mezo_replay import embedded

from tests.test_train_tasks import make_model

SHA_A = "a" * 40
SHA_B = "b" * 40
SHA_R = "c" * 40


def cache_repo(root: Path, repo: str, files: Path | dict[str, Path], sha: str, ref: str = "main") -> None:
    """models--org--name/{refs/<ref>, snapshots/<sha>/...}, as huggingface_hub lays out its cache."""
    d = root / ("models--" + repo.replace("/", "--"))
    (d / "refs").mkdir(parents=True, exist_ok=True)
    (d / "blobs").mkdir(exist_ok=True)
    (d / "refs" / ref).write_text(sha)
    snap = d / "snapshots" / sha
    if isinstance(files, Path):
        shutil.copytree(files, snap)
        return
    for rel, src in files.items():
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, snap / rel)


def run(*args: str, cwd: Path, env: dict[str, str], python: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, *args] if python else [sys.executable, "-m", "mezo_replay", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env={**os.environ, **env})


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A cache holding a base model (two commits) and a repo of trajectories, one per user."""
    d = tmp_path_factory.mktemp("hub")
    env = {"HF_HUB_CACHE": str(d / "cache"), "HF_HUB_OFFLINE": "1", "HF_TOKEN": ""}
    make_model("llama", d / "base-a")
    make_model("gpt2", d / "base-b")  # another model under the same repo, at another commit
    cache_repo(d / "cache", "acme/tiny-llama", d / "base-a", SHA_A)
    cache_repo(d / "cache", "acme/tiny-llama", d / "base-b", SHA_B, ref="v2")
    rows = embedded.load_task()[0][:16]
    (d / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run("train", "--model", "acme/tiny-llama", "--data", "d.jsonl", "--steps", "4", "--batch-size", "4", "-q",
            "-o", "alice.mzt", cwd=d, env=env)
    assert r.returncode == 0, r.stderr
    r = run("train", "--model", str(d / "base-b"), "--data", "d.jsonl", "--steps", "2", "--batch-size", "4", "-q",
            "-o", "bob.mzt", cwd=d, env=env)
    assert r.returncode == 0, r.stderr
    cache_repo(d / "cache", "acme/runs", {"users/alice/run.mzt": d / "alice.mzt", "users/bob/run.mzt": d / "bob.mzt"},
               SHA_R)
    return d, env


def test_reconstruct_from_hub_ids(hub, tmp_path):
    d, env = hub
    r = run("reconstruct", "hf://acme/tiny-llama", "hf://acme/runs/users/alice/run.mzt", "-o", "out", "-q",
            cwd=tmp_path, env=env)
    assert r.returncode == 0 and "verified" in r.stdout, r.stderr
    probe = ("import sys, transformers as tf; m = tf.AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
             "tf.AutoTokenizer.from_pretrained(sys.argv[1]); print(type(m).__name__)")
    loaded = run("-c", probe, "out", cwd=tmp_path, env=env, python=True)
    assert loaded.stdout.strip() == "LlamaForCausalLM", loaded.stderr
    # the same with the commit spelled out, and verify
    r = run("verify", f"hf://acme/tiny-llama@{SHA_A}", f"hf://acme/runs@{SHA_R}/users/alice/run.mzt", "out", "-q",
            cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr


def test_ls_lists_every_trajectory(hub, tmp_path):
    d, env = hub
    r = run("ls", "acme/runs", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "users/alice/run.mzt" in r.stdout and "users/bob/run.mzt" in r.stdout
    assert f"acme/tiny-llama@{SHA_A[:12]}" in r.stdout
    rows = json.loads(run("ls", "hf://acme/runs", "--json", cwd=tmp_path, env=env).stdout)
    assert [(x["path"], x["steps"]) for x in rows] == [("users/alice/run.mzt", 4), ("users/bob/run.mzt", 2)]


def test_python_api_loads_from_a_repo_id(hub, tmp_path):
    d, env = hub
    code = ("from mezo_replay import load_trajectory; t = load_trajectory('acme/runs', 'users/alice/run.mzt'); "
            "print(t.steps, t.header['base']['source'], t.header['base']['revision'])")
    r = run("-c", code, cwd=tmp_path, env=env, python=True)
    assert r.stdout.split() == ["4", "acme/tiny-llama", SHA_A], r.stderr


@pytest.mark.parametrize("base, traj, message", [
    ("hf://acme/tiny-llama", "hf://acme/runs/users/carol/run.mzt", "not in the Hugging Face cache"),
    ("hf://acme/nope", "hf://acme/runs/users/alice/run.mzt", "not in the Hugging Face cache"),
    ("hf://acme/tiny-llama@v2", "hf://acme/runs/users/alice/run.mzt",
     f"resolves to commit {SHA_B}, but the trajectory was trained on commit {SHA_A}"),
    ("hf://acme/tiny-llama", "hf://acme/runs/users/bob/run.mzt", "wrong base"),
    ("hf://acme/tiny-llama", "hf://acme/runs", "name the trajectory as hf://acme/runs/PATH"),
    ("hf://", "hf://acme/runs/users/alice/run.mzt", "expected hf://org/name"),
])
def test_hub_failures_are_one_line_and_write_nothing(hub, tmp_path, base, traj, message):
    d, env = hub
    r = run("reconstruct", base, traj, "-o", "out", "-q", cwd=tmp_path, env=env)
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_offline_with_nothing_cached(tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    r = run("ls", "acme/runs", cwd=tmp_path, env=env)
    assert r.returncode == 1 and "not in the Hugging Face cache" in r.stderr



def test_sharded_base_from_the_hub(tmp_path):
    import transformers as tf

    make_model("llama", tmp_path / "src")
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "src")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    tf.AutoTokenizer.from_pretrained(tmp_path / "src").save_pretrained(tmp_path / "sharded")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    env = {"HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    cache_repo(tmp_path / "cache", "acme/sharded", tmp_path / "sharded", SHA_A)
    rows = embedded.load_task()[0][:8]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run("train", "--model", "acme/sharded", "--data", "d.jsonl", "--steps", "2", "--batch-size", "4", "-q",
               cwd=tmp_path, env=env).returncode == 0
    r = run("reconstruct", "hf://acme/sharded", "traj.mzt", "-o", "out", "-q", cwd=tmp_path, env=env)
    assert r.returncode == 0 and "verified" in r.stdout, r.stderr
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("error, message", [
    ("repo", "no such repository (or it is private or gated: set HF_TOKEN"),
    ("entry", "no such file in the repository"),
    ("401", "the Hub refused (check HF_TOKEN)"),
])
def test_online_hub_errors_are_one_line(tmp_path, monkeypatch, error, message):
    """Errors the Hub itself answers with, raised at the huggingface_hub API boundary."""
    import huggingface_hub
    from click.testing import CliRunner
    from huggingface_hub import errors

    from mezo_replay.cli import main
    from tests.test_publish import http_error

    exc = {"repo": http_error(404, errors.RepositoryNotFoundError),
           "entry": http_error(404, errors.RemoteEntryNotFoundError),
           "401": http_error(401)}[error]

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    r = CliRunner().invoke(main, ["reconstruct", "hf://acme/tiny", "hf://acme/runs/run.mzt", "-o",
                                  str(tmp_path / "out"), "-q"])
    assert r.exit_code == 1 and message in r.output, r.output
    assert not (tmp_path / "out").exists()


# --- PEFT trajectories on the Hub ----------------------------------------------------------------

@pytest.fixture(scope="module")
def peft_hub(tmp_path_factory):
    """A base on the Hub and a LoRA trajectory trained on it, published beside a full one."""
    from tests.test_adapter import peft_trajectory

    d = tmp_path_factory.mktemp("peft-hub")
    env = {"HF_HUB_CACHE": str(d / "cache"), "HF_HUB_OFFLINE": "1", "HF_TOKEN": ""}
    make_model("llama", d / "base")
    cache_repo(d / "cache", "acme/tiny-llama", d / "base", SHA_A)
    logits = peft_trajectory(d / "base", d / "carol.mzt", base_source="acme/tiny-llama", base_revision=SHA_A)
    cache_repo(d / "cache", "acme/adapters", {"users/carol/run.mzt": d / "carol.mzt"}, SHA_R)
    return d, env, logits


def test_peft_trajectory_from_the_hub_rebuilds_without_a_base(peft_hub, tmp_path):
    from tests.test_adapter import adapter_logits

    d, env, logits = peft_hub
    r = run("reconstruct", "hf://acme/adapters/users/carol/run.mzt", "-o", "adapter", "-q", cwd=tmp_path, env=env)
    assert r.returncode == 0 and "lora adapter" in r.stdout, r.stderr
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("acme/tiny-llama", SHA_A)
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "base_model: acme/tiny-llama" in card and "base_model_relation: adapter" in card
    assert "mezo-replay reconstruct hf://acme/adapters/users/carol/run.mzt -o adapter" in card
    assert torch.equal(adapter_logits(d / "base", tmp_path / "adapter"), logits)
    # --merge with a Hub base resolves the commit the trajectory records
    r = run("reconstruct", "hf://acme/adapters/users/carol/run.mzt", "--merge", "hf://acme/tiny-llama", "-o", "merged",
            "-q", cwd=tmp_path, env=env)
    assert r.returncode == 0 and (tmp_path / "merged" / "model.safetensors").is_file(), r.stderr
    # a base given for an adapter is refused, saying what to run instead
    r = run("reconstruct", "hf://acme/tiny-llama", "hf://acme/adapters/users/carol/run.mzt", "-o", "x", "-q",
            cwd=tmp_path, env=env)
    assert r.returncode == 1 and "--merge hf://acme/tiny-llama" in r.stderr and not (tmp_path / "x").exists()
    r = run("ls", "acme/adapters", cwd=tmp_path, env=env)
    assert "users/carol/run.mzt" in r.stdout and "lora adapter: no base needed" in r.stdout, r.stderr
