"""Neuron-structured PAD (`partition_granularity="neuron"`): the fast path against eq. 4 element-wise."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_batch
from torch import nn

import pad_moe_transformers as pmt


def _neuron_layer(hidden=8, inter=12, num_experts=4, k=2, kappa=0.5) -> pmt.PADMoEFeedForward:
    moe = pmt.PADMoEFeedForward.from_dense(
        nn.Linear(hidden, inter), nn.GELU(), nn.Linear(inter, hidden),
        num_experts=num_experts, num_experts_per_tok=k, partition_granularity="neuron",
    )
    with torch.no_grad():
        for linear in (moe.fc_in, moe.fc_out):
            linear.expert_weight.normal_()
            linear.static_weight.normal_()
            linear.expert_bias.normal_()
            linear.scale_logit.fill_(-0.3)
        moe.fc_in.static_bias.normal_()
        moe.router.weight.normal_()
    neurons = torch.zeros(inter, dtype=torch.bool)
    neurons[torch.randperm(inter)[: int(kappa * inter)]] = True
    moe.set_neuron_mask(neurons)
    return moe


def _element_reference(moe: pmt.PADMoEFeedForward) -> pmt.PADMoEFeedForward:
    reference = copy.deepcopy(moe)
    reference.partition_granularity = "element"  # the generic eq. 4 path on the same parameters
    return reference


@pytest.mark.parametrize("kappa", [0.0, 0.25, 0.5, 1.0])
def test_neuron_fast_path_matches_element_path(kappa):
    moe = _neuron_layer(kappa=kappa)
    reference = _element_reference(moe)
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(moe(x), reference(x), rtol=1e-5, atol=1e-5)
    moe(x).square().mean().backward()
    reference(x).square().mean().backward()
    for (name, p), (_, q) in zip(moe.named_parameters(), reference.named_parameters()):
        fast = torch.zeros_like(p) if p.grad is None else p.grad  # unused slices may get no gradient at all
        torch.testing.assert_close(
            fast, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"gradient of {name}: {m}"
        )


def test_neuron_eval_outputs_follow_weight_edits():
    """No cached neuron weights: an in-place edit, even through `.data`, shows in the next eval forward."""
    moe = _neuron_layer().eval()
    reference = _element_reference(moe).eval()
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), reference(x), rtol=1e-5, atol=1e-5)
        moe.fc_out.expert_weight.data.mul_(2.0)
        reference.fc_out.expert_weight.data.mul_(2.0)
        torch.testing.assert_close(moe(x), reference(x), rtol=1e-5, atol=1e-5)


def test_unstructured_mask_is_refused():
    moe = _neuron_layer()
    moe.fc_in.mask[0, 0] = ~moe.fc_in.mask[0, 0]
    with pytest.raises(ValueError, match="neuron-structured"):
        moe(torch.randn(1, 3, 8))


def test_neuron_model_upcycled_equals_dense(tiny_bert_config, tmp_path):
    from transformers import AutoModel

    dense = AutoModel.from_config(tiny_bert_config).eval()
    dense.save_pretrained(tmp_path)
    config = pmt.PADMoEConfig.from_base(str(tmp_path), num_experts=4, partition_granularity="neuron")
    pad = AutoModel.from_pretrained(tmp_path, config=config)
    for moe in pad.moe_layers:
        moe.set_neuron_mask(torch.rand(moe.fc_in.out_features) < 0.5)
    batch = random_batch()
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        diff = (pad(**batch).last_hidden_state - dense(**batch).last_hidden_state)[mask].abs().max()
    assert diff <= 1e-5
