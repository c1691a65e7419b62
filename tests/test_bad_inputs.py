"""Bad input catalogue (issue #7): each bad input gets a specific error that says what to do, or the
correct result where there is one. docs/reliability.md lists these together with the bad inputs that
other test modules already cover (config ranges in test_config.py, bad checkpoints in
test_checkpoint.py, partition argument errors in test_partition.py)."""

from __future__ import annotations

import copy
import errno
import os

import pytest
import torch
from test_callback import _args, _PairDataset
from test_checkpoint import assert_same_module, make_model
from test_partition import _batches, _tiny_model
from torch.utils.data import IterableDataset
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    RobertaConfig,
    Trainer,
)

import pad_moe_transformers as pmt
from pad_moe_transformers.architectures import PAD_FFN_LAYOUTS, FFNLayout
from pad_moe_transformers.checkpoint import PADCheckpointError
from pad_moe_transformers.partition import apply_partition, partition_model
from pad_moe_transformers.partition.units import linears_by_name

BASE = BertConfig(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    vocab_size=50,
    max_position_embeddings=32,
)



def _eval_model(**pad_kwargs):
    return _tiny_model(**pad_kwargs).eval()


def _ids(batch=2, seq=6, low=1, high=50):
    return torch.randint(low, high, (batch, seq))


# ----------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dynamic_ratio": float("nan")}, r"dynamic_ratio must be a finite real number, got nan"),
        ({"dynamic_ratio": "0.5"}, r"dynamic_ratio must be a finite real number, got '0\.5'"),
        ({"dynamic_ratio": None}, r"dynamic_ratio must be a finite real number, got None"),
        ({"dynamic_ratio": True}, r"dynamic_ratio must be a finite real number, got True"),
        ({"dynamic_ratio": -0.5}, r"dynamic_ratio must be in \(0, 1\], got -0\.5"),
        ({"router_z_loss_coef": float("nan")}, r"router_z_loss_coef must be a finite real number"),
        ({"router_aux_loss_coef": float("inf")}, r"router_aux_loss_coef must be a finite real number"),
        ({"router_aux_loss_coef": "x"}, r"router_aux_loss_coef must be a finite real number, got 'x'"),
        ({"num_experts": 8.0}, r"num_experts must be an integer >= 1, got 8\.0"),
        ({"num_experts_per_tok": True}, r"num_experts_per_tok must be an integer"),
        ({"moe_layers": 0}, r"moe_layers must be None \(all layers\) or a list of layer indices, got 0"),
        ({"partition": ["imp"]}, r"partition must be None or a dict"),
    ],
)
def test_invalid_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pmt.PADMoEConfig(base_config=BASE, **kwargs)


def test_unregistered_base_model_type_is_named():
    with pytest.raises(ValueError, match="nonexistent_family"):
        pmt.PADMoEConfig(base_config={"model_type": "nonexistent_family"})


# ----------------------------------------------------------------------------------- families and loading
def test_dense_checkpoint_of_a_family_without_ffn_mapping(tmp_path):
    GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'gpt2' has no PAD-MoE FFN mapping; supported model types: \['albert'"):
        pmt.PADMoEConfig.from_base(str(tmp_path))


def test_ffn_layout_that_does_not_match_the_model(monkeypatch):
    monkeypatch.setitem(
        PAD_FFN_LAYOUTS, "bert", FFNLayout(layers="encoder.layers", ffn_in="a", activation="b", ffn_out="c")
    )
    with pytest.raises(
        ValueError, match=r"layout of 'bert' \(layers at 'encoder\.layers'\) does not match the BertModel"
    ):
        pmt.PADMoEModel(pmt.PADMoEConfig(base_config=BASE))
    monkeypatch.setitem(
        PAD_FFN_LAYOUTS, "bert", FFNLayout(layers="encoder.layer", ffn_in="mlp.fc1", activation="b", ffn_out="c")
    )
    with pytest.raises(ValueError, match=r"Layer 0 \(BertLayer\) has no FFN at the paths of the 'bert' layout"):
        pmt.PADMoEModel(pmt.PADMoEConfig(base_config=BASE))


def test_pad_checkpoint_loaded_with_a_config_of_another_base_type(tmp_path):
    _tiny_model(experts=4).save_pretrained(tmp_path)
    roberta = RobertaConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=50,
        max_position_embeddings=34,
    )
    config = pmt.PADMoEConfig(base_config=roberta, num_experts=4)
    with pytest.raises(
        PADCheckpointError,
        match=r"'base_config\.model_type' .* config has 'roberta', the tensors were written with 'bert'",
    ):
        AutoModelForSequenceClassification.from_pretrained(tmp_path, config=config)


def test_directory_with_config_but_no_weights(tmp_path):
    _tiny_model().config.save_pretrained(tmp_path)
    with pytest.raises(PADCheckpointError, match=r"No model\.safetensors or model\.safetensors\.index\.json found"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path)


# -------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize(
    "inputs, message",
    [
        (lambda: {"input_ids": torch.tensor([[1, 2, 60]])}, r"input_ids holds values in \[1, 60\] .* vocab_size=50"),
        (lambda: {"input_ids": torch.tensor([[1, -2, 3]])}, r"input_ids holds values in \[-2, 3\]"),
        (
            lambda: {"input_ids": _ids(), "token_type_ids": torch.full((2, 6), 2)},
            r"token_type_ids .* type_vocab_size=2",
        ),
        (lambda: {"input_ids": _ids(seq=40)}, r"Sequence length 40 exceeds the model's 32 positions"),
        (
            lambda: {"input_ids": _ids(), "labels": torch.tensor([0, 5])},
            r"labels hold class ids in \[0, 5\] .* 2 classes",
        ),
        (
            lambda: {"input_ids": _ids(), "attention_mask": torch.ones(2, 7, dtype=torch.long)},
            r"attention_mask has shape \(2, 7\) but the inputs have \(batch, seq\) = \(2, 6\)",
        ),
        (
            lambda: {"input_ids": _ids(), "attention_mask": torch.ones(1, 6, dtype=torch.long)},
            r"attention_mask has shape \(1, 6\)",
        ),
        (
            lambda: {"input_ids": _ids()[0]},
            r"input_ids must have 2 dimensions \(batch, seq\), got shape \(6,\); .*input_ids\.unsqueeze\(0\)",
        ),
        (
            lambda: {"input_ids": _ids().float()},
            r"input_ids must be integer token ids \(torch\.long\), got dtype torch\.float32",
        ),
        (lambda: {"input_ids": torch.ones(0, 6, dtype=torch.long)}, r"Empty batch: input_ids has shape \(0, 6\)"),
    ],
    ids=[
        "vocab",
        "negative-id",
        "token-type",
        "too-long",
        "label-class",
        "mask-shape",
        "mask-broadcast",
        "1d-ids",
        "float-ids",
        "empty-batch",
    ],
)
def test_bad_model_inputs_are_named(inputs, message):
    model = _eval_model()
    with pytest.raises(ValueError, match=message):
        model(**inputs())


def test_roberta_positions_count_the_padding_offset():
    config = RobertaConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=50,
        max_position_embeddings=34,
        pad_token_id=1,
    )
    model = pmt.PADMoEModel(pmt.PADMoEConfig(base_config=config, num_experts=2)).eval()
    assert model(input_ids=_ids(seq=32, low=2)).last_hidden_state.shape == (2, 32, 16)  # 34 - (1 + 1) positions
    with pytest.raises(ValueError, match=r"Sequence length 33 exceeds the model's 32 positions"):
        model(input_ids=_ids(seq=33, low=2))


def test_masked_lm_labels_are_checked_against_the_vocabulary():
    config = pmt.PADMoEConfig(base_config=BASE, num_experts=2)
    model = pmt.PADMoEForMaskedLM(config).eval()
    ids = _ids()
    labels = ids.clone()
    labels[:, :2] = -100
    assert torch.isfinite(model(input_ids=ids, labels=labels).loss)  # token ids >= num_labels are fine here
    labels[0, 3] = 50
    with pytest.raises(ValueError, match=r"labels hold class ids in \[\d+, 50\] but the model has 50 classes"):
        model(input_ids=ids, labels=labels)


def test_all_padding_batch_forward_is_finite_and_routes_nothing():
    model = _eval_model()
    model.reset_expert_usage()
    out = model(input_ids=_ids(), attention_mask=torch.zeros(2, 6, dtype=torch.long), labels=torch.tensor([0, 1]))
    assert torch.isfinite(out.loss) and float(out.aux_loss) == 0.0
    assert all(sum(counts) == 0 for counts in model.expert_usage().values())


# ------------------------------------------------------------------------------------------ partition
def _with(batch, **changes):
    return dict(batch, **changes)


def test_partition_batches_none_or_a_single_batch():
    with pytest.raises(ValueError, match="batches is None"):
        partition_model(_tiny_model(), None, progress=False)
    with pytest.raises(
        ValueError, match=r"batches is a single batch \(a dict with keys \['attention_mask', 'input_ids', 'labels'\]\)"
    ):
        partition_model(_tiny_model(), _batches()[0], progress=False)


def test_partition_all_padding_batch():
    batches = _batches()
    batches[1] = _with(batches[1], attention_mask=torch.zeros_like(batches[1]["attention_mask"]))
    model = _tiny_model()
    with pytest.raises(ValueError, match=r"Partition batch 1 is all padding"):
        partition_model(model, batches, progress=False)
    assert not model.config.is_partitioned and all(bool(lin.mask.all()) for lin in linears_by_name(model).values())


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_partition_nan_or_inf_in_the_inputs(value):
    batch = _batches(n=1)[0]
    embeds = torch.randn(*batch["input_ids"].shape, 16)
    embeds[2, 4, 7] = value
    bad = {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    with pytest.raises(
        ValueError, match=r"Non-finite task loss .* on partition batch 0.*NaN/inf in \['inputs_embeds'\]"
    ):
        partition_model(_tiny_model(), [bad], progress=False)


def test_partition_nan_regression_labels():
    base = copy.deepcopy(BASE)
    base.num_labels = 1  # a regression head
    model = pmt.PADMoEForSequenceClassification(pmt.PADMoEConfig(base_config=base, num_experts=4))
    batches = [_with(b, labels=torch.randn(b["labels"].shape[0])) for b in _batches(n=2)]
    assert torch.isfinite(model(**batches[0]).loss)
    batches[1]["labels"][0] = float("nan")
    with pytest.raises(ValueError, match=r"partition batch 1.*NaN/inf in \['labels'\]"):
        partition_model(model, batches, progress=False)


def test_partition_inf_in_a_weight_is_named():
    model = _tiny_model()
    with torch.no_grad():
        linears_by_name(model)["layer.1.fc_out"].expert_weight[2, 0, 0] = float("inf")
    with pytest.raises(
        ValueError,
        match=r"model weight 'model\.bert\.encoder\.layer\.1\.intermediate\.dense\.fc_out\.expert_weight' "
        r"holds NaN/inf",
    ):
        partition_model(model, _batches(), progress=False)


def test_partition_nan_scores_with_a_finite_loss(monkeypatch):
    """Scores can be NaN while the loss is finite (e.g. 0 * inf in a gradient); such a mask would be arbitrary
    (NaN sorts first), so it is refused. The NaN is injected into the eq. 7 scores."""
    from pad_moe_transformers.partition import algorithms

    real = algorithms.mask_gradients

    def nan_scores(*args, **kwargs):
        grads = real(*args, **kwargs)
        grads["layer.0.fc_out"][1, 3] = float("nan")
        return grads

    monkeypatch.setattr(algorithms, "mask_gradients", nan_scores)
    model = _tiny_model()
    with pytest.raises(
        ValueError, match=r"scores of layer\.0\.fc_out hold 1 NaN/inf value\(s\) among its 512 candidates"
    ):
        partition_model(model, _batches(), rounds=1, progress=False)
    assert not model.config.is_partitioned and all(bool(lin.mask.all()) for lin in linears_by_name(model).values())


def test_moe_p_nan_saliency(monkeypatch):
    from pad_moe_transformers.partition import postprocess

    real = postprocess.expert_weight_gradients

    def nan_grads(*args, **kwargs):
        grads = real(*args, **kwargs)
        grads["layer.1.fc_in"][0, 0, 0] = float("nan")
        return grads

    monkeypatch.setattr(postprocess, "expert_weight_gradients", nan_grads)
    with pytest.raises(ValueError, match=r"SNIP saliencies of layer\.1\.fc_in hold NaN/inf"):
        partition_model(_tiny_model(), _batches(), method="moe_p", progress=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"warmup_steps": -1}, r"warmup_steps must be >= 0 \(None: one step per batch\), got -1"),
        ({"warmup_lr": 0.0}, r"warmup_lr must be > 0 for score='warmup_grad', got 0\.0"),
    ],
)
def test_partition_bad_warmup_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        partition_model(_tiny_model(), _batches(), progress=False, **kwargs)


def test_apply_partition_refuses_non_binary_masks():
    model = _tiny_model()
    scores = {name: torch.rand(lin.mask.shape) for name, lin in linears_by_name(model).items()}
    with pytest.raises(
        ValueError, match=r"Mask of layer\.0\.fc_in has dtype torch\.float32 with values other than 0 and 1"
    ):
        apply_partition(model, scores)
    ratios = apply_partition(model, {n: (s > 0.5).float() for n, s in scores.items()})  # 0/1 floats are fine
    assert all(0.3 < r < 0.7 for r in ratios.values())


def test_tiny_ratio_makes_every_element_static_and_round_trips(tmp_path):
    """kappa > 0 that rounds to zero dynamic elements: a valid (fully static) model, saved and loaded exactly."""
    model = _tiny_model()
    result = partition_model(model, _batches(), dynamic_ratio=1e-6, rounds=1, progress=False)
    assert set(result.dynamic_ratios.values()) == {0.0}
    model.save_pretrained(tmp_path)
    assert_same_module(model, AutoModelForSequenceClassification.from_pretrained(tmp_path))


def test_ratio_one_keeps_everything_dynamic_and_the_function():
    model = _eval_model()
    batch = _batches(n=1)[0]
    with torch.no_grad():
        before = model(**batch).logits
    result = partition_model(model, [batch], dynamic_ratio=1.0, progress=False)
    assert set(result.dynamic_ratios.values()) == {1.0}
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)


# -------------------------------------------------------------------------------------------- Trainer
class _EmptyStream(IterableDataset):
    def __iter__(self):
        return iter(())


def test_callback_with_an_empty_streaming_dataset(tmp_path):
    trainer = Trainer(
        model=_tiny_model(),
        args=_args(tmp_path, max_steps=2),
        train_dataset=_EmptyStream(),
        callbacks=[pmt.IMPTrainerCallback(num_batches=2)],
    )
    with pytest.raises(ValueError, match=r"IMPTrainerCallback: the Trainer's train dataloader yielded no batches"):
        trainer.train()


def test_empty_map_dataset_is_refused_by_the_trainer(tmp_path):
    """Not ours: Trainer's sampler refuses an empty dataset before any callback runs."""
    trainer = Trainer(
        model=_tiny_model(),
        args=_args(tmp_path),
        train_dataset=_PairDataset(n=0),
        callbacks=[pmt.IMPTrainerCallback(num_batches=2)],
    )
    with pytest.raises(ValueError, match="num_samples=0"):
        trainer.train()


class _Unlabelled(_PairDataset):
    def __getitem__(self, i):
        item = super().__getitem__(i)
        item.pop("labels")
        return item


def test_callback_with_a_dataset_without_labels(tmp_path):
    trainer = Trainer(
        model=_tiny_model(),
        args=_args(tmp_path),
        train_dataset=_Unlabelled(),
        callbacks=[pmt.IMPTrainerCallback(num_batches=2)],
    )
    with pytest.raises(ValueError, match=r"Partition batch 0 has no labels .* keeps its label column"):
        trainer.train()


# -------------------------------------------------------------------------------------------- saving
def test_save_into_an_unwritable_directory(tmp_path, monkeypatch):
    """Saving where no file can be created raises a `PermissionError` naming the directory and leaves the
    checkpoint already there as it was. Root ignores file modes, so the refusal is simulated at the OS call
    that creates the staging directory; `test_save_into_a_read_only_directory` checks the real thing."""
    old = make_model()
    old.save_pretrained(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    from pad_moe_transformers.checkpoint import save as save_module

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    monkeypatch.setattr(save_module.tempfile, "mkdtemp", refuse)
    with pytest.raises(PermissionError, match=r"Cannot write a checkpoint into .*Permission denied.*must be writable"):
        make_model(kappa=0.2).save_pretrained(tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
    monkeypatch.undo()
    assert_same_module(old, AutoModelForSequenceClassification.from_pretrained(tmp_path))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="file modes do not stop root")
def test_save_into_a_read_only_directory(tmp_path):
    target = tmp_path / "ckpt"
    old = make_model()
    old.save_pretrained(target)
    os.chmod(target, 0o555)
    try:
        with pytest.raises(PermissionError, match="Cannot write a checkpoint into"):
            make_model(kappa=0.2).save_pretrained(target)
        with pytest.raises(PermissionError, match="Cannot create the checkpoint directory"):
            make_model().save_pretrained(target / "sub")
    finally:
        os.chmod(target, 0o755)
    assert_same_module(old, AutoModelForSequenceClassification.from_pretrained(target))
