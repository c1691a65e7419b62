"""Optimizer groups for routers and scale factors (pad_moe_transformers/training.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

import pad_moe_transformers as pmt
from pad_moe_transformers.training import pad_optimizer_cls_and_kwargs, pad_optimizer_grouped_parameters


def _model(tiny_bert_config, **pad_kwargs):
    config = pmt.PADMoEConfig.from_base(tiny_bert_config, num_experts=4, num_labels=2, **pad_kwargs)
    torch.manual_seed(0)
    return pmt.PADMoEForSequenceClassification(config)


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_groups_partition_the_trainable_parameters(tiny_bert_config):
    model = _model(tiny_bert_config)
    groups = pad_optimizer_grouped_parameters(
        model, weight_decay=0.1, router_learning_rate=1e-3, scale_learning_rate=1e-2
    )
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"decay", "no_decay", "router", "scale_factors"}
    every = [id(p) for g in groups for p in g["params"]]
    assert len(every) == len(set(every)) == sum(1 for p in model.parameters() if p.requires_grad)

    scale_names = _names(model, by_name["scale_factors"])
    assert scale_names and all("scale_logit" in n for n in scale_names)
    assert by_name["scale_factors"]["lr"] == 1e-2 and by_name["scale_factors"]["weight_decay"] == 0.0
    assert _names(model, by_name["router"]) and all(".router." in n for n in _names(model, by_name["router"]))
    assert by_name["router"]["lr"] == 1e-3 and by_name["router"]["weight_decay"] == 0.1
    # Everything else keeps the Trainer's rule: biases and LayerNorm without decay, default lr.
    assert "lr" not in by_name["decay"] and "lr" not in by_name["no_decay"]
    assert all("bias" in n or "LayerNorm" in n for n in _names(model, by_name["no_decay"]))
    assert any("expert_weight" in n for n in _names(model, by_name["decay"]))


def test_free_scale_factors_are_grouped_and_none_mode_has_no_group(tiny_bert_config):
    free = _model(tiny_bert_config, scale_factor_mode="free")
    names = _names(free, {g["name"]: g for g in pad_optimizer_grouped_parameters(free, 0.1)}["scale_factors"])
    assert names and {n.rsplit(".", 1)[1] for n in names} == {"lambda_static", "lambda_dynamic"}
    none = _model(tiny_bert_config, scale_factor_mode="none")
    assert "scale_factors" not in {g["name"] for g in pad_optimizer_grouped_parameters(none, 0.1)}


def test_bad_learning_rates_are_refused(tiny_bert_config):
    model = _model(tiny_bert_config)
    with pytest.raises(ValueError, match="router_learning_rate must be > 0"):
        pad_optimizer_grouped_parameters(model, 0.1, router_learning_rate=0.0)
    with pytest.raises(ValueError, match="scale_learning_rate must be > 0"):
        pad_optimizer_grouped_parameters(model, 0.1, scale_learning_rate=-1.0)


def test_trainer_uses_the_group_learning_rates_through_the_schedule(tiny_bert_config, tmp_path):
    model = _model(tiny_bert_config)
    args = TrainingArguments(
        output_dir=str(tmp_path), learning_rate=1e-4, weight_decay=0.1, warmup_steps=2, max_steps=4,
        use_cpu=True, report_to="none",
    )
    dataset = [{"input_ids": torch.randint(5, 99, (8,)), "labels": torch.tensor(i % 2)} for i in range(16)]
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset,
        optimizer_cls_and_kwargs=pad_optimizer_cls_and_kwargs(model, args, scale_learning_rate=1e-2),
    )
    phi_before = [m.scale_logit.detach().clone() for m in model.modules() if isinstance(m, pmt.PADExpertLinear)]
    trainer.train()
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    # The linear schedule ends at 0 for every group, from each group's own peak.
    assert groups["scale_factors"]["initial_lr"] == 1e-2 and groups["decay"]["initial_lr"] == 1e-4
    assert groups["router"]["initial_lr"] == 1e-4
    assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), torch.optim.AdamW)
    phi_after = [m.scale_logit.detach() for m in model.modules() if isinstance(m, pmt.PADExpertLinear)]
    # Adam moves a parameter by about lr per step: with 1e-2 the scale logits move by far more than 1e-4 would allow.
    moved = max(float((a - b).abs()) for a, b in zip(phi_after, phi_before))
    assert moved > 4 * 1e-4
