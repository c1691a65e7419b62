"""Transformers pipelines on PAD models, held to the plain family model (BERT / ResNet) by the same tests: at batch
sizes 1, 2 and 8, with inputs of different lengths (so batches are padded), every result equals the model run on
that input alone. Also the rule that makes this possible (as Mixtral): the router losses are returned only with
labels or `output_router_logits=True`, so a default output holds only batch-leading tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_batch
from PIL import Image
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    ResNetConfig,
    ResNetForImageClassification,
    Trainer,
    TrainingArguments,
    ViTImageProcessorPil,
    pipeline,
)

import pad_moe_transformers as pmt
from pad_moe_transformers.partition import perturb_experts

BATCH_SIZES = (1, 2, 8)
KINDS = ("plain", "pad")
# Nine inputs of different lengths: batch size 8 gives one padded full batch and one of a single input.
TEXTS = [
    "short.",
    "a somewhat longer sentence about the weather today.",
    "ok",
    "the quick brown fox jumps over the lazy dog while the cat watches from the warm windowsill.",
    "two words",
    "mixture of experts routes every token to two of its experts.",
    "padding must not change a result.",
    "yes",
    "pipelines split a batched output back into one result per input, item by item.",
]
MASKED = [
    "the [MASK] is blue.",
    "a [MASK].",
    "the quick brown fox jumps over the lazy [MASK] while the cat watches from the windowsill.",
    "[MASK] words",
    "every token goes to two of the [MASK] in the layer.",
    "padding must not change the [MASK].",
    "[MASK]",
    "pipelines split a batched output back into one [MASK] per input.",
    "no padding in this [MASK] one",
]
IMAGE_SIZES = [(20, 30), (48, 17), (32, 32), (9, 9), (64, 40), (33, 21), (16, 50), (25, 25), (40, 60)]
ATOL = 1e-5


def _text_config(tokenizer) -> BertConfig:
    return BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, num_labels=3,
        initializer_range=0.3,  # not 0.02: spread-out scores, so a tolerance of 1e-5 tells the inputs apart
    )  # fmt: skip


def _partition(model, batches: list[dict]) -> None:
    """Experts made to differ (a model built from a config starts upcycled from its random dense FFN: equal
    experts, so the routing would not matter), then a random partition at kappa = 0.5."""
    perturb_experts(model, relative_std=1.0)
    pmt.partition_model(model, batches, method="random", dynamic_ratio=0.5, progress=False)
    assert model.config.is_partitioned


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def text_models(tokenizer, tmp_path_factory) -> dict[tuple[str, str], torch.nn.Module]:
    """`{(kind, task): model}`: plain BERT models and PAD-MoE models (experts that differ, randomly partitioned)
    of the same tiny config."""
    config = _text_config(tokenizer)
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    torch.manual_seed(0)
    models = {
        ("plain", "text-classification"): BertForSequenceClassification(config),
        ("plain", "feature-extraction"): BertModel(config),
        ("plain", "fill-mask"): BertForMaskedLM(config),
    }
    pad_config = dict(base_config=config, num_experts=4, num_experts_per_tok=2)
    classifier = pmt.PADMoEForSequenceClassification(pmt.PADMoEConfig(**pad_config))
    _partition(classifier, [{**enc, "labels": torch.arange(len(TEXTS)) % 3}])
    masked_lm = pmt.PADMoEForMaskedLM(pmt.PADMoEConfig(**pad_config))
    _partition(masked_lm, [{**enc, "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}])
    # The base model has no loss to partition with: it loads the partitioned classifier's checkpoint instead.
    path = tmp_path_factory.mktemp("pad_classifier")
    classifier.save_pretrained(path, model_card=False)
    base = AutoModel.from_pretrained(path)
    assert isinstance(base, pmt.PADMoEModel) and base.config.is_partitioned
    models |= {
        ("pad", "text-classification"): classifier,
        ("pad", "feature-extraction"): base,
        ("pad", "fill-mask"): masked_lm,
    }
    return {key: model.eval() for key, model in models.items()}


@torch.no_grad()
def _alone(model, tokenizer, text: str):
    """The model on one unpadded input, the reference for every batched result."""
    return model(**tokenizer(text, return_tensors="pt"))


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_text_classification_pipeline_equals_model_alone(text_models, tokenizer, kind, batch_size):
    model = text_models[kind, "text-classification"]
    classify = pipeline("text-classification", model=model, tokenizer=tokenizer)
    results = classify(TEXTS, batch_size=batch_size, top_k=None)
    assert len(results) == len(TEXTS)
    for text, result in zip(TEXTS, results):
        probs = _alone(model, tokenizer, text).logits[0].softmax(-1)
        expected = {model.config.id2label[i]: float(p) for i, p in enumerate(probs)}
        assert {r["label"]: r["score"] for r in result} == pytest.approx(expected, abs=ATOL), text


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_feature_extraction_pipeline_equals_model_alone(text_models, tokenizer, kind, batch_size):
    model = text_models[kind, "feature-extraction"]
    results = pipeline("feature-extraction", model=model, tokenizer=tokenizer)(TEXTS, batch_size=batch_size)
    padded = 0
    for text, result in zip(TEXTS, results):
        expected = _alone(model, tokenizer, text).last_hidden_state[0]
        features = torch.tensor(result[0])
        # Batched, the pipeline returns the padded positions too; the real tokens come first.
        padded += features.shape[0] > expected.shape[0]
        torch.testing.assert_close(features[: expected.shape[0]], expected, atol=ATOL, rtol=1e-4, msg=text)
    assert (padded > 0) == (batch_size > 1)  # the batches really were padded


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_fill_mask_pipeline_equals_model_alone(text_models, tokenizer, kind, batch_size):
    model = text_models[kind, "fill-mask"]
    results = pipeline("fill-mask", model=model, tokenizer=tokenizer)(MASKED, batch_size=batch_size, top_k=5)
    for text, result in zip(MASKED, results):
        enc = tokenizer(text, return_tensors="pt")
        position = int((enc["input_ids"][0] == tokenizer.mask_token_id).nonzero())
        probs = _alone(model, tokenizer, text).logits[0, position].softmax(-1)
        # Compared by token rather than by rank: near-equal probabilities of a random model may swap places.
        scores = {r["token"]: r["score"] for r in result}
        assert scores == pytest.approx({token: float(probs[token]) for token in scores}, abs=ATOL), text
        assert min(scores.values()) >= float(probs.topk(5).values[-1]) - ATOL, text


@pytest.fixture(scope="module")
def image_models() -> dict[str, torch.nn.Module]:
    """A plain ResNet and a randomly partitioned PAD dynamic-convolution ResNet of the same tiny config."""
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    torch.manual_seed(0)
    plain = ResNetForImageClassification(config)
    pad = pmt.PADDyConvForImageClassification(pmt.PADDyConvConfig.from_base(config))
    generator = torch.Generator().manual_seed(0)
    _partition(pad, [{"pixel_values": torch.randn(8, 3, 32, 32, generator=generator), "labels": torch.arange(8) % 3}])
    return {"plain": plain.eval(), "pad": pad.eval()}


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_image_classification_pipeline_equals_model_alone(image_models, kind, batch_size):
    model = image_models[kind]
    processor = ViTImageProcessorPil(size={"height": 32, "width": 32})  # PIL backend: no torchvision needed
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in IMAGE_SIZES]
    classify = pipeline("image-classification", model=model, image_processor=processor)
    results = classify(images, batch_size=batch_size, top_k=None)
    assert len(results) == len(images)
    for size, image, result in zip(IMAGE_SIZES, images, results):
        with torch.no_grad():
            probs = model(**processor(image, return_tensors="pt")).logits[0].softmax(-1)
        expected = {model.config.id2label[i]: float(p) for i, p in enumerate(probs)}
        assert {r["label"]: r["score"] for r in result} == pytest.approx(expected, abs=ATOL), size


# ------------------------------------------------------------------------------------------ the router-loss rule
PAD_HEADS = [
    pmt.PADMoEModel,
    pmt.PADMoEForSequenceClassification,
    pmt.PADMoEForTokenClassification,
    pmt.PADMoEForQuestionAnswering,
    pmt.PADMoEForMaskedLM,
]


@pytest.mark.parametrize("cls", PAD_HEADS, ids=lambda cls: cls.__name__)
def test_default_outputs_hold_only_batch_leading_tensors(tiny_bert_config, cls):
    """What a pipeline (or Trainer.predict) splits per item: nothing 0-d or (batch * seq)-shaped by default."""
    model = cls(pmt.PADMoEConfig(base_config=tiny_bert_config, num_experts=4)).eval()
    batch = random_batch()
    model.reset_expert_usage()
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, output_attentions=True)
    assert out.get("aux_loss") is None and out.get("z_loss") is None and out.get("router_logits") is None
    tensors = [t for value in out.values() for t in (value if isinstance(value, tuple) else (value,))]
    assert tensors and all(t.dim() > 0 and t.shape[0] == 3 for t in tensors)
    # Expert usage is still counted on every forward: top-k slots of the real tokens in each layer.
    real_tokens = int(batch["attention_mask"].sum())
    assert all(sum(counts) == 2 * real_tokens for counts in model.expert_usage().values())


def test_pad_vision_default_outputs_hold_only_batch_leading_tensors():
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    model = pmt.PADDyConvForImageClassification(pmt.PADDyConvConfig.from_base(config)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32), output_hidden_states=True)
    tensors = [t for value in out.values() for t in (value if isinstance(value, tuple) else (value,))]
    assert tensors and all(t.dim() > 0 and t.shape[0] == 2 for t in tensors)


def test_labels_add_router_losses_to_task_loss(tiny_bert_config):
    model = pmt.PADMoEForSequenceClassification(
        pmt.PADMoEConfig(base_config=tiny_bert_config, num_experts=4, router_aux_loss_coef=0.5, router_z_loss_coef=0.25)
    ).eval()
    batch, labels = random_batch(), torch.tensor([0, 1, 1])
    out = model(**batch, labels=labels)
    assert out.aux_loss.dim() == 0 and out.z_loss.dim() == 0 and out.router_logits is None
    task = torch.nn.functional.cross_entropy(out.logits, labels)
    torch.testing.assert_close(out.loss, task + 0.5 * out.aux_loss + 0.25 * out.z_loss)
    assert out.aux_loss > 0 and out.z_loss > 0  # both terms really enter the loss


def test_question_answering_positions_give_router_losses(tiny_bert_config):
    """For QA the labels are the answer positions: with them the loss exists and includes the router terms."""
    model = pmt.PADMoEForQuestionAnswering(
        pmt.PADMoEConfig(base_config=tiny_bert_config, num_experts=4, router_aux_loss_coef=0.5, router_z_loss_coef=0.25)
    ).eval()
    batch = random_batch()
    start, end = torch.tensor([1, 2, 3]), torch.tensor([2, 4, 5])
    out = model(**batch, start_positions=start, end_positions=end)
    cross_entropy = torch.nn.functional.cross_entropy
    task = (cross_entropy(out.start_logits, start) + cross_entropy(out.end_logits, end)) / 2
    torch.testing.assert_close(out.loss, task + 0.5 * out.aux_loss + 0.25 * out.z_loss)
    assert model(**batch).get("aux_loss") is None


@pytest.mark.parametrize("where", ["argument", "config"])
def test_output_router_logits_returns_losses_and_logits(tiny_bert_config, where):
    config = pmt.PADMoEConfig(base_config=tiny_bert_config, num_experts=4, output_router_logits=where == "config")
    model = pmt.PADMoEForSequenceClassification(config).eval()
    batch, labels = random_batch(), torch.tensor([0, 1, 1])
    with torch.no_grad():
        labelled = model(**batch, labels=labels, output_router_logits=False)
        asked = model(**batch, **({"output_router_logits": True} if where == "argument" else {}))
    assert asked.loss is None and labelled.router_logits is None  # the argument overrides the config
    # The same losses as with labels (both computed on the real tokens of the same batch).
    torch.testing.assert_close(asked.aux_loss, labelled.aux_loss)
    torch.testing.assert_close(asked.z_loss, labelled.z_loss)
    assert len(asked.router_logits) == len(model.moe_layers)
    assert all(logits.shape == (batch["input_ids"].numel(), 4) for logits in asked.router_logits)


@pytest.mark.parametrize("output_router_logits", [False, True])
def test_trainer_predict_and_evaluate(tiny_bert_config, tmp_path, output_router_logits):
    """Trainer's inference loop, the other per-batch consumer: predictions are the logits alone (the router fields,
    present with labels or when asked for, are in `keys_to_ignore_at_inference`), the eval loss includes them."""
    config = pmt.PADMoEConfig(
        base_config=tiny_bert_config, num_experts=4, router_aux_loss_coef=0.5, output_router_logits=output_router_logits
    )
    model = pmt.PADMoEForSequenceClassification(config).eval()
    batch, labels = random_batch(batch=6), torch.tensor([0, 1, 1, 0, 1, 0])
    rows = [{key: value[i] for key, value in batch.items()} for i in range(6)]
    labelled = [{**row, "labels": labels[i]} for i, row in enumerate(rows)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to="none", use_cpu=True)
    trainer = Trainer(model=model, args=args)
    with torch.no_grad():
        logits = model(**batch).logits.numpy()
        # Trainer averages the per-batch losses weighted by batch size (batches of 4 and 2 here).
        parts = (slice(0, 4), slice(4, 6))
        losses = [model(**{k: v[part] for k, v in batch.items()}, labels=labels[part]).loss for part in parts]
    expected_loss = float((4 * losses[0] + 2 * losses[1]) / 6)
    unlabelled = trainer.predict(rows)
    assert isinstance(unlabelled.predictions, np.ndarray) and unlabelled.label_ids is None
    np.testing.assert_allclose(unlabelled.predictions, logits, atol=1e-5)
    predicted = trainer.predict(labelled)
    np.testing.assert_allclose(predicted.predictions, logits, atol=1e-5)
    assert predicted.metrics["test_loss"] == pytest.approx(expected_loss, abs=1e-5)
    assert trainer.evaluate(labelled)["eval_loss"] == pytest.approx(expected_loss, abs=1e-5)
