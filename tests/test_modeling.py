"""Model-level behaviour: losses, heads, moe_layers selection, parameter report, save/load."""

from __future__ import annotations

import pytest
import torch
from conftest import random_batch
from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

import pad_moe_transformers as pmt
from pad_moe_transformers.core import named_pad_linears


def _pad(config, cls=pmt.PADMoEForSequenceClassification, **kwargs):
    return cls(pmt.PADMoEConfig(base_config=config, num_experts=4, **kwargs))


def test_aux_loss_added_to_task_loss(tiny_bert_config):
    model = _pad(tiny_bert_config, router_aux_loss_coef=0.5, router_z_loss_coef=0.25).eval()
    batch = random_batch()
    labels = torch.tensor([0, 1, 1])
    out = model(**batch, labels=labels)
    task = torch.nn.functional.cross_entropy(out.logits, labels)
    torch.testing.assert_close(out.loss, task + 0.5 * out.aux_loss + 0.25 * out.z_loss)
    unlabelled = model(**batch)
    assert unlabelled.loss is None and unlabelled.aux_loss is None and unlabelled.z_loss is None  # as Mixtral


def test_regression_head(tiny_bert_config):
    tiny_bert_config.num_labels = 1
    model = _pad(tiny_bert_config, router_aux_loss_coef=0.0).eval()
    batch = random_batch()
    labels = torch.tensor([0.5, 2.0, 4.5])
    out = model(**batch, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), labels))


def test_moe_layers_selection(tiny_bert_config):
    model = _pad(tiny_bert_config, moe_layers=[1], cls=pmt.PADMoEModel)
    assert len(model.moe_layers) == 1
    layers = model.model.encoder.layer
    assert isinstance(layers[0].intermediate.dense, torch.nn.Linear)
    assert isinstance(layers[1].intermediate.dense, pmt.PADMoEFeedForward)
    with pytest.raises(ValueError, match="moe_layers"):
        _pad(tiny_bert_config, moe_layers=[5], cls=pmt.PADMoEModel)


def test_parameter_report_counts_as_the_paper(tiny_bert_config):
    model = _pad(tiny_bert_config, cls=pmt.PADMoEModel)
    dense = AutoModel.from_config(tiny_bert_config)
    report = model.parameter_report()
    h, i, e, n_layers = 32, 48, 4, 2
    assert report.dense_equivalent == sum(p.numel() for p in dense.parameters())
    # Fully dynamic before partition: every expert counts its whole weight.
    assert report.dynamic == n_layers * 2 * e * h * i and report.static == 0
    # Partition one linear to 25% dynamic.
    linear = model.moe_layers[0].fc_in
    mask = torch.zeros(i, h, dtype=torch.bool)
    mask.view(-1)[: h * i // 4] = True
    linear.mask.copy_(mask)
    report = model.parameter_report()
    row = next(r for r in report.layers if r.layer == 0 and r.linear == "fc_in")
    assert row.dynamic_ratio == 0.25
    assert row.dynamic == e * h * i // 4 and row.static == h * i - h * i // 4
    assert report.total == sum(r.total for r in report.layers) + report.router + report.non_moe
    assert report.total < report.moe_equivalent
    assert report.to_dict()["layers"][0]["total"] == report.layers[0].total


@pytest.mark.parametrize("auto_class", [AutoModel, AutoModelForSequenceClassification, AutoModelForMaskedLM])
def test_save_load_round_trip(tiny_base_config, auto_class, tmp_path):
    config = pmt.PADMoEConfig(base_config=tiny_base_config, num_experts=4)
    model = auto_class.from_config(config).eval()
    with torch.no_grad():  # make the experts differ and the mask non-trivial, as after training
        masks = {}
        for ref in named_pad_linears(model):
            ref.module.expert_weight.add_(0.01 * torch.randn_like(ref.module.expert_weight))
            ref.module.scale_logit.fill_(0.3)
            masks[ref.short_name] = torch.rand(ref.module.mask.shape) < 0.5
    pmt.apply_partition(model, masks, {"method": "manual"})
    model.save_pretrained(tmp_path)
    again = auto_class.from_pretrained(tmp_path)
    assert type(again) is type(model)
    batch = random_batch(tiny_base_config.vocab_size)
    with torch.no_grad():
        a, b = model(**batch), again(**batch)
    key = "last_hidden_state" if auto_class is AutoModel else "logits"
    torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=0, atol=0)
    for moe_a, moe_b in zip(model.moe_layers, again.moe_layers):
        assert torch.equal(moe_a.fc_in.mask, moe_b.fc_in.mask)


def test_trainer_style_backward(tiny_bert_config):
    model = _pad(tiny_bert_config).train()
    out = model(**random_batch(), labels=torch.tensor([0, 1, 0]))
    out.loss.backward()
    assert model.moe_layers[0].router.weight.grad.abs().sum() > 0
    assert model.moe_layers[0].fc_in.scale_logit.grad is not None
