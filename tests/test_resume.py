"""Crash safety: a run killed with SIGKILL (or stopped with SIGTERM) and resumed ends on the same bytes as
an uninterrupted run. Real subprocesses, real signals, the embedded model and task."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mezo_replay import embedded
from mezo_replay.format.mzt import read_trajectory

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
    if sig == signal.SIGKILL:
        # The file itself: a killed run leaves a prefix of the uninterrupted file (each chunk is one write)
        # and the resume appends the rest. (A stopped run flushed a shorter chunk and its fingerprint
        # when it stopped, so its file differs in chunking while the steps and weights above are equal.)
        assert (tmp_path / "run.mzt").read_bytes() == uninterrupted.path.read_bytes()


def inproc(*args: str, cwd: Path) -> tuple[int, str]:
    """The command line in this process (click's runner): each refusal loads the model, and a subprocess
    would only add the import time."""
    from click.testing import CliRunner

    from mezo_replay.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stderr


REFUSED = [  # each changes one setting that changes the steps (constant schedule: --steps may grow)
    (["--batch-size", "8"], "--batch-size 4 there, 8 now"),
    (["--max-length", "64"], "--max-length 128 there, 64 now"),
    (["--lr", "3e-4"], "--lr 0.0002 there, 0.0003 now"),
    (["--eps", "1e-2"], "--eps 0.001 there, 0.01 now"),
    (["--seed", "5"], "--seed 0 there, 5 now"),
    (["--weight-decay", "0.1"], "--weight-decay (not set) there, 0.1 now"),
    (["--schedule", "linear"],
     "--schedule constant there, linear now; --steps (the schedule's length) 0 there, 12 now"),
    (["--warmup-steps", "2"], "--steps (the schedule's length) 0 there, 12 now; --warmup-steps 0 there, 2 now"),
    (["--noise", "rademacher16"], "--noise gaussian16 there, rademacher16 now"),
    (["--freeze", "mlp"], "--tune/--freeze: 29 tuned tensors there, 20 now"),
    (["--dtype", "bf16"], "--dtype fp32 there, bf16 now"),
    (["--template", "Review: {prompt}"], "--template (not set) there, 'Review: {prompt}' now"),
    (["--data", "shuffled.jsonl"], "--data (its contents) "),
    (["--data", "fewer.jsonl"], "--data (its number of examples) "),
    (["--task", "lm", "--data", "texts.jsonl"], "--task prompt-completion there, lm now"),
]


BASE_RUN = ["train", "--flush-every", "2", "--batch-size", "4", "--eval-every", "0", "--lr", "2e-4", "-q"]


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("six")
    finish(*BASE_RUN, "--steps", "6", "-o", "r.mzt", cwd=d)
    rows, _ = embedded.load_task()
    for name, data in (("shuffled", rows[1:] + rows[:1]), ("fewer", rows[1:]),
                       ("texts", [{"text": r["prompt"] + r["completion"]} for r in rows])):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    return d


@pytest.mark.parametrize("extra, message", [pytest.param(*c, marks=[] if i < 2 else [pytest.mark.slow])
                                            for i, c in enumerate(REFUSED)], ids=[" ".join(c[0]) for c in REFUSED])
def test_resume_refuses_a_setting_that_changes_the_steps(six_steps, extra, message):
    base, tmp_path = BASE_RUN, six_steps
    before = sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir() if p.is_file())
    code, err = inproc(*base, "--steps", "12", *extra, "--resume", "r.mzt", cwd=tmp_path)
    assert code == 1 and err.startswith("Error: --resume refused: r.mzt was recorded with other settings: ")
    assert message in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert err.count(" there, ") == max(1, message.count(" there, ")), (extra, err)  # only what changed
    assert sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir()) == before  # nothing written


def test_resume_names_every_difference_and_allows_the_rest(tmp_path):
    base = BASE_RUN
    finish(*base, "--steps", "6", "-o", "r.mzt", cwd=tmp_path)
    before = (tmp_path / "r.mzt").read_bytes()
    # several at once: every one named, with both values, in one line (a real process this time)
    r = subprocess.run([sys.executable, "-m", "mezo_replay", *base, "--steps", "12", "--batch-size", "8",
                        "--max-length", "64", "--lr", "3e-4", "--resume", "r.mzt"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for message in ("--batch-size 4 there, 8 now", "--max-length 128 there, 64 now", "--lr 0.0002 there, 0.0003 now"):
        assert message in r.stderr, r.stderr
    assert (tmp_path / "r.mzt").read_bytes() == before
    # what does not change the steps may change: evaluation, checkpoints, chunking, and a longer constant run
    code, err = inproc(*base, "--steps", "9", "--eval-every", "3", "--checkpoint-every", "4", "--flush-every", "3",
                       "--resume", "r.mzt", cwd=tmp_path)
    assert code == 0, err
    assert read_trajectory(tmp_path / "r.mzt").steps == 9
