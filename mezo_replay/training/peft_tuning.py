"""A transformers model turned into a peft model whose adapter MeZO tunes, starting from values the
trajectory regenerates.

peft builds the adapter (LoRA or prefix tuning), so the result is a real peft adapter that serving stacks
load. What peft draws at random (LoRA's A, a prefix's embeddings) is then overwritten with values from the
run's own generator (mezo_replay.arithmetic.initial, spec/init.md): same distribution and scale as peft's, but
reproducible from the seed alone, so the trajectory stores no initial value and rebuilds without a base.
Each tuned tensor is named by the key peft saves it under in adapter_model.safetensors, and its generator
index is that name's position in UTF-8 order, the order MeZO sorts its tensors in.
"""
from __future__ import annotations

import enum
import hashlib
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import MezoReplayError
from ..arithmetic.initial import gaussian16, generate, kaiming_uniform_bound, uniform16, zeros

KINDS = ("lora", "prefix")


@dataclass(frozen=True)
class PeftOptions:
    """What `mezo-replay train --peft` builds. `targets` None: peft's default modules for the architecture."""

    kind: str  # "lora" or "prefix"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None
    num_virtual_tokens: int = 10

    def check(self) -> None:
        if self.kind not in KINDS:
            raise MezoReplayError(f"--peft {self.kind!r}: choose one of {', '.join(KINDS)}")
        if self.r < 1 or self.alpha <= 0 or self.num_virtual_tokens < 1:
            raise MezoReplayError("--lora-r, --lora-alpha and --num-virtual-tokens must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise MezoReplayError(f"--lora-dropout {self.dropout}: must be in [0, 1)")
        if self.targets is not None and (not self.targets or not all(t.strip() for t in self.targets)):
            raise MezoReplayError("--lora-targets: give module names separated by commas, e.g. q_proj,v_proj")


@dataclass
class PeftSetup:
    """A wrapped model and what the trajectory header needs to describe its adapter."""

    model: Any  # the peft.PeftModel
    params: dict[str, torch.nn.Parameter]  # saved key -> the tuned parameter
    inits: dict[str, Any]  # saved key -> True (stored whole: a head) or a generated `init` object
    adapter_config: dict[str, Any]  # JSON-safe adapter_config.json, base_model_name_or_path/revision null
    options: PeftOptions
    targets: tuple[str, ...]  # LoRA: the target module names actually used

    def metadata(self) -> dict[str, str]:
        """spec/metadata.md's peft keys: everything a resume must match that the adapter's shape sets."""
        o = self.options
        if o.kind == "prefix":
            return {"peft": "prefix", "num_virtual_tokens": str(o.num_virtual_tokens)}
        return {"peft": "lora", "lora_r": str(o.r), "lora_alpha": str(o.alpha), "lora_dropout": repr(float(o.dropout)),
                "lora_targets": ",".join(self.targets)}

    @property
    def adapter_elements(self) -> int:
        return sum(p.numel() for p in self.params.values())


def _conv1d() -> type:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def linear_leaf_names(model: Any) -> list[str]:
    """The distinct last name parts of the model's Linear and Conv1D layers: what --lora-targets can name."""
    kinds = (torch.nn.Linear, _conv1d())
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and isinstance(m, kinds)})


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of target names: the module's full name, or its name ending in '.target'."""
    return name == target or name.endswith("." + target)


def default_targets(model: Any) -> tuple[str, ...] | None:
    """peft's per-architecture LoRA targets (e.g. q_proj,v_proj for Llama and OPT, c_attn for GPT-2,
    query_key_value for BLOOM, query,value for BERT), or None if peft has none for this model type."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    found = defaults.get(getattr(model.config, "model_type", None))
    return tuple(found) if found else None


def _check_targets(model: Any, targets: Sequence[str], given: bool) -> None:
    kinds = (torch.nn.Linear, _conv1d())
    modules = dict(model.named_modules())
    names = linear_leaf_names(model)
    for t in targets:
        hits = [n for n in modules if n and _matches(n, t)]
        if not hits:
            where = "--lora-targets" if given else f"peft's default target for {model.config.model_type}"
            raise MezoReplayError(f"{where} {t!r} matches no module of {type(model).__name__}; its Linear/Conv1D "
                                  f"layers are named: {', '.join(names)}")
        bad = [n for n in hits if not isinstance(modules[n], kinds)]
        if bad:
            raise MezoReplayError(f"--lora-targets {t!r}: {bad[0]} is of type {type(modules[bad[0]]).__name__}, not a Linear "
                                  f"or Conv1D layer (MeZO-LoRA generates the initial values of those only); "
                                  f"pick from: {', '.join(names)}")


def _json_safe(value: Any) -> Any:
    """adapter_config.json as peft writes it, but deterministic: sets as sorted lists, enums as their values."""
    if isinstance(value, enum.Enum):
        return _json_safe(value.value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((_json_safe(v) for v in value), key=str)
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise MezoReplayError(f"the peft config holds a {type(value).__name__}, which adapter_config.json cannot carry")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def wrap(model: Any, options: PeftOptions, *, task: str, masked: bool, seed: int,
         extra_modules: Collection[str] = ()) -> PeftSetup:
    """The peft model of `model` (a loaded transformers model, in eval mode) with its adapter set to the
    generated initial values of run seed `seed`. `extra_modules`: modules whose weights the base lacks
    (besides a classifier head, which peft saves itself), saved whole with the adapter so it fits the base."""
    import peft

    options.check()
    if options.kind == "prefix":
        # peft hands the prefix to transformers as `past_key_values`, which transformers 5 now warns about on
        # every model call; the user can do nothing about it, so it is kept off their terminal.
        warnings.filterwarnings("ignore", message=r".*`past_key_values` is deprecated", category=FutureWarning)
    if options.kind == "prefix" and masked:
        raise MezoReplayError("--peft prefix: peft's prefix tuning serves causal LMs only, and this is a masked LM "
                              "(peft has no masked-LM task for it); use --peft lora")
    if options.kind == "prefix" and task == "classify-head":
        raise MezoReplayError("--peft prefix with --task classify-head: peft's sequence classifiers take no prefix "
                              "(no past key values); use --peft lora, or --task label-words with prefix tuning")
    task_type = "SEQ_CLS" if task == "classify-head" else None if masked else "CAUSAL_LM"
    targets: tuple[str, ...] = ()
    if options.kind == "lora":
        given = options.targets is not None
        targets = tuple(dict.fromkeys(t.strip() for t in options.targets)) if given else default_targets(model)
        if not targets:
            raise MezoReplayError(f"peft has no default LoRA targets for model type "
                                  f"{getattr(model.config, 'model_type', None)!r}: pass --lora-targets, from: "
                                  f"{', '.join(linear_leaf_names(model))}")
        _check_targets(model, targets, given)
        config = peft.LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                                 target_modules=list(targets), task_type=task_type,
                                 modules_to_save=sorted(extra_modules) or None)
    else:
        if extra_modules:
            raise MezoReplayError(f"--peft prefix: the base lacks weights of {', '.join(sorted(extra_modules))}, "
                                  f"which a prefix adapter cannot carry; use --peft lora")
        config = peft.PrefixTuningConfig(num_virtual_tokens=options.num_virtual_tokens, task_type=task_type)
    try:
        with warnings.catch_warnings():  # peft's notes on transformers deprecations and Conv1D's layout
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
            wrapped = peft.get_peft_model(model, config)
    except (ValueError, TypeError, KeyError, AttributeError, NotImplementedError, RuntimeError) as e:
        raise MezoReplayError(f"peft cannot wrap {type(model).__name__} for --peft {options.kind}: {_one_line(e)}") \
            from None
    wrapped.eval()  # get_peft_model leaves the model in training mode: dropout would make the two forwards differ
    keys = saved_keys(wrapped)
    inits = _initial_values(wrapped, keys)
    order = sorted(keys, key=lambda n: n.encode("utf-8"))  # MeZO's tensor order: the generator's index k
    with torch.no_grad():
        for k, key in enumerate(order):
            spec = inits[key]
            if isinstance(spec, Mapping):
                p = keys[key]
                p.copy_(generate(spec, seed, k, p.shape, p.dtype, p.device))
    adapter_config = _json_safe(wrapped.peft_config["default"].to_dict())
    adapter_config["base_model_name_or_path"] = None
    adapter_config["revision"] = None
    return PeftSetup(wrapped, keys, inits, adapter_config, options, targets)


def saved_keys(wrapped: Any) -> dict[str, torch.nn.Parameter]:
    """Saved key -> trainable parameter, matched by storage with peft's own state dict (no name surgery).
    A prefix's saved `prompt_embeddings` is computed from the embedding, so it is matched by value."""
    from peft import get_peft_model_state_dict

    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    state = get_peft_model_state_dict(wrapped)
    out: dict[str, torch.nn.Parameter] = {}
    for key, value in state.items():
        same = [p for p in trainable if p.data_ptr() == value.data_ptr() and p.shape == value.shape
                and p.dtype == value.dtype]
        if not same and wrapped.peft_config["default"].is_prompt_learning:
            emb = wrapped.prompt_encoder["default"].embedding.weight
            same = [emb] if emb.requires_grad and torch.equal(emb.detach().cpu(), value) else []
        if len(same) != 1:
            raise MezoReplayError(f"peft saves {key!r}, which is not exactly one trainable parameter")
        out[key] = same[0]
    if {id(p) for p in out.values()} != {id(p) for p in trainable}:
        raise MezoReplayError("peft trains parameters it does not save: this adapter could not be rebuilt")
    return out


def _initial_values(wrapped: Any, keys: Mapping[str, torch.nn.Parameter]) -> dict[str, Any]:
    """The `init` of each saved tensor, decided by the module that owns it: LoRA A kaiming-uniform over its
    input features (peft's init), B zeros, a prefix's embeddings N(0, 1) (nn.Embedding's), anything else
    (a modules_to_save head) stored whole."""
    from peft.tuners.lora import LoraLayer

    spec: dict[int, Any] = {}
    for module in wrapped.modules():
        if isinstance(module, LoraLayer):
            for a in module.lora_A.values():
                spec[id(a.weight)] = uniform16(kaiming_uniform_bound(a.weight.shape[1]))
            for b in module.lora_B.values():
                spec[id(b.weight)] = zeros()
    if wrapped.peft_config["default"].is_prompt_learning:
        spec[id(wrapped.prompt_encoder["default"].embedding.weight)] = gaussian16(1.0)
    return {key: spec.get(id(p), True) for key, p in keys.items()}


@contextmanager
def same_dropout(model: Any, seed: int, step: int) -> Iterator[None]:
    """LoRA dropout on, with masks drawn from a torch generator seeded by (seed, step): each of MeZO's two
    forwards of a step sees the same masks (the same function), and a resumed run draws the ones an
    uninterrupted run drew. The base model's own dropout stays off, as in full-parameter MeZO."""
    from peft.tuners.lora import LoraLayer

    drops = [d for m in model.modules() if isinstance(m, LoraLayer) for d in m.lora_dropout.values()
             if isinstance(d, torch.nn.Dropout)]
    device = next(model.parameters()).device
    digest = hashlib.sha256(f"mezo-replay lora dropout {seed} {step}".encode()).digest()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        for d in drops:
            d.train()
        try:
            yield
        finally:
            for d in drops:
                d.eval()
