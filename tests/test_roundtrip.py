"""The promise: training's final weights == reconstruct(base, trajectory), byte for byte.

Real transformers models (built from configs: no Hub here), real safetensors files, real .mzt files.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from mezo_replay.arithmetic import reference as R
from mezo_replay.rebuild import replay
from mezo_replay.format.fingerprint import DTYPE_NAMES
from mezo_replay.format.mzt import read_trajectory
from mezo_replay.training.optimizer import MeZO
from mezo_replay.format.safetensors_io import BaseCheckpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_model(arch: str, dtype: torch.dtype):
    import transformers as tf

    torch.manual_seed(0)
    if arch == "llama-tied":
        cfg = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "opt":
        cfg = tf.OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=64, word_embed_proj_dim=32, tie_word_embeddings=False)
        model = tf.OPTForCausalLM(cfg)
    else:
        raise ValueError(arch)
    return model.to(dtype).eval()


def lm_closure(model, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (4, 12), generator=g).to(device)
    return lambda: model(input_ids=ids, labels=ids).loss.float()


def train_steps(model, traj_path, steps, *, lr=5e-3, eps=1e-3, seed=7, snapshot_at=None, device="cpu", **rule):
    opt = MeZO(model.named_parameters(), lr=lr, eps=eps, seed=seed, **rule)
    # compact=False: tests cut and corrupt this file chunk by chunk (test_cli), so it keeps its flushes
    opt.record(traj_path, base_source="test", steps_per_chunk=3, compact=False)
    snap = None
    for s in range(steps):
        opt.step(lm_closure(model, device, seed=s))
        if snapshot_at == s + 1:
            snap = {n: p.detach().cpu().clone() for n, p in zip(opt.names, opt.params)}
    opt.close()
    return opt, snap


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def read_out(path, name):
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


def out_tensors(out) -> dict[str, torch.Tensor]:
    ckpt = BaseCheckpoint.open(out)
    return {n: ckpt.read(n) for n in ckpt.entries}


@pytest.mark.parametrize("arch", ["llama-tied", "gpt2"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_reconstruct_equals_training_bytes(tmp_path, arch, dtype):
    model = tiny_model(arch, DTYPES[dtype])
    base = tmp_path / "base"
    model.save_pretrained(base)
    before = out_tensors(base)
    opt, _ = train_steps(model, tmp_path / "t.mzt", steps=7)
    traj = read_trajectory(tmp_path / "t.mzt")
    assert traj.steps == 7 and traj.final_fingerprint is not None
    p = replay.plan(base, tmp_path / "t.mzt")
    out = replay.reconstruct(p, tmp_path / "out")
    got = out_tensors(out)
    assert set(got) == set(before)
    tuned = dict(zip(opt.names, opt.params))
    assert set(tuned) <= set(before) and len(tuned) == len(traj.header["tensors"])
    changed = 0
    for name, t in got.items():
        if name in tuned:
            assert tensor_bytes(t) == tensor_bytes(tuned[name]), name
            changed += tensor_bytes(t) != tensor_bytes(before[name])
        else:
            assert tensor_bytes(t) == tensor_bytes(before[name]), name
    assert changed == len(tuned)  # every tuned tensor moved: the test can fail
    if arch == "llama-tied":
        assert "lm_head.weight" not in tuned and "model.embed_tokens.weight" in tuned
    # the output folder is a loadable Hugging Face model with the tuned weights
    import transformers as tf

    loaded = tf.AutoModelForCausalLM.from_pretrained(out, dtype=DTYPES[dtype])
    for name, p in loaded.named_parameters():
        if name in tuned:
            assert tensor_bytes(p) == tensor_bytes(tuned[name]), name


def test_single_file_base_and_step_checkpoints(tmp_path):
    model = tiny_model("opt", torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    base_file = tmp_path / "base" / "model.safetensors"
    opt, snap = train_steps(model, tmp_path / "t.mzt", steps=6, snapshot_at=4)
    out = replay.reconstruct(replay.plan(base_file, tmp_path / "t.mzt"), tmp_path / "tuned.safetensors")
    assert out == tmp_path / "tuned.safetensors" and out.is_file()
    for name, p in zip(opt.names, opt.params):
        assert tensor_bytes(read_out(out, name)) == tensor_bytes(p)
    p4 = replay.plan(base_file, tmp_path / "t.mzt", step=4)
    assert p4.expected is None and p4.checkpoint is None  # no fingerprint recorded at step 4
    with pytest.raises(replay.VerificationError, match="no fingerprint for step 4.*steps 0, 6"):
        replay.reconstruct(p4, tmp_path / "step4.safetensors")
    assert not (tmp_path / "step4.safetensors").exists()
    out4 = replay.reconstruct(p4, tmp_path / "step4.safetensors", unverified=True)
    for name in opt.names:
        assert tensor_bytes(read_out(out4, name)) == tensor_bytes(snap[name])
    with safe_open(str(out4), framework="pt") as f:
        assert f.metadata()["mezo_replay.steps"] == "4"


def test_sharded_base(tmp_path):
    model = tiny_model("llama-tied", torch.float32)
    model.save_pretrained(tmp_path / "base", max_shard_size="40KB")
    assert (tmp_path / "base" / "model.safetensors.index.json").exists()
    opt, _ = train_steps(model, tmp_path / "t.mzt", steps=3)
    out = replay.reconstruct(replay.plan(tmp_path / "base", tmp_path / "t.mzt"), tmp_path / "out")
    assert (out / "model.safetensors.index.json").read_bytes() == (
        tmp_path / "base" / "model.safetensors.index.json").read_bytes()
    got = out_tensors(out)
    for name, p in zip(opt.names, opt.params):
        assert tensor_bytes(got[name]) == tensor_bytes(p)


def test_reference_agrees_on_a_real_model(tmp_path):
    """The literal numpy reference replays the same trajectory to the same bytes as the torch path."""
    model = tiny_model("gpt2", torch.float16)
    model.save_pretrained(tmp_path / "base")
    opt, _ = train_steps(model, tmp_path / "t.mzt", steps=3)
    traj = read_trajectory(tmp_path / "t.mzt")
    h = traj.header
    base = BaseCheckpoint.open(tmp_path / "base")
    for k, t in enumerate(h["tensors"][:6]):
        w = base.read(t["name"])
        bits = w.view(torch.int16).numpy().reshape(-1).view(np.uint16)
        got = R.replay(bits, t["dtype"], seed=int(h["generator"]["seed"]), k=k, noise_name=h["noise"]["name"],
                       rule=h["rule"], grads=[int(b) for b in traj.grad_bits], decayed=bool(t.get("decay")))
        want = opt.params[k].detach().view(torch.int16).numpy().reshape(-1).view(np.uint16)
        assert got.tolist() == want.tolist(), t["name"]


def test_frozen_parameters_are_untouched_and_not_listed(tmp_path):
    model = tiny_model("llama-tied", torch.float32)
    for name, p in model.named_parameters():
        if ".mlp." in name:
            p.requires_grad_(False)
    model.save_pretrained(tmp_path / "base")
    opt, _ = train_steps(model, tmp_path / "t.mzt", steps=2)
    assert opt.names and not any(".mlp." in n for n in opt.names)
    names = [t["name"] for t in read_trajectory(tmp_path / "t.mzt").header["tensors"]]
    assert names == sorted(names, key=str.encode) == opt.names
    out = out_tensors(replay.reconstruct(replay.plan(tmp_path / "base", tmp_path / "t.mzt"), tmp_path / "o"))
    base = out_tensors(tmp_path / "base")
    for name in base:
        if ".mlp." in name:
            assert tensor_bytes(out[name]) == tensor_bytes(base[name])


@CUDA
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_cuda_training_reconstructs_on_cpu_and_cuda(tmp_path, dtype):
    model = tiny_model("llama-tied", DTYPES[dtype])
    model.save_pretrained(tmp_path / "base")
    model = model.to("cuda")
    opt, _ = train_steps(model, tmp_path / "t.mzt", steps=5, device="cuda")
    for device in ("cpu", "cuda"):
        out = replay.reconstruct(replay.plan(tmp_path / "base", tmp_path / "t.mzt"), tmp_path / f"out-{device}",
                                 device=device)
        got = out_tensors(out)
        for name, p in zip(opt.names, opt.params):
            assert tensor_bytes(got[name]) == tensor_bytes(p), (device, name)
    assert DTYPE_NAMES[opt.params[0].dtype] == {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}[dtype]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_schedule_and_weight_decay_round_trip(tmp_path, dtype):
    from mezo_replay.arithmetic.rule import Schedule

    model = tiny_model("gpt2", DTYPES[dtype])
    model.save_pretrained(tmp_path / "base")
    opt, _ = train_steps(model, tmp_path / "t.mzt", steps=6, lr=2e-2, weight_decay=0.5,
                         schedule=Schedule("linear", warmup_steps=2, total_steps=6))
    h = read_trajectory(tmp_path / "t.mzt").header
    decay = {t["name"]: t["decay"] for t in h["tensors"]}
    assert decay["transformer.h.0.attn.c_attn.weight"] is True
    assert decay["transformer.h.0.attn.c_attn.bias"] is False and decay["transformer.ln_f.weight"] is False
    assert h["rule"]["weight_decay"] == 0.5 and h["rule"]["schedule"]["name"] == "linear"
    got = out_tensors(replay.reconstruct(replay.plan(tmp_path / "base", tmp_path / "t.mzt"), tmp_path / "out"))
    for name, p in zip(opt.names, opt.params):
        assert tensor_bytes(got[name]) == tensor_bytes(p), name


@pytest.mark.parametrize("train_with, replay_with", [("torch", "compiled"), ("compiled", "torch"),
                                                     ("triton", "compiled"), ("torch", "triton")])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_backends_agree_across_training_and_replay(tmp_path, dtype, train_with, replay_with):
    """Train with one backend, reconstruct with another: the same bytes. Training with triton runs the
    grouped kernel (one launch per phase for all tensors) under the interpreter where there is no GPU."""
    from mezo_replay.kernels import cpu_kernel, steps, triton_kernels
    from mezo_replay.arithmetic.rule import Schedule

    if not cpu_kernel.available():
        pytest.skip("the compiled CPU kernel is not built")
    if "triton" in (train_with, replay_with) and not (triton_kernels.available() and triton_kernels.interpreting()):
        pytest.skip("Triton on CPU tensors needs the interpreter (CUDA is tested in test_cuda_training_...)")
    model = tiny_model("llama-tied", DTYPES[dtype])
    model.save_pretrained(tmp_path / "base")
    try:
        steps.set_backend(train_with)
        opt, _ = train_steps(model, tmp_path / "t.mzt", steps=5, weight_decay=0.25,
                             schedule=Schedule("cosine", warmup_steps=1, total_steps=5))
        steps.set_backend(replay_with)
        got = out_tensors(replay.reconstruct(replay.plan(tmp_path / "base", tmp_path / "t.mzt"), tmp_path / "out"))
    finally:
        steps.set_backend("auto")
    for name, p in zip(opt.names, opt.params):
        assert tensor_bytes(got[name]) == tensor_bytes(p), name


def test_compiled_backend_missing_falls_back_with_a_warning(monkeypatch):
    from mezo_replay.kernels import cpu_kernel, steps

    monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    try:
        with pytest.warns(UserWarning, match="not built"):
            assert steps.set_backend("compiled") == "torch"
        w = torch.ones(10)
        assert steps._path(w) == "torch"
    finally:
        steps.set_backend("auto")
    with pytest.raises(ValueError, match="unknown backend"):
        steps.set_backend("cuda-magic")
