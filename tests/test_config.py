"""PADMoEConfig: defaults, validation messages, from_base, JSON round trip."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, BertConfig, GPT2Config

import pad_moe_transformers as pmt


def test_defaults(tiny_bert_config):
    config = pmt.PADMoEConfig(base_config=tiny_bert_config)
    assert config.model_type == "pad_moe"
    assert (config.num_experts, config.num_experts_per_tok, config.dynamic_ratio) == (8, 2, 0.5)
    assert config.scale_factor_mode == "sum2"
    assert config.router_aux_loss_coef > 0 and config.router_z_loss_coef == 0 and config.router_jitter_noise == 0
    assert config.moe_layers is None and config.partition is None and not config.is_partitioned


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"num_experts": 0}, "num_experts"),
        ({"num_experts_per_tok": 3, "num_experts": 2}, "num_experts_per_tok"),
        ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
        ({"dynamic_ratio": 0.0}, "dynamic_ratio"),
        ({"dynamic_ratio": 1.5}, "dynamic_ratio"),
        ({"scale_factor_mode": "both"}, "scale_factor_mode"),
        ({"router_aux_loss_coef": -1.0}, "router_aux_loss_coef"),
        ({"router_jitter_noise": 1.0}, "router_jitter_noise"),
        ({"moe_layers": []}, "moe_layers"),
        ({"moe_layers": [0, 0]}, "moe_layers"),
        ({"partition_granularity": "row"}, "partition_granularity"),
    ],
)
def test_invalid_values_name_the_field(tiny_bert_config, kwargs, field):
    with pytest.raises(ValueError, match=field):
        pmt.PADMoEConfig(base_config=tiny_bert_config, **kwargs)


def test_unsupported_family_is_rejected():
    with pytest.raises(ValueError, match="supported"):
        pmt.PADMoEConfig(base_config=GPT2Config())


def test_from_base_routes_kwargs(tmp_path, tiny_bert_config):
    tiny_bert_config.save_pretrained(tmp_path)
    config = pmt.PADMoEConfig.from_base(
        str(tmp_path), num_experts=4, dynamic_ratio=0.3, num_labels=3, hidden_dropout_prob=0.2, router_z_loss_coef=1e-3
    )
    assert config.num_experts == 4 and config.dynamic_ratio == 0.3 and config.router_z_loss_coef == 1e-3
    assert config.base_config.hidden_dropout_prob == 0.2
    assert config.num_labels == 3 and config.base_config.num_labels == 3
    with pytest.raises(ValueError, match="not_a_field"):
        pmt.PADMoEConfig.from_base(str(tmp_path), not_a_field=1)


def test_from_base_regression_head(tmp_path, tiny_bert_config):
    tiny_bert_config.save_pretrained(tmp_path)
    config = pmt.PADMoEConfig.from_base(str(tmp_path), num_labels=1)
    assert config.base_config.num_labels == 1 and config.num_labels == 1


def test_json_round_trip(tmp_path, tiny_bert_config):
    config = pmt.PADMoEConfig(base_config=tiny_bert_config, num_experts=4, moe_layers=[1], scale_factor_mode="free")
    config.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(again, pmt.PADMoEConfig)
    assert isinstance(again.base_config, BertConfig)
    assert again.base_config.hidden_size == tiny_bert_config.hidden_size
    assert (again.num_experts, again.moe_layers, again.scale_factor_mode) == (4, [1], "free")


def test_from_base_refuses_pad_checkpoint(tmp_path, tiny_bert_config):
    pmt.PADMoEConfig(base_config=tiny_bert_config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="already a PAD-MoE"):
        pmt.PADMoEConfig.from_base(str(tmp_path))
