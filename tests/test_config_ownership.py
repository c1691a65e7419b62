"""Who owns a PAD config and what it may hold (issue 26, part 5).

- Upcycling copies the config: one `PADMoEConfig` / `PADDyConvConfig` starts several models (the paper's Fig. 4
  compares IMP / MP / Random from one start), and partitioning one model leaves the caller's config as it was.
- Numbers: numeric fields hold plain Python numbers (numpy scalars, 0-d arrays and tensors are converted), so
  `save_pretrained` writes JSON; assignments are validated.
- Task head: the PAD config owns num_labels / id2label / label2id / problem_type and writes them through to
  `base_config`; a base config edited directly is refused, naming both values.
- IMP on batches without a single labelled token says so (instead of blaming an overflow).
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    ResNetConfig,
)

import pad_moe_transformers as pmt
from pad_moe_transformers.partition import partition_model

BERT = dict(
    vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
    max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)
RESNET = dict(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")


def text_batches(n: int = 2, seed: int = 1, token_labels: bool = False) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        shape = (4, 8) if token_labels else (4,)
        out.append({
            "input_ids": torch.randint(1, 50, (4, 8), generator=g),
            "attention_mask": torch.ones(4, 8, dtype=torch.long),
            "labels": torch.randint(0, 2, shape, generator=g),
        })
    return out


def image_batches(n: int = 2, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"pixel_values": torch.randn(4, 3, 32, 32, generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
        for _ in range(n)
    ]


# One case per PAD config: how to build its dense model, its PAD config and its batches.
KINDS = {
    "text": (
        lambda: AutoModelForSequenceClassification.from_config(BertConfig(**BERT, num_labels=2)),
        lambda path: pmt.PADMoEConfig.from_base(path, num_experts=4),
        text_batches,
        AutoModelForSequenceClassification,
    ),
    "vision": (
        lambda: AutoModelForImageClassification.from_config(ResNetConfig(**RESNET, num_labels=3)),
        lambda path: pmt.PADDyConvConfig.from_base(path, num_kernels=2),
        image_batches,
        AutoModelForImageClassification,
    ),
}


def pad_config(kind: str, **base_kwargs):
    if kind == "text":
        return pmt.PADMoEConfig(base_config=BertConfig(**BERT, **base_kwargs), num_experts=4)
    return pmt.PADDyConvConfig(base_config=ResNetConfig(**RESNET, **base_kwargs), num_kernels=2)


def model_of(config):
    text = isinstance(config, pmt.PADMoEConfig)
    return (AutoModelForSequenceClassification if text else AutoModelForImageClassification).from_config(config)


def pad_masks(model) -> list[torch.Tensor]:
    return [ref.module.mask for ref in pmt.core.named_pad_weights(model)]


def head_out_features(model) -> int:
    classifier = model.model.classifier
    return (classifier[-1] if isinstance(classifier, torch.nn.Sequential) else classifier).out_features


# ----------------------------------------------------------------------------- one config, several models
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_one_config_starts_imp_mp_and_random(kind, tmp_path):
    """Fig. 4's workflow: three upcycles from one config object, each partitioned with its own method and saved.
    The caller's config is the one it had (no `partition`, the same base config object, the same fields)."""
    build_dense, build_config, batches, auto = KINDS[kind]
    torch.manual_seed(0)
    build_dense().save_pretrained(tmp_path / "dense")
    config = build_config(str(tmp_path / "dense"))
    base, before = config.base_config, config.to_dict()
    models = {}
    for method in ("imp", "mp", "random"):
        model = auto.from_pretrained(tmp_path / "dense", config=config)
        assert model.config is not config and model.config.base_config is not base
        assert not model.config.is_partitioned and all(bool(m.all()) for m in pad_masks(model))
        partition_model(model, batches(), method=method, dynamic_ratio=0.5, rounds=1, progress=False)
        assert model.config.partition["method"] == method
        assert config.partition is None and config.base_config is base and config.to_dict() == before
        model.save_pretrained(tmp_path / method)
        models[method] = model
    for method, model in models.items():  # each saved model is its own partition, not a later one's
        again = auto.from_pretrained(tmp_path / method)
        assert again.config.partition["method"] == method
        assert all(torch.equal(saved, loaded) for saved, loaded in zip(pad_masks(model), pad_masks(again)))
    masks = [torch.cat([m.flatten() for m in pad_masks(model)]) for model in models.values()]
    assert not torch.equal(masks[0], masks[2])  # IMP and Random chose differently: separate models


# ----------------------------------------------------------------------------- numbers
NUMBER_CASES = {
    "text": {"dynamic_ratio": 0.25, "num_experts": 4, "num_experts_per_tok": 1, "router_aux_loss_coef": 0.5,
             "router_z_loss_coef": 0.001, "router_jitter_noise": 0.1},
    "vision": {"num_kernels": 2, "dynamic_ratio": 0.3, "attention_reduction": 2, "temperature_init": 30.0,
               "temperature_final": 1.0, "temperature_epochs": 5},
}
WRAPPERS = {
    "np.float32/int64": lambda v: np.float32(v) if isinstance(v, float) else np.int64(v),
    "np.float64/int32": lambda v: np.float64(v) if isinstance(v, float) else np.int32(v),
    "0-d ndarray": np.array,
    "0-d tensor": torch.tensor,
}


@pytest.mark.parametrize("wrap", sorted(WRAPPERS))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_numpy_and_tensor_numbers_become_python_numbers(kind, wrap, tmp_path):
    values = NUMBER_CASES[kind]
    wrapped = {name: WRAPPERS[wrap](value) for name, value in values.items()}
    config = pad_config(kind)
    config = type(config)(base_config=config.base_config, **wrapped)
    for name, value in values.items():  # the value meant: float32's 0.3 is stored as 0.3, not 0.30000001192...
        assert type(getattr(config, name)) is type(value) and getattr(config, name) == value, name
    config.save_pretrained(tmp_path)  # JSON: failed with numpy scalars
    again = AutoConfig.from_pretrained(tmp_path)
    assert {name: getattr(again, name) for name in values} == values
    # On assignment too, and the model builds and saves from it.
    config = pad_config(kind)
    for name, value in wrapped.items():
        setattr(config, name, value)
    assert {name: (type(getattr(config, name)), getattr(config, name)) for name in values} == {
        name: (type(value), value) for name, value in values.items()
    }
    model_of(config).save_pretrained(tmp_path / "model")


def test_moe_layers_items_become_python_ints(tmp_path):
    config = pmt.PADMoEConfig(base_config=BertConfig(**BERT), moe_layers=list(np.arange(2)))
    assert config.moe_layers == [0, 1] and all(type(i) is int for i in config.moe_layers)
    config.moe_layers = [torch.tensor(1)]
    assert config.moe_layers == [1] and type(config.moe_layers[0]) is int
    config.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).moe_layers == [1]


@pytest.mark.parametrize(
    "kind,field,bad,match",
    [
        ("text", "dynamic_ratio", np.array([0.5, 0.5]), r"dynamic_ratio must be a finite real number, got array"),
        ("text", "dynamic_ratio", np.float32(1.5), r"dynamic_ratio must be in \(0, 1\], got 1\.5"),
        ("text", "num_experts", np.float64(4.0), r"num_experts must be an integer >= 1, got 4\.0"),
        ("text", "num_experts_per_tok", 9, r"num_experts_per_tok must be an integer in \[1, num_experts=4\]"),
        ("text", "router_jitter_noise", torch.tensor(1.0), r"router_jitter_noise must be in \[0, 1\), got 1\.0"),
        ("text", "scale_factor_mode", "both", "scale_factor_mode must be one of"),
        ("vision", "num_kernels", np.int64(0), r"num_kernels must be an integer >= 1, got 0"),
        ("vision", "temperature_final", torch.tensor([1.0]), r"temperature_final must be a finite real number"),
        ("vision", "dynamic_ratio", np.float32("nan"), r"dynamic_ratio must be a finite real number, got nan"),
        ("vision", "partition_granularity", "neuron", "partition_granularity must be 'element'"),
    ],
)
def test_invalid_assignment_is_refused_and_the_old_value_kept(kind, field, bad, match):
    config = pad_config(kind)
    old = getattr(config, field)
    with pytest.raises(ValueError, match=match):
        setattr(config, field, bad)
    assert getattr(config, field) == old
    with pytest.raises(ValueError, match=match.split(" must")[0]):
        type(config)(base_config=config.base_config, **{field: bad})


# ----------------------------------------------------------------------------- task-head fields
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_head_field_set_on_base_config_is_refused_naming_both_values(kind, tmp_path):
    config = pad_config(kind)
    config.base_config.num_labels = 3  # silently overridden by the PAD config's 2 before
    message = r"base_config has num_labels=3 .* has num_labels=2 .*`config\.num_labels = 3`"
    with pytest.raises(ValueError, match=message):
        model_of(config)
    with pytest.raises(ValueError, match=message):
        config.save_pretrained(tmp_path)
    config.base_config.num_labels = 2
    config.problem_type = "single_label_classification"
    config.base_config.problem_type = "multi_label_classification"
    with pytest.raises(ValueError, match=r"base_config has problem_type='multi_label_classification' .* has "
                       r"problem_type='single_label_classification'"):
        model_of(config)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_head_field_set_on_pad_config_reaches_the_head(kind, tmp_path):
    config = pad_config(kind)
    config.num_labels = 3
    assert config.base_config.num_labels == 3 and config.base_config.label2id == config.label2id
    config.id2label[2] = "third"  # one map, shared: an in-place edit reaches the base config too
    assert config.base_config.id2label[2] == "third"
    config.problem_type = "multi_label_classification"
    model = model_of(config)
    assert head_out_features(model) == 3 and model.config.base_config.problem_type == "multi_label_classification"
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path)
    assert again.config.id2label == again.config.base_config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "third"}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_head_fields_at_construction(kind, caplog):
    # Not given to the PAD config: the base config's are taken over.
    base = pad_config(kind, num_labels=4).base_config
    config = type(pad_config(kind))(base_config=copy.deepcopy(base))
    assert config.num_labels == config.base_config.num_labels == 4
    # Given: the PAD config's win, and the different value the base config had is named in a warning.
    with caplog.at_level(logging.WARNING, logger="pad_moe_transformers"):
        config = type(config)(base_config=copy.deepcopy(base), num_labels=5)
    assert config.num_labels == config.base_config.num_labels == 5
    assert "was given num_labels=5" in caplog.text and "base_config has num_labels=4" in caplog.text
    # Groups are independent: a problem_type given alone keeps the base config's labels.
    config = type(config)(base_config=copy.deepcopy(base), problem_type="multi_label_classification")
    assert config.num_labels == 4 and config.base_config.problem_type == "multi_label_classification"


def test_problem_type_inferred_by_the_head_is_taken_over(tmp_path):
    """problem_type=None means "infer": the family head sets it on base_config at its first forward with labels."""
    config = pad_config("text")
    model = model_of(config)
    model(**text_batches(1)[0])
    assert model.config.base_config.problem_type == "single_label_classification"
    model.save_pretrained(tmp_path)  # no contradiction: taken over
    assert model.config.problem_type == "single_label_classification"


# ----------------------------------------------------------------------------- IMP without labelled tokens
def _token_model():
    torch.manual_seed(0)
    return AutoModelForTokenClassification.from_config(pmt.PADMoEConfig(base_config=BertConfig(**BERT), num_experts=4))


@pytest.mark.parametrize("method", ["imp", "mp"])
def test_partition_without_a_labelled_token_says_so(method):
    batches = text_batches(2, token_labels=True)
    for batch in batches:
        batch["labels"].fill_(-100)
    with pytest.raises(ValueError, match=r"No partition batch has a single labelled token: every label is -100"):
        partition_model(_token_model(), batches, method=method, progress=False)


def test_partition_names_the_batches_without_a_labelled_token():
    batches = text_batches(3, token_labels=True)
    batches[1]["labels"].fill_(-100)
    with pytest.raises(ValueError, match=r"Partition batches \[1\] have no labelled token .* Drop them"):
        partition_model(_token_model(), batches, progress=False)
    batches[1]["labels"][0, 0] = 1  # one labelled token is enough
    partition_model(_token_model(), batches, rounds=1, progress=False)
