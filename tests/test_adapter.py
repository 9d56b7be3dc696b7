"""PEFT trajectories rebuilt without a base into adapter folders that peft loads, bit for bit.

The trajectories are made here the way `train --peft` makes them: peft wraps a tiny Llama (built from a
transformers config), the adapter starts from mezo_replay.initial's generated values, MeZO tunes it
under the names peft saves it by, with a real loss. The rebuilds go through the real CLI."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from mezo_replay import embedded, initial
from mezo_replay.mzt import read_trajectory
from mezo_replay.optimizer import MeZO
from mezo_replay.safetensors_io import BaseCheckpoint
from tests.test_train_tasks import make_model

PROMPTS = ["Review: the soup was cold and bland. Sentiment:", "Review: a delight from start to end. Sentiment:"]


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mezo_replay", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


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
