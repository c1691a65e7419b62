"""`push_to_hub` / `save_pretrained(push_to_hub=True)` / loading by repo id, with the Hub mocked at the `HfApi`
boundary: `HfApi.create_repo`, `create_branch` and `create_commit` are replaced (autospec: a call with arguments
the real method does not take fails) by a recorder that keeps every call and the bytes of every committed file.
Loading by repo id reads a Hugging Face cache filled with the committed files (`local_files_only=True`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from unittest import mock

import pytest
import torch
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, RepoUrl
from huggingface_hub.errors import HfHubHTTPError
from safetensors.torch import load as load_safetensors_bytes
from test_checkpoint import assert_same_module, make_model, outputs
from transformers import AutoModelForSequenceClassification

from pad_moe_transformers import checkpoint as ckpt

USER = "pad-user"
REPO = f"{USER}/tiny-pad"
TOKEN = "hf_test_token"
ENDPOINT = "https://huggingface.co"


@dataclass
class Commit:
    repo_id: str
    files: dict[str, bytes]
    kwargs: dict
    oid: str


@dataclass
class RecordingHub:
    """What the mocked `HfApi` methods were asked to do; `repos` holds the files of each repo after the commits."""

    created: list[dict] = field(default_factory=list)
    branches: list[dict] = field(default_factory=list)
    commits: list[Commit] = field(default_factory=list)
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branch_error: int | None = None  # HTTP status that create_branch answers with, if any

    def create_repo(self, api, repo_id, **kwargs):
        self.created.append({"repo_id": repo_id, **kwargs})
        full_id = repo_id if "/" in repo_id else f"{USER}/{repo_id}"  # the Hub puts a bare name in the user's namespace
        self.repos.setdefault(full_id, {})
        return RepoUrl(f"{ENDPOINT}/{full_id}", endpoint=ENDPOINT)

    def create_branch(self, api, repo_id, **kwargs):
        self.branches.append({"repo_id": repo_id, **kwargs})
        if self.branch_error is not None:
            response = mock.Mock(status_code=self.branch_error, headers={}, url=f"{ENDPOINT}/api/{repo_id}/branch")
            raise HfHubHTTPError("branch refused", response=response)

    def create_commit(self, api, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            assert isinstance(op, CommitOperationAdd)
            with open(op.path_or_fileobj, "rb") as f:  # read now: the directory may be temporary
                files[op.path_in_repo] = f.read()
        oid = hashlib.sha1(b"".join(name.encode() + data for name, data in sorted(files.items()))).hexdigest()
        self.commits.append(Commit(repo_id, files, kwargs, oid))
        self.repos.setdefault(repo_id, {}).update(files)
        pr_url = f"{ENDPOINT}/{repo_id}/discussions/1" if kwargs.get("create_pr") else None
        return CommitInfo(
            commit_url=f"{ENDPOINT}/{repo_id}/commit/{oid}", commit_message=kwargs["commit_message"],
            commit_description=kwargs.get("commit_description") or "", oid=oid, pr_url=pr_url,
        )


@pytest.fixture
def hub():
    recorder = RecordingHub()
    with mock.patch.object(HfApi, "create_repo", autospec=True, side_effect=recorder.create_repo), \
            mock.patch.object(HfApi, "create_branch", autospec=True, side_effect=recorder.create_branch), \
            mock.patch.object(HfApi, "create_commit", autospec=True, side_effect=recorder.create_commit):
        yield recorder


def hub_cache(tmp_path, repo_id: str, files: dict[str, bytes]) -> str:
    """A Hugging Face cache directory (`models--org--name/{refs,snapshots}`) holding `files` as the repo's `main`."""
    cache = tmp_path / "cache"
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    revision = "0" * 40
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return str(cache)


def load_from_hub(tmp_path, files: dict[str, bytes], **kwargs):
    cache = hub_cache(tmp_path, REPO, files)
    return AutoModelForSequenceClassification.from_pretrained(REPO, cache_dir=cache, local_files_only=True, **kwargs)


def uploaded_tensors(files: dict[str, bytes]) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, data in files.items():
        if name.endswith(".safetensors"):
            tensors.update(load_safetensors_bytes(data))
    return tensors


# ----------------------------------------------------------------------------------------------- push_to_hub
def test_push_to_hub_uploads_compact_files_and_card(hub, tmp_path):
    model = make_model()
    model.config.base_config._name_or_path = "google-bert/bert-base-uncased"
    info = model.push_to_hub("tiny-pad", token=TOKEN, private=True, eval_results={"eval_accuracy": 0.75}, tags=["glue"])

    assert hub.created == [{"repo_id": "tiny-pad", "private": True, "token": TOKEN, "exist_ok": True}]
    assert hub.branches == []
    (commit,) = hub.commits
    assert commit.repo_id == REPO and info.oid == commit.oid
    assert commit.kwargs == {
        "commit_message": "Upload PADMoEForSequenceClassification", "commit_description": None, "token": TOKEN,
        "create_pr": False, "revision": None,
    }
    files = commit.files
    assert sorted(files) == ["README.md", "config.json", "model.safetensors"]

    # The compact checkpoint went up: no dense expert tensors, the same bytes save_pretrained writes.
    tensors = uploaded_tensors(files)
    assert not any(k.endswith((".expert_weight", ".static_weight", ".mask")) for k in tensors)
    assert any(k.endswith(".mask_packed") for k in tensors)
    model.save_pretrained(tmp_path / "local", eval_results={"eval_accuracy": 0.75})
    assert files["model.safetensors"] == (tmp_path / "local" / "model.safetensors").read_bytes()
    assert files["config.json"] == (tmp_path / "local" / "config.json").read_bytes()

    # The PAD card, naming the repo id the Hub returned (not Transformers' generic card).
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == "google-bert/bert-base-uncased" and card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-classification"
    assert {"pad-net", "mixture-of-experts", "glue"} <= set(card.data.tags)
    assert f'from_pretrained("{REPO}")' in card.text and "| eval_accuracy | 0.7500 |" in card.text
    assert f"{model.parameter_report().total:,}" in card.text
    assert "| Checkpoint format | pad_moe v1, layout `compact` |" in card.text

    # What was uploaded loads back, by repo id, to the exact module.
    again = load_from_hub(tmp_path, hub.repos[REPO])
    assert_same_module(model, again)
    assert again.name_or_path == REPO


def test_push_to_hub_commit_options(hub):
    """commit message and description, a PR, a branch (created first unless it is a PR ref), as in Transformers."""
    model = make_model(kappa=None)
    info = model.push_to_hub(
        REPO, commit_message="PAD kappa 0.4", commit_description="IMP, 10 batches", create_pr=True, revision="dev"
    )
    assert hub.branches == [{"repo_id": REPO, "branch": "dev", "token": None, "exist_ok": True}]
    (commit,) = hub.commits
    assert commit.kwargs == {
        "commit_message": "PAD kappa 0.4", "commit_description": "IMP, 10 batches", "token": None,
        "create_pr": True, "revision": "dev",
    }
    assert info.pr_url == f"{ENDPOINT}/{REPO}/discussions/1" and info.pr_num == 1
    assert "| Checkpoint format | pad_moe v1, layout `moe` |" in commit.files["README.md"].decode()

    model.push_to_hub(REPO, revision="refs/pr/1")  # a PR ref: no branch to create
    assert len(hub.branches) == 1 and hub.commits[-1].kwargs["revision"] == "refs/pr/1"


def test_push_to_a_branch_that_cannot_be_created(hub):
    """A 403 on the branch is ignored when opening a PR (the branch must then exist); otherwise it is raised."""
    model = make_model()
    hub.branch_error = 403
    model.push_to_hub(REPO, revision="dev", create_pr=True)
    assert len(hub.commits) == 1
    with pytest.raises(HfHubHTTPError, match="branch refused"):
        model.push_to_hub(REPO, revision="dev")
    assert len(hub.commits) == 1


# ----------------------------------------------------------------------------------------------- save_pretrained
def test_sharded_push_via_save_pretrained_and_load_by_repo_id(hub, tmp_path):
    model = make_model()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("not part of the save")
    model.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id=REPO, token=TOKEN, max_shard_size="20KB")

    assert hub.created == [{"repo_id": REPO, "token": TOKEN, "exist_ok": True}]
    (commit,) = hub.commits
    assert commit.kwargs == {
        "commit_message": "Upload PADMoEForSequenceClassification", "commit_description": None, "token": TOKEN,
        "create_pr": False, "revision": None,
    }
    files = commit.files
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    # Exactly what the save wrote (not notes.txt), with the bytes now on disk.
    assert sorted(files) == sorted(shards + [ckpt.WEIGHTS_INDEX_NAME, "config.json", "README.md"])
    assert len(shards) > 1
    assert all(files[name] == (tmp_path / "out" / name).read_bytes() for name in files)
    assert f'from_pretrained("{REPO}")' in files["README.md"].decode()

    again = load_from_hub(tmp_path, hub.repos[REPO], token=TOKEN)  # the index first, then every shard
    assert_same_module(model, again)
    assert torch.equal(outputs(model), outputs(again))
    assert again.name_or_path == REPO


def test_save_pretrained_push_defaults(hub, tmp_path):
    """Repo named after the directory, a custom commit message, a PR; a hand-written README is neither
    overwritten nor uploaded."""
    out = tmp_path / "my-pad-model"
    out.mkdir()
    (out / "README.md").write_text("my own card")
    make_model().save_pretrained(out, push_to_hub=True, commit_message="v2", create_pr=True, private=True)
    assert hub.created == [{"repo_id": "my-pad-model", "private": True, "exist_ok": True}]
    (commit,) = hub.commits
    assert commit.repo_id == f"{USER}/my-pad-model"
    assert commit.kwargs == {
        "commit_message": "v2", "commit_description": None, "token": None, "create_pr": True, "revision": None,
    }
    assert sorted(commit.files) == ["config.json", "model.safetensors"]
    assert (out / "README.md").read_text() == "my own card"


def test_no_upload_from_other_ranks(hub, tmp_path):
    assert make_model().save_pretrained(tmp_path / "out", push_to_hub=True, is_main_process=False) is None
    assert hub.created == [] and hub.commits == [] and not (tmp_path / "out").exists()


def test_corrupt_upload_is_refused_on_download(hub, tmp_path):
    """A corrupt file in the repo is caught when loading by repo id, just like a local one."""
    make_model().push_to_hub(REPO, token=TOKEN)
    files = dict(hub.repos[REPO])
    files["model.safetensors"] = files["model.safetensors"][:-64]
    with pytest.raises(ckpt.PADCheckpointError, match="truncated"):
        load_from_hub(tmp_path, files)
