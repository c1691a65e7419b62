"""Everyday operations on a PAD checkpoint, each compared with what plain BERT does with the same operation.

The reference is the family model itself: the same tiny `BertForSequenceClassification` saved as is (`bert`)
and upcycled to PAD-MoE, partitioned and saved (`pad`). An operation must succeed or fail the same way for
both, and give the same kind of result.
"""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
from conftest import random_batch
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
)

import pad_moe_transformers as pmt
from pad_moe_transformers.core import named_pad_linears


def _bert_config() -> BertConfig:
    return BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip


def _upcycle_and_partition(dense_dir, auto_class, seed: int = 0):
    config = pmt.PADMoEConfig.from_base(str(dense_dir), num_experts=4)
    model = auto_class.from_pretrained(dense_dir, config=config)
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    with torch.no_grad():  # the experts differ, as after training: routing then matters
        for ref in named_pad_linears(model):
            ref.module.expert_weight.add_(0.05 * torch.randn(ref.module.expert_weight.shape, generator=generator))
            masks[ref.short_name] = torch.rand(ref.module.mask.shape, generator=generator) < 0.5
    pmt.apply_partition(model, masks, {"method": "random"})
    return model


@pytest.fixture
def checkpoints(tmp_path):
    """`{"bert": dir, "pad": dir}`: the same sequence-classification model, plain and as a partitioned PAD-MoE."""
    torch.manual_seed(0)
    BertForSequenceClassification(_bert_config()).save_pretrained(tmp_path / "bert")
    _upcycle_and_partition(tmp_path / "bert", AutoModelForSequenceClassification).save_pretrained(tmp_path / "pad")
    return {"bert": tmp_path / "bert", "pad": tmp_path / "pad"}


def _head_config(model):
    """The config the head is built from (the family config of a PAD model)."""
    return getattr(model.config, "base_config", model.config)


def _without_prefix(keys, kind: str) -> set[str]:
    """Checkpoint keys without the PAD wrapper's `model.` prefix, to compare with plain BERT's."""
    return {k.removeprefix("model.") if kind == "pad" else k for k in keys}


@pytest.mark.parametrize("kind", ["bert", "pad"])
def test_config_overrides_at_from_pretrained(checkpoints, kind):
    model = AutoModelForSequenceClassification.from_pretrained(checkpoints[kind], hidden_dropout_prob=0.3)
    assert _head_config(model).hidden_dropout_prob == 0.3
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in model.modules())


@pytest.mark.parametrize("kind", ["bert", "pad"])
def test_new_num_labels_needs_ignore_mismatched_sizes(checkpoints, kind):
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForSequenceClassification.from_pretrained(checkpoints[kind], num_labels=5)
    model = AutoModelForSequenceClassification.from_pretrained(
        checkpoints[kind], num_labels=5, ignore_mismatched_sizes=True
    )
    assert model.config.num_labels == 5 and _head_config(model).num_labels == 5
    assert model(**random_batch()).logits.shape == (3, 5)


@pytest.mark.parametrize("kind", ["bert", "pad"])
def test_id2label_override(checkpoints, kind):
    labels = {0: "negative", 1: "positive"}
    model = AutoModelForSequenceClassification.from_pretrained(checkpoints[kind], id2label=labels)
    assert model.config.id2label == labels and _head_config(model).id2label == labels


def test_head_checkpoint_into_base_model_reports_the_same_keys(checkpoints):
    reports = {}
    for kind in ("bert", "pad"):
        model, info = AutoModel.from_pretrained(checkpoints[kind], output_loading_info=True)
        assert not info["missing_keys"]
        reports[kind] = _without_prefix(info["unexpected_keys"], kind)
    assert reports["pad"] == reports["bert"] == {"classifier.weight", "classifier.bias"}


def test_base_checkpoint_into_head_reports_the_same_keys(checkpoints, tmp_path):
    reports = {}
    for kind in ("bert", "pad"):
        AutoModel.from_pretrained(checkpoints[kind]).save_pretrained(tmp_path / f"{kind}_base")
        _, info = AutoModelForSequenceClassification.from_pretrained(
            tmp_path / f"{kind}_base", output_loading_info=True
        )
        reports[kind] = _without_prefix(info["missing_keys"], kind)
        assert not info["unexpected_keys"]
    assert reports["pad"] == reports["bert"] == {"classifier.weight", "classifier.bias"}


def test_masked_lm_then_sequence_classification(tmp_path):
    """Continue pre-training, then fine-tune: a masked-LM checkpoint loads into a classification head."""
    torch.manual_seed(0)
    BertForMaskedLM(_bert_config()).save_pretrained(tmp_path / "bert")
    _upcycle_and_partition(tmp_path / "bert", AutoModelForMaskedLM).save_pretrained(tmp_path / "pad")
    reports = {}
    for kind in ("bert", "pad"):
        model, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / kind, output_loading_info=True)
        reports[kind] = (_without_prefix(info["missing_keys"], kind), _without_prefix(info["unexpected_keys"], kind))
        model(**random_batch())
    assert reports["pad"] == reports["bert"]
    # BERT's masked-LM model has no pooler: it is new, like the classifier.
    assert reports["pad"][0] == {
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
        "classifier.weight",
        "classifier.bias",
    }


@pytest.mark.parametrize("kind", ["bert", "pad"])
def test_resize_token_embeddings_then_save_and_load(checkpoints, kind, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(checkpoints[kind]).eval()
    model.resize_token_embeddings(120)
    assert model.get_input_embeddings().weight.shape[0] == 120
    model.save_pretrained(tmp_path / "resized")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "resized").eval()
    batch = random_batch(vocab_size=120)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, again(**batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["bert", "pad"])
def test_return_dict_false_and_pickled_outputs(checkpoints, kind):
    model = AutoModelForSequenceClassification.from_pretrained(checkpoints[kind]).eval()
    batch = random_batch()
    labels = torch.tensor([0, 1, 1])
    with torch.no_grad():
        as_dict = model(**batch, labels=labels)
        as_tuple = model(**batch, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    loss, logits = as_tuple[:2]  # the first two fields, as for BERT
    assert torch.equal(loss, as_dict.loss) and torch.equal(logits, as_dict.logits)
    again = pickle.loads(pickle.dumps(as_dict))
    assert type(again) is type(as_dict) and torch.equal(again.logits, as_dict.logits)


def test_bfloat16_loading_keeps_the_router_fp32(checkpoints):
    bert = AutoModelForSequenceClassification.from_pretrained(checkpoints["bert"], dtype=torch.bfloat16)
    pad = AutoModelForSequenceClassification.from_pretrained(checkpoints["pad"], dtype=torch.bfloat16)
    assert bert.classifier.weight.dtype == pad.model.classifier.weight.dtype == torch.bfloat16
    assert all(moe.router.weight.dtype == torch.float32 for moe in pad.moe_layers)
    assert all(moe.fc_in.dynamic_parameter.dtype == torch.bfloat16 for moe in pad.moe_layers)
    assert pad(**random_batch()).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["bert", "pad"])
@pytest.mark.parametrize("options", [{"device_map": "cpu"}, {"low_cpu_mem_usage": True}])
def test_loader_options(checkpoints, kind, options):
    reference = AutoModelForSequenceClassification.from_pretrained(checkpoints[kind]).eval()
    model = AutoModelForSequenceClassification.from_pretrained(checkpoints[kind], **options).eval()
    batch = random_batch()
    with torch.no_grad():
        assert torch.equal(reference(**batch).logits, model(**batch).logits)


@pytest.mark.parametrize("kind", ["bert", "pad"])
def test_subfolder_and_variant(checkpoints, kind, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(checkpoints[kind]).eval()
    model.save_pretrained(tmp_path / "repo" / "sub", variant="v1")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "repo", subfolder="sub", variant="v1")
    batch = random_batch()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again.eval()(**batch).logits)
    with pytest.raises(OSError, match="v2"):  # a missing variant is named
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "repo", subfolder="sub", variant="v2")


@pytest.mark.parametrize("kind", ["bert", "pad"])
def test_gradient_checkpointing_gives_the_same_gradients_on_padded_batches(checkpoints, kind):
    model = AutoModelForSequenceClassification.from_pretrained(checkpoints[kind]).train()
    batch, labels = random_batch(pad_last=4), torch.tensor([0, 1, 1])

    def gradients(checkpointing: bool):
        model.zero_grad()
        if checkpointing:
            model.gradient_checkpointing_enable()
        else:
            model.gradient_checkpointing_disable()
        if kind == "pad":
            model.reset_expert_usage()
        model(**batch, labels=labels).loss.backward()
        usage = model.expert_usage() if kind == "pad" else None
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, usage

    plain, usage_plain = gradients(False)
    checkpointed, usage_checkpointed = gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    if kind == "pad":  # each real token counted once per forward, not again when the backward recomputes
        assert usage_checkpointed == usage_plain
        real = int(batch["attention_mask"].sum())
        assert all(sum(counts) == real * 2 for counts in usage_plain.values())


@pytest.mark.parametrize("kind", ["bert", "pad"])
def test_two_threads_share_one_model(checkpoints, kind):
    model = AutoModelForSequenceClassification.from_pretrained(checkpoints[kind]).eval()
    batches = [random_batch(pad_last=p) for p in (0, 5)]
    with torch.no_grad():
        expected = [model(**b).logits for b in batches]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def run(index: int) -> None:
        with torch.no_grad():
            for _ in range(20):
                results[index].append(model(**batches[index]).logits)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in (0, 1):
        assert len(results[index]) == 20
        assert all(torch.equal(logits, expected[index]) for logits in results[index])


@pytest.mark.parametrize("kind", ["bert", "pad"])
def test_deepcopy_after_a_failed_forward(checkpoints, kind):
    model = AutoModelForSequenceClassification.from_pretrained(checkpoints[kind]).train()
    with pytest.raises((ValueError, IndexError, RuntimeError)):
        model(**random_batch(), labels=torch.tensor([0, 7, 1]))  # label 7 of a 2-label head
    clone = copy.deepcopy(model).eval()
    batch = random_batch()
    with torch.no_grad():
        assert torch.equal(clone(**batch).logits, model.eval()(**batch).logits)
