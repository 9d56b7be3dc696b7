"""`info --plot` and `push --plot`: the recorded training curves of real trajectories drawn into real files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch

from mezo_replay.plot import smoothed, smoothing_window
from mezo_replay.training.optimizer import MeZO
from tests.test_adapter import inproc, one_error_line
from tests.test_publish import SHA, FakeApi, op_bytes
from tests.test_roundtrip import lm_closure, tiny_model

needs_matplotlib = pytest.mark.skipif(find_spec("matplotlib") is None, reason="matplotlib is not installed")
PNG = b"\x89PNG\r\n\x1a\n"
INSTALL = "pip install 'mezo-replay[plot]'"


def cli(*args: str | Path, cwd: Path, prelude: str | None = None) -> subprocess.CompletedProcess[str]:
    """The real command line in a new process; `prelude` runs first in it (to take matplotlib away)."""
    start = ["-m", "mezo_replay"] if prelude is None else \
        ["-c", f"{prelude}\nfrom mezo_replay.cli import main\nmain(prog_name='mezo-replay')"]
    return subprocess.run([sys.executable, *start, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def small_run(path: Path, *, losses: bool = True, evals: bool = True, steps: int = 12) -> Path:
    """A finished trajectory of a tiny GPT-2, with evaluations (loss and accuracy) every 4 steps."""
    model = tiny_model("gpt2", torch.float32)
    opt = MeZO(model.named_parameters(), lr=5e-3, eps=1e-3, seed=7)
    opt.record(path, base_source="acme/tiny-gpt2", base_revision=SHA, record_losses=losses,
               metadata={"task": "label-words", "objective": "ce"})
    for s in range(steps):
        opt.step(lm_closure(model, seed=s))
        if evals and (s + 1) % 4 == 0:
            opt.writer.add_eval(s + 1, "eval", {"loss": 4.6 - 0.01 * s, "accuracy": 0.25 + 0.02 * s})
    opt.close()
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """a.mzt: the embedded model trained by the CLI's training function (in this process: no second
    interpreter start); b.mzt: another run with an accuracy metric; nolosses.mzt: losses left out;
    bare.mzt: neither losses nor evaluations."""
    from mezo_replay import embedded
    from mezo_replay.training.train import TrainConfig, train

    d = tmp_path_factory.mktemp("runs")
    tr, ev = embedded.load_task()
    train(TrainConfig(model=embedded.MODEL_DIR, train_examples=tr[:64], eval_examples=ev[:16], out=d / "a.mzt",
                      steps=6, eval_every=3, lr=embedded.DEFAULTS["lr"], eps=1e-3, batch_size=4))
    small_run(d / "b.mzt")
    small_run(d / "nolosses.mzt", losses=False)
    small_run(d / "bare.mzt", losses=False, evals=False, steps=2)
    return d


@pytest.fixture
def work(runs, tmp_path) -> Path:
    for name in ("a.mzt", "b.mzt", "nolosses.mzt", "bare.mzt"):
        (tmp_path / name).symlink_to(runs / name)
    return tmp_path


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def assert_png(path: Path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 1000
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 600
    assert pixels[..., :3].std() > 0.05  # something is drawn, not a blank canvas


@needs_matplotlib
def test_info_plots_two_trajectories(work):
    r = cli("info", "a.mzt", "b.mzt", "--plot", "curves.png", cwd=work)
    assert r.returncode == 0, r.stderr
    assert_png(work / "curves.png")
    blocks = r.stdout.split("\n\n")
    assert blocks[0].startswith("a.mzt: MeZO trajectory") and blocks[1].startswith("b.mzt: MeZO trajectory")
    assert r.stdout.rstrip().endswith("wrote curves.png: the training loss and evaluations of 2 trajectories "
                                      "against steps")
    assert "note:" not in r.stdout and leftovers(work) == []

    # --json: an array of what each file's --json gives; the chart's lines go to stderr
    r = inproc("info", "a.mzt", "b.mzt", "--json", "--plot", "curves.svg", "--x-axis", "forward-passes", cwd=work)
    assert r.returncode == 0, r.stderr
    both = json.loads(r.stdout)
    assert [s["path"] for s in both] == ["a.mzt", "b.mzt"] and [s["steps"] for s in both] == [6, 12]
    assert both[0] == json.loads(inproc("info", "a.mzt", "--json", cwd=work).stdout)  # one file: an object
    assert "wrote curves.svg" in r.stderr and "forward passes" in r.stderr
    svg = (work / "curves.svg").read_text()
    assert svg.startswith("<?xml") and "<svg" in svg and "training forward passes (2 per step)" in svg
    assert "a.mzt: eval loss" in svg and "b.mzt: eval accuracy" in svg and "b.mzt: training loss" in svg


@needs_matplotlib
def test_a_file_without_losses_draws_what_it_has(work):
    r = inproc("info", "nolosses.mzt", "b.mzt", "--plot", "c.pdf", cwd=work)
    assert r.returncode == 0, r.stderr
    assert (work / "c.pdf").read_bytes()[:5] == b"%PDF-"
    notes = [line for line in r.stdout.splitlines() if line.startswith("note:")]
    assert notes == ["note: nolosses.mzt: no per-step losses (trained with --no-record-losses): drew its "
                     "evaluations only"]
    r = inproc("info", "bare.mzt", "--plot", "bare.png", cwd=work)
    one_error_line(r, "nothing to draw: bare.mzt records no per-step losses and no evaluations")
    assert not (work / "bare.png").exists() and leftovers(work) == []


@needs_matplotlib
def test_existing_output_and_bad_names_are_refused(work):
    (work / "curves.png").write_bytes(b"keep me")
    r = inproc("info", "a.mzt", "--plot", "curves.png", cwd=work)
    one_error_line(r, "curves.png already exists; pass --overwrite to replace it")
    assert r.stdout == "" and (work / "curves.png").read_bytes() == b"keep me"  # refused before any work
    r = inproc("info", "a.mzt", "--plot", "curves.png", "--overwrite", cwd=work)
    assert r.returncode == 0, r.stderr
    assert_png(work / "curves.png")
    assert leftovers(work) == []

    one_error_line(inproc("info", "a.mzt", "--plot", "curves.jpg", cwd=work), "curves.jpg", ".png, .svg or .pdf")
    one_error_line(inproc("info", "a.mzt", "--plot", "no/such/dir.png", cwd=work), "does not exist")
    r = inproc("info", "a.mzt", "--x-axis", "forward-passes", cwd=work)
    assert r.returncode == 2 and "--x-axis goes with --plot PATH" in r.stderr
    assert sorted(p.name for p in work.iterdir() if not p.name.endswith(".mzt")) == ["curves.png"]


def test_without_matplotlib_one_line_names_the_extra(work, monkeypatch):
    r = cli("info", "a.mzt", "--plot", "curves.png", cwd=work, prelude="import sys; sys.modules['matplotlib'] = None")
    one_error_line(r, "needs matplotlib, which is not installed", INSTALL)
    assert r.stdout == "" and not (work / "curves.png").exists()

    fake = FakeApi()
    monkeypatch.setattr("mezo_replay.hub.publish.HfApi", lambda *a, **k: fake)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert inproc("info", "a.mzt", cwd=work).returncode == 0  # only --plot needs it
    one_error_line(inproc("push", "b.mzt", "acme/runs", "--plot", cwd=work), INSTALL)
    assert fake.calls == []


@needs_matplotlib
def test_push_puts_the_chart_beside_the_trajectory_and_on_the_card(work, monkeypatch):
    from huggingface_hub import ModelCard

    from mezo_replay.hub.publish import push_to_hub

    fake = FakeApi()
    push_to_hub(work / "b.mzt", "alice/runs", api=fake, plot=True)
    ops, _ = fake.commit()
    assert sorted(ops) == ["README.md", "b-curves.png", "b.mzt"]
    chart = work / "pushed.png"
    chart.write_bytes(op_bytes(ops["b-curves.png"]))
    assert_png(chart)
    card = ModelCard(op_bytes(ops["README.md"]).decode())
    assert "## Training curves\n\n![Training loss and evaluations of b.mzt](b-curves.png)" in card.text
    assert card.data.library_name == "mezo-replay"

    fake = FakeApi()
    monkeypatch.setattr("mezo_replay.hub.publish.HfApi", lambda *a, **k: fake)
    r = inproc("push", "b.mzt", "acme/runs", "--path-in-repo", "users/alice/", "--plot", cwd=work)
    assert r.returncode == 0, r.stderr
    assert "with its chart hf://acme/runs/users/alice/b-curves.png" in r.stdout
    ops, _ = fake.commit()
    assert sorted(ops) == ["README.md", "users/alice/README.md", "users/alice/b-curves.png", "users/alice/b.mzt"]
    assert op_bytes(ops["users/alice/b-curves.png"])[:8] == PNG
    assert "](b-curves.png)" in op_bytes(ops["users/alice/README.md"]).decode()  # beside the card

    fake = FakeApi()
    monkeypatch.setattr("mezo_replay.hub.publish.HfApi", lambda *a, **k: fake)
    assert inproc("push", "b.mzt", "acme/runs", cwd=work).returncode == 0  # no --plot: no chart, no section
    ops, _ = fake.commit()
    assert sorted(ops) == ["README.md", "b.mzt"] and "Training curves" not in op_bytes(ops["README.md"]).decode()


def test_smoothing_is_a_centred_mean_of_the_finite_values():
    values = np.array([1.0, 2.0, np.nan, 4.0, np.inf, 6.0, 7.0])
    got = smoothed(values, 3)
    finite = np.where(np.isfinite(values), values, np.nan)
    want = [np.nanmean(finite[max(0, i - 1):i + 2]) for i in range(values.size)]
    assert np.allclose(got, want)
    assert np.isnan(smoothed(np.array([np.nan, np.nan]), 1)).all()
    assert [smoothing_window(n) for n in (1, 6, 60, 1000, 20000)] == [1, 2, 8, 32, 141]


def test_forward_passes_count_every_perturbation_of_an_n_spsa_step():
    """--x-axis forward-passes: 2N passes a step for a file with N perturbations (spec/nspsa.md), 2 otherwise."""
    from mezo_replay.format.mzt import read_trajectory
    from mezo_replay.plot import Curves, _x

    vectors = Path(__file__).resolve().parent.parent / "spec" / "vectors"
    nspsa, plain = (Curves.of(n, read_trajectory(vectors / n / "traj.mzt")) for n in ("tiny-nspsa", "tiny"))
    assert (nspsa.forwards, plain.forwards) == (6, 2)  # tiny-nspsa: 3 perturbations a step
    assert _x(np.arange(3), "forward-passes", nspsa.forwards).tolist() == [0, 6, 12]
    assert _x(np.arange(3), "steps", nspsa.forwards).tolist() == [0, 1, 2]
