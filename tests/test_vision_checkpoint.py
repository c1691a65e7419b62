"""Compact checkpoints of PAD vision models: exact round trips (fully dynamic and partitioned), size against the
theory, Auto-class loading across heads, and clear errors for checkpoints of the wrong kind."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    BertConfig,
    MobileNetV2Config,
    ResNetConfig,
)

import pad_moe_transformers as pmt
from pad_moe_transformers import checkpoint as ckpt

BASES = {
    "resnet": ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3),
    "mobilenet_v2": MobileNetV2Config(depth_multiplier=0.35, image_size=32, num_labels=3),
}


def batches(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"pixel_values": torch.randn(4, 3, 32, 32, generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
        for _ in range(n)
    ]


def build(name: str, **kwargs) -> pmt.PADDyConvForImageClassification:
    torch.manual_seed(0)
    return AutoModelForImageClassification.from_config(pmt.PADDyConvConfig.from_base(BASES[name], **kwargs)).eval()


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)


@pytest.mark.parametrize("name", list(BASES))
@pytest.mark.parametrize("partitioned", [False, True], ids=["dynamic", "partitioned"])
def test_round_trip_is_exact(name, partitioned, tmp_path):
    model = build(name)
    if partitioned:
        pmt.partition_model(model, batches(2), method="random", dynamic_ratio=0.3, progress=False)
    model.save_pretrained(tmp_path)
    with ckpt.load.safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        layout = f.metadata()[ckpt.METADATA_LAYOUT]
    assert layout == ("compact" if partitioned else "moe")
    assert not (tmp_path / "README.md").exists()
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert isinstance(loaded, pmt.PADDyConvForImageClassification)
    assert loaded.config.partition == model.config.partition
    assert float(loaded.pad_convs[0].attention.temperature) == model.config.temperature_final
    assert_same_model(model, loaded)


def test_file_size_matches_theory(tmp_path):
    base = ResNetConfig(embedding_size=16, hidden_sizes=[64, 128], depths=[1, 1], layer_type="basic", num_labels=3)
    model = AutoModelForImageClassification.from_config(pmt.PADDyConvConfig.from_base(base))
    pmt.partition_model(model, batches(1), method="random", dynamic_ratio=0.3, progress=False)
    model.save_pretrained(tmp_path)
    theory = ckpt.theoretical_checkpoint_size(model)
    file = tmp_path / "model.safetensors"
    with open(file, "rb") as f:
        header = 8 + int.from_bytes(f.read(8), "little")
    assert os.path.getsize(file) - header == theory["total_bytes"]  # payload: exactly the theory
    assert abs(os.path.getsize(file) / theory["total_bytes"] - 1) < 0.01  # with the header: within 1%
    conv = model.pad_convs[-1]
    nnz, numel = conv.num_dynamic(), conv.mask.numel()
    assert abs(nnz / numel - 0.3) < 1e-3
    # the PAD convolutions store K * nnz(M) + numel - nnz(M) values, far fewer than DY-Conv's K * numel
    dense_values = sum(c.num_kernels * c.mask.numel() for c in model.pad_convs)
    assert theory["pad_values"] < 0.5 * dense_values


def test_base_and_head_classes_load_each_others_checkpoints(tmp_path):
    head = build("resnet")
    pmt.partition_model(head, batches(2), method="mp", dynamic_ratio=0.5, progress=False)
    head.save_pretrained(tmp_path / "head")
    base = AutoModel.from_pretrained(tmp_path / "head")
    assert isinstance(base, pmt.PADDyConvModel)
    names = {r.short_name: r.module for r in pmt.core.named_pad_weights(base)}
    for ref in pmt.core.named_pad_weights(head):
        assert torch.equal(names[ref.short_name].mask, ref.module.mask)
        assert names[ref.short_name].storage == ref.module.storage == "compact"
        assert torch.equal(names[ref.short_name].expert_values, ref.module.expert_values)
    base.save_pretrained(tmp_path / "base")
    again = AutoModelForImageClassification.from_pretrained(tmp_path / "base", num_labels=3)
    assert torch.equal(again.pad_convs[0].static_values, head.pad_convs[0].static_values)


def test_wrong_kernel_count_is_refused(tmp_path):
    build("resnet").save_pretrained(tmp_path)
    with pytest.raises(ckpt.PADCheckpointError, match="'num_kernels' does not match.*config has 2.*written with 4"):
        AutoModelForImageClassification.from_pretrained(tmp_path, num_kernels=2)


def test_wrong_kind_of_checkpoint_gives_clear_errors(tmp_path):
    build("resnet").save_pretrained(tmp_path / "vision")
    bert = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, vocab_size=99)
    text = AutoModelForSequenceClassification.from_config(pmt.PADMoEConfig.from_base(bert, num_experts=2))
    text.save_pretrained(tmp_path / "text")
    with pytest.raises(ValueError, match="PADDyConvConfig.*AutoModelForSequenceClassification"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "vision")
    with pytest.raises(ckpt.PADCheckpointError, match="is a 'pad_dyconv' checkpoint .*loads 'pad_moe' checkpoints"):
        pmt.PADMoEForSequenceClassification.from_pretrained(tmp_path / "vision")
    with pytest.raises(ckpt.PADCheckpointError, match="is a 'pad_moe' checkpoint .*loads 'pad_dyconv' checkpoints"):
        pmt.PADDyConvForImageClassification.from_pretrained(tmp_path / "text")
    with pytest.raises(ValueError, match="PADMoEConfig.*AutoModelForImageClassification"):
        AutoModelForImageClassification.from_pretrained(tmp_path / "text")
