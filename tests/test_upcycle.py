"""Upcycled PAD-MoE == dense model, on tiny configs of every family and on the real MiniLM."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import random_batch
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

import pad_moe_transformers as pmt

HEADS = [
    (AutoModel, "last_hidden_state"),
    (AutoModelForSequenceClassification, "logits"),
    (AutoModelForTokenClassification, "logits"),
    (AutoModelForQuestionAnswering, "start_logits"),
    (AutoModelForMaskedLM, "logits"),
]


def _max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    if mask is not None and a.dim() >= 2 and a.shape[:2] == mask.shape:
        a, b = a[mask], b[mask]
    return (a - b).abs().max().item()


@pytest.mark.parametrize("auto_class,key", HEADS, ids=[h[0].__name__ for h in HEADS])
def test_upcycled_equals_dense_tiny(tiny_base_config, auto_class, key, tmp_path):
    dense = auto_class.from_config(tiny_base_config).eval()
    dense.save_pretrained(tmp_path / "dense")
    config = pmt.PADMoEConfig.from_base(str(tmp_path / "dense"), num_experts=4, num_experts_per_tok=2)
    pad = auto_class.from_pretrained(tmp_path / "dense", config=config)
    assert isinstance(pad, pmt.PADMoEPreTrainedModel)
    assert len(pad.moe_layers) == (1 if tiny_base_config.model_type == "albert" else 2)
    # Any mask: the upcycled experts and static weights are equal, so the output does not depend on it.
    for moe in pad.moe_layers:
        for linear in moe.pad_linears().values():
            linear.mask.copy_(torch.rand(linear.mask.shape) < 0.5)
    batch = random_batch(tiny_base_config.vocab_size)
    if tiny_base_config.model_type in ("roberta", "xlm-roberta", "camembert"):
        batch["input_ids"][0, -3:] = 1  # their pad token
    with torch.no_grad():
        expected = getattr(dense(**batch), key)
        out = pad(**batch, output_router_logits=True)  # without labels, the router losses only when asked for
    mask = batch["attention_mask"].bool()
    assert _max_diff(getattr(out, key), expected, mask) <= 1e-5
    assert torch.isfinite(out.aux_loss)


def test_upcycled_equals_dense_minilm(minilm_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    sentences = [
        "A man is playing a guitar on the street.",
        "The company said its third-quarter profit rose 12 percent, beating analysts' forecasts.",
        "No.",
        "Scientists have discovered a new species of frog in the rainforests of Madagascar.",
    ]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    dense = AutoModel.from_pretrained(minilm_path).eval()
    config = pmt.PADMoEConfig.from_base(minilm_path, num_experts=8, num_experts_per_tok=2, dynamic_ratio=0.5)
    pad = AutoModel.from_pretrained(minilm_path, config=config)
    for moe in pad.moe_layers:
        for linear in moe.pad_linears().values():
            linear.mask.copy_(torch.rand(linear.mask.shape) < 0.5)
    with torch.no_grad():
        expected = dense(**batch).last_hidden_state
        out = pad(**batch, output_router_logits=True)
    mask = batch["attention_mask"].bool()
    assert _max_diff(out.last_hidden_state, expected, mask) <= 1e-5
    assert len(out.router_logits) == 6
    # Every position is routed (padding too, as in Mixtral); usage and the losses count the real tokens only.
    assert out.router_logits[0].shape == (mask.numel(), 8)
    usage = pad.expert_usage()
    assert sorted(usage) == list(range(6)) and sum(usage[0]) == int(mask.sum()) * 2


def test_no_missing_or_unexpected_ffn_keys_when_upcycling(tiny_bert_config, tmp_path):
    AutoModel.from_config(tiny_bert_config).save_pretrained(tmp_path)  # no classifier in the checkpoint
    config = pmt.PADMoEConfig.from_base(str(tmp_path), num_labels=2)
    from transformers.utils import logging as hf_logging

    # A handler on the library's root logger sees the load report whatever other code did to
    # propagation or handlers (e.g. an example script's logging set-up earlier in the session).
    records: list[str] = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = lambda record: records.append(record.getMessage())
    library_logger = hf_logging.get_logger()
    library_logger.addHandler(handler)
    try:
        AutoModelForSequenceClassification.from_pretrained(tmp_path, config=config)
    finally:
        library_logger.removeHandler(handler)
    text = "\n".join(records)
    assert "classifier" in text, "the load report (new classifier head) must have been captured"
    for fragment in ("intermediate", "output.dense", "expert_weight", "static_weight", "router", "mask"):
        assert fragment not in text, f"load report mentions {fragment!r}:\n{text}"


def test_upcycling_with_config_of_other_family_fails(tiny_base_config, tmp_path):
    dense = AutoModel.from_config(tiny_base_config)
    dense.save_pretrained(tmp_path)
    from transformers import BertConfig, RobertaConfig

    wrong_base = RobertaConfig() if tiny_base_config.model_type == "bert" else BertConfig()
    config = pmt.PADMoEConfig(base_config=wrong_base)
    with pytest.raises(ValueError, match="PADMoEConfig.from_base"):
        AutoModel.from_pretrained(tmp_path, config=config)


def test_bf16_upcycling_keeps_router_fp32_math(tiny_bert_config, tmp_path):
    AutoModel.from_config(tiny_bert_config).save_pretrained(tmp_path)
    config = pmt.PADMoEConfig.from_base(str(tmp_path), num_experts=4)
    pad = AutoModel.from_pretrained(tmp_path, config=config, dtype=torch.bfloat16)
    assert pad.moe_layers[0].fc_in.expert_weight.dtype == torch.bfloat16
    assert pad.moe_layers[0].fc_in.mask.dtype == torch.bool
    out = pad(**random_batch(), output_router_logits=True)
    assert out.router_logits[0].dtype == torch.float32
    assert torch.isfinite(out.last_hidden_state.float()).all()


def test_config_built_model_draws_its_experts_independently(tiny_bert_config):
    """Built from a config alone (no dense weights to upcycle), the experts are drawn one by one, as a Mixtral built
    from its config: identical copies of a random FFN would only be told apart by the router. A model handed a dense
    model (`base_model=`, the upcycling path) keeps exact copies."""
    config = pmt.PADMoEConfig(base_config=tiny_bert_config.to_dict(), num_experts=4, num_experts_per_tok=2)
    for built in (pmt.PADMoEModel(config), AutoModel.from_config(config)):
        for moe in built.moe_layers:
            for linear in moe.pad_linears().values():
                experts = linear.expert_weight.detach()
                assert not torch.equal(experts[0], experts[1])
                assert 0.015 < experts.std().item() < 0.025  # the family's initializer_range, 0.02
                torch.testing.assert_close(linear.static_weight, experts.mean(0))  # the never-partitioned convention
    dense = AutoModel.from_config(tiny_bert_config)
    upcycled = pmt.PADMoEModel(config, base_model=dense)
    for moe in upcycled.moe_layers:
        for linear in moe.pad_linears().values():
            experts = linear.expert_weight.detach()
            assert all(torch.equal(experts[0], expert) for expert in experts)
