"""`merged_pad_weights()`: eq. 4 formed once per block at inference, never stale outside it, never under grad.

The models here are unmerged (`unmerge_pad_weights()`: eval mode would merge them), so that the block alone is
tested; merged models are tested in tests/test_merge.py."""

from __future__ import annotations

import threading

import pytest
import torch
from _fixtures import count_eq4_formations, perturb_pad_model
from torch import nn
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel, ResNetConfig

import pad_moe_transformers as pmt


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense")
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    return path


def _model(dense_dir, granularity: str) -> nn.Module:
    config = pmt.PADMoEConfig.from_base(dense_dir, num_labels=2, partition_granularity=granularity)
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(dense_dir, config=config)
    return perturb_pad_model(model, granularity, alpha=0.1).eval().unmerge_pad_weights()


IDS = torch.tensor([[2, 7, 9, 11, 3, 0], [2, 5, 6, 3, 0, 0]])
MASK = (IDS != 0).long()


@pytest.mark.parametrize("granularity", ["element", "neuron"])
def test_block_gives_the_same_outputs_and_merges_once(dense_dir, granularity, monkeypatch):
    model = _model(dense_dir, granularity)
    with torch.no_grad():
        expected = model(input_ids=IDS, attention_mask=MASK).logits
    if granularity == "element":  # 2 layers x (fc_in, fc_out)
        calls, per_forward = count_eq4_formations(monkeypatch), 4
    else:  # 2 layers, each forming its neuron slices
        calls, per_forward = count_eq4_formations(monkeypatch, "neuron"), 2
    with torch.no_grad(), pmt.merged_pad_weights():
        outputs = [model(input_ids=IDS, attention_mask=MASK).logits for _ in range(3)]
    for logits in outputs:
        torch.testing.assert_close(logits, expected, atol=0, rtol=0)
    assert calls[0] == per_forward  # once for the three forwards
    with torch.no_grad():
        model(input_ids=IDS, attention_mask=MASK)
    assert calls[0] == 2 * per_forward  # outside the block: formed again


def test_values_end_with_the_block_and_edits_show_after_it(dense_dir):
    model = _model(dense_dir, "element")
    linear = model.moe_layers[0].fc_in
    with torch.no_grad(), pmt.merged_pad_weights():
        before = model(input_ids=IDS, attention_mask=MASK).logits
        linear.expert_weight.data.mul_(-1.0)  # a write through `.data` inside the block is not seen there (documented)
        torch.testing.assert_close(model(input_ids=IDS, attention_mask=MASK).logits, before, atol=0, rtol=0)
    with torch.no_grad():  # ... and is seen as soon as the block ends
        after = model(input_ids=IDS, attention_mask=MASK).logits
    assert not torch.allclose(after, before)


def test_grad_mode_inside_the_block_is_never_cached(dense_dir):
    model = _model(dense_dir, "element")
    linear = model.moe_layers[0].fc_in
    with pmt.merged_pad_weights():
        with torch.no_grad():
            model(input_ids=IDS, attention_mask=MASK)  # fills the cache
        loss = model(input_ids=IDS, attention_mask=MASK, labels=torch.tensor([0, 1])).loss
        loss.backward()
    assert linear.expert_weight.grad is not None and linear.expert_weight.grad.abs().sum() > 0
    assert linear.scale_logit.grad is not None


def test_other_threads_do_not_see_the_block(dense_dir, monkeypatch):
    model = _model(dense_dir, "element")
    calls = count_eq4_formations(monkeypatch)
    seen = []

    def other():
        with torch.no_grad():
            model(input_ids=IDS, attention_mask=MASK)
            model(input_ids=IDS, attention_mask=MASK)
        seen.append(calls[0])

    with torch.no_grad(), pmt.merged_pad_weights():
        model(input_ids=IDS, attention_mask=MASK)
        assert calls[0] == 4
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert seen == [4 + 8]  # the other thread formed eq. 4 in each of its two forwards


def test_dynamic_convolution_uses_the_block_too(monkeypatch):
    base = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    config = pmt.PADDyConvConfig.from_base(base, dynamic_ratio=0.5)
    torch.manual_seed(0)
    model = pmt.PADDyConvForImageClassification(config).eval().unmerge_pad_weights()
    with torch.no_grad():
        for ref in pmt.core.named_pad_weights(model):
            ref.module.mask.copy_(torch.rand_like(ref.module.mask, dtype=torch.float) < 0.5)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(pixel_values=images).logits
    calls = count_eq4_formations(monkeypatch)
    with torch.no_grad(), pmt.merged_pad_weights():
        for _ in range(2):
            torch.testing.assert_close(model(pixel_values=images).logits, expected, atol=1e-6, rtol=1e-6)
    assert calls[0] == len(pmt.core.named_pad_weights(model))
