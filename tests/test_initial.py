"""Generated initial values (spec/init.md): torch's generate() against the numpy reference, the limits
that keep the init stream apart from every step, and the checks that stop a wrong starting value from
being trained or replayed. Header validation of init objects is in test_mzt.py (BAD_HEADERS) and
test_hostile.py; the spec's vectors in test_spec_vectors.py."""
from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from mezo_replay.arithmetic import initial, reference as R
from mezo_replay.format import mzt
from mezo_replay.rebuild import replay
from mezo_replay.errors import CorruptChunkError, LimitError, MezoReplayError
from mezo_replay.format.fingerprint import base_fingerprint, tensor_fingerprint
from mezo_replay.training.optimizer import MeZO
from tests.test_mzt import PREAMBLE, chunk, crafted, head_chunk, make_header, rebase, step_chunk, zframe
from tests.test_spec_vectors import DEVICES, TORCH_DTYPE, torch_to_bits

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
SPECS = [initial.zeros(), initial.uniform16(initial.kaiming_uniform_bound(7)), initial.uniform16(2.0**-140),
         initial.uniform16(70000.0), initial.gaussian16(1.0), initial.gaussian16(0.02), initial.gaussian16(2.0**-20)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", SPECS, ids=[str(s) for s in SPECS])
def test_generate_matches_the_reference(device: str, spec: dict) -> None:
    for dtype in ("F32", "BF16", "F16"):
        for seed, k, shape in ((0, 0, [37]), (2**64 - 1, 1048575, [3, 1, 17]), (2**40 + 3, 9, []), (5, 2, [0, 4])):
            got = initial.generate(spec, seed, k, shape, TORCH_DTYPE[dtype], device)
            assert list(got.shape) == shape and got.dtype == TORCH_DTYPE[dtype] and got.device.type == device
            want = R.initial_value(spec, seed, k, shape, dtype)
            assert torch_to_bits(got, dtype).tolist() == want.tolist(), (dtype, seed, k, shape)


def test_generate_does_not_depend_on_slicing(monkeypatch: pytest.MonkeyPatch) -> None:
    """generate() works in slices of _SLICE elements; any slice size, aligned to Philox's 8-element
    blocks or not, gives the same bits (each element depends on its own index only)."""
    for spec in SPECS[1:2] + SPECS[4:5]:
        whole = initial.generate(spec, 11, 3, [1001], torch.bfloat16)
        for size in (8, 13, 1000):
            monkeypatch.setattr(initial, "_SLICE", size)
            assert torch.equal(initial.generate(spec, 11, 3, [1001], torch.bfloat16).view(torch.int16),
                               whole.view(torch.int16)), size
        monkeypatch.undo()


def test_values_have_the_stated_distribution() -> None:
    """init.md's properties: uniform16 lies strictly inside (-b, b) on odd multiples of b/65536 with
    exactly zero mean over all u; gaussian16 is the noise table times std; zeros are +0.0."""
    u = np.arange(65536)
    q = (2 * u - 65535).astype(np.float32) * np.float32(2.0**-16)
    assert q.sum(dtype=np.float64) == 0.0 and np.abs(q).max() < 1 and np.abs(q).min() == 2.0**-16
    v = R.initial_binary32(initial.uniform16(1.0), 3, 0, np.arange(200_000, dtype=np.uint64))
    assert set(np.unique(np.abs(v) * 65536).astype(np.int64) % 2) == {1}  # odd multiples of 2^-16
    g = R.initial_binary32(initial.gaussian16(1.0), 3, 0, np.arange(8, dtype=np.uint64))
    assert np.isin(g, R.gauss16_table()).all()
    z = initial.generate(initial.zeros(), 0, 0, [5], torch.float16)
    assert torch_to_bits(z, "F16").tolist() == [0] * 5  # +0.0, not -0.0


def test_scales_are_binary32_and_peft_bounds() -> None:
    assert initial.kaiming_uniform_bound(2048) == 1 / math.sqrt(2048)
    assert initial.uniform16(initial.kaiming_uniform_bound(2048))["bound"] == 0.022097086533904076
    assert initial.uniform16(0.1)["bound"] == float(np.float32(0.1)) != 0.1
    assert initial.gaussian16(1)["std"] == 1.0
    for bad in (0.0, -1.0, float("inf"), float("nan"), 1e39):
        with pytest.raises(ValueError, match="positive finite binary32"):
            initial.gaussian16(bad)
    with pytest.raises(ValueError, match="unknown initial value"):
        initial.generate({"name": "xavier"}, 0, 0, [3], torch.float32)
    with pytest.raises(ValueError, match="unknown initial value"):
        R.initial_value({"name": "zeros", "std": 1.0}, 0, 0, [3], "F32")


def test_the_init_stream_is_never_a_step() -> None:
    """A file holds at most 2^32 - 1 steps (indices up to 2^32 - 2): the step index 2^32 - 1 is free."""
    assert mzt.MAX_STEPS == 2**32 - 1 == initial.INIT_STREAM == R.INIT_STREAM
    last_step = mzt.MAX_STEPS - 1
    idx = np.arange(64, dtype=np.uint64)
    assert not np.array_equal(R.random_u16(9, last_step, 0, idx), R.random_u16(9, R.INIT_STREAM, 0, idx))


def test_writer_and_reader_hold_the_step_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The limit itself (2^32 - 1 steps) is too many to write in a test; a lowered one shows that
    the writer stops at it and the reader refuses a file beyond it, by the same comparisons."""
    path = tmp_path / "six.mzt"
    with mzt.TrajectoryWriter(path, make_header(losses=False), steps_per_chunk=2) as w:
        for _ in range(6):
            w.append_step(0x3F80)
    monkeypatch.setattr(mzt, "MAX_STEPS", 6)
    assert mzt.read_trajectory(path).steps == 6  # exactly at the limit: accepted
    monkeypatch.setattr(mzt, "MAX_STEPS", 5)
    with pytest.raises(CorruptChunkError, match="more than 5 steps"):
        mzt.read_trajectory(path)
    with mzt.TrajectoryWriter(tmp_path / "five.mzt", make_header(losses=False), steps_per_chunk=2) as w:
        for _ in range(5):
            w.append_step(0x3F80)
        with pytest.raises(LimitError, match="at most 5 steps"):
            w.append_step(0x3F80)
    assert mzt.read_trajectory(tmp_path / "five.mzt").steps == 5


def test_an_init_chunk_for_a_generated_tensor_is_corrupt(tmp_path: Path) -> None:
    header = make_header()
    header["tensors"][0]["init"] = initial.zeros()
    rebase(header)
    init = chunk(b"INIT", zframe(struct.pack("<IQ", 0, 0) + bytes(24)))
    with pytest.raises(CorruptChunkError, match="not marked init"):
        mzt.read_trajectory(crafted(tmp_path, PREAMBLE, head_chunk(header), init, step_chunk(0, [1])))


def _adapter(seed: int = 2**33 + 1) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    specs = {"a.lora_A.weight": initial.uniform16(initial.kaiming_uniform_bound(6)),
             "a.lora_B.weight": initial.zeros(), "prompt_embeddings": initial.gaussian16(1.0)}
    shapes = {"a.lora_A.weight": [2, 6], "a.lora_B.weight": [4, 2], "prompt_embeddings": [3, 5]}
    params = {n: initial.generate(specs[n], seed, k, shapes[n], torch.bfloat16).requires_grad_(True)
              for k, n in enumerate(sorted(specs))}
    return params, specs


def test_the_optimizer_refuses_a_parameter_not_holding_its_init() -> None:
    params, specs = _adapter()
    header = MeZO(params.items(), lr=1e-3, eps=1e-3, seed=2**33 + 1).header(new_tensors=specs)
    assert [t["init"] for t in header["tensors"]] == [specs[t["name"]] for t in header["tensors"]]
    assert [t["sha256"] for t in header["tensors"]] == [tensor_fingerprint(params[t["name"]].detach())
                                                       for t in header["tensors"]]
    with pytest.raises(ValueError, match="a.lora_A.weight did not start from the initial value"):
        MeZO(params.items(), lr=1e-3, eps=1e-3, seed=2**33 + 2).header(new_tensors=specs)  # another seed
    params["prompt_embeddings"].data[1, 2] += 1
    with pytest.raises(ValueError, match="prompt_embeddings did not start from"):
        MeZO(params.items(), lr=1e-3, eps=1e-3, seed=2**33 + 1).header(new_tensors=specs)


def test_a_generated_value_that_misses_its_fingerprint_is_never_replayed(tmp_path: Path) -> None:
    """A reader whose generator disagrees with the writer's (here: a header whose sha256 is of another
    value) refuses before replaying, with a VerificationError naming the tensor."""
    params, specs = _adapter()
    opt = MeZO(params.items(), lr=1e-3, eps=1e-3, seed=2**33 + 1)
    header = opt.header(new_tensors=specs, record_losses=False)
    header["tensors"][0]["sha256"] = tensor_fingerprint(torch.zeros(2, 6, dtype=torch.bfloat16))
    header["base"]["fingerprint"] = base_fingerprint([t["name"] for t in header["tensors"]],
                                                     [t["sha256"] for t in header["tensors"]])
    with mzt.TrajectoryWriter(tmp_path / "t.mzt", header) as w:
        w.append_step(0x3F80)
    p = replay.plan(None, tmp_path / "t.mzt")
    with pytest.raises(replay.VerificationError, match="generated initial value of 'a.lora_A.weight'"):
        next(replay.replayed(p))


def test_only_a_trajectory_with_every_init_replays_without_base() -> None:
    assert not replay.needs_base(mzt.read_trajectory(VECTORS / "tiny-lora" / "traj.mzt"))
    for name in ("tiny", "tiny-new-tensor"):  # the latter has one init tensor, the others need the base
        traj = mzt.read_trajectory(VECTORS / name / "traj.mzt")
        assert replay.needs_base(traj)
        with pytest.raises(MezoReplayError, match="give the base"):
            replay.plan(None, traj)
