"""`mezo-replay train` on the embedded default, in real processes, followed by the command it prints."""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


from mezo_replay import embedded
from mezo_replay.rebuild import replay
from mezo_replay.format.safetensors_io import BaseCheckpoint
from mezo_replay.training.train import TrainConfig, train
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
    assert result.optimizer.names
    assert_rebuild_is_training(result, tmp_path / "out")


def assert_rebuild_is_training(result, out: Path) -> None:
    """reconstruct of a train() result's trajectory gives its final in-memory weights, byte for byte."""
    got = BaseCheckpoint.open(replay.reconstruct(replay.plan(result.base, result.trajectory), out))
    tuned = dict(result.model.named_parameters())
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



# --- defaults, messages, sizes (issue 14, items 7, 8, 11) -----------------------------------------

def flat(text: str) -> str:
    """Help text with its line wrapping undone, so phrases can be searched across lines."""
    return " ".join(text.split())


def user_model(tmp_path: Path) -> Path:
    """The embedded model under another path: for train, a user's model like any other."""
    return Path(shutil.copytree(embedded.MODEL_DIR, tmp_path / "my-model"))


def write_data(tmp_path: Path, n: int = 32) -> Path:
    import json

    train_rows, _ = embedded.load_task()
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in train_rows[:n]))
    return path


def test_train_help_shows_every_default(tmp_path):
    r = cli("train", "--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    text = flat(r.stdout)
    options = text.split(" Options: ", 1)[1]
    for option, shown in [("--lr", "1e-6; 5e-5 for the embedded demo"), ("--eps", "0.001"),
                          ("--batch-size", "16"), ("--max-length", "128"), ("--steps", "1000"),
                          ("--eval-every", "500; 100 for the embedded demo"), ("--eval-batch-size", "64"),
                          ("--seed", "0")]:
        entry = options.split(f" {option} ", 1)[1]
        entry = entry[:entry.index(" --")]  # this option's entry, up to the next option
        assert "[default:" in entry and shown in entry, (option, entry)
    assert "causal LM" in text and "masked LM" in text and "classif" in text and "about 50 seconds" in text


def test_every_train_option_states_its_default():
    """In process, over click's own records: no option (except on/off flags) leaves its default unsaid."""
    import click

    from mezo_replay.cli import main

    command = main.commands["train"]
    ctx = click.Context(command)
    for param in command.params:
        if not isinstance(param, click.Option) or param.is_flag or param.name == "help":
            continue
        record = param.get_help_record(ctx)
        assert record is not None and "[default:" in record[1], param.name


def test_user_model_gets_mezo_defaults_recorded(tmp_path):
    from mezo_replay.format.mzt import read_trajectory

    model, data = user_model(tmp_path), write_data(tmp_path)
    r = cli("train", "--model", str(model), "--data", str(data), "--steps", "2", "-q", "-o", "u.mzt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    h = read_trajectory(tmp_path / "u.mzt").header
    assert h["rule"]["lr"] == pytest.approx(1e-6, rel=1e-6) and h["rule"]["eps"] == pytest.approx(1e-3, rel=1e-4)
    assert h["metadata"]["batch_size"] == "16" and h["metadata"]["max_length"] == "128"
    assert h["base"]["source"] == str(model)  # a user's model is named as given


def test_mask_template_on_a_causal_lm_names_the_cause(tmp_path):
    import json

    model = user_model(tmp_path)
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"sentence": f"review {i}", "label": i % 2}) + "\n"
                                              for i in range(8)))
    r = cli("train", "--model", str(model), "--data", "s.jsonl", "--task", "label-words", "--template",
            "{sentence} It was {mask}.", "--label-words", '{"0": " terrible", "1": " great"}', "--steps", "1",
            "-q", "-o", "m.mzt", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("Error:") and len(r.stderr.strip().splitlines()) == 1
    assert "not a masked LM" in r.stderr and str(model) in r.stderr and "'mask' column" not in r.stderr
    assert not (tmp_path / "m.mzt").exists()


def test_eval_batch_size_option(tmp_path):
    from mezo_replay.format.mzt import read_trajectory

    r = cli("train", "--steps", "1", "--eval-batch-size", "5", "-q", "-o", "b.mzt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    evals = read_trajectory(tmp_path / "b.mzt").evals
    assert [e["step"] for e in evals] == [0, 1]
    assert evals[0]["metrics"]["loss"] == pytest.approx(1.9541, abs=1e-3)  # the whole set, as in the README
    r = cli("train", "--steps", "1", "--eval-batch-size", "0", "-q", "-o", "b0.mzt", cwd=tmp_path)
    assert r.returncode == 2 and "--eval-batch-size" in r.stderr and not (tmp_path / "b0.mzt").exists()


def test_eval_batch_size_reaches_the_eval_batches(tmp_path, monkeypatch):
    import mezo_replay.training.train as T

    sizes: list[int] = []
    make_task = T.make_task

    def counting(*args, **kwargs):
        task = make_task(*args, **kwargs)
        make_batch = task.make_batch
        task.make_batch = lambda encoded, pad: (sizes.append(len(encoded)), make_batch(encoded, pad))[1]
        return task

    monkeypatch.setattr(T, "make_task", counting)
    tr, ev = embedded.load_task()
    T.train(TrainConfig(model=embedded.MODEL_DIR, train_examples=tr[:8], eval_examples=ev[:10], out=tmp_path / "e.mzt",
                        steps=1, lr=5e-5, batch_size=4, eval_batch_size=3))
    assert sizes[:4] == [3, 3, 3, 1]  # the eval set, cut before training starts


def test_embedded_trajectory_records_no_local_path(tmp_path):
    import zstandard

    r = cli("train", "--steps", "2", "-q", "-o", str(tmp_path / "p.mzt"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = (tmp_path / "p.mzt").read_bytes()
    length = int.from_bytes(data[16:20], "little")
    head = zstandard.ZstdDecompressor().decompress(data[28:28 + length]).decode()
    assert str(embedded.MODEL_DIR.parent) not in head and str(tmp_path) not in head
    assert '"source":"mezo-replay:embedded/tiny-llama"' in head.replace(" ", "")
    from mezo_replay.format.mzt import read_trajectory

    assert read_trajectory(tmp_path / "p.mzt").header["rule"]["lr"] == pytest.approx(5e-5, rel=1e-6)  # the demo's
    args = printed_command(r.stdout)
    assert args[1] == embedded.MODEL_NAME  # and it rebuilds, from any directory:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r2 = cli(*args[:2], str(tmp_path / "p.mzt"), "-o", "t", "-q", cwd=elsewhere)
    assert r2.returncode == 0 and "verified against" in r2.stdout, r2.stderr
    r3 = cli("verify", embedded.MODEL_NAME, str(tmp_path / "p.mzt"), "t", "-q", cwd=elsewhere)
    assert r3.returncode == 0, r3.stderr


def test_no_record_losses_smaller_and_still_exact_and_whole_file_sizes(tmp_path):
    from mezo_replay.cli import summary
    from mezo_replay.format.mzt import read_trajectory

    common = ("train", "--steps", "12", "--eval-every", "6", "-q")
    r1 = cli(*common, "-o", "with.mzt", cwd=tmp_path)
    assert r1.returncode == 0, r1.stderr
    r = cli(*common, "--no-record-losses", "-o", "without.mzt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with_, without = read_trajectory(tmp_path / "with.mzt"), read_trajectory(tmp_path / "without.mzt")
    # train reports the whole file and what it holds, not only the step records
    per_step = f"{with_.file_bytes:,} bytes = {with_.file_bytes / 12:.2f} bytes/step"
    assert per_step in r1.stdout and f"{with_.bytes_per_step:.2f} bytes/step of step records" in r1.stdout
    assert "stored: header" in r1.stdout and "3 evals" in r1.stdout and "1 fingerprint" in r1.stdout
    assert "losses" in r1.stdout.split("stored:")[1] and "losses" not in r.stdout.split("stored:")[1]
    info = cli("info", "with.mzt", cwd=tmp_path)
    assert info.returncode == 0 and per_step in info.stdout and "stored     header" in info.stdout
    assert without.header["records"] == {"losses": False} and without.losses is None
    assert without.file_bytes < with_.file_bytes
    assert without.grad_bits.tobytes() == with_.grad_bits.tobytes()
    assert without.final_fingerprint == with_.final_fingerprint
    s = summary(without)
    assert "losses" not in s["stored"]["by_kind"] and sum(s["stored"]["by_kind"].values()) == without.file_bytes
    assert sum(summary(with_)["stored"]["by_kind"].values()) == with_.file_bytes
    r2 = cli(*printed_command(r.stdout), "-q", cwd=tmp_path)
    assert r2.returncode == 0 and "verified against" in r2.stdout, r2.stderr
    r3 = cli("info", "without.mzt", cwd=tmp_path)
    assert r3.returncode == 0 and "not recorded (trained with --no-record-losses)" in r3.stdout


@pytest.mark.slow
def test_classify_head_init_bytes_are_reported(tmp_path):
    import json

    rows = [{"text": f"Review: it was {'lovely' if i % 2 else 'awful'} {i}.", "label": i % 2} for i in range(16)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = cli("train", "--data", "c.jsonl", "--task", "classify-head", "--steps", "2", "-q", "-o", "c.mzt",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    info = cli("info", "c.mzt", "--json", cwd=tmp_path)
    stored = json.loads(info.stdout)["stored"]
    assert [t["name"] for t in stored["init_tensors"]] == ["score.weight"]
    assert stored["init_tensors"][0]["raw_bytes"] == 2 * 128 * 4
    assert stored["init_tensors"][0]["stored_bytes"] == stored["by_kind"]["init"]
    assert "init score.weight" in r.stdout


def test_load_model_holds_weights_in_memory(tmp_path):
    """from_pretrained leaves weights memory-mapped; load_model must not (first forwards would page them in)."""
    from mezo_replay.training.train import load_model

    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    model_dir = user_model(tmp_path)
    model, _, _ = load_model(model_dir, "fp32", "cpu")
    assert str(model_dir / "model.safetensors") not in maps.read_text()
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert tied == bool(model.config.tie_word_embeddings)  # tied weights stay one tensor
