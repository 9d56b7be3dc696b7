"""PEFT trajectories rebuilt without a base into adapter folders that peft loads, bit for bit.

The trajectories are made here the way `train --peft` makes them: peft wraps a tiny Llama (built from a
transformers config), the adapter starts from mezo_replay.initial's generated values, MeZO tunes it
under the names peft saves it by, with a real loss. The rebuilds go through the real CLI."""
from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from mezo_replay import embedded
from mezo_replay.arithmetic import initial
from mezo_replay.format.mzt import read_trajectory
from mezo_replay.training.optimizer import MeZO
from mezo_replay.format.safetensors_io import BaseCheckpoint
from tests.test_train_tasks import make_model

PROMPTS = ["Review: the soup was cold and bland. Sentiment:", "Review: a delight from start to end. Sentiment:"]


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mezo_replay", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def inproc(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The same command line run in this process (no interpreter start-up): for the many cases."""
    from click.testing import CliRunner

    from mezo_replay.cli import main

    here = os.getcwd()
    os.chdir(cwd)
    try:
        r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


def one_error_line(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def json_safe(config) -> dict:
    return json.loads(json.dumps(config.to_dict(), default=lambda x: sorted(x) if isinstance(x, set) else str(x)))


def saved_name(param_name: str) -> str:
    """The key peft's get_peft_model_state_dict gives a trainable parameter (adapter name dropped)."""
    if param_name.startswith("prompt_encoder."):
        return "prompt_embeddings"
    return param_name.replace(".default", "")


def batch(base: Path) -> dict[str, torch.Tensor]:
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(base)
    return dict(tok(PROMPTS, return_tensors="pt", padding=True))


def load_base(base: Path):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


def peft_trajectory(base: Path, path: Path, *, kind: str = "lora", seed: int = 3, steps: int = 4,
                    base_source: str | None = None, base_revision: str | None = None,
                    r: int = 4) -> torch.Tensor:
    """Trains a PEFT adapter on `base` with MeZO into `path`; returns the logits it ends with on `batch`."""
    import peft

    model = load_base(base)
    if kind == "lora":
        config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    else:
        config = peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(model, config).eval()
    params = {saved_name(n): p for n, p in pm.named_parameters() if p.requires_grad}
    inits = {}
    for k, name in enumerate(sorted(params, key=lambda n: n.encode("utf-8"))):
        p = params[name]
        spec = (initial.zeros() if ".lora_B." in name else initial.gaussian16(1.0) if kind != "lora"
                else initial.uniform16(initial.kaiming_uniform_bound(p.shape[1])))
        with torch.no_grad():
            p.copy_(initial.generate(spec, seed, k, p.shape, p.dtype))
        inits[name] = spec
    adapter_config = json_safe(pm.peft_config["default"]) | {"base_model_name_or_path": None, "revision": None}
    opt = MeZO(params.items(), lr=5e-2, eps=1e-2, seed=seed)
    opt.record(path, base_source=base_source if base_source is not None else str(base), base_revision=base_revision,
               metadata={"peft": "lora" if kind == "lora" else "prefix", "task": "lm"}, new_tensors=inits,
               extra={"peft": {"adapter_config": adapter_config,
                               "base_weights": BaseCheckpoint.open(base).weights_fingerprint()}})
    x = batch(base)
    labels = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    for _ in range(steps):
        opt.step(lambda: pm(**x, labels=labels).loss)
    opt.close()
    with torch.no_grad():
        return pm(**x).logits


def adapter_logits(base: Path, folder: Path) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(base), folder).eval()
    with torch.no_grad():
        return model(**batch(base)).logits


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A base and three trajectories on it: two LoRA (different seeds) and one prefix tuning."""
    d = tmp_path_factory.mktemp("peft")
    base = make_model("llama", d / "base")
    logits = {"alice": peft_trajectory(base, d / "alice.mzt", seed=1),
              "bob": peft_trajectory(base, d / "bob.mzt", seed=2),
              "prefix": peft_trajectory(base, d / "prefix.mzt", kind="prefix", seed=5)}
    return d, base, logits


def full_trajectory(base: Path, path: Path) -> Path:
    """A full fine-tune of `base` (its own weights tuned): it needs the base to rebuild."""
    model = load_base(base)
    opt = MeZO(model.named_parameters(), lr=1e-3, eps=1e-3, seed=0)
    opt.record(path, base_source="acme/tiny-llama", base_revision="a" * 40)
    x = batch(base)
    for _ in range(2):
        opt.step(lambda: model(**x, labels=x["input_ids"]).loss)
    opt.close()
    return path


def tensors_of(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


# --- rebuilding ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["alice", "prefix"])
def test_cli_rebuild_loads_in_peft_with_the_trained_logits_bitwise(runs, tmp_path, name):
    d, base, logits = runs
    r = cli("reconstruct", str(d / f"{name}.mzt"), "-o", "adapter", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "verified against the trajectory" in r.stdout and "PeftModel.from_pretrained" in r.stdout
    out = tmp_path / "adapter"
    assert listing(tmp_path) == ["adapter", "adapter/README.md", "adapter/adapter_config.json",
                                 "adapter/adapter_model.safetensors"]  # no temporary left behind
    assert torch.equal(adapter_logits(base, out), logits[name])

    traj = read_trajectory(d / f"{name}.mzt")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base) and config["revision"] is None
    assert config["inference_mode"] is True
    recorded = traj.header["peft"]["adapter_config"]
    assert {k: v for k, v in config.items() if k not in ("base_model_name_or_path", "revision", "inference_mode")} \
        == {k: v for k, v in recorded.items() if k not in ("base_model_name_or_path", "revision", "inference_mode")}
    tensors, meta = tensors_of(out / "adapter_model.safetensors")
    assert list(tensors) == [t["name"] for t in traj.header["tensors"]]
    assert meta == {"format": "pt", "mezo_replay.steps": str(traj.steps),
                    "mezo_replay.base_fingerprint": traj.header["base"]["fingerprint"],
                    "mezo_replay.base_weights": traj.header["peft"]["base_weights"]}
    from mezo_replay.format.fingerprint import tensor_fingerprint

    assert [tensor_fingerprint(t) for t in tensors.values()] == traj.final_fingerprint
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and f"reconstruct {name}.mzt -o adapter" in card
    assert str(d) not in card  # the writer's directories stay private


def test_two_rebuilt_adapters_switch_on_one_base(runs, tmp_path):
    from peft import PeftModel

    d, base, logits = runs
    r = cli("reconstruct", str(d / "alice.mzt"), str(d / "bob.mzt"), "-o", "users", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "rebuilt 2 outputs in users" in r.stdout
    model = PeftModel.from_pretrained(load_base(base), tmp_path / "users" / "alice", adapter_name="alice").eval()
    model.load_adapter(tmp_path / "users" / "bob", adapter_name="bob")
    x = batch(base)
    with torch.no_grad():
        for who in ("bob", "alice", "bob"):
            model.set_adapter(who)
            assert torch.equal(model(**x).logits, logits[who]), who
    assert not torch.equal(logits["alice"], logits["bob"])


def test_many_trajectories_hold_one_adapter_at_a_time(runs, tmp_path, monkeypatch):
    """Instrumented: when each trajectory is read and each tensor replayed, no earlier trajectory or
    replayed tensor is still alive, so memory is one adapter's whatever the count."""
    from mezo_replay.rebuild import adapter, replay

    d, base, logits = runs
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"user{i}.mzt")
        paths[-1].write_bytes((d / ("alice.mzt" if i % 2 else "bob.mzt")).read_bytes())
    trajs: list[weakref.ref] = []
    tensors: list[weakref.ref] = []
    reads, most = [0], [0]

    def alive(refs: list[weakref.ref], collect: bool = True) -> int:
        if collect:
            gc.collect()
        return sum(r() is not None for r in refs)

    real_read, real_replayed = adapter.read_trajectory, replay.replayed

    def read(path, *a, **k):
        most[0] = max(most[0], alive(trajs))
        t = real_read(path, *a, **k)
        trajs.append(weakref.ref(t))
        reads[0] += 1
        return t

    def replayed(*a, **k):
        for name, w in real_replayed(*a, **k):
            most[0] = max(most[0], alive(trajs) - 1)  # the one being written
            assert alive(tensors, collect=False) == 0
            tensors.append(weakref.ref(w))
            yield name, w

    monkeypatch.setattr(adapter, "read_trajectory", read)
    monkeypatch.setattr(replay, "replayed", replayed)
    totals = []
    done = adapter.rebuild_many(paths, tmp_path / "out", on_total=totals.append)
    assert [p.name for p in done] == [f"user{i}" for i in range(3)]
    assert reads[0] == 6 and most[0] == 0  # read twice (check, then rebuild), never two at once
    assert totals == [3 * read_trajectory(paths[0]).steps * sum(
        math.prod(t["shape"]) for t in read_trajectory(paths[0]).header["tensors"])]
    assert torch.equal(adapter_logits(base, tmp_path / "out" / "user1"), logits["alice"])


def test_merge_matches_the_adapter_to_rounding_and_refuses_another_base(runs, tmp_path):
    """Merged weights are peft's W + scaling * B @ A rounded once to float32, where the adapter computes
    x W^T + scaling * (x A^T) B^T: equal up to float32 rounding, here within 1e-5 of logits of size ~1."""
    import shutil

    import transformers as tf

    d, base, logits = runs
    r = inproc("reconstruct", str(d / "alice.mzt"), "--merge", str(base), "-o", "merged", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tf.AutoTokenizer.from_pretrained(tmp_path / "merged")  # the tokenizer came along
    with torch.no_grad():
        got = merged(**batch(base)).logits
    assert torch.allclose(got, logits["alice"], rtol=0, atol=1e-5)
    assert not torch.allclose(got, load_base(base)(**batch(base)).logits, rtol=0, atol=1e-3)  # the adapter counts

    other = tmp_path / "other"
    shutil.copytree(base, other)
    weights = other / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    r = cli("reconstruct", str(d / "alice.mzt"), "--merge", str(other), "-o", "merged2", "-q", cwd=tmp_path)
    one_error_line(r, "not the model this adapter was trained on", read_trajectory(d / "alice.mzt")
                   .header["peft"]["base_weights"], BaseCheckpoint.open(other).weights_fingerprint())
    assert not (tmp_path / "merged2").exists()


def test_verify_and_info(runs, tmp_path):
    d, base, logits = runs
    assert inproc("reconstruct", str(d / "alice.mzt"), "-o", "a", "-q", cwd=tmp_path).returncode == 0
    r = cli("verify", str(d / "alice.mzt"), "a", "-q", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("OK: a after 4 steps"), r.stderr
    r = inproc("verify", str(d / "bob.mzt"), "a", "-q", cwd=tmp_path)
    one_error_line(r, "does not match")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/elsewhere/base"  # pointing the base elsewhere is allowed
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    assert inproc("verify", str(d / "alice.mzt"), "a", "-q", cwd=tmp_path).returncode == 0
    config["r"] = 8
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    one_error_line(inproc("verify", str(d / "alice.mzt"), "a", "-q", cwd=tmp_path), "differs", "in r")

    r = inproc("info", str(d / "alice.mzt"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "lora adapter (peft LORA): r 4, alpha 8" in r.stdout and "not needed to rebuild" in r.stdout
    assert "generated init 8 tensors 0 (of 3,584 raw" in r.stdout
    s = json.loads(inproc("info", str(d / "alice.mzt"), "--json", cwd=tmp_path).stdout)
    assert s["kind"] == "lora" and s["needs_base"] is False and s["peft"]["adapter_config"]["r"] == 4
    assert sum(t["stored_bytes"] for t in s["stored"]["generated_tensors"]) == 0


def test_base_less_trajectory_without_peft_rebuilds_into_one_safetensors_file(runs, tmp_path):
    """A run whose tensors all start from generated values but that records no adapter (no `peft`): no
    adapter_config to write, so its tensors go into one plain .safetensors file."""
    d, base, logits = runs
    path = tmp_path / "plain.mzt"
    data = read_trajectory(d / "alice.mzt")
    raw = (d / "alice.mzt").read_bytes()
    header = dict(data.header)
    del header["peft"]
    path.write_bytes(with_header(raw, header))
    one_error_line(inproc("reconstruct", str(path), "-o", "out", "-q", cwd=tmp_path), "name the output *.safetensors")
    r = inproc("reconstruct", str(path), "-o", "out.safetensors", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    tensors, meta = tensors_of(tmp_path / "out.safetensors")
    adapter_tensors, _ = tensors_of_rebuilt(d / "alice.mzt", tmp_path / "ref")
    assert list(tensors) == list(adapter_tensors)
    assert all(torch.equal(tensors[k], adapter_tensors[k]) for k in tensors)
    assert "mezo_replay.base_weights" not in meta and meta["mezo_replay.steps"] == "4"


def tensors_of_rebuilt(traj: Path, out: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from mezo_replay.rebuild.adapter import write_adapter

    write_adapter(traj, out)
    return tensors_of(out / "adapter_model.safetensors")


def with_header(raw: bytes, header: dict) -> bytes:
    """The same file with another HEAD chunk (what a newer or hostile writer could produce)."""
    import struct

    from tests.test_mzt import chunk, zframe

    length = struct.unpack("<I", raw[16:20])[0]
    return raw[:16] + chunk(b"HEAD", zframe(json.dumps(header).encode())) + raw[28 + length:]


# --- bad input: one line, exit 1, nothing written ------------------------------------------------

def bad_inputs(d: Path, base: Path) -> dict[str, tuple[list[str], str]]:
    raw = (d / "alice.mzt").read_bytes()
    header = read_trajectory(d / "alice.mzt").header
    (d / "bad").mkdir(exist_ok=True)
    unknown = json.loads(json.dumps(header))
    unknown["tensors"][0]["init"] = {"name": "orthogonal"}
    (d / "bad" / "unknown.mzt").write_bytes(with_header(raw, unknown))
    corrupt = bytearray(raw)
    corrupt[-40] ^= 0xFF
    (d / "bad" / "corrupt.mzt").write_bytes(bytes(corrupt))
    (d / "bad" / "cut.mzt").write_bytes(raw[:60])
    (d / "bad" / "cut-steps.mzt").write_bytes(raw[:-30])
    (d / "bad" / "alice.mzt").write_bytes(raw)
    full_trajectory(base, d / "bad" / "full.mzt") if not (d / "bad" / "full.mzt").exists() else None
    a, b = str(d / "alice.mzt"), str(d / "bad")
    return {
        "base given to an adapter": ([str(base), a, "-o", "out"], "is a PEFT lora adapter"),
        "full without base": ([f"{b}/full.mzt", "-o", "out"], f"give the base first, `mezo-replay reconstruct "
                                                             f"hf://acme/tiny-llama@{'a' * 40}"),
        "existing output": ([a, "-o", "exists"], "exists already exists; pass --overwrite"),
        "existing output among many": ([a, str(d / "bob.mzt"), "-o", "."], "bob already exists"),
        "duplicate stems": ([a, f"{b}/alice.mzt", "-o", "out"], "two trajectories would write out/alice"),
        "corrupt": ([f"{b}/corrupt.mzt", "-o", "out"], "is corrupt"),
        "truncated header": ([f"{b}/cut.mzt", "-o", "out"], "truncated inside its HEAD"),
        "truncated steps": ([f"{b}/cut-steps.mzt", "-o", "out"], "records no fingerprint"),
        "corrupt among many": ([a, f"{b}/corrupt.mzt", "-o", "out"], "is corrupt"),
        "unknown init": ([f"{b}/unknown.mzt", "-o", "out"], "orthogonal"),
        "merge prefix": ([str(d / "prefix.mzt"), "--merge", str(base), "-o", "out"], "cannot be merged"),
        "merge full": ([f"{b}/full.mzt", "--merge", str(base), "-o", "out"], "--merge is for PEFT adapter"),
        "base then two": ([str(base), a, str(d / "bob.mzt"), "-o", "out"], "give exactly one TRAJECTORY"),
        "missing trajectory": (["nope.mzt", "-o", "out"], "nope.mzt"),
        "adapter to a file": ([a, "-o", "out.safetensors"], "rebuilds into a folder"),
    }


BAD = ["base given to an adapter", "full without base", "existing output", "existing output among many",
       "duplicate stems", "corrupt", "truncated header", "truncated steps", "corrupt among many", "unknown init",
       "merge prefix", "merge full", "base then two", "missing trajectory", "adapter to a file"]


SUBPROCESS = {"base given to an adapter", "full without base"}  # the rest in-process: the same code, faster


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, case):
    d, base, _ = runs
    args, message = bad_inputs(d, base)[case]
    (tmp_path / "exists").mkdir()
    (tmp_path / "bob").mkdir()
    before = listing(tmp_path)
    run = cli if case in SUBPROCESS else inproc
    one_error_line(run("reconstruct", *args, "-q", cwd=tmp_path), message)
    assert listing(tmp_path) == before


def test_step_zero_is_peft_s_starting_point(runs, tmp_path):
    """--step 0 rebuilds the generated initial values: LoRA's B is zero, so the adapter changes nothing yet
    and the logits are the base's, bit for bit."""
    d, base, _ = runs
    r = inproc("reconstruct", str(d / "alice.mzt"), "--step", "0", "-o", "start", "-q", cwd=tmp_path)
    assert r.returncode == 0 and "after 0 steps" in r.stdout, r.stderr
    tensors, meta = tensors_of(tmp_path / "start" / "adapter_model.safetensors")
    assert meta["mezo_replay.steps"] == "0"
    assert all(not t.any() for k, t in tensors.items() if ".lora_B." in k)
    assert all(t.any() for k, t in tensors.items() if ".lora_A." in k)
    with torch.no_grad():
        assert torch.equal(adapter_logits(base, tmp_path / "start"), load_base(base)(**batch(base)).logits)


@pytest.mark.slow
def test_many_trajectories_peak_memory_is_one_adapters(tmp_path):
    """A real process's peak RSS: rebuilding four 64 MiB adapters in one call costs less than half an
    adapter more than rebuilding one (no time is measured)."""
    name = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
    w = torch.nn.Parameter(torch.zeros(4096, 4096))
    opt = MeZO([(name, w)], lr=1e-3, eps=1e-3, seed=0)
    opt.record(tmp_path / "u0.mzt", new_tensors={name: initial.zeros()},
               extra={"peft": {"adapter_config": {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1},
                               "base_weights": "0" * 64}})
    for _ in range(2):
        opt.step(lambda: float(w[0, :8].sum()))
    opt.close()
    for i in range(1, 4):
        (tmp_path / f"u{i}.mzt").write_bytes((tmp_path / "u0.mzt").read_bytes())
    code = ("import resource, sys; from mezo_replay.rebuild.adapter import rebuild_many; rebuild_many(sys.argv[2:], sys.argv[1]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")

    def peak(out: str, files: list[str]) -> int:
        r = subprocess.run([sys.executable, "-c", code, out, *files], cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr
        return int(r.stdout.split()[-1])

    one = peak("one", ["u0.mzt"])
    four = peak("four", [f"u{i}.mzt" for i in range(4)])
    assert len(list((tmp_path / "four").iterdir())) == 4
    assert four - one < (64 << 20) // 2, (one, four)


VECTOR = Path(__file__).resolve().parents[1] / "spec" / "vectors" / "tiny-lora"


@pytest.mark.skipif(not (VECTOR / "traj.mzt").is_file(), reason="the base-less spec vector is not in this checkout")
def test_spec_vector_rebuilds_into_an_adapter_with_the_expected_bytes(tmp_path):
    r = inproc("reconstruct", str(VECTOR / "traj.mzt"), "-o", "adapter", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    expected = json.loads((VECTOR / "expected.json").read_text())["tensors"]
    tensors, meta = tensors_of(tmp_path / "adapter" / "adapter_model.safetensors")
    assert list(tensors) == list(expected)
    for name, t in tensors.items():
        assert t.contiguous().view(-1).view(torch.uint8).numpy().tobytes().hex() == expected[name]["bytes"], name


@pytest.mark.slow
def test_train_peft_lora_cli_then_the_printed_rebuild_gives_the_trained_logits(tmp_path):
    """End to end through both commands: `train --peft lora` on the embedded model, then the exact rebuild
    command it prints, run as printed. The folder's PeftModel gives, bit for bit, the logits of the model
    training ended with: peft's own wrapping of the base, holding the trajectory's final tensors (their
    fingerprints are the ones training recorded when it stopped)."""
    import shlex

    import peft

    from mezo_replay.rebuild import replay

    r = cli("train", "--peft", "lora", "--lora-r", "2", "--steps", "3", "--batch-size", "4", "--eval-every", "0",
            "-q", "-o", "run.mzt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    printed = [line.strip() for line in r.stdout.splitlines() if line.strip().startswith("mezo-replay reconstruct")]
    assert printed == ["mezo-replay reconstruct run.mzt -o run-adapter"], r.stdout
    r = cli(*shlex.split(printed[0])[1:], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    traj = read_trajectory(tmp_path / "run.mzt")
    assert traj.header["base"]["source"] == embedded.MODEL_NAME
    config = json.loads((tmp_path / "run-adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == embedded.MODEL_NAME

    config = peft.get_peft_config(dict(traj.header["peft"]["adapter_config"]))
    trained = peft.get_peft_model(load_base(embedded.MODEL_DIR), config).eval()
    final = dict(replay.replayed(replay.plan(None, traj)))
    peft.set_peft_model_state_dict(trained, final)
    assert all(torch.equal(p, final[saved_name(n)]) for n, p in trained.named_parameters() if ".lora_" in n)
    x = batch(embedded.MODEL_DIR)
    with torch.no_grad():
        expected = trained(**x).logits
        assert not torch.equal(expected, load_base(embedded.MODEL_DIR)(**x).logits)  # the adapter does something
    assert torch.equal(adapter_logits(embedded.MODEL_DIR, tmp_path / "run-adapter"), expected)


@pytest.mark.parametrize("task", ["label-words", "classify-head"])
def test_bert_adapters_from_train_rebuild_and_merge(tmp_path, task):
    """What `train --peft lora` makes of a masked LM: label words (peft task type none) and a new
    classifier head (SEQ_CLS; the head and pooler travel whole in INIT chunks). The CLI rebuilds each into
    a folder whose PeftModel gives the trained logits bitwise, and merges it into the base."""
    import transformers as tf
    from peft import PeftModel

    from mezo_replay.training.data import load_splits
    from mezo_replay.training.peft_tuning import PeftOptions
    from mezo_replay.training.train import TrainConfig, train
    from tests.test_peft_train import BATCH, MASKED, write_data

    model_dir = make_model("bert", tmp_path / "bert")
    files = write_data(tmp_path)
    rows, ev = load_splits(files["label-words.train"], files["label-words.eval"])
    options = MASKED if task == "label-words" else {"text_key": "sentence"}
    result = train(TrainConfig(model=model_dir, train_examples=rows, eval_examples=ev, out=tmp_path / "run.mzt",
                               steps=2, lr=5e-2, batch_size=8, task=task, task_options=options,
                               peft=PeftOptions("lora", r=4)))
    with torch.no_grad():
        expected = result.model(input_ids=BATCH[0], attention_mask=BATCH[1]).logits
    r = inproc("reconstruct", "run.mzt", "-o", "adapter", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    head = task == "classify-head"
    auto = tf.AutoModelForSequenceClassification if head else tf.AutoModelForMaskedLM
    base = auto.from_pretrained(model_dir, **({"num_labels": 2} if head else {})).eval()
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=BATCH[0], attention_mask=BATCH[1]).logits, expected)
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert ("BertForSequenceClassification" if head else "AutoModelForMaskedLM") in card

    r = inproc("reconstruct", "run.mzt", "--merge", str(model_dir), "-o", "merged", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    merged = auto.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = merged(input_ids=BATCH[0], attention_mask=BATCH[1]).logits
    assert torch.allclose(got, expected, rtol=0, atol=1e-5)
