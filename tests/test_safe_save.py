"""Saving: the bytes written (pinned), the sharding, and safe saves (issue #7): `save_pretrained` stages every file
in a hidden directory inside the target and moves them into place with `os.replace` only when all are complete,
so a failure mid-write leaves the previous checkpoint loadable, and a successful save leaves no temporary files."""

from __future__ import annotations

import errno
import hashlib
import json
import os

import pytest
import torch
from conftest import tiny_base_configs
from safetensors import safe_open
from test_checkpoint import assert_same_module, make_model
from transformers import AutoModelForSequenceClassification

import pad_moe_transformers as pmt
from pad_moe_transformers.checkpoint import save as save_module
from pad_moe_transformers.core import named_pad_linears

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


# ----------------------------------------------------------------------------------------------- bytes written
def seeded_model(cls=pmt.PADMoEForSequenceClassification, kappa: float | None = 0.4):
    """A tiny BERT PAD model whose every state-dict entry is drawn from one seeded generator, key by key in sorted
    order (independent of how the model initialises itself); masks with density `kappa`, or all ones (never
    partitioned) for `kappa=None`."""
    config = pmt.PADMoEConfig(base_config=tiny_base_configs()["bert"], num_experts=4)
    model = cls(config).eval()
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for _, tensor in sorted(model.state_dict(keep_vars=True).items()):
            if tensor.dtype == torch.bool:
                tensor.copy_(torch.rand(tensor.shape, generator=generator) < kappa if kappa is not None else True)
            elif tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    if kappa is not None:
        model.config.partition = {"method": "random", "dynamic_ratio": kappa}
    return model


# sha256 of "<file> <sha256 of the file>" lines (sorted) of the weight files (safetensors and shard index), as
# written by the code of commit 72484c3 (before safetensors/huggingface_hub replaced the hand-written header
# and sharding code). Saving the same model must keep giving these bytes.
PINNED = {
    "compact": ({}, "2fe1655dd7add5e202e738b1abd890101c7758a8ad4c614d592136e876bccd0c"),
    "moe": ({"kappa": None}, "9a93f3c566a996f25a1d92f0d8d788c5eaac3a0432bf6ee089174445106f9ff1"),
    "compact_sharded": ({"max_shard_size": "20KB"}, "1a0155ab53dc0f910e663af3163ade236f978bfc5e363cf28f265a8a89c29436"),
    "moe_sharded": (
        {"kappa": None, "max_shard_size": "30KB"}, "83a7d2258443cd1002ad955e054a0da8c9accb0b842beefaf2cd840d887385e7"
    ),
    "variant_sharded": (
        {"variant": "v1", "max_shard_size": "20KB"}, "25e60d083aa46c60c38a69540a51a8e6266c5c1e4dae804dff26aeef4bd005bc"
    ),
    "tied_mlm": ({"cls": pmt.PADMoEForMaskedLM}, "fd2107e1e6b00e81f1340e0e4e523a1bc8fa83f446e9990041ee9f56bdc109b5"),
}


def weight_digest(directory) -> tuple[str, dict[str, str]]:
    files = {
        name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
        for name in sorted(os.listdir(directory)) if name.endswith((".safetensors", ".safetensors.index.json"))
    }
    lines = "".join(f"{name} {digest}\n" for name, digest in files.items())
    return hashlib.sha256(lines.encode()).hexdigest(), files


@pytest.mark.parametrize("case", sorted(PINNED))
def test_saved_bytes_are_pinned(tmp_path, case):
    options, expected = PINNED[case]
    options = dict(options)
    model = seeded_model(cls=options.pop("cls", pmt.PADMoEForSequenceClassification), kappa=options.pop("kappa", 0.4))
    model.save_pretrained(tmp_path / "a", **options)
    digest, files = weight_digest(tmp_path / "a")
    assert digest == expected, files
    model.save_pretrained(tmp_path / "b", **options)  # saving again: the same bytes
    assert weight_digest(tmp_path / "b")[0] == digest


def test_shards_smaller_than_a_pad_linear_keep_it_whole(tmp_path):
    """`max_shard_size` below one PAD linear's tensors: every entry larger than the limit gets a shard of its own
    (huggingface_hub's rule), the tensors of a PAD linear are never split, and the checkpoint loads."""
    model = make_model()
    model.save_pretrained(tmp_path, max_shard_size="5KB")
    with open(tmp_path / "model.safetensors.index.json", encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 10
    for ref in named_pad_linears(model):
        assert len({file for key, file in weight_map.items() if key.startswith(ref.name + ".")}) == 1, ref.name
    for shard in shards:
        with safe_open(str(tmp_path / shard), framework="pt") as f:
            keys = list(f.keys())
            nbytes = sum(f.get_tensor(k).nbytes for k in keys)
        prefixes = {k.rsplit(".", 1)[0] for k in keys}
        assert nbytes <= 5000 or len(prefixes) == 1 or len(keys) == 1, (shard, keys)
    assert_same_module(model, load(tmp_path))


# ----------------------------------------------------------------------------------------------- safe saves
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

    def broken_card(*args, **kwargs):
        raise RuntimeError("card template error")

    monkeypatch.setattr(save_module, "write_model_card", broken_card)
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
