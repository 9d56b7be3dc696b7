"""Tests for mezo_replay.format.safetensors_io on real checkpoints written by transformers and safetensors."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from mezo_replay.errors import CheckpointError, MezoReplayError, OutputExistsError
from mezo_replay.format.safetensors_io import BaseCheckpoint, CheckpointWriter

# name -> (dtype, tie_word_embeddings, max_shard_size); the small shard sizes force several shards.
MODELS = {
    "f32_sharded": (torch.float32, False, "10KB"),
    "bf16_single": (torch.bfloat16, True, "50GB"),
    "f16_sharded": (torch.float16, False, "8KB"),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    out = {}
    for i, (name, (dtype, tie, shard)) in enumerate(MODELS.items()):
        torch.manual_seed(i)
        config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie)
        model = LlamaForCausalLM(config).to(dtype)
        with torch.no_grad():  # norms init to exactly 1.0; make every tensor distinctive
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.save_pretrained(root / name, max_shard_size=shard)
        (root / name / "tokenizer.json").write_text('{"version": "1.0"}')
        (root / name / "README.md").write_text("# tiny\n")
        out[name] = root / name
    assert (out["f32_sharded"] / "model.safetensors.index.json").exists()
    assert (out["f16_sharded"] / "model.safetensors.index.json").exists()
    assert (out["bf16_single"] / "model.safetensors").exists()
    return out


@pytest.fixture
def model_copy(models: dict[str, Path], tmp_path: Path):
    def copy(name: str) -> Path:
        return Path(shutil.copytree(models[name], tmp_path / f"copy_{name}"))
    return copy


def base_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert as_bytes(a) == as_bytes(b)


def split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def copy_all(base: BaseCheckpoint, out: Path, **kw) -> Path:
    with CheckpointWriter(base, out, **kw) as w:
        for name in base.entries:
            w.copy_from_base(name)
        return w.commit()


# ---------------------------------------------------------------- reading


@pytest.mark.parametrize("name", MODELS)
def test_read_matches_load_file(models: dict[str, Path], name: str) -> None:
    base = BaseCheckpoint.open(models[name])
    expected = base_tensors(models[name])
    assert set(base.entries) == set(expected)
    for tname, want in expected.items():
        got = base.read(tname)
        assert_same(got, want)
        assert got.is_contiguous() and got.device.type == "cpu"
        assert bytes(base.read_bytes(tname)) == as_bytes(want)
    assert base.is_dir and all(m.get("format") == "pt" for m in base.metadata.values())
    assert [f.name for f in base.files] == sorted({e.file.name for e in base.entries.values()})
    if name == "bf16_single":
        assert base.entries["model.embed_tokens.weight"].dtype == "BF16"
        assert "lm_head.weight" not in base.entries  # tied


def test_read_is_a_writable_copy(models: dict[str, Path]) -> None:
    base = BaseCheckpoint.open(models["bf16_single"])
    t = base.read("model.norm.weight")
    t.add_(1)
    assert not torch.equal(t, base.read("model.norm.weight"))


def test_single_file_entries_and_offsets(models: dict[str, Path]) -> None:
    path = models["bf16_single"] / "model.safetensors"
    base = BaseCheckpoint.open(path)
    assert not base.is_dir and base.files == [path] and base.aux_files() == []
    header, data = split(path)
    data_start = path.stat().st_size - len(data)
    for name, e in base.entries.items():
        assert e.file == path and e.dtype == header[name]["dtype"] and list(e.shape) == header[name]["shape"]
        assert [e.start - data_start, e.end - data_start] == header[name]["data_offsets"]


def test_odd_dtypes_scalars_and_empty_tensors(tmp_path: Path) -> None:
    tensors = {
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 3),
        "i64": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "flags": torch.tensor([True, False, True]),
        "bf16": torch.tensor([1.0, -2.5, float("nan")], dtype=torch.bfloat16),
        "u8": torch.arange(5, dtype=torch.uint8),
    }
    path = tmp_path / "odd.safetensors"
    save_file(tensors, path, metadata={"k": "v"})
    base = BaseCheckpoint.open(path)
    assert base.metadata == {"odd.safetensors": {"k": "v"}}
    assert {n: e.dtype for n, e in base.entries.items()} == {
        "scalar": "F32", "empty": "F32", "i64": "I64", "flags": "BOOL", "bf16": "BF16", "u8": "U8"}
    for name, want in tensors.items():
        assert_same(base.read(name), want)
    out = copy_all(base, tmp_path / "out.safetensors")
    assert split(out)[1] == split(path)[1]
    for name, want in load_file(out).items():
        assert_same(want, tensors[name])


# ---------------------------------------------------------------- writing


@pytest.mark.parametrize("name", MODELS)
def test_copy_all_reproduces_base(models: dict[str, Path], tmp_path: Path, name: str) -> None:
    src = models[name]
    base = BaseCheckpoint.open(src)
    out = copy_all(base, tmp_path / "out", metadata={"mezo_replay": "1"})
    assert out == tmp_path / "out" and leftovers(tmp_path) == []
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    for f in base.files:
        base_header, base_data = split(f)
        out_header, out_data = split(out / f.name)
        assert out_data == base_data  # same offsets, same bytes
        assert out_header.pop("__metadata__") == {**base_header.pop("__metadata__"), "mezo_replay": "1"}
        assert out_header == base_header
        assert struct.unpack("<Q", (out / f.name).read_bytes()[:8])[0] % 8 == 0
        with safe_open(out / f.name, "pt") as so:
            assert so.metadata() == {"format": "pt", "mezo_replay": "1"}
    for aux in ["config.json", "generation_config.json", "tokenizer.json", "README.md"]:
        assert (out / aux).read_bytes() == (src / aux).read_bytes()
    if base.index_file:
        assert (out / base.index_file.name).read_bytes() == base.index_file.read_bytes()
    expected = base_tensors(src)
    got = base_tensors(out)
    assert set(got) == set(expected)
    for tname in expected:
        assert_same(got[tname], expected[tname])
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for tname, want in expected.items():
        assert_same(loaded[tname].to(want.dtype), want)


def test_copy_single_file(models: dict[str, Path], tmp_path: Path) -> None:
    src = models["bf16_single"] / "model.safetensors"
    base = BaseCheckpoint.open(src)
    out = copy_all(base, tmp_path / "tuned.safetensors", metadata={"format": "pt", "trajectory": "abc"})
    assert split(out)[1] == split(src)[1]
    assert list(tmp_path.iterdir()) == [out]
    with safe_open(out, "pt") as so:
        assert so.metadata() == {"format": "pt", "trajectory": "abc"}
    for name, want in load_file(src).items():
        assert_same(load_file(out)[name], want)


@pytest.mark.parametrize("name", ["f32_sharded", "bf16_single"])
def test_write_in_reverse_order_with_updates(models: dict[str, Path], tmp_path: Path, name: str) -> None:
    base = BaseCheckpoint.open(models[name])
    names = list(base.entries)
    updated = {names[0]: base.read(names[0]) + 1, names[-1]: base.read(names[-1]) * 2}
    with CheckpointWriter(base, tmp_path / "out") as w:
        for i, tname in enumerate(reversed(names)):
            if tname in updated:
                w.write(tname, updated[tname])
            elif i % 3 == 0:
                w.write(tname, base.read_bytes(tname))
            elif i % 3 == 1:
                w.write(tname, bytes(base.read_bytes(tname)))
            else:
                w.write(tname, base.read(tname))
        w.commit()
    got, expected = base_tensors(tmp_path / "out"), base_tensors(models[name])
    for tname in names:
        assert_same(got[tname], updated.get(tname, expected[tname]))
    assert not torch.equal(got[names[0]], expected[names[0]])


def test_bad_writes_are_refused(models: dict[str, Path], tmp_path: Path) -> None:
    base = BaseCheckpoint.open(models["f32_sharded"])
    name = "model.norm.weight"
    good = base.read(name)
    with CheckpointWriter(base, tmp_path / "out") as w:
        bad = [good[:-1], good.to(torch.float16), good.reshape(4, 4), bytes(base.read_bytes(name))[:-1],
               bytes(base.read_bytes(name)) + b"\0", torch.zeros(())]
        for data in bad:
            with pytest.raises(CheckpointError, match="model.norm.weight"):
                w.write(name, data)
        with pytest.raises(CheckpointError, match="no tensor named"):
            w.write("nope", good)
        w.write(name, good)
        with pytest.raises(CheckpointError, match="twice"):
            w.write(name, good)
        with pytest.raises(CheckpointError, match="twice"):
            w.copy_from_base(name)
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["f32_sharded", "bf16_single"])
def test_commit_with_missing_tensor_leaves_nothing(models: dict[str, Path], tmp_path: Path,
                                                    name: str) -> None:
    base = BaseCheckpoint.open(models[name])
    names = list(base.entries)
    w = CheckpointWriter(base, tmp_path / "out")
    assert leftovers(tmp_path)  # the temporary exists while writing
    for tname in names[2:]:
        w.copy_from_base(tname)
    with pytest.raises(CheckpointError, match=f"{names[0]!r} was never written \\(2 of"):
        w.commit()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError, match="aborted"):
        w.copy_from_base(names[0])


def test_exception_inside_with_leaves_nothing(models: dict[str, Path], tmp_path: Path) -> None:
    base = BaseCheckpoint.open(models["f16_sharded"])
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(base, tmp_path / "out") as w:
            for name in base.entries:
                w.copy_from_base(name)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with CheckpointWriter(base, tmp_path / "out2") as w:  # leaving without commit also aborts
        w.copy_from_base(next(iter(base.entries)))
    assert list(tmp_path.iterdir()) == []


def test_existing_output_and_overwrite(models: dict[str, Path], tmp_path: Path) -> None:
    base = BaseCheckpoint.open(models["f32_sharded"])
    out = copy_all(base, tmp_path / "out", metadata={"run": "old"})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputExistsError, match="--overwrite"):
        CheckpointWriter(base, out)
    assert isinstance(OutputExistsError("x"), MezoReplayError)

    with pytest.raises(RuntimeError):  # overwrite, but the new write fails: the old output survives
        with CheckpointWriter(base, out, overwrite=True, metadata={"run": "new"}) as w:
            for name in base.entries:
                w.copy_from_base(name)
            raise RuntimeError("fail")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and leftovers(tmp_path) == []

    copy_all(base, out, overwrite=True, metadata={"run": "new"})
    assert leftovers(tmp_path) == []
    for f in base.files:
        with safe_open(out / f.name, "pt") as so:
            assert so.metadata()["run"] == "new"


def test_existing_single_file_output(models: dict[str, Path], tmp_path: Path) -> None:
    base = BaseCheckpoint.open(models["bf16_single"] / "model.safetensors")
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        CheckpointWriter(base, out)
    w = CheckpointWriter(base, out, overwrite=True)
    w.abort()
    assert out.read_bytes() == b"old" and leftovers(tmp_path) == []
    copy_all(base, out, overwrite=True)
    assert split(out)[1] == split(base.files[0])[1]


def test_unsafe_outputs_are_refused(model_copy, tmp_path: Path) -> None:
    src = model_copy("bf16_single")
    base = BaseCheckpoint.open(src)
    for out in [src, src.parent]:
        with pytest.raises(CheckpointError, match="would replace the base"):
            CheckpointWriter(base, out, overwrite=True)
    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        CheckpointWriter(base, precious, overwrite=True)
    with pytest.raises(CheckpointError, match="is a file"):
        CheckpointWriter(base, precious / "notes.txt", overwrite=True)
    with pytest.raises(CheckpointError, match="parent directory does not exist"):
        CheckpointWriter(base, tmp_path / "missing" / "out")
    single = BaseCheckpoint.open(src / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"must end in \.safetensors"):
        CheckpointWriter(single, tmp_path / "out.bin")
    assert (precious / "notes.txt").exists() and leftovers(tmp_path) == [] and leftovers(src.parent) == []


# ---------------------------------------------------------------- directories


def test_aux_and_skipped_files(model_copy, tmp_path: Path) -> None:
    src = model_copy("f32_sharded")
    skipped = ["adapter_model.safetensors", "pytorch_model.bin", "pytorch_model.bin.index.json",
               "tf_model.h5"]
    for extra in skipped:
        (src / extra).write_bytes(b"\x80\x04not really a pickle")
    (src / "tokenizer.model").write_bytes(b"spm")
    (src / "subdir").mkdir()
    (src / "subdir" / "x.json").write_text("{}")
    base = BaseCheckpoint.open(src)
    assert [p.name for p in base.aux_files()] == [
        "README.md", "config.json", "generation_config.json", "tokenizer.json", "tokenizer.model"]
    assert [p.name for p in base.skipped_files()] == skipped
    out = copy_all(base, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [p.name for p in base.aux_files()] + [f.name for f in base.files] + ["model.safetensors.index.json"])


def test_directory_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"neither model\.safetensors nor .*found: config\.json"):
        BaseCheckpoint.open(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        BaseCheckpoint.open(tmp_path / "absent")


def test_directory_with_only_pickle_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04garbage that must never be unpickled")
    with pytest.raises(CheckpointError, match=r"pickle-based pytorch_model\.bin.*never unpickles"):
        BaseCheckpoint.open(tmp_path)


def test_directory_with_both_layouts(model_copy) -> None:
    src = model_copy("f32_sharded")
    shutil.copy(src / "model-00001-of-00004.safetensors", src / "model.safetensors")
    with pytest.raises(CheckpointError, match="both"):
        BaseCheckpoint.open(src)


# ---------------------------------------------------------------- hostile headers


def entry(dtype: str, shape: list, start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


HOSTILE = {
    # id: (header JSON object or raw bytes, data bytes, header length override, expected message)
    "too_short": (None, b"", None, "too short"),
    "length_past_eof": ({}, b"", 1000, "header length 1000 exceeds the file size"),
    "length_2_63": ({}, b"", 2**63, "exceeds the 100000000 byte cap"),
    "not_json": (b"{not json", b"", None, "header is not valid JSON"),
    "bad_utf8": (b'{"\xff": 1}', b"", None, "header is not valid JSON"),
    "not_object": (b"[1, 2]", b"", None, "not a JSON object"),
    "duplicate": (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                  b'"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"xy", None, "duplicate key 'a'"),
    "overlap": ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, bytes(12), None,
                "tensor 'b' overlaps the data of tensor 'a'"),
    "hole": ({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, bytes(12), None,
             "hole of 4 bytes in the data buffer before tensor 'b'"),
    "hole_at_start": ({"a": entry("F32", [1], 4, 8)}, bytes(8), None, "hole of 4 bytes"),
    "trailing": ({"a": entry("F32", [1], 0, 4)}, bytes(8), None, "4 trailing bytes"),
    "past_eof": ({"a": entry("F32", [4], 0, 16)}, bytes(8), None, "run past the end of the file"),
    "huge_offsets": ({"a": entry("F32", [2**60], 0, 2**62)}, bytes(8), None, "run past the end"),
    "size_mismatch": ({"a": entry("F32", [3], 0, 8)}, bytes(8), None,
                      "needs 12 bytes but its data_offsets span 8"),
    "unknown_dtype": ({"a": entry("F17", [1], 0, 4)}, bytes(4), None, "unsupported dtype 'F17'"),
    "reversed_offsets": ({"a": entry("F32", [0], 4, 0)}, bytes(4), None, "invalid data_offsets"),
    "negative_dim": ({"a": entry("F32", [-1], 0, 4)}, bytes(4), None, "invalid shape"),
    "bool_dim": ({"a": entry("U8", [True], 0, 1)}, bytes(1), None, "invalid shape"),
    "float_offset": ({"a": entry("U8", [1], 0.0, 1)}, bytes(1), None, "invalid data_offsets"),
    "extra_field": ({"a": {**entry("U8", [1], 0, 1), "x": 1}}, bytes(1), None, "exactly dtype, shape"),
    "entry_not_object": ({"a": [1]}, b"", None, "exactly dtype, shape"),
    "bad_metadata": ({"__metadata__": {"a": 1}}, b"", None, "__metadata__ must map strings"),
    "newline_in_name": ({"a\nb": entry("F32", [2], 0, 4)}, bytes(4), None, "tensor 'a\\nb' of dtype"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_headers(tmp_path: Path, case: str) -> None:
    header, data, length, message = HOSTILE[case]
    path = tmp_path / "bad.safetensors"
    if header is None:
        path.write_bytes(b"\x01\x02")
    else:
        raw = header if isinstance(header, bytes) else json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    with pytest.raises(CheckpointError) as info:
        BaseCheckpoint.open(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and "\n" not in text
    assert message in text


def test_padded_header_and_empty_file_are_valid(tmp_path: Path) -> None:
    path = tmp_path / "ok.safetensors"
    raw = json.dumps({"a": entry("U8", [2], 0, 2)}).encode() + b"   "
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"xy")
    assert bytes(BaseCheckpoint.open(path).read_bytes("a")) == b"xy"
    path.write_bytes(struct.pack("<Q", 2) + b"{}")
    assert BaseCheckpoint.open(path).entries == {}


# ---------------------------------------------------------------- hostile indexes


def edit_index(src: Path, edit) -> Path:
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    edit(data["weight_map"])
    index.write_text(json.dumps(data))
    return index


@pytest.mark.parametrize("shard", [
    "../model-00001-of-00004.safetensors", "/etc/model.safetensors", "sub/model.safetensors",
    "..\\model.safetensors", "..", "model-00001-of-00004.bin", "C:model.safetensors", 7,
])
def test_index_with_unsafe_shard_names(model_copy, shard) -> None:
    src = model_copy("f32_sharded")
    index = edit_index(src, lambda wm: wm.__setitem__("model.norm.weight", shard))
    with pytest.raises(CheckpointError, match="unsafe shard name") as info:
        BaseCheckpoint.open(src)
    assert str(info.value).startswith(str(index))


def test_index_with_missing_shard(model_copy) -> None:
    src = model_copy("f32_sharded")
    (src / "model-00002-of-00004.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00004.safetensors listed in the ind"):
        BaseCheckpoint.open(src)


def test_index_tensor_missing_from_shard(model_copy) -> None:
    src = model_copy("f32_sharded")
    edit_index(src, lambda wm: wm.__setitem__("ghost.weight", "model-00001-of-00004.safetensors"))
    with pytest.raises(CheckpointError, match="'ghost.weight' listed for shard model-00001-.* is not in"):
        BaseCheckpoint.open(src)


def test_index_maps_tensor_to_wrong_shard(model_copy) -> None:
    src = model_copy("f32_sharded")
    base = BaseCheckpoint.open(src)
    name = "model.norm.weight"
    other = next(f.name for f in base.files if f != base.entries[name].file)
    edit_index(src, lambda wm: wm.__setitem__(name, other))
    with pytest.raises(CheckpointError, match=f"but the index maps it to {other}"):
        BaseCheckpoint.open(src)


def test_index_not_listing_a_tensor(model_copy) -> None:
    src = model_copy("f32_sharded")
    edit_index(src, lambda wm: wm.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match="'model.norm.weight' is in shard .* but the index does"):
        BaseCheckpoint.open(src)


def test_tensor_in_two_shards(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2), "x": torch.zeros(1)}, tmp_path / "a.safetensors")
    save_file({"w": torch.ones(2), "y": torch.zeros(1)}, tmp_path / "b.safetensors")
    index = {"metadata": {}, "weight_map": {"w": "a.safetensors", "x": "a.safetensors", "y": "b.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'w' is in two shards, a.safetensors and b.safetensors"):
        BaseCheckpoint.open(tmp_path)


@pytest.mark.parametrize("content, message", [
    (b"{oops", "index is not valid JSON"),
    (b"[]", "weight_map"),
    (b'{"weight_map": {}}', "weight_map"),
    (b'{"weight_map": {"a": "a.safetensors", "a": "b.safetensors"}}', "duplicate key 'a'"),
    (b'{"metadata": 3, "weight_map": {"a": "a.safetensors"}}', "metadata"),
])
def test_malformed_index(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "model.safetensors.index.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        BaseCheckpoint.open(tmp_path)
