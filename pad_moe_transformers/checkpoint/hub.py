"""Uploading a PAD checkpoint to the Hugging Face Hub (`push_to_hub`)."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from typing import Any

from .save import save_pad_pretrained


def hf_api():
    """Transformers' shared `HfApi` (so that endpoint and token settings apply), or a new one."""
    try:
        from transformers.utils.hub import hf_api as shared_hf_api

        return shared_hf_api()
    except ImportError:  # pragma: no cover - transformers without the shared HfApi
        from huggingface_hub import HfApi

        return HfApi()


def create_repo(repo_id: str, **kwargs: Any) -> str:
    """Create the Hub repo `repo_id` unless it exists (`HfApi.create_repo(..., exist_ok=True)`); return its full id."""
    return hf_api().create_repo(repo_id, exist_ok=True, **kwargs).repo_id


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
):
    """`PADMoEPreTrainedModel.push_to_hub`: Transformers' `PushToHubMixin.push_to_hub` flow (create the
    repo, `save_pretrained` into a temporary directory, `create_commit` of every file) with the
    compact checkpoint and the generated PAD model card instead of the generic one."""
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    repo_id = create_repo(repo_id, private=private, token=token)
    with tempfile.TemporaryDirectory() as tmp_dir:
        save_pad_pretrained(
            model,
            tmp_dir,
            max_shard_size=max_shard_size or "50GB",
            tags=tags,
            base_model=base_model,
            eval_results=eval_results,
            card_repo_id=repo_id,
        )
        return model._upload_modified_files(
            tmp_dir,
            repo_id,
            files_timestamps={},
            commit_message=commit_message,
            token=token,
            create_pr=create_pr,
            revision=revision,
            commit_description=commit_description,
        )
