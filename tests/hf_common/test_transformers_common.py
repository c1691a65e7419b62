"""Transformers' own `ModelTesterMixin` on plain BERT and on the PAD-MoE classes, same tiny config.

Run: `python -m pytest -q -p no:randomly -m hf_common tests/hf_common`. The first run downloads the
transformers sdist of the installed version from PyPI (see `_hf_sdist.py`); without PyPI the module
is skipped with the reason, or fails when `PAD_MOE_HF_COMMON_REQUIRED=1` (as in `.ci/run`).

`BertCommonTest` runs the mixin on five plain BERT classes, `PADMoECommonTest` on the five PAD
classes built with `PADMoEConfig.from_base(<the same BertConfig>, num_experts=4, num_experts_per_tok=2)`;
both get the same inputs (random padding anywhere in a row). The mixin finds a class's task (labels,
which tests apply) by its name in Transformers' task tables, so the PAD test class lists the PAD
classes there under `pad_moe`, as they would be if `pad_moe` were a built-in model type.

Contract, checked test by test by `test_pad_passes_what_bert_passes` (run last): PAD passes every
common test plain BERT passes, except `PAD_EXPECTED_FAILURES`, each a strict expected failure (it
must fail, raising the listed exception; a pass is an error):
- `ROUTING_EXCEPTIONS`: a reason tied to routing. Empty today: no common test fails because of
  routing, also when the experts are made to differ (tried by perturbing them after `post_init`).
- `UPSTREAM_TEST_DEFECTS`: a defect of the common test itself that PAD's state triggers.
"""


from __future__ import annotations

import os
import tempfile
import unittest
from unittest import mock

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)
from transformers.modeling_utils import load_state_dict
from transformers.models.auto import modeling_auto
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as hf_logging

import pad_moe_transformers as pmt

from ._hf_sdist import SdistUnavailable, load_modeling_common

pytestmark = pytest.mark.hf_common

try:
    common = load_modeling_common()
except SdistUnavailable as error:
    if os.environ.get("PAD_MOE_HF_COMMON_REQUIRED"):  # CI: PyPI is reachable there, a skip would hide the harness
        raise
    pytest.skip(f"Transformers' common model tests are unavailable: {error}", allow_module_level=True)

ROUTING_EXCEPTIONS: dict[str, str] = {}
"""Common test name -> why PAD cannot pass it, tied to routing; each is a strict expected failure
(`AssertionError`) for PAD. Empty: no common test needs one (see the module docstring)."""

UPSTREAM_TEST_DEFECTS: dict[str, tuple[type[Exception], str]] = {
    "test_torch_save_load": (
        TypeError,
        "transformers 5.24's test calls `state_dict()[key]` on a dict for every torch.BoolTensor entry, and PAD "
        "state dicts hold the bool `mask` buffers (BERT's hold none); `test_pad_state_dict_torch_save_load` "
        "checks the same round trip",
    ),
}
"""Common test name -> (exception, reason) for a defect of the common test itself that PAD's state
triggers; a strict expected failure raising exactly that exception, so a fixed upstream test shows up."""

# The tasks of the PAD classes, as Transformers' own task tables would list them if `pad_moe` were a
# built-in model type: the mixin picks labels and skips by `model_class.__name__` in these tables.
PAD_TASK_TABLES = {
    "MODEL_MAPPING_NAMES": pmt.PADMoEModel,
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES": pmt.PADMoEForMaskedLM,
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": pmt.PADMoEForSequenceClassification,
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES": pmt.PADMoEForTokenClassification,
    "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES": pmt.PADMoEForQuestionAnswering,
}


class TinyBertTester:
    """Tiny BERT config and inputs, with the sizes of Transformers' own `BertModelTester`
    (whose file, `tests/models/bert/`, is not in the sdist). Random padding anywhere in the rows."""

    batch_size = 13
    seq_length = 7
    is_training = True
    vocab_size = 99
    hidden_size = 32
    num_hidden_layers = 2
    num_attention_heads = 4
    # 37 in BertModelTester; 40 keeps every expert dimension a multiple of 8, so that Transformers'
    # eager/batched_mm/grouped_mm comparison runs grouped_mm itself in fp16, bf16 and fp32 (an unaligned size
    # makes the PAD layers take the eager experts, which that test would see as grouped_mm not called).
    intermediate_size = 40
    type_vocab_size = 16

    def __init__(self, parent: unittest.TestCase | None) -> None:
        self.parent = parent

    def get_config(self) -> BertConfig:
        return BertConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_act="gelu",
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1,
            max_position_embeddings=512,
            type_vocab_size=self.type_vocab_size,
            initializer_range=0.02,
        )

    def prepare_config_and_inputs_for_common(self) -> tuple:
        """`(config, {"input_ids", "token_type_ids", "attention_mask"})`, each `(batch_size, seq_length)`."""
        shape = [self.batch_size, self.seq_length]
        inputs = {
            "input_ids": common.ids_tensor(shape, self.vocab_size),
            "token_type_ids": common.ids_tensor(shape, self.type_vocab_size),
            "attention_mask": common.random_attention_mask(shape),
        }
        return self.get_config(), inputs


class TinyPADMoETester(TinyBertTester):
    """The same tiny BERT, wrapped as a PAD-MoE config (4 experts, top-2)."""

    num_experts = 4
    num_experts_per_tok = 2

    def get_config(self) -> pmt.PADMoEConfig:
        return pmt.PADMoEConfig.from_base(
            super().get_config(), num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok
        )


class BertCommonTest(common.ModelTesterMixin, unittest.TestCase):
    all_model_classes = (
        BertModel,
        BertForMaskedLM,
        BertForSequenceClassification,
        BertForTokenClassification,
        BertForQuestionAnswering,
    )

    def setUp(self) -> None:
        self.model_tester = TinyBertTester(self)


class PADMoECommonTest(common.ModelTesterMixin, unittest.TestCase):
    all_model_classes = tuple(PAD_TASK_TABLES.values())

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        for table, model_class in PAD_TASK_TABLES.items():
            entry = {pmt.PADMoEConfig.model_type: model_class.__name__}
            patcher = mock.patch.dict(getattr(modeling_auto, table), entry)
            patcher.start()
            cls.addClassCleanup(patcher.stop)

    def setUp(self) -> None:
        self.model_tester = TinyPADMoETester(self)

    def test_reverse_loading_mapping(self) -> None:
        """The mixin's test on partitioned models: PAD's compact conversion (`mask_packed`, `static_values`,
        `expert_values`) is the format of a partitioned model; a never-partitioned one is stored as a plain MoE,
        in which no compact pattern can match. Each model is partitioned at random right before it is first saved."""
        from pad_moe_transformers.core import named_pad_linears

        save_pretrained = pmt.PADMoEPreTrainedModel.save_pretrained

        def save_partitioned(model, *args, **kwargs):
            if not model.config.is_partitioned:  # a reloaded (already partitioned) model is saved as it is
                masks = {ref.short_name: torch.rand(ref.module.mask.shape) < 0.5 for ref in named_pad_linears(model)}
                pmt.apply_partition(model, masks, {"method": "random"})
            return save_pretrained(model, *args, **kwargs)

        with mock.patch.object(pmt.PADMoEPreTrainedModel, "save_pretrained", save_partitioned):
            super().test_reverse_loading_mapping()


    def test_can_load_ignoring_mismatched_shapes(self) -> None:
        """The mixin's check, with the classifier looked up where a PAD model keeps it: the mixin searches the
        model's direct children for the `nn.Linear` sized by `num_labels`, and a PAD model's only child is the
        wrapped family model (`model.model.classifier`). Everything else as the mixin does."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        config = common._config_zero_init(config)
        config.num_labels = 3
        model_class = pmt.PADMoEForSequenceClassification
        with tempfile.TemporaryDirectory() as tmp_dir:
            model = model_class(config)
            model.save_pretrained(tmp_dir)
            with self.assertRaises(RuntimeError):
                model_class.from_pretrained(tmp_dir, num_labels=42)
            logger = hf_logging.get_logger("transformers.modeling_utils")
            with CaptureLogger(logger) as captured:
                new_model = model_class.from_pretrained(tmp_dir, num_labels=42, ignore_mismatched_sizes=True)
            self.assertIn("Reinit due to size mismatch", captured.out)
        heads = [f"model.{n}" for n, m in new_model.model.named_children() if isinstance(m, nn.Linear)]
        mismatched = [name for name in heads if new_model.get_submodule(name).out_features == 42]
        self.assertEqual(mismatched, ["model.classifier"])
        old, new = dict(model.named_parameters()), dict(new_model.named_parameters())
        self.assertFalse(set(old) - set(new))
        for key, value in new.items():
            if any(key.startswith(name) for name in mismatched):
                self.assertEqual(value.shape[0], 42)
                self.assertLessEqual(old[key].data.mean().item(), 1e-1, key)
            else:
                torch.testing.assert_close(old[key], value, msg=f"{key} does not match")


def _expect_failures(test_class: type, expected: dict[str, tuple[type[Exception], str]]) -> None:
    """Mark each listed test of `test_class` as a strict expected failure raising the given exception."""
    names = {name for name in dir(test_class) if name.startswith("test_")}
    unknown = sorted(set(expected) - names)
    if unknown:
        raise ValueError(f"expected PAD failures name tests the mixin does not have: {unknown}")
    for name, (exception, reason) in expected.items():
        mark = pytest.mark.xfail(strict=True, raises=exception, reason=reason)
        setattr(test_class, name, mark(getattr(test_class, name)))


PAD_EXPECTED_FAILURES = {name: (AssertionError, f"routing: {why}") for name, why in ROUTING_EXCEPTIONS.items()}
PAD_EXPECTED_FAILURES.update(
    {name: (error, f"defect of the common test: {why}") for name, (error, why) in UPSTREAM_TEST_DEFECTS.items()}
)
_expect_failures(PADMoECommonTest, PAD_EXPECTED_FAILURES)


def test_pad_state_dict_torch_save_load(tmp_path) -> None:
    """What `test_torch_save_load` checks, without its bool-tensor defect: a PAD state dict (bool masks
    included) survives `torch.save` (both serialisations) and Transformers' `load_state_dict` unchanged."""
    config, _ = TinyPADMoETester(None).prepare_config_and_inputs_for_common()
    for model_class in PADMoECommonTest.all_model_classes:
        state_dict = model_class(config).state_dict()
        assert any(t.dtype == torch.bool for t in state_dict.values()), "no bool buffer: this check lost its point"
        for zipfile in (True, False):
            path = tmp_path / f"{model_class.__name__}-{zipfile}.bin"
            torch.save(state_dict, path, _use_new_zipfile_serialization=zipfile)
            loaded = load_state_dict(str(path))
            assert loaded.keys() == state_dict.keys(), model_class.__name__
            for key, tensor in state_dict.items():
                same = loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor)
                assert same, f"{model_class.__name__}: {key}"


# Outcomes compatible with the plain class's: BERT passed -> PAD passed; BERT partly skipped -> PAD passed or partly.
_REQUIRED = {"passed": {"passed"}, "partial": {"passed", "partial"}}


def test_pad_passes_what_bert_passes(common_test_outcomes: dict) -> None:
    """Every common test plain BERT passes, PAD passes too, except `PAD_EXPECTED_FAILURES` (strict xfails)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("the comparison needs both test classes in one process; run without -n")
    by_class: dict[str, dict[str, tuple[str, str]]] = {}
    for (cls, name), outcome in common_test_outcomes.items():
        by_class.setdefault(cls, {})[name] = outcome.summary()
    bert, pad = by_class.get(BertCommonTest.__name__, {}), by_class.get(PADMoECommonTest.__name__, {})
    compared = sorted(set(bert) & set(pad))
    if not compared:
        pytest.skip("no common test ran for both BERT and PAD in this session (selected with -k?)")
    problems = []
    for name in compared:
        (bert_outcome, bert_detail), (pad_outcome, pad_detail) = bert[name], pad[name]
        if name in PAD_EXPECTED_FAILURES:
            if bert_outcome != "passed":
                problems.append(f"{name}: listed as an expected PAD failure but BERT {bert_outcome}: {bert_detail}")
            elif pad_outcome != "xfailed":
                problems.append(f"{name}: listed as an expected PAD failure but PAD {pad_outcome}: {pad_detail}")
        elif pad_outcome not in _REQUIRED.get(bert_outcome, {pad_outcome}):
            problems.append(f"{name}: BERT {bert_outcome}, PAD {pad_outcome}: {pad_detail}")
    assert not problems, f"{len(problems)} of {len(compared)} common tests:\n" + "\n".join(problems)
