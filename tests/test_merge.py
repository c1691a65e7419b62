"""Merged inference (`merge_pad_weights` / `unmerge_pad_weights`, automatic in eval mode): eq. 4 formed once across
forwards without grad, outputs equal to the unmerged model's, never stale after an edit of the weights, gradients
untouched, checkpoints unchanged."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
from _fixtures import count_eq4_formations, perturb_pad_model, save_tiny_bert
from transformers import AutoTokenizer, BertConfig, ResNetConfig, Trainer, TrainingArguments, pipeline

import pad_moe_transformers as pmt
from pad_moe_transformers.core.pad_weight import PADWeight

IDS = torch.tensor([[2, 7, 9, 11, 3, 0, 0], [2, 5, 6, 8, 12, 4, 3], [2, 13, 3, 0, 0, 0, 0]])
MASK = (IDS != 0).long()
BATCH = {"input_ids": IDS, "attention_mask": MASK}
LABELS = torch.tensor([0, 1, 1])


def _config(granularity: str = "element") -> pmt.PADMoEConfig:
    base = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24)
    return pmt.PADMoEConfig(
        base_config=base, num_experts=4, num_experts_per_tok=2, num_labels=2, partition_granularity=granularity
    )


def _model(granularity: str = "element") -> pmt.PADMoEForSequenceClassification:
    """A partitioned classifier (experts that differ, scale factors away from 1), in eval mode."""
    torch.manual_seed(0)
    return perturb_pad_model(pmt.PADMoEForSequenceClassification(_config(granularity)), granularity).eval()


def _count(monkeypatch, granularity: str = "element") -> list[int]:
    return count_eq4_formations(monkeypatch, granularity)


def _unmerged_logits(model, batch=BATCH) -> torch.Tensor:
    """The logits of a never-merged copy of `model` (the reference every merged output must equal)."""
    reference = copy.deepcopy(model).unmerge_pad_weights()
    assert not reference.pad_weights_merged
    with torch.no_grad():
        return reference(**batch).logits


def _logits(model, batch=BATCH) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


# ------------------------------------------------------------------------------------------ merged = unmerged, once
@pytest.mark.parametrize("granularity", ["element", "neuron"])
def test_eval_mode_merges_forms_eq4_once_and_gives_the_unmerged_outputs(granularity, monkeypatch):
    model = _model(granularity)
    assert model.pad_weights_merged  # eval mode merges
    expected = _unmerged_logits(model)
    calls = _count(monkeypatch, granularity)
    per_model = 4 if granularity == "element" else 2  # 2 layers x (fc_in, fc_out) / 2 layers' slices
    for _ in range(3):
        torch.testing.assert_close(_logits(model), expected, atol=0, rtol=0)
    with torch.inference_mode():
        torch.testing.assert_close(model(**BATCH).logits, expected, atol=0, rtol=0)
    for row in range(3):  # one padded input at a time, batch 1
        single = {k: v[row : row + 1, : int(MASK[row].sum())] for k, v in BATCH.items()}
        torch.testing.assert_close(_logits(model, single), expected[row : row + 1], atol=1e-5, rtol=1e-5)
    assert calls[0] == per_model
    model.unmerge_pad_weights()  # opted out: formed in every forward, eval mode included
    model.eval()
    assert not model.pad_weights_merged
    _logits(model)
    _logits(model)
    assert calls[0] == 3 * per_model
    model.merge_pad_weights()  # formed now, once
    assert model.pad_weights_merged and calls[0] == 4 * per_model
    torch.testing.assert_close(_logits(model), expected, atol=0, rtol=0)
    assert calls[0] == 4 * per_model


def test_train_mode_unmerges_and_eval_merges_again(monkeypatch):
    model = _model()
    _logits(model)
    assert all(m._pad_merge_cache is not None for m in model.modules() if isinstance(m, PADWeight))
    model.train()
    assert not model.pad_weights_merged
    assert all(m._pad_merge_cache is None for m in model.modules() if isinstance(m, PADWeight))  # freed
    calls = _count(monkeypatch)
    _logits(model)
    _logits(model)
    assert calls[0] == 8  # train mode: every forward forms eq. 4 (grad disabled or not)
    model.eval()
    _logits(model)
    _logits(model)
    assert calls[0] == 12


def test_dynamic_convolution_merges_in_eval_mode(monkeypatch):
    base = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    torch.manual_seed(0)
    model = pmt.PADDyConvForImageClassification(pmt.PADDyConvConfig.from_base(base, dynamic_ratio=0.5)).eval()
    convs = [ref.module for ref in pmt.core.named_pad_weights(model)]
    with torch.no_grad():
        for conv in convs:
            conv.mask.copy_(torch.rand_like(conv.mask, dtype=torch.float) < 0.5)
            conv.expert_weight.add_(torch.randn_like(conv.expert_weight), alpha=0.1)
    images = {"pixel_values": torch.randn(3, 3, 16, 16)}
    assert model.pad_weights_merged
    expected = _unmerged_logits(model, images)
    calls = _count(monkeypatch)
    for _ in range(3):
        torch.testing.assert_close(_logits(model, images), expected, atol=0, rtol=0)
    assert calls[0] == len(convs)
    with torch.no_grad():  # an edit of a kernel: formed again, the new outputs
        convs[0].expert_weight.mul_(-1.0)
    changed = _logits(model, images)
    assert calls[0] == len(convs) + 1
    assert not torch.allclose(changed, expected)
    torch.testing.assert_close(changed, _unmerged_logits(model, images), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ never stale
def _sgd_step(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(**BATCH, labels=LABELS).loss.backward()  # eval mode, grad enabled: eq. 4 formed with its gradient
    optimizer.step()


def _fused_adamw_step(model):  # fused optimizers do not bump version counters: the step hook catches them
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model(**BATCH, labels=LABELS).loss.backward()
    optimizer.step()


def _load_other_state_dict(model):
    other = _model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p), alpha=0.1)
    model.load_state_dict(other.state_dict())


def _edit_mask(model):
    with torch.no_grad():
        for moe in model.moe_layers:
            moe.fc_in.mask[:2] = ~moe.fc_in.mask[:2]


def _edit_neuron_mask(model):
    for moe in model.moe_layers:
        moe.set_neuron_mask(torch.arange(moe.fc_in.out_features) % 2 == 0)


def _edit_scale_factors(model):
    with torch.no_grad():
        for moe in model.moe_layers:
            moe.fc_out.scale_logit.fill_(-0.7)


def _assign_data(model):
    for moe in model.moe_layers:
        moe.fc_in.static_weight.data = moe.fc_in.static_weight.data * 2.0 + 0.1


def _replace_parameter(model):
    linear = model.moe_layers[1].fc_out
    linear.expert_weight = torch.nn.Parameter(linear.expert_weight.detach() * -1.0)


def _partition(model):
    pmt.partition_model(model, [{**BATCH, "labels": LABELS}], method="random", dynamic_ratio=0.3, progress=False)


EDITS = {
    "sgd_step": _sgd_step,
    "fused_adamw_step": _fused_adamw_step,
    "load_state_dict": _load_other_state_dict,
    "mask_in_place": _edit_mask,
    "scale_factors": _edit_scale_factors,
    "data_assignment": _assign_data,
    "new_parameter": _replace_parameter,
    "partition": _partition,
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edit_of_a_merged_model_gives_the_new_outputs(edit):
    model = _model()
    before = _logits(model)  # the merged weights are formed
    EDITS[edit](model)
    assert model.pad_weights_merged and not model.training
    after = _logits(model)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, _unmerged_logits(model), atol=0, rtol=0)


@pytest.mark.parametrize("edit", ["neuron_mask", "sgd_step", "load_state_dict", "static_bias"])
def test_an_edit_of_a_merged_neuron_model_gives_the_new_outputs(edit):
    model = _model("neuron")
    before = _logits(model)
    if edit == "neuron_mask":
        _edit_neuron_mask(model)
    elif edit == "static_bias":  # read through the neuron slices, not the element weights
        with torch.no_grad():
            for moe in model.moe_layers:
                moe.fc_in.static_bias.add_(1.0)
    elif edit == "sgd_step":
        _sgd_step(model)
    else:
        other = _model("neuron")
        with torch.no_grad():
            for p in other.parameters():
                p.add_(torch.randn_like(p), alpha=0.1)
        model.load_state_dict(other.state_dict())
    after = _logits(model)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, _unmerged_logits(model), atol=0, rtol=0)


def test_to_float64_gives_the_float64_outputs():
    model = _model()
    _logits(model)
    model.to(torch.float64)
    assert all(m._pad_merge_cache is None for m in model.modules() if isinstance(m, PADWeight))  # dropped
    merged = _logits(model)
    assert merged.dtype == torch.float64
    assert all(m._pad_merge_cache[1].dtype == torch.float64 for m in model.modules() if isinstance(m, PADWeight))
    torch.testing.assert_close(merged, _unmerged_logits(model), atol=0, rtol=0)


def test_a_relaxed_mask_is_never_served_from_the_merged_weights():
    model = _model()
    _logits(model)
    linear = model.moe_layers[0].fc_in
    with torch.no_grad():
        cached = linear.effective_weight()
        linear.soft_mask = torch.full_like(linear.static_weight, 0.5)
        try:
            relaxed = linear.effective_weight()
        finally:
            linear.soft_mask = None
    l_s, l_d = linear.scale_factors()
    expected = l_d * 0.5 * linear.expert_weight + (l_s * 0.5 * linear.static_weight).unsqueeze(0)
    torch.testing.assert_close(relaxed, expected.detach())
    assert not torch.allclose(relaxed, cached)
    with torch.no_grad():
        assert linear.effective_weight() is cached  # and the merged weights serve again after


# ------------------------------------------------------------------------------------------ gradients
def test_eval_mode_with_grad_forms_eq4_once_with_exact_gradients(monkeypatch):
    never = _model().unmerge_pad_weights()
    merged = _model()
    calls = _count(monkeypatch)
    with torch.inference_mode():  # formed here (a normal tensor, usable where autograd records)
        merged(**BATCH)
    for _ in range(3):
        for model in (never, merged):
            model.zero_grad()
            model(**BATCH, labels=LABELS).loss.backward()
        for (name, p), q in zip(never.named_parameters(), merged.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, atol=0, rtol=0, msg=name)
    assert calls[0] == 3 * 4 + 4  # the never-merged model in each of 3 forwards, the merged one once
    assert merged.moe_layers[0].fc_in.expert_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("granularity", ["element", "neuron"])
def test_training_after_merge_gives_the_gradients_of_a_never_merged_model(granularity):
    never = _model(granularity).unmerge_pad_weights()
    merged = _model(granularity)
    merged.merge_pad_weights()
    _logits(merged)
    # Eval mode with grad enabled (merged): eq. 4 is formed with its gradient.
    for mode in ("eval", "train"):
        for model in (never, merged):
            model.zero_grad()
            model.train(mode == "train")
            torch.manual_seed(1)  # the same router jitter, if any
            model(**BATCH, labels=LABELS).loss.backward()
        for (name, p), q in zip(never.named_parameters(), merged.parameters()):
            if p.grad is None:
                assert q.grad is None, name
            else:
                torch.testing.assert_close(q.grad, p.grad, atol=0, rtol=0, msg=f"{mode}: {name}")
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in merged.parameters())


# ------------------------------------------------------------------------------------------ threads, pipeline, saving
def test_two_threads_share_a_merged_model(monkeypatch):
    model = _model()
    expected = _unmerged_logits(model)
    calls = _count(monkeypatch)
    results, errors = [], []

    def run():
        try:
            for _ in range(5):
                results.append(_logits(model))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 10
    for logits in results:
        torch.testing.assert_close(logits, expected, atol=0, rtol=0)
    assert 4 <= calls[0] <= 8  # formed once per PAD weight (at most once per thread if both start unmerged)


def test_text_classification_pipeline_forms_eq4_once(tmp_path, monkeypatch):
    dense = tmp_path / "dense"
    save_tiny_bert(dense, "the a cat dog man is on park sat ran".split())
    config = pmt.PADMoEConfig.from_base(str(dense), num_experts=4, num_labels=2)
    model = pmt.PADMoEForSequenceClassification.from_pretrained(dense, config=config)
    tokenizer = AutoTokenizer.from_pretrained(dense)
    texts = ["the cat sat on the park", "a dog ran", "the man is a cat", "dog"]
    batch = {**tokenizer(texts, padding=True, return_tensors="pt"), "labels": torch.tensor([0, 1, 0, 1])}
    pmt.partition_model(model, [batch], method="random", dynamic_ratio=0.5, progress=False)
    model.save_pretrained(tmp_path / "pad", model_card=False)
    tokenizer.save_pretrained(tmp_path / "pad")
    loaded = pmt.PADMoEForSequenceClassification.from_pretrained(tmp_path / "pad")
    assert loaded.config.is_partitioned and loaded.pad_weights_merged  # from_pretrained leaves it in eval mode
    calls = _count(monkeypatch)
    classify = pipeline("text-classification", model=loaded, tokenizer=tokenizer)
    results = [classify(text) for text in texts] + classify(texts, batch_size=2)
    assert len(results) == 8 and calls[0] == 4  # 2 layers x (fc_in, fc_out), once over 6 pipeline calls
    reference = copy.deepcopy(loaded).unmerge_pad_weights()
    with torch.no_grad():
        for text, result in zip(texts, results[4:]):
            probs = reference(**tokenizer(text, return_tensors="pt")).logits[0].softmax(-1)
            assert result["score"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_trainer_predict_forms_eq4_once(tmp_path, monkeypatch):
    model = _model()
    model.train()  # as after training: Trainer.predict puts it in eval mode
    rows = [{"input_ids": IDS[i], "attention_mask": MASK[i], "labels": LABELS[i]} for i in range(3)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=1, report_to="none", use_cpu=True)
    trainer = Trainer(model=model, args=args)
    calls = _count(monkeypatch)
    first = trainer.predict(rows)  # 3 batches
    second = trainer.predict(rows)
    assert calls[0] == 4  # 2 layers x (fc_in, fc_out), once over 6 forwards
    np.testing.assert_array_equal(first.predictions, second.predictions)
    for i in range(3):
        single = {k: v[i : i + 1] for k, v in BATCH.items()}  # padded rows as they are (batch 1)
        np.testing.assert_allclose(first.predictions[i], _unmerged_logits(model, single)[0].numpy(), atol=1e-6)


@pytest.mark.parametrize("granularity", ["element", "neuron"])
def test_save_pretrained_bytes_do_not_depend_on_merging(granularity, tmp_path):
    model = _model(granularity).unmerge_pad_weights()
    masks = {ref.short_name: ref.module.mask.clone() for ref in pmt.core.named_pad_linears(model)}
    pmt.apply_partition(model, masks, {"method": "manual"})  # the masks set by hand, recorded
    model.save_pretrained(tmp_path / "unmerged", model_card=False)
    model.merge_pad_weights()
    _logits(model)
    assert model.pad_weights_merged
    assert not any("merge" in name or "frozen" in name for name in model.state_dict())
    model.save_pretrained(tmp_path / "merged", model_card=False)
    names = sorted(p.name for p in (tmp_path / "unmerged").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "merged").iterdir()) and "model.safetensors" in names
    for name in names:
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "unmerged" / name).read_bytes(), name
    reloaded = pmt.PADMoEForSequenceClassification.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(reloaded), _logits(model), atol=0, rtol=0)
