"""push_to_hub and the model card, with HfApi faked at its method boundary (no network here)."""
from __future__ import annotations

import re

import httpx2
import pytest
import torch
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard
from huggingface_hub.errors import (HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled,
                                    RepositoryNotFoundError)

from mezo_replay.hub import publish
from mezo_replay.errors import MezoReplayError
from mezo_replay.format.mzt import read_trajectory
from mezo_replay.training.optimizer import MeZO
from mezo_replay.hub.publish import model_card, push_to_hub
from tests.test_roundtrip import lm_closure, tiny_model

SHA = "0123456789abcdef0123456789abcdef01234567"
REPO = "alice/tiny-gpt2-mezo"


def make_trajectory(path, *, base_source="acme/tiny-gpt2", base_revision=SHA, close=True, evals=True,
                    metadata=None):
    model = tiny_model("gpt2", torch.float32)
    opt = MeZO(model.named_parameters(), lr=5e-3, eps=1e-3, seed=7)
    meta = {"task": "prompt-completion", "objective": "ce", "batch_size": "16"} if metadata is None else metadata
    if metadata is None and base_revision:
        meta["base_model"] = f"{base_source}@{base_revision}"
    opt.record(path, base_source=base_source, base_revision=base_revision, metadata=meta)
    for s in range(3):
        opt.step(lm_closure(model, seed=s))
    if evals:
        opt.writer.add_eval(2, "eval", {"loss": 4.5, "accuracy": 0.25})
        opt.writer.add_eval(3, "eval", {"loss": 4.25, "accuracy": 0.5})
        opt.writer.add_eval(3, "train", {"loss": 4.0})
    if close:
        opt.close()
    else:
        opt.writer.close()  # steps and evals, but no final fingerprint
    return path


@pytest.fixture(scope="module")
def mzt(tmp_path_factory):
    return make_trajectory(tmp_path_factory.mktemp("traj") / "run.mzt")


class FakeApi(HfApi):
    """A real HfApi whose network methods only record their calls (or raise a chosen error)."""

    def __init__(self, readme_exists=False, fail=None):
        super().__init__()
        self.calls, self.readme_exists, self.fail = [], readme_exists, fail

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        if self.fail is not None:
            raise self.fail

    def file_exists(self, repo_id, filename, **kw):
        self.calls.append(("file_exists", repo_id, filename, kw))
        return self.readme_exists

    def create_commit(self, repo_id, operations, **kw):
        ops = list(operations)
        self.calls.append(("create_commit", repo_id, ops, kw))
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{'f' * 40}", commit_message="",
                          commit_description="", oid="f" * 40)

    def names(self):
        return [c[0] for c in self.calls]

    def commit(self):
        (commit,) = [c for c in self.calls if c[0] == "create_commit"]
        return {op.path_in_repo: op for op in commit[2]}, commit[3]


def op_bytes(op: CommitOperationAdd) -> bytes:
    with op.as_file() as f:
        return f.read()


def test_push_at_root(mzt):
    api = FakeApi()
    url = push_to_hub(mzt, REPO, token="hf_x", api=api)
    assert url == f"https://huggingface.co/{REPO}/commit/{'f' * 40}"
    assert api.names() == ["create_repo", "create_commit"]  # one commit; no README check at the root
    assert api.calls[0] == ("create_repo", REPO, {"private": False, "exist_ok": True, "repo_type": "model",
                                                   "token": "hf_x"})
    ops, kw = api.commit()
    assert sorted(ops) == ["README.md", "run.mzt"]
    assert op_bytes(ops["run.mzt"]) == mzt.read_bytes()
    assert kw["token"] == "hf_x" and "run.mzt" in kw["commit_message"]

    card = ModelCard(op_bytes(ops["README.md"]).decode())
    assert card.data.base_model == "acme/tiny-gpt2"
    assert card.data.base_model_relation == "adapter"
    assert card.data.library_name == "mezo-replay"
    assert {"mezo-replay", "mezo", "zeroth-order", "trajectory"} <= set(card.data.tags)
    assert f"mezo-replay reconstruct hf://acme/tiny-gpt2@{SHA} hf://{REPO}/run.mzt -o tuned" in card.text
    assert "pip install mezo-replay" in card.text


def test_card_contents(mzt):
    traj = read_trajectory(mzt)
    text = str(model_card(traj, path_in_repo="run.mzt", repo_id=REPO))
    assert traj.header["base"]["fingerprint"] in text
    assert SHA in text
    size = sum(p.numel() * 4 for p in tiny_model("gpt2", torch.float32).parameters())
    assert f"{publish.human_bytes(traj.file_bytes)} instead of {publish.human_bytes(size)} of tuned weights" in text
    assert re.search(r"\| Steps \| 3 \|", text)
    rule = traj.header["rule"]  # eps is stored quantised to 16 bits: 0.000999987...
    assert f"mezo-sgd: lr {rule['lr']:.6g}, eps {rule['eps']:.6g}, constant schedule, no weight decay" in text
    assert "| Noise | gaussian16 from philox4x32-10, seed 7 |" in text
    assert "| Task | prompt-completion |" in text and "| Objective | ce |" in text and "| Batch size | 16 |" in text
    # the last eval of each split, with all its metrics
    assert "| eval | 3 | 4.25 | 0.5 |" in text and "| train | 3 | 4 |  |" in text and "4.5 |" not in text


def test_human_bytes():
    assert [publish.human_bytes(n) for n in (873, 8_900, 2_500_000, 124_000_000_000, 999_999)] == \
        ["873 bytes", "8.9 kB", "2.5 MB", "124 GB", "1.0 MB"]


def test_card_base_not_on_hub(tmp_path):
    path = make_trajectory(tmp_path / "local.mzt", base_source=str(tmp_path / "base"), base_revision=None,
                           evals=False, metadata={"task": "lm"})
    card = model_card(read_trajectory(path), path_in_repo="local.mzt", repo_id=REPO)
    assert card.data.base_model is None and card.data.get("base_model_relation") is None
    assert card.data.library_name == "mezo-replay"
    assert f"mezo-replay reconstruct BASE hf://{REPO}/local.mzt -o tuned" in card.text
    assert "not on the Hub" in card.text and "## Evaluation" not in card.text


def test_base_on_hub_rules():
    def hub(source, revision=None, meta=None):
        return publish.base_on_hub({"base": {"source": source, "revision": revision}, "metadata": meta or {}})

    assert hub("acme/tiny", SHA) == ("acme/tiny", SHA)
    assert hub("acme/tiny") == ("acme/tiny", None)
    assert hub("gpt2", SHA) == ("gpt2", SHA) and hub("gpt2") == (None, None)
    assert hub("/models/x") == (None, None) and hub(None) == (None, None)
    assert hub("whatever", None, {"base_model": f"acme/tiny@{SHA}"}) == ("acme/tiny", SHA)


def test_card_without_sha_omits_it(tmp_path):
    path = make_trajectory(tmp_path / "r.mzt", base_revision=None, evals=False, metadata={})
    text = model_card(read_trajectory(path), path_in_repo="r.mzt", repo_id=REPO).text
    assert f"mezo-replay reconstruct hf://acme/tiny-gpt2 hf://{REPO}/r.mzt -o tuned" in text


@pytest.mark.parametrize("exists", [False, True])
def test_push_into_folder(mzt, exists):
    api = FakeApi(readme_exists=exists)
    push_to_hub(mzt, REPO, path_in_repo="users/alice/exp1.mzt", private=True, api=api)
    assert api.names() == ["create_repo", "file_exists", "create_commit"]
    assert api.calls[0][2]["private"] is True
    assert api.calls[1] == ("file_exists", REPO, "README.md", {"token": None})
    ops, _ = api.commit()
    expected = ["users/alice/README.md", "users/alice/exp1.mzt"] + ([] if exists else ["README.md"])
    assert sorted(ops) == sorted(expected)
    assert op_bytes(ops["users/alice/exp1.mzt"]) == mzt.read_bytes()
    card = ModelCard(op_bytes(ops["users/alice/README.md"]).decode())
    assert card.data.base_model == "acme/tiny-gpt2"
    assert f"hf://acme/tiny-gpt2@{SHA} hf://{REPO}/users/alice/exp1.mzt -o tuned" in card.text
    if not exists:
        root = ModelCard(op_bytes(ops["README.md"]).decode())
        assert root.data.library_name == "mezo-replay" and "mezo-replay" in root.data.tags
        assert "one per folder" in root.text


def test_folder_path_keeps_file_name(mzt):
    api = FakeApi(readme_exists=True)
    push_to_hub(mzt, REPO, path_in_repo="runs/", api=api)
    assert sorted(api.commit()[0]) == ["runs/README.md", "runs/run.mzt"]
    for bad in ("../x.mzt", "runs/README.md", ""):
        with pytest.raises(MezoReplayError):
            push_to_hub(mzt, REPO, path_in_repo=bad, api=FakeApi())


def http_error(status, cls=HfHubHTTPError, url="https://huggingface.co/api/repos/create"):
    response = httpx2.Response(status, request=httpx2.Request("POST", url))
    return cls(f"{status} Client Error.\n\nsome details", response=response)


@pytest.fixture
def logged_out(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


@pytest.mark.parametrize("error, token, expected", [
    (LocalTokenNotFoundError("Token is required"), None, "not logged in: run `hf auth login` or set HF_TOKEN"),
    (http_error(401), None, "not logged in: run `hf auth login` or set HF_TOKEN"),
    (http_error(401, RepositoryNotFoundError), None, "not logged in: run `hf auth login` or set HF_TOKEN"),
    (http_error(401), "hf_bad", "the Hub rejected the token (401)"),
    (http_error(403), "hf_ro", "no write access to alice/tiny-gpt2-mezo (403)"),
    (http_error(404, RepositoryNotFoundError), "hf_x", "repository alice/tiny-gpt2-mezo was not found"),
    (http_error(500), "hf_x", "the Hub refused to push to alice/tiny-gpt2-mezo (500): 500 Client Error."),
    (OfflineModeIsEnabled("offline"), None, "the Hub cannot be reached"),
    (httpx2.ConnectError("[Errno -2] Name or service not known"), None, "the Hub cannot be reached"),
])
def test_hub_errors_become_one_line(mzt, logged_out, error, token, expected):
    api = FakeApi(fail=error)
    with pytest.raises(MezoReplayError) as info:
        push_to_hub(mzt, REPO, token=token, api=api)
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert info.value.__cause__ is None and api.names() == ["create_repo"]


def test_errors_in_commit_are_mapped_too(mzt):
    class Failing(FakeApi):
        def create_commit(self, repo_id, operations, **kw):
            raise http_error(403, url=f"https://huggingface.co/api/models/{repo_id}/commit/main")

    with pytest.raises(MezoReplayError, match=r"no write access"):
        push_to_hub(mzt, REPO, token="hf_x", api=Failing())


def test_other_errors_are_not_swallowed(mzt):
    with pytest.raises(ZeroDivisionError):
        push_to_hub(mzt, REPO, api=FakeApi(fail=ZeroDivisionError()))


def test_truncated_trajectory_is_refused_before_any_call(mzt, tmp_path):
    cut = tmp_path / "cut.mzt"
    cut.write_bytes(mzt.read_bytes()[:-5])
    assert read_trajectory(cut).truncated
    api = FakeApi()
    with pytest.raises(MezoReplayError, match=r"truncated") as info:
        push_to_hub(cut, REPO, api=api)
    assert "\n" not in str(info.value) and api.calls == []


def test_corrupt_and_unfinished_trajectories_are_refused(mzt, tmp_path):
    data = bytearray(mzt.read_bytes())
    data[40] ^= 0xFF
    bad = tmp_path / "bad.mzt"
    bad.write_bytes(bytes(data))
    unfinished = make_trajectory(tmp_path / "open.mzt", close=False)
    api = FakeApi()
    with pytest.raises(MezoReplayError, match=r"corrupt"):
        push_to_hub(bad, REPO, api=api)
    with pytest.raises(MezoReplayError, match=r"no final fingerprint"):
        push_to_hub(unfinished, REPO, api=api)
    with pytest.raises(MezoReplayError, match=r"cannot read"):
        push_to_hub(tmp_path / "missing.mzt", REPO, api=api)
    assert api.calls == []


def test_cli_push_then_pull_round_trip(mzt, tmp_path, monkeypatch):
    """`mezo-replay push` at the HfApi boundary: the uploaded files, laid out as the Hub caches them,
    are what `load_trajectory` reads back (the pull side is tested offline in tests/test_hub.py)."""
    from click.testing import CliRunner

    from mezo_replay.cli import main

    fake = FakeApi()
    monkeypatch.setattr("mezo_replay.hub.publish.HfApi", lambda *a, **k: fake)
    r = CliRunner().invoke(main, ["push", str(mzt), "acme/runs", "--path-in-repo", "users/alice/run.mzt",
                                  "--private"])
    assert r.exit_code == 0, r.output
    assert "hf://acme/runs/users/alice/run.mzt" in r.output
    files, _ = fake.commit()
    assert sorted(files) == ["README.md", "users/alice/README.md", "users/alice/run.mzt"]
    assert op_bytes(files["users/alice/run.mzt"]) == mzt.read_bytes()
    assert fake.calls[0][2]["private"] is True


def test_peft_card_names_the_base_and_the_base_less_rebuild(tmp_path):
    from tests.test_adapter import peft_trajectory
    from tests.test_train_tasks import make_model

    base = make_model("llama", tmp_path / "base")
    peft_trajectory(base, tmp_path / "lora.mzt", base_source="acme/tiny-llama", base_revision=SHA)
    api = FakeApi()
    push_to_hub(tmp_path / "lora.mzt", "alice/adapters", path_in_repo="users/bob/", api=api)
    card = next(op for op in api.calls[-1][2] if op.path_in_repo == "users/bob/README.md")
    text = card.path_or_fileobj.decode()
    meta = ModelCard(text).data
    assert meta.base_model == "acme/tiny-llama" and meta.base_model_relation == "adapter"
    assert "peft" in meta.tags and "lora" in meta.tags
    assert "mezo-replay reconstruct hf://alice/adapters/users/bob/lora.mzt -o lora-adapter\n" in text
    assert f"--merge hf://acme/tiny-llama@{SHA}" in text
    assert f"from_pretrained('acme/tiny-llama', revision='{SHA}')" in text and "PeftModel.from_pretrained" in text
    assert str(tmp_path) not in text
