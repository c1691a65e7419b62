"""Uploading a PAD checkpoint to the Hugging Face Hub through `huggingface_hub`'s public API
(`HfApi.create_repo`, `HfApi.create_branch`, `HfApi.create_commit` with `CommitOperationAdd`).

`push_pad_to_hub` follows Transformers' `PushToHubMixin.push_to_hub` (create the repo, `save_pretrained`
into a temporary directory, commit every file) but keeps the PAD model card that `save_pretrained`
writes, where Transformers would replace it by a generic card or the repo's current one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError

from .._version import __version__


def hf_api() -> HfApi:
    """An `HfApi` tagged with this library (what the Hub sees as the client)."""
    return HfApi(library_name="pad_moe_transformers", library_version=__version__)


def create_repo(repo_id: str, **kwargs: Any) -> str:
    """Create the Hub repo `repo_id` unless it exists (`HfApi.create_repo(..., exist_ok=True)`); return its
    full id (`user/name`). `kwargs` go to `create_repo` (`token`, `private`, ...)."""
    return hf_api().create_repo(repo_id, exist_ok=True, **kwargs).repo_id


def default_commit_message(model: Any) -> str:
    """The commit message Transformers uses when none is given."""
    name = type(model).__name__
    return "Upload model" if "Model" in name else f"Upload {name}"


def upload_files(
    directory: str | os.PathLike,
    repo_id: str,
    filenames: Iterable[str],
    *,
    commit_message: str,
    commit_description: str | None = None,
    token: str | bool | None = None,
    create_pr: bool = False,
    revision: str | None = None,
) -> CommitInfo:
    """Commit the files `filenames` of `directory` (at the repo root) to `repo_id` in one commit. A `revision`
    that is a branch is created first if needed (as Transformers does; a 403 there is ignored when opening a PR,
    since the branch then has to exist already)."""
    directory = os.fspath(directory)
    api = hf_api()
    if revision is not None and not revision.startswith("refs/pr"):
        try:
            api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
        except HfHubHTTPError as error:
            if not (create_pr and error.response is not None and error.response.status_code == 403):
                raise
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(directory, name)) for name in filenames
    ]
    return api.create_commit(
        repo_id=repo_id,
        operations=operations,
        commit_message=commit_message,
        commit_description=commit_description,
        token=token,
        create_pr=create_pr,
        revision=revision,
    )


def push_pad_to_hub(
    model: Any,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | str | None = None,
    base_model: str | None = None,
    eval_results: Mapping[str, Any] | None = None,
) -> CommitInfo:
    """`PADMoEPreTrainedModel.push_to_hub`: create the repo, `model.save_pretrained` (compact weights, config,
    PAD model card naming `repo_id`) into a temporary directory and commit all of it."""
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    repo_id = create_repo(repo_id, private=private, token=token)
    with tempfile.TemporaryDirectory() as tmp_dir:
        model.save_pretrained(
            tmp_dir,
            max_shard_size=max_shard_size or "50GB",
            tags=tags,
            base_model=base_model,
            eval_results=eval_results,
            card_repo_id=repo_id,
        )
        return upload_files(
            tmp_dir,
            repo_id,
            sorted(os.listdir(tmp_dir)),
            commit_message=commit_message or default_commit_message(model),
            commit_description=commit_description,
            token=token,
            create_pr=create_pr,
            revision=revision,
        )
