"""MeZO training of peft adapters (LoRA, prefix tuning) on tiny Llama, GPT-2, OPT, BLOOM and BERT models:
the adapter rebuilt from the trajectory alone, loaded with peft's own PeftModel.from_pretrained onto the
untouched base, gives the logits the model ended training with, bit for bit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mezo_replay import embedded
from mezo_replay.rebuild import replay
from mezo_replay.training.data import load_splits
from mezo_replay.errors import MezoReplayError
from mezo_replay.arithmetic.initial import generate
from mezo_replay.format.mzt import read_trajectory
from mezo_replay.training.peft_tuning import PeftOptions
from mezo_replay.format.safetensors_io import BaseCheckpoint
from mezo_replay.training.train import TrainConfig, train
from tests.test_train_tasks import LABEL_WORDS, make_model, write_data
from tests.test_rebuild_cli import cli, printed_command
from tests.test_resume import inproc

BATCH = (torch.tensor([[0, 5, 6, 7, 8, 9], [0, 10, 11, 12, 2, 2]]), torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]))
MASKED = {"template": "{sentence} It was {mask}.", "label_words": LABEL_WORDS}


def run(tmp: Path, arch: str, options: PeftOptions, *, kind: str = "prompt-completion", task_options=None,
        out: str = "t.mzt", steps: int = 3, seed: int = 0, **more):
    model_dir = tmp / arch
    if not model_dir.exists():
        make_model(arch, model_dir)
    files = write_data(tmp)
    rows, ev = load_splits(files[f"{kind}.train"], files[f"{kind}.eval"])
    cfg = TrainConfig(model=model_dir, train_examples=rows, eval_examples=ev, out=tmp / out, steps=steps, lr=5e-2,
                      batch_size=8, seed=seed, task=kind, task_options=task_options or {}, eval_every=2,
                      peft=options, **more)
    return model_dir, train(cfg)


def adapter_from_trajectory(traj_path: Path, folder: Path, base_path: Path) -> Path:
    """An adapter folder written from the trajectory alone: the header's adapter_config and the replayed
    tensors under the header's names (what `reconstruct RUN.mzt -o FOLDER` writes)."""
    from safetensors.torch import save_file

    traj = read_trajectory(traj_path)
    assert not replay.needs_base(traj)
    tensors = dict(replay.replayed(replay.plan(None, traj)))
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {**traj.header["peft"]["adapter_config"], "base_model_name_or_path": str(base_path)}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def load_base(model_dir: Path, masked: bool = False):
    import transformers as tf

    auto = tf.AutoModelForMaskedLM if masked else tf.AutoModelForCausalLM
    return auto.from_pretrained(model_dir).eval()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=BATCH[0], attention_mask=BATCH[1]).logits


def assert_base_untouched(model_dir: Path, wrapped) -> None:
    """Every weight of the base inside the trained peft model equals the checkpoint's, bit for bit."""
    stored = load_base(model_dir, masked="bert" in model_dir.name).state_dict()
    seen = 0
    for name, p in wrapped.get_base_model().named_parameters():
        if p.requires_grad:
            continue
        key = name.replace(".base_layer.", ".").replace(".original_module.", ".")
        assert torch.equal(p, stored[key]), name
        seen += 1
    assert seen >= len([n for n, _ in load_base(model_dir, masked="bert" in model_dir.name).named_parameters()])


def check_rebuilt_logits(tmp: Path, model_dir: Path, result, masked: bool = False) -> torch.Tensor:
    from peft import PeftModel

    folder = adapter_from_trajectory(result.trajectory, tmp / f"{result.trajectory.stem}-adapter", model_dir)
    loaded = PeftModel.from_pretrained(load_base(model_dir, masked), folder).eval()
    expected = logits(result.model)
    assert torch.equal(logits(loaded), expected)
    return expected


LORA_CASES = [
    ("llama", "prompt-completion", None),
    ("gpt2", "prompt-completion", None),
    ("opt", "prompt-completion", None),
    ("bloom", "prompt-completion", None),
    ("bert", "label-words", MASKED),
]


@pytest.mark.parametrize("arch, kind, task_options", [
    pytest.param(*c, marks=() if c[0] == "llama" else pytest.mark.slow, id=c[0]) for c in LORA_CASES])
def test_lora_rebuilt_from_the_trajectory_alone_gives_the_trained_logits(tmp_path, arch, kind, task_options):
    model_dir, result = run(tmp_path, arch, PeftOptions("lora", r=4), kind=kind, task_options=task_options)
    traj = read_trajectory(result.trajectory)
    header = traj.header
    assert all(isinstance(t["init"], dict) for t in header["tensors"])  # every start generated: no INIT bytes
    assert not traj.inits
    assert [t["name"] for t in header["tensors"]] == sorted(result.peft.params, key=lambda n: n.encode())
    assert all(".lora_A.weight" in t["name"] or ".lora_B.weight" in t["name"] for t in header["tensors"])
    assert header["base"]["source"] == str(model_dir) and header["base"]["revision"] is None
    assert header["peft"]["base_weights"] == BaseCheckpoint.open(model_dir).weights_fingerprint()
    config = header["peft"]["adapter_config"]
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["base_model_name_or_path"] is None
    assert config["task_type"] == (None if arch == "bert" else "CAUSAL_LM")
    meta = header["metadata"]
    assert meta["peft"] == "lora" and meta["lora_r"] == "4" and meta["lora_alpha"] == "16"
    assert meta["lora_targets"] == ",".join(sorted(config["target_modules"]))
    assert not (tmp_path / "t.base-fp32").exists()
    assert_base_untouched(model_dir, result.model)
    moved = [n for n, p in result.peft.params.items() if ".lora_B." in n and p.abs().max() > 0]
    assert moved  # B left zero: the adapter would be a no-op and the test would prove little
    check_rebuilt_logits(tmp_path, model_dir, result, masked=arch == "bert")


def test_lora_a_starts_from_the_generated_kaiming_uniform(tmp_path):
    """Step 0 of the trajectory is peft's distribution from our generator: A within 1/sqrt(in), B zero."""
    model_dir, result = run(tmp_path, "llama", PeftOptions("lora", r=4), steps=1)
    header = read_trajectory(result.trajectory).header
    for k, t in enumerate(header["tensors"]):
        start = generate(t["init"], 0, k, t["shape"], torch.float32)
        if ".lora_A." in t["name"]:
            assert t["init"] == {"name": "uniform16", "bound": float(torch.tensor(32 ** -0.5))}
            assert 0 < start.abs().max() < 32 ** -0.5 and start.std() > 0.05
        else:
            assert t["init"] == {"name": "zeros"} and not start.any()


@pytest.mark.slow
def test_two_rebuilt_adapters_switch_on_one_base(tmp_path):
    from peft import PeftModel

    model_dir, first = run(tmp_path, "opt", PeftOptions("lora", r=4), out="a.mzt", seed=1)
    _, second = run(tmp_path, "opt", PeftOptions("lora", r=2, targets=("q_proj", "k_proj", "out_proj")),
                    out="b.mzt", seed=2)
    want_a, want_b = logits(first.model), logits(second.model)
    assert not torch.equal(want_a, want_b)
    fa = adapter_from_trajectory(first.trajectory, tmp_path / "a-adapter", model_dir)
    fb = adapter_from_trajectory(second.trajectory, tmp_path / "b-adapter", model_dir)
    model = PeftModel.from_pretrained(load_base(model_dir), fa, adapter_name="a").eval()
    model.load_adapter(fb, adapter_name="b")
    model.eval()
    for name, want in [("b", want_b), ("a", want_a), ("b", want_b)]:
        model.set_adapter(name)
        assert torch.equal(logits(model), want), name


@pytest.mark.slow
def test_bf16_model_keeps_a_float32_adapter_and_no_base_copy(tmp_path):
    """peft keeps a bf16 model's adapter in float32 (autocast_adapter_dtype), in training and when it loads
    the rebuilt folder, so the logits still match; the base is not copied in bf16 beside the trajectory."""
    import transformers as tf
    from peft import PeftModel

    model_dir, result = run(tmp_path, "gpt2", PeftOptions("lora", r=4), dtype="bf16")
    header = read_trajectory(result.trajectory).header
    assert {t["dtype"] for t in header["tensors"]} == {"F32"} and header["metadata"]["dtype"] == "bf16"
    assert not (tmp_path / "t.base-bf16").exists()
    folder = adapter_from_trajectory(result.trajectory, tmp_path / "adapter", model_dir)
    base = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    assert torch.equal(logits(PeftModel.from_pretrained(base, folder).eval()), logits(result.model))


def test_prefix_tuning_rebuilt_gives_the_trained_logits(tmp_path):
    model_dir, result = run(tmp_path, "llama", PeftOptions("prefix", num_virtual_tokens=4))
    header = read_trajectory(result.trajectory).header
    assert [(t["name"], t["init"]) for t in header["tensors"]] == [("prompt_embeddings", {"name": "gaussian16",
                                                                                          "std": 1.0})]
    assert header["metadata"]["peft"] == "prefix" and header["metadata"]["num_virtual_tokens"] == "4"
    assert header["peft"]["adapter_config"]["peft_type"] == "PREFIX_TUNING"
    assert_base_untouched(model_dir, result.model)
    check_rebuilt_logits(tmp_path, model_dir, result)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "opt", "bloom"])
def test_prefix_tuning_on_other_causal_lms(tmp_path, arch):
    model_dir, result = run(tmp_path, arch, PeftOptions("prefix", num_virtual_tokens=3), kind="label-words",
                            task_options={"template": "{sentence} It was", "label_words": LABEL_WORDS})
    check_rebuilt_logits(tmp_path, model_dir, result)


@pytest.mark.slow
def test_classify_head_lora_stores_the_head_and_what_the_base_lacks(tmp_path):
    """BERT's classifier from a masked-LM checkpoint: the head and the pooler (absent from the base) are
    saved whole with the adapter (modules_to_save), so the adapter fits the base it names."""
    import transformers as tf
    from peft import PeftModel

    model_dir = make_model("bert", tmp_path / "bert")
    files = write_data(tmp_path)
    rows, ev = load_splits(files["label-words.train"], files["label-words.eval"])
    result = train(TrainConfig(model=model_dir, train_examples=rows, eval_examples=ev, out=tmp_path / "c.mzt",
                               steps=2, lr=5e-2, batch_size=8, task="classify-head",
                               task_options={"text_key": "sentence"}, peft=PeftOptions("lora", r=4)))
    header = read_trajectory(result.trajectory).header
    whole = sorted(t["name"] for t in header["tensors"] if t["init"] is True)
    assert whole == ["base_model.model.bert.pooler.dense.bias", "base_model.model.bert.pooler.dense.weight",
                     "base_model.model.classifier.bias", "base_model.model.classifier.weight"]
    assert header["config"]["architectures"] == ["BertForSequenceClassification"]
    folder = adapter_from_trajectory(result.trajectory, tmp_path / "c-adapter", model_dir)
    base = tf.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    loaded = PeftModel.from_pretrained(base, folder).eval()
    assert torch.equal(logits(loaded), logits(result.model))


def test_resumed_peft_run_equals_an_uninterrupted_one(tmp_path):
    options = PeftOptions("lora", r=2, dropout=0.25)
    _, whole = run(tmp_path, "llama", options, out="whole.mzt", steps=4, flush_every=2)
    _, part = run(tmp_path, "llama", options, out="part.mzt", steps=2, flush_every=2)
    _, resumed = run(tmp_path, "llama", options, out="part.mzt", steps=4, flush_every=2, resume=True)
    assert resumed.resumed_from == 2
    a, b = read_trajectory(whole.trajectory), read_trajectory(resumed.trajectory)
    assert b.grad_bits.tolist() == a.grad_bits.tolist() and b.final_fingerprint == a.final_fingerprint
    assert torch.equal(logits(resumed.model), logits(whole.model))
    # dropout is on while training (other losses than without it), and both runs drew the same masks
    _, plain = run(tmp_path, "llama", PeftOptions("lora", r=2), out="plain.mzt", steps=2)
    assert read_trajectory(plain.trajectory).losses[:2].tolist() != a.losses[:2].tolist()
    with pytest.raises(MezoReplayError, match="--lora-r 2 there, 3 now"):
        run(tmp_path, "llama", PeftOptions("lora", r=3, dropout=0.25), out="part.mzt", steps=6, resume=True)
    with pytest.raises(MezoReplayError, match="--peft lora there, prefix now"):
        run(tmp_path, "llama", PeftOptions("prefix"), out="part.mzt", steps=6, resume=True)
    with pytest.raises(MezoReplayError, match=r"^--resume refused: .* other settings: --peft lora there, \(not set\) now$"):
        run(tmp_path, "llama", None, out="part.mzt", steps=6, resume=True)
    assert read_trajectory(tmp_path / "part.mzt").steps == 4


def test_cli_train_peft_lora_prints_the_adapter_rebuild(tmp_path):
    r = cli("train", "--peft", "lora", "--lora-r", "2", "--steps", "2", "--batch-size", "4", "--eval-every", "0",
            "-q", "-o", "run.mzt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "mezo-replay reconstruct run.mzt -o run-adapter" in r.stdout
    assert "3,072 lora adapter parameters of " in r.stdout  # r=2 on q_proj and v_proj of 3 layers, 128 wide
    header = read_trajectory(tmp_path / "run.mzt").header
    assert header["base"]["source"] == "mezo-replay:embedded/tiny-llama"
    assert header["metadata"]["lora_targets"] == "q_proj,v_proj"
    rule = header["rule"]  # the demo's PEFT defaults (defaults.PEFT_DEMO_DEFAULTS), not full tuning's
    assert rule["lr"] == pytest.approx(1e-3, rel=1e-6) and rule["eps"] == pytest.approx(1e-2, rel=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.mzt"]  # no cast copy of the base
    rebuilt = cli(*printed_command(r.stdout), cwd=tmp_path)  # the exact printed command, no base
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert sorted(p.name for p in (tmp_path / "run-adapter").iterdir()) == \
        ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    from safetensors import safe_open
    with safe_open(str(tmp_path / "run-adapter" / "adapter_model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(t["name"] for t in header["tensors"])
    code, err = inproc("train", "--peft", "lora", "--lora-r", "2", "--steps", "3", "--batch-size", "4",
                       "--eval-every", "0", "-q", "--resume", "run.mzt", cwd=tmp_path)
    assert code == 0, err
    assert read_trajectory(tmp_path / "run.mzt").steps == 3


REFUSALS = [
    (["--peft", "lora", "--tune", "mlp"], "cannot be combined"),
    (["--lora-r", "4"], "add --peft lora"),
    (["--peft", "lora", "--lora-targets", "q_proj,nope"],
     "'nope' matches no module of LlamaForCausalLM; its Linear/Conv1D layers are named: down_proj, gate_proj, "
     "k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    (["--peft", "lora", "--lora-targets", "embed_tokens"], "is of type Embedding, not a Linear or Conv1D"),
    (["--peft", "prefix", "--task", "classify-head", "--data", "cls.jsonl"], "no past key values"),
    (["--peft", "prefix", "--model", "bert", "--task", "label-words", "--data", "cls.jsonl", "--template",
      "{text} It was {mask}.", "--label-words", '{"0": " terrible", "1": " great"}'], "masked LM"),
    (["--peft", "lora", "--model", "xglm"], "no default LoRA targets for model type 'xglm': pass --lora-targets, "
                                            "from: fc1, fc2, k_proj, lm_head, out_proj, q_proj, v_proj"),
]


@pytest.mark.parametrize("args, message", [
    pytest.param(*c, marks=() if i < 4 else pytest.mark.slow, id=str(i)) for i, c in enumerate(REFUSALS)])
def test_bad_peft_inputs_fail_in_one_line_writing_nothing(tmp_path, args, message):
    import transformers as tf

    if "bert" in args:
        make_model("bert", tmp_path / "bert")
    if "xglm" in args:
        tok = tf.AutoTokenizer.from_pretrained(embedded.MODEL_DIR)
        tf.XGLMForCausalLM(tf.XGLMConfig(vocab_size=len(tok), d_model=32, ffn_dim=64, num_layers=1,
                                         attention_heads=4)).save_pretrained(tmp_path / "xglm")
        tok.save_pretrained(tmp_path / "xglm")
    (tmp_path / "cls.jsonl").write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n"
                                                for i, t in enumerate(["good", "bad", "fine", "awful"])))
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = inproc("train", *args, "--steps", "1", "-q", "-o", "x.mzt", cwd=tmp_path)
    assert code == 1 and err.startswith("Error:") and len(err.strip().splitlines()) == 1, err
    assert message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
