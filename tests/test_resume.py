"""Crash safety: a run killed with SIGKILL (or stopped with SIGTERM) and resumed ends on the same bytes as
an uninterrupted run. Real subprocesses, real signals, the embedded model and task."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mezo_replay import embedded
from mezo_replay.mzt import read_trajectory

STEPS, FLUSH = 24, 4
ARGS = ["train", "--steps", str(STEPS), "--flush-every", str(FLUSH), "--batch-size", "4", "--eval-every", "0",
        "--lr", "2e-4", "--schedule", "cosine", "--warmup-steps", "3", "--weight-decay", "0.05", "-q"]


def start(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "mezo_replay", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "mezo_replay", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return r


def wait_for_steps(path: Path, n: int, proc: subprocess.Popen[str]) -> int:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training ended before step {n}: {proc.stderr.read() if proc.stderr else ''}")
        if path.exists():
            try:
                steps = read_trajectory(path).steps
            except Exception:
                steps = 0
            if steps >= n:
                return steps
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("whole")
    finish(*ARGS, "-o", "whole.mzt", cwd=d)
    return read_trajectory(d / "whole.mzt")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_and_resumed_equals_uninterrupted(tmp_path, uninterrupted, sig):
    proc = start(*ARGS, "-o", "run.mzt", cwd=tmp_path)
    wait_for_steps(tmp_path / "run.mzt", 2 * FLUSH, proc)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    cut = read_trajectory(tmp_path / "run.mzt")  # readable whatever the moment of the kill
    assert 2 * FLUSH <= cut.steps < STEPS
    assert cut.grad_bits.tolist() == uninterrupted.grad_bits[:cut.steps].tolist()
    if sig == signal.SIGTERM:
        assert proc.returncode == 0 and cut.final_fingerprint is not None  # stopped between steps, cleanly
        assert "--resume run.mzt" in proc.stdout.read()
    r = finish(*ARGS, "--resume", "run.mzt", cwd=tmp_path)
    assert f"resumed at step {cut.steps}" in r.stdout
    done = read_trajectory(tmp_path / "run.mzt")
    assert done.steps == STEPS
    assert done.grad_bits.tolist() == uninterrupted.grad_bits.tolist()
    assert done.final_fingerprint == uninterrupted.final_fingerprint  # byte-identical weights
    finish("verify", str(embedded.MODEL_DIR), "run.mzt", "-q", cwd=tmp_path)


def test_resume_refuses_other_settings_or_base(tmp_path):
    base = ["train", "--flush-every", "2", "--batch-size", "4", "--eval-every", "0", "--lr", "2e-4", "-q"]
    finish(*base, "--steps", "6", "-o", "r.mzt", cwd=tmp_path)
    before = (tmp_path / "r.mzt").read_bytes()
    cases = [
        (["--lr", "3e-4"], "rule lr: 0.00019999"),
        (["--seed", "5"], "generator seed: '0' there, '5' now"),
        (["--weight-decay", "0.1"], "rule weight_decay: None there"),
        (["--freeze", "mlp"], "tunes 29 tensors"),
        (["--dtype", "bf16"], "not the base"),
    ]
    for extra, message in cases:  # a constant schedule may grow --steps; each case changes one thing
        r = subprocess.run([sys.executable, "-m", "mezo_replay", *base, "--steps", "12", *extra, "--resume", "r.mzt"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 1 and "--resume refused" in r.stderr and message in r.stderr, (extra, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
        assert (tmp_path / "r.mzt").read_bytes() == before  # untouched
    r = subprocess.run([sys.executable, "-m", "mezo_replay", *base, "--steps", "12", "--schedule", "linear",
                        "--resume", "r.mzt"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "schedule.name: 'constant' there, 'linear' now" in r.stderr
    finish(*base, "--steps", "9", "--resume", "r.mzt", cwd=tmp_path)  # the same settings continue
    assert read_trajectory(tmp_path / "r.mzt").steps == 9
