"""`mezo-replay train` on the embedded default, in real processes, followed by the command it prints."""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


from mezo_replay import embedded, replay
from mezo_replay.safetensors_io import BaseCheckpoint
from mezo_replay.train import TrainConfig, train
from tests.test_roundtrip import tensor_bytes

CLI = [sys.executable, "-m", "mezo_replay"]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def printed_command(stdout: str) -> list[str]:
    line = stdout.strip().splitlines()[-1].strip()
    assert line.startswith("mezo-replay reconstruct "), stdout
    return shlex.split(line)[1:]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_train_then_the_printed_reconstruct(tmp_path, dtype):
    r = cli("train", "--steps", "6", "--eval-every", "3", "--dtype", dtype, "-q", "-o", "run.mzt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "eval loss" in r.stdout and "bytes/step" in r.stdout
    args = printed_command(r.stdout)
    if dtype == "bf16":
        assert (tmp_path / "run.base-bf16" / "model.safetensors").exists()
        assert "run.base-bf16" in args
    r2 = cli(*args, "-q", cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr
    assert "verified against" in r2.stdout
    out = tmp_path / "run-tuned"
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()
    r3 = cli("verify", args[1], "run.mzt", "run-tuned", "-q", cwd=tmp_path)
    assert r3.returncode == 0, r3.stderr


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_training_code_path_bytes_equal_reconstruction(tmp_path, dtype):
    """The CLI's training function, in process: its final in-memory weights against reconstruct."""
    tr, ev = embedded.load_task()
    cfg = TrainConfig(model=embedded.MODEL_DIR, train_examples=tr[:64], eval_examples=ev[:16], out=tmp_path / "t.mzt",
                      steps=5, lr=embedded.DEFAULTS["lr"], eps=1e-3, batch_size=4, dtype=dtype)
    result = train(cfg)
    out = replay.reconstruct(replay.plan(result.base, result.trajectory), tmp_path / "out")
    got = BaseCheckpoint.open(out)
    tuned = dict(result.model.named_parameters())
    assert result.optimizer.names
    for name in result.optimizer.names:
        assert tensor_bytes(got.read(name)) == tensor_bytes(tuned[name]), name


def test_train_refuses_bad_inputs(tmp_path):
    (tmp_path / "run.mzt").write_bytes(b"keep me")
    r = cli("train", "--steps", "2", "-q", "-o", "run.mzt", cwd=tmp_path)
    assert r.returncode == 1 and "--overwrite" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (tmp_path / "run.mzt").read_bytes() == b"keep me"
    empty = tmp_path / "no-weights"
    empty.mkdir()
    shutil.copy(embedded.MODEL_DIR / "config.json", empty / "config.json")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded.MODEL_DIR / f, empty / f)
    r = cli("train", "--model", str(empty), "--steps", "2", "-q", "-o", "x.mzt", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("Error:") and "no-weights" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x.mzt").exists()
    (tmp_path / "bad.jsonl").write_text('{"prompt": "Review: fine. Sentiment:"}\n')
    r = cli("train", "--data", "bad.jsonl", "--steps", "2", "-q", "-o", "y.mzt", cwd=tmp_path)
    assert r.returncode == 1 and "completion" in r.stderr and not (tmp_path / "y.mzt").exists()

