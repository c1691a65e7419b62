"""Safe saves (issue #7): `save_pretrained` stages every file in a hidden directory inside the target and
moves them into place with `os.replace` only when all are complete, so a failure mid-write leaves the
previous checkpoint loadable, and a successful save leaves no temporary files."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from pad_moe_transformers.checkpoint import save as save_module
from test_checkpoint import assert_same_module, make_model

STAGING = save_module.STAGING_PREFIX


def snapshot(directory):
    """Every file (relative path -> bytes) under `directory`, hidden ones included."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, directory)] = f.read()
    return files


def load(path):
    return AutoModelForSequenceClassification.from_pretrained(path)


class DiskFull(OSError):
    pass


def failing_writer(fail_on_call: int, exception: BaseException | None = None):
    """A safetensors writer that writes half of the `fail_on_call`-th file, then raises (a full disk)."""
    real = save_module.save_file
    calls = []

    def save_file(tensors, path, metadata=None):
        calls.append(path)
        real(tensors, path, metadata=metadata)
        if len(calls) == fail_on_call:
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            raise exception or DiskFull(errno.ENOSPC, "No space left on device", path)

    return save_file, calls


@pytest.fixture
def previous(tmp_path):
    """A checkpoint already in the directory (sharded, so that a new save replaces several files)."""
    model = make_model(kappa=0.4)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    return model, tmp_path, snapshot(tmp_path)


@pytest.mark.parametrize("shard_size, fail_on", [("50GB", 1), ("20KB", 3), ("10KB", 1)])
def test_failure_mid_write_leaves_the_previous_checkpoint(previous, monkeypatch, shard_size, fail_on):
    old, path, before = previous
    writer, calls = failing_writer(fail_on)
    monkeypatch.setattr(save_module, "save_file", writer)
    new = make_model(kappa=0.2)
    with pytest.raises(DiskFull):
        new.save_pretrained(path, max_shard_size=shard_size)
    assert len(calls) == fail_on
    assert all(os.path.basename(os.path.dirname(c)).startswith(STAGING) for c in calls)  # never into the target
    assert snapshot(path) == before  # same files, same bytes, no staging directory left
    monkeypatch.undo()
    assert_same_module(old, load(path))


def test_keyboard_interrupt_mid_write(previous, monkeypatch):
    old, path, before = previous
    writer, _ = failing_writer(2, KeyboardInterrupt())
    monkeypatch.setattr(save_module, "save_file", writer)
    with pytest.raises(KeyboardInterrupt):
        make_model(kappa=0.2).save_pretrained(path, max_shard_size="20KB")
    assert snapshot(path) == before
    monkeypatch.undo()
    assert_same_module(old, load(path))


def test_failure_after_the_weights_before_the_commit(previous, monkeypatch):
    """The weights are all staged; the model card fails. Nothing has moved yet."""
    old, path, before = previous
    from pad_moe_transformers import modelcard

    def broken_card(*args, **kwargs):
        raise RuntimeError("card template error")

    monkeypatch.setattr(modelcard, "write_model_card", broken_card)
    with pytest.raises(RuntimeError, match="card template error"):
        make_model(kappa=0.2).save_pretrained(path)
    assert snapshot(path) == before
    monkeypatch.undo()
    assert_same_module(old, load(path))


def test_files_are_staged_then_replaced_in_order(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("kept")  # other files in the directory are not touched
    moves = []
    real_replace = os.replace

    def spy(src, dst):
        moves.append((os.fspath(src), os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(save_module.os, "replace", spy)
    model = make_model()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    monkeypatch.undo()
    names = [os.path.basename(dst) for _, dst in moves]
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) > 2
    assert names == shards + ["model.safetensors.index.json", "config.json", "README.md"]
    for src, dst in moves:
        assert os.path.dirname(os.path.dirname(src)) == str(tmp_path)
        assert os.path.basename(os.path.dirname(src)).startswith(STAGING)
        assert os.path.dirname(dst) == str(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(names + ["notes.txt"])  # no temporary files left
    assert (tmp_path / "notes.txt").read_text() == "kept"
    assert_same_module(model, load(tmp_path))


def test_successful_save_replaces_the_old_layout_and_cleans_leftovers(previous):
    old, path, _ = previous
    leftover = path / f"{STAGING}killed"  # what a save killed with SIGKILL leaves behind
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    new = make_model(kappa=0.2)
    new.save_pretrained(path)  # one file now: the old shards and index are removed
    assert sorted(os.listdir(path)) == ["README.md", "config.json", "model.safetensors"]
    assert_same_module(new, load(path))


def test_staged_bytes_equal_a_direct_write(tmp_path):
    """Staging changes where files are written, not what: the same bytes as the writer produces directly."""
    model = make_model()
    model.save_pretrained(tmp_path / "saved", max_shard_size="20KB")
    direct = tmp_path / "direct"
    direct.mkdir()
    save_module._write_checkpoint_files(model, str(direct), state_dict=None, max_shard_size="20KB", variant=None)
    model.config.save_pretrained(direct)
    saved = snapshot(tmp_path / "saved")
    assert saved.pop("README.md")
    assert saved == snapshot(direct)


def test_trainer_style_save_is_staged_too(tmp_path, monkeypatch):
    """`save_checkpoint_files` (the weights alone) is staged the same way."""
    old = make_model()
    old.save_pretrained(tmp_path)
    before = snapshot(tmp_path)
    writer, _ = failing_writer(1)
    monkeypatch.setattr(save_module, "save_file", writer)
    with pytest.raises(DiskFull):
        save_module.save_checkpoint_files(make_model(kappa=0.2), tmp_path)
    assert snapshot(tmp_path) == before
    monkeypatch.undo()
    saved = save_module.save_checkpoint_files(old, tmp_path)
    assert saved.files == [str(tmp_path / "model.safetensors")] and os.path.isfile(saved.files[0])
    assert snapshot(tmp_path) == before  # same model: same bytes
    torch.testing.assert_close(load(tmp_path).model.classifier.weight, old.model.classifier.weight, rtol=0, atol=0)
