"""Mode partition (IMP / MP / Random) of PAD vision models through the MoE's partition code."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForImageClassification, MobileNetV2Config, ResNetConfig

import pad_moe_transformers as pmt

RESNET = ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=4)


def batches(seed: int, n: int = 4, size: int = 16) -> list[dict]:
    """Images whose label shows in their colour channels, so the task loss carries signal."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randint(0, 4, (size,), generator=g)
        x = 0.5 * torch.randn(size, 3, 32, 32, generator=g)
        x[torch.arange(size), y % 3] += y[:, None, None].float() - 1.5
        out.append({"pixel_values": x, "labels": y})
    return out


@pytest.fixture(scope="module")
def scratch():
    torch.manual_seed(0)
    return AutoModelForImageClassification.from_config(pmt.PADDyConvConfig.from_base(RESNET))


def flat_masks(result) -> torch.Tensor:
    return torch.cat([m.flatten() for m in result.masks.values()])


@pytest.mark.parametrize("method", ["imp", "mp", "random"])
def test_partition_sets_masks_and_metadata(scratch, method):
    model = copy.deepcopy(scratch)
    result = pmt.partition_model(model, batches(0, n=2), method=method, dynamic_ratio=0.3, progress=False)
    names = [r.short_name for r in pmt.core.named_pad_weights(model)]
    assert list(result.masks) == names and "encoder.stages.0.layers.0.layer.0.convolution" in names
    for conv, (name, ratio) in zip(model.pad_convs, result.dynamic_ratios.items()):
        assert abs(ratio - 0.3) <= 1 / conv.mask.numel() and torch.equal(conv.mask, result.masks[name])
        assert conv.storage == "compact" and conv.expert_values.shape[1] == int(conv.mask.sum())
        expert, static = conv.dense_expert_weight(), conv.dense_static_weight()
        assert bool((expert[:, ~conv.mask] == 0).all()) and bool((static[conv.mask] == 0).all())
    assert model.config.partition["method"] == method and model.config.is_partitioned
    pmt.partition.verify_partition_metadata(model)
    # training after the partition: entries eq. 4 does not read get no gradient
    model.train()
    pmt.dense_pad_storage(model)  # dense storage: the entries eq. 4 does not read are there, with zero gradient
    model(**batches(5, n=1)[0]).loss.backward()
    conv = model.pad_convs[1]
    assert bool((conv.expert_weight.grad[:, ~conv.mask] == 0).all())
    assert bool((conv.static_weight.grad[conv.mask] == 0).all())


def test_imp_is_not_random(scratch):
    """Two IMP partitions from disjoint batches keep clearly more common dynamic entries than two random ones."""
    def overlap(method: str, seeds: tuple[int, int]) -> float:
        masks = []
        for seed in seeds:
            result = pmt.partition_model(
                copy.deepcopy(scratch), batches(seed), method=method, dynamic_ratio=0.3, seed=seed, progress=False
            )
            masks.append(flat_masks(result))
        return float((masks[0] & masks[1]).sum() / masks[0].sum())

    imp, random = overlap("imp", (1, 2)), overlap("random", (1, 2))
    assert abs(random - 0.3) < 0.03  # chance level: kappa
    assert imp > 0.4, imp  # measured 0.49


def test_upcycled_model_partitions_after_the_warmup(tmp_path):
    """Equal kernels make eq. 7 zero (the upcycling trap); the default warm-up of the kernels breaks the tie."""
    torch.manual_seed(0)
    AutoModelForImageClassification.from_config(RESNET).save_pretrained(tmp_path)
    model = AutoModelForImageClassification.from_pretrained(tmp_path, config=pmt.PADDyConvConfig.from_base(tmp_path))
    before = [c.expert_weight.detach().clone() for c in model.pad_convs]
    with pytest.raises(ValueError, match="carry no information"):
        pmt.partition_model(copy.deepcopy(model), batches(0, n=2), method="mp", score="grad", progress=False)
    result = pmt.partition_model(model, batches(0, n=2), method="imp", progress=False)
    assert result.metadata["warmup_steps"] == 2
    for conv, weight in zip(model.pad_convs, before):  # the warm-up is undone: only the post-processing zeros
        assert torch.equal(conv.dense_expert_weight(), weight * conv.mask)


def test_mobilenet_v2_depthwise_convs_partition():
    torch.manual_seed(0)
    base = MobileNetV2Config(depth_multiplier=0.35, image_size=32, num_labels=4, initializer_range=0.2)
    model = AutoModelForImageClassification.from_config(pmt.PADDyConvConfig.from_base(base, dynamic_ratio=0.5))
    result = pmt.partition_model(model, batches(0, n=1, size=8), method="mp", progress=False)
    assert result.metadata["target_dynamic_ratio"] == 0.5
    assert abs(result.metadata["achieved_dynamic_ratio_total"] - 0.5) < 1e-3
    assert "layer.0.conv_3x3.convolution" in result.masks


def test_partition_needs_a_pad_model():
    plain = AutoModelForImageClassification.from_config(RESNET)
    with pytest.raises(TypeError, match="PADDyConvPreTrainedModel"):
        pmt.partition_model(plain, batches(0, n=1), progress=False)
