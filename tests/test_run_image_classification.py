"""End-to-end smoke test of examples/run_image_classification.py on scikit-learn's digits, a tiny budget."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageClassification

import pad_moe_transformers  # noqa: F401
from pad_moe_transformers.core import named_pad_linears

pytest.importorskip("sklearn")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "run_image_classification.py"
TINY = [
    "--model_config", "resnet10", "--width_multiplier", "0.125", "--image_size", "16",
    "--max_train_samples", "48", "--max_eval_samples", "32", "--per_device_train_batch_size", "16",
    "--num_train_epochs", "1", "--use_cpu", "--do_train", "--do_eval", "--disable_tqdm", "true",
    "--partition_batches", "2", "--seed", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def example():
    if str(EXAMPLE.parent) not in sys.path:  # as `python examples/run_image_classification.py`: image_data.py beside
        sys.path.insert(0, str(EXAMPLE.parent))
    spec = importlib.util.spec_from_file_location("run_image_classification_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_digits_split_is_fixed_and_standardised(example):
    from image_data import load_digits_data

    data = load_digits_data(image_size=16)
    assert (len(data.train), len(data.eval)) == (1257, 540)
    assert data.train[0]["pixel_values"].shape == (3, 16, 16)
    assert abs(float(data.train.pixel_values.mean())) < 1e-4
    assert torch.equal(load_digits_data(image_size=16).eval.labels, data.eval.labels)


def test_pad_mode_partitions_trains_saves_and_reloads(example, tmp_path):
    metrics = example.main([*TINY, "--mode", "pad", "--kappa", "0.3", "--output_dir", str(tmp_path)])
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["train_wall_s"] > 0
    run = json.loads((tmp_path / "image_run.json").read_text())
    assert run["partition"]["method"] == "imp"
    assert run["partition"]["achieved_dynamic_ratio_total"] == pytest.approx(0.3, abs=0.01)
    assert metrics["parameters_static"] > 0 and metrics["parameters_dynamic"] > 0
    model = AutoModelForImageClassification.from_pretrained(tmp_path)
    ratios = [ref.module.dynamic_ratio() for ref in named_pad_linears(model)]
    assert ratios and all(r == pytest.approx(0.3, abs=0.02) for r in ratios)


@pytest.mark.parametrize("mode", ["static", "condconv"])
def test_baseline_modes_run(example, tmp_path, mode):
    if mode == "condconv" and importlib.util.find_spec("timm") is None:
        pytest.skip("needs timm (pip install --no-deps timm)")
    metrics = example.main([*TINY, "--mode", mode, "--output_dir", str(tmp_path)])
    assert "eval_accuracy" in metrics
    assert metrics["parameters_dynamic"] == 0 if mode == "static" else metrics["parameters_dynamic"] > 0


def test_bad_kappa_is_a_clear_error(example, tmp_path):
    with pytest.raises(ValueError, match="--kappa must be in"):
        example.main([*TINY, "--mode", "pad", "--kappa", "1.5", "--output_dir", str(tmp_path)])
