"""What `train` prints must rebuild: for every task, the exact `mezo-replay reconstruct` command a real
`train` process prints, run in a real process, gives the weights training ended on, and `verify` agrees.
Also: headless checkpoints (keys without the base-model prefix), and verified earlier checkpoints
(`ckpt` chunks, `--checkpoint-every`, `--unverified`)."""
from __future__ import annotations

import hashlib
import json
import shlex
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

from mezo_replay import embedded
from mezo_replay.arithmetic import reference as R
from mezo_replay.format.fingerprint import checkpoint_fingerprint, fingerprint_raw, tensor_fingerprint
from mezo_replay.format.mzt import read_trajectory
from mezo_replay.format.safetensors_io import BaseCheckpoint
from tests.test_train_tasks import LABEL_WORDS, make_model, write_data

CLI = [sys.executable, "-m", "mezo_replay"]
VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"


def cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


def ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, r.stderr
    return r


def inproc(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The same command line in this process (click's runner): quicker where a subprocess adds nothing."""
    from click.testing import CliRunner

    from mezo_replay.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


def printed_command(stdout: str) -> list[str]:
    lines = [ln.strip() for ln in stdout.splitlines() if ln.strip().startswith("mezo-replay reconstruct ")]
    assert len(lines) == 1, stdout
    return shlex.split(lines[0])[1:]


def assert_rebuilt(out: Path, traj_path: Path, base: Path) -> dict[str, torch.Tensor]:
    """The rebuilt tensors are training's: each tuned tensor's fingerprint (SHA-256 over its bytes) equals
    the one the training process took of its own weights; every other tensor is the base's, byte for byte."""
    traj = read_trajectory(traj_path)
    got, ref = BaseCheckpoint.open(out), BaseCheckpoint.open(base)
    names = [t["name"] for t in traj.header["tensors"]]
    assert [tensor_fingerprint(got.read(n)) for n in names] == traj.final_fingerprint
    for name in ref.entries:
        if name not in names:
            assert ref.read(name).view(torch.uint8).equal(got.read(name).view(torch.uint8)), name
    assert set(got.entries) == set(ref.entries) | set(names)
    return {n: got.read(n) for n in got.entries}


CASES = [  # (architecture, task, options, data shape, class that loads the rebuilt folder)
    ("llama", "classify-head", ["--text-key", "sentence"], "label-words", "AutoModelForSequenceClassification"),
    pytest.param("llama", "prompt-completion", [], "prompt-completion", "AutoModelForCausalLM", marks=pytest.mark.slow),
    pytest.param("llama", "lm", [], "lm", "AutoModelForCausalLM", marks=pytest.mark.slow),
    pytest.param("gpt2", "label-words", ["--template", "{sentence} It was", "--label-words", json.dumps(LABEL_WORDS),
                                         "--objective", "accuracy"], "label-words", "AutoModelForCausalLM",
                 marks=pytest.mark.slow),
    pytest.param("bert", "label-words", ["--template", "{sentence} It was {mask}.", "--label-words",
                                         json.dumps(LABEL_WORDS)], "label-words", "AutoModelForMaskedLM",
                 marks=pytest.mark.slow),
    pytest.param("gpt2", "classify-head", ["--text-key", "sentence"], "label-words",
                 "AutoModelForSequenceClassification", marks=pytest.mark.slow),
    pytest.param("bert", "classify-head", ["--text-key", "sentence", "--objective", "f1"], "label-words",
                 "AutoModelForSequenceClassification", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("arch, task, options, shape, loader", CASES)
def test_the_printed_rebuild_command_of_every_task(tmp_path, arch, task, options, shape, loader):
    import transformers as tf

    model_dir = make_model(arch, tmp_path / arch)
    files = write_data(tmp_path)
    r = ok(cli("train", "--model", arch, "--data", files[f"{shape}.train"], "--eval-data", files[f"{shape}.eval"],
               "--task", task, *options, "--steps", "4", "--eval-every", "2", "--batch-size", "8", "--lr", "1e-3",
               "-q", "-o", "run.mzt", cwd=tmp_path))
    args = printed_command(r.stdout)
    traj = read_trajectory(tmp_path / "run.mzt")
    assert traj.steps == 4 and sorted(traj.checkpoints) == [2] and sorted(traj.fingerprints) == [4]
    new = [t["name"] for t in traj.header["tensors"] if t.get("init")]
    assert bool(new) == (task == "classify-head")
    rebuilt = ok(cli(*args, "-q", cwd=tmp_path))  # exactly what train printed
    assert "verified against the trajectory: each of" in rebuilt.stdout
    out = tmp_path / args[args.index("-o") + 1]
    assert_rebuilt(out, tmp_path / "run.mzt", model_dir)
    assert "OK:" in ok(cli("verify", args[1], "run.mzt", out, "-q", cwd=tmp_path)).stdout
    assert "OK:" in ok(cli("verify", args[1], "run.mzt", "-q", cwd=tmp_path)).stdout  # by replay
    config = json.loads((out / "config.json").read_text())
    model = getattr(tf, loader).from_pretrained(out)
    if task == "classify-head":
        assert config["architectures"] == [type(model).__name__] and type(model).__name__.endswith(
            "ForSequenceClassification")
        assert config["id2label"] == {"0": "0", "1": "1"} and model.config.num_labels == 2
    else:
        assert config == json.loads((model_dir / "config.json").read_text())
    state = model.state_dict()  # the rebuilt folder loads with the tuned weights, under the model's names
    for name, fp in zip((t["name"] for t in traj.header["tensors"]), traj.final_fingerprint):
        assert tensor_fingerprint(state[name]) == fp, name
    step2 = ok(cli("reconstruct", args[1], "run.mzt", "-o", "at2", "--step", "2", "-q", cwd=tmp_path))
    assert "together match the checkpoint fingerprint recorded for step 2" in step2.stdout


# --- headless checkpoints -----------------------------------------------------------------------------

def headless_bert(d: Path) -> Path:
    """A BERT encoder saved as BertModel: keys `embeddings.*`, `encoder.*`, `pooler.*`, no `bert.` prefix,
    like sentence-transformers/all-MiniLM-L6-v2."""
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(embedded.MODEL_DIR)
    torch.manual_seed(0)
    model = tf.BertModel(tf.BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                                       pad_token_id=2))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    keys = BaseCheckpoint.open(d).entries
    assert "embeddings.word_embeddings.weight" in keys and not any(k.startswith("bert.") for k in keys)
    return d


def test_headless_encoder_stores_only_the_new_head(tmp_path):
    import transformers as tf

    base = headless_bert(tmp_path / "minilm")
    files = write_data(tmp_path)
    r = ok(cli("train", "--model", "minilm", "--data", files["label-words.train"], "--eval-data",
               files["label-words.eval"], "--task", "classify-head", "--text-key", "sentence", "--steps", "20",
               "--batch-size", "8", "--lr", "1e-3", "-q", "-o", "run.mzt", cwd=tmp_path))
    traj = read_trajectory(tmp_path / "run.mzt")
    assert traj.new_tensors == {"classifier.bias": 2 * 4, "classifier.weight": 2 * 32 * 4}
    names = [t["name"] for t in traj.header["tensors"]]
    assert "embeddings.word_embeddings.weight" in names and not any(n.startswith("bert.") for n in names)
    model_bytes = sum(e.nbytes for e in BaseCheckpoint.open(base).entries.values())
    assert traj.file_bytes < 6000 < model_bytes // 20, traj.file_bytes  # stored whole it was the model's size
    args = printed_command(r.stdout)
    ok(cli(*args, "-q", cwd=tmp_path))
    out = tmp_path / args[args.index("-o") + 1]
    tensors = assert_rebuilt(out, tmp_path / "run.mzt", base)
    assert "classifier.weight" in tensors and "embeddings.word_embeddings.weight" in tensors
    model, info = tf.AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(model).__name__ == "BertForSequenceClassification"
    state = model.state_dict()
    for name, fp in zip(names, traj.final_fingerprint):
        key = name if name in state else f"bert.{name}"
        assert tensor_fingerprint(state[key]) == fp, name


def test_a_base_of_another_layout_is_refused_not_stored_whole(tmp_path):
    from safetensors.torch import load_file, save_file

    base = headless_bert(tmp_path / "enc")
    weights = load_file(base / "model.safetensors")
    save_file({f"encoder_model.{k}": v for k, v in weights.items()}, str(base / "model.safetensors"),
              metadata={"format": "pt"})
    files = write_data(tmp_path)
    train = ["train", "--model", "enc", "--data", files["label-words.train"], "--task", "classify-head",
             "--text-key", "sentence", "--steps", "1", "--batch-size", "4", "-q", "-o", "run.mzt"]
    line = one_line_error(inproc(*train, cwd=tmp_path))
    assert "are not in the base" in line and "bytes" in line and "--allow-new-tensors" in line, line
    assert "embeddings." in line and not (tmp_path / "run.mzt").exists()
    ok(inproc(*train, "--allow-new-tensors", cwd=tmp_path))
    assert len(read_trajectory(tmp_path / "run.mzt").new_tensors) == len(weights) + 2


def test_prefixed_checkpoint_into_a_headless_model_maps_names(tmp_path):
    """The reverse case transformers also handles: a task checkpoint (`bert.*`) loaded as a BertModel."""
    import transformers as tf

    from mezo_replay.training.train import checkpoint_names, head_parameters

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, max_position_embeddings=32)
    tf.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "task")
    stored = BaseCheckpoint.open(tmp_path / "task").entries
    headless = tf.BertModel(cfg)
    keys = checkpoint_names(headless, stored)
    assert keys["embeddings.word_embeddings.weight"] == "bert.embeddings.word_embeddings.weight"
    assert all(k in stored for k in keys.values()) and not head_parameters(headless)
    classifier = tf.BertForSequenceClassification(cfg)
    assert head_parameters(classifier) == {"classifier.weight", "classifier.bias"}
    assert checkpoint_names(classifier, stored) == {n: n for n, _ in classifier.named_parameters()}


# --- checkpoints --------------------------------------------------------------------------------------

def test_checkpoint_every_and_evals_make_steps_verifiable(tmp_path):
    run = ["train", "--steps", "7", "--checkpoint-every", "2", "--eval-every", "3", "--batch-size", "4", "-q",
           "-o", "run.mzt"]
    r = ok(cli(*run, cwd=tmp_path))
    base = printed_command(r.stdout)[1]
    traj = read_trajectory(tmp_path / "run.mzt")
    assert sorted(traj.checkpoints) == [2, 3, 4, 6] and sorted(traj.fingerprints) == [7]
    assert [e["step"] for e in traj.evals] == [0, 3, 6, 7]
    assert len([c for c in chunk_list(tmp_path / "run.mzt") if c[1] == "STEP"]) == 1  # checkpoints cut no chunk
    r4 = ok(cli("reconstruct", base, "run.mzt", "-o", "at4", "--step", "4", "-q", cwd=tmp_path))
    assert "verified against the trajectory: the 29 tuned tensors together match the checkpoint fingerprint " \
           "recorded for step 4" in r4.stdout
    at4 = BaseCheckpoint.open(tmp_path / "at4")
    names = [t["name"] for t in traj.header["tensors"]]
    assert checkpoint_fingerprint(names, [tensor_fingerprint(at4.read(n)) for n in names]) == traj.checkpoints[4]
    line = one_line_error(inproc("reconstruct", base, "run.mzt", "-o", "at5", "--step", "5", "-q", cwd=tmp_path))
    assert "no fingerprint for step 5" in line and "0, 2, 3, 4, 6, 7" in line and "--unverified" in line
    assert not (tmp_path / "at5").exists()
    r5 = ok(inproc("reconstruct", base, "run.mzt", "-o", "at5", "--step", "5", "--unverified", "-q", cwd=tmp_path))
    assert "NOT verified (--unverified): the trajectory records no fingerprint for step 5" in r5.stdout
    r0 = ok(inproc("reconstruct", base, "run.mzt", "-o", "at0", "--step", "0", "-q", cwd=tmp_path))
    assert "step 0 is the base" in r0.stdout
    line = one_line_error(inproc("verify", base, "run.mzt", "at5", "--step", "5", "-q", cwd=tmp_path))
    assert "no fingerprint for step 5" in line and "--unverified" not in line
    # an altered checkpoint fingerprint (CRC and zstd made valid again) is caught, and nothing is written
    bad = altered_checkpoint(tmp_path / "run.mzt", step=4)
    line = one_line_error(inproc("reconstruct", base, bad.name, "-o", "bad4", "--step", "4", "-q", cwd=tmp_path))
    assert "do not match the trajectory's checkpoint fingerprint" in line and not (tmp_path / "bad4").exists()


def chunk_list(path: Path) -> list[tuple[int, str, int]]:
    data, out, off = path.read_bytes(), [], 16
    while off + 12 <= len(data):
        length, ctype = struct.unpack_from("<I4s", data, off)
        out.append((off, ctype.decode(), length))
        off += 12 + length
    return out


def altered_checkpoint(path: Path, step: int) -> Path:
    data = bytearray(path.read_bytes())
    for off, ctype, length in chunk_list(path):
        payload = bytes(data[off + 12:off + 12 + length])
        if ctype == "ckpt" and struct.unpack_from("<I", zstandard.decompress(payload))[0] == step:
            new = zstandard.ZstdCompressor(write_checksum=True).compress(struct.pack("<I", step) + bytes(32))
            chunk = struct.pack("<I4sI", len(new), b"ckpt", zlib.crc32(new, zlib.crc32(b"ckpt"))) + new
            data[off:off + 12 + length] = chunk
            out = path.with_name("altered.mzt")
            out.write_bytes(bytes(data))
            return out
    raise AssertionError(f"no ckpt chunk for step {step}")


def test_checkpoint_vector_against_an_independent_computation(tmp_path):
    """spec/vectors/tiny-checkpoints: the numpy reference replays each tensor to step N, and SHA-256 written
    out by hand (format.md: name, zero byte, raw tensor fingerprint, in index order) gives expected.json's
    checkpoint fingerprints, which the reader returns and reconstruct verifies."""
    from mezo_replay.rebuild import replay

    d = VECTORS / "tiny-checkpoints"
    expected = json.loads((d / "expected.json").read_text())
    traj = read_trajectory(d / "traj.mzt")
    assert {str(k): v for k, v in traj.checkpoints.items()} == expected["checkpoints"] and len(traj.checkpoints) == 2
    h, base = traj.header, BaseCheckpoint.open(d / "base.safetensors")
    words = {"F32": np.uint32, "BF16": np.uint16, "F16": np.uint16}
    for n_text, want in expected["checkpoints"].items():
        n = int(n_text)
        digest = hashlib.sha256()
        for k, t in enumerate(h["tensors"]):
            w = base.read(t["name"]).contiguous().view(torch.uint8).numpy().view(words[t["dtype"]]).reshape(-1)
            got = R.replay(w, t["dtype"], seed=int(h["generator"]["seed"]), k=k, noise_name=h["noise"]["name"],
                           rule=h["rule"], grads=[int(b) for b in traj.grad_bits[:n]], decayed=bool(t.get("decay")))
            fp = fingerprint_raw(t["dtype"], t["shape"], np.asarray(got))
            digest.update(t["name"].encode() + b"\0" + bytes.fromhex(fp))
        assert digest.hexdigest() == want, n
        p = replay.plan(d / "base.safetensors", d / "traj.mzt", step=n)
        assert p.checkpoint == want and p.expected is None
        replay.reconstruct(p, tmp_path / f"at{n}.safetensors")


def ckpt_chunk(body: bytes) -> bytes:
    payload = zstandard.ZstdCompressor(write_checksum=True).compress(body)
    return struct.pack("<I4sI", len(payload), b"ckpt", zlib.crc32(payload, zlib.crc32(b"ckpt"))) + payload


@pytest.mark.parametrize("body, reason", [
    (struct.pack("<I", 7) + bytes(32), "beyond the 6 steps"),
    (struct.pack("<I", 2) + bytes(31), "not 36"),
    (struct.pack("<I", 2) + bytes(33), "over this chunk type's limit"),
    (struct.pack("<I", 4) + bytes(32), "contradicts the checkpoint fingerprint recorded earlier for step 4"),
])
def test_a_bad_checkpoint_chunk_is_corrupt(tmp_path, body, reason):
    from mezo_replay.errors import CorruptChunkError

    path = tmp_path / "t.mzt"
    path.write_bytes((VECTORS / "tiny-checkpoints" / "traj.mzt").read_bytes() + ckpt_chunk(body))
    with pytest.raises(CorruptChunkError, match=reason):
        read_trajectory(path)
    kept = read_trajectory(path, strict=False)  # everything before it stays usable
    assert kept.corrupt is not None and kept.corrupt.type == "ckpt" and kept.steps == 6
    assert sorted(kept.checkpoints) == [2, 4] and kept.final_fingerprint is not None


def test_the_writer_refuses_a_checkpoint_it_cannot_stand_behind(tmp_path):
    from mezo_replay.format.mzt import TrajectoryWriter

    header = read_trajectory(VECTORS / "tiny" / "traj.mzt").header
    with TrajectoryWriter(tmp_path / "w.mzt", header) as w:
        w.append_step(0x3F80, 1.0)
        for step, fp in ((2, "0" * 64), (1, "A" * 64), (1, "0" * 63), (True, "0" * 64)):
            with pytest.raises(ValueError, match="a checkpoint needs"):
                w.add_checkpoint(step, fp)
        w.add_checkpoint(1, "ab" * 32)
    assert read_trajectory(tmp_path / "w.mzt").checkpoints == {1: "ab" * 32}


def test_new_tensor_vector_through_the_command_line(tmp_path):
    """spec/vectors/tiny-new-tensor gave `no tensor named 'e.head'` in reconstruct and verify (the progress
    bar's total looked new tensors up in the base)."""
    d = VECTORS / "tiny-new-tensor"
    expected = json.loads((d / "expected.json").read_text())
    r = ok(inproc("reconstruct", d / "base.safetensors", d / "traj.mzt", "-o", "out.safetensors", cwd=tmp_path))
    assert "verified against the trajectory" in r.stdout
    got = BaseCheckpoint.open(tmp_path / "out.safetensors")
    for name, want in expected["tensors"].items():
        assert hashlib.sha256(got.read(name).contiguous().view(torch.uint8).numpy()).hexdigest() == want["sha256"]
    assert "OK:" in ok(inproc("verify", d / "base.safetensors", d / "traj.mzt", cwd=tmp_path)).stdout
    assert "OK:" in ok(inproc("verify", d / "base.safetensors", d / "traj.mzt", "out.safetensors",
                              cwd=tmp_path)).stdout
