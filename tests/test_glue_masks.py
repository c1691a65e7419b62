"""benchmarks/glue/glue_masks.py: masks read back from real compact checkpoints, agreement against hand counts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_base_configs

import pad_moe_transformers as pmt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "glue"))
import glue_masks  # noqa: E402  (benchmarks/ is not a package)
import glue_quality  # noqa: E402


def save_pad(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny PAD model with random masks (1350-entry weights: the packed form has padding bits), saved
    compact; returns its masks as `read_masks` should name them."""
    bert = tiny_base_configs()["bert"]
    bert.hidden_size, bert.num_attention_heads, bert.intermediate_size = 30, 2, 45
    model = pmt.PADMoEForSequenceClassification(
        pmt.PADMoEConfig(base_config=bert, num_experts=2, partition={"method": "random"})
    )
    generator = torch.Generator().manual_seed(seed)
    expected = {}
    with torch.no_grad():
        pad_linears = {id(linear) for moe in model.moe_layers for linear in moe.pad_linears().values()}
        for name, module in model.named_modules():
            if id(module) in pad_linears:
                mask = torch.rand(module.mask.shape, generator=generator) < 0.5
                module.mask.copy_(mask)
                expected[name] = mask.reshape(-1).numpy()
    model.save_pretrained(path)
    return expected


def test_read_masks_matches_the_saved_model(tmp_path):
    expected = save_pad(tmp_path)
    masks = glue_masks.read_masks(tmp_path / "model.safetensors")
    assert len(masks) == len(expected) == 4  # 2 layers x fc_in, fc_out
    for name, mask in expected.items():
        (key,) = [k for k in masks if k.endswith(name)]
        assert masks[key].shape == mask.shape == (1350,) and np.array_equal(masks[key], mask)


def test_agreement_by_hand():
    a = {"w": np.array([1, 1, 0, 0, 1, 0, 0, 0], bool)}  # 3 dynamic of 8
    b = {"w": np.array([1, 0, 0, 0, 1, 1, 1, 0], bool)}  # 4 dynamic of 8
    got = glue_masks.mask_agreement(a, b)
    assert got["agreement"] == 5 / 8  # entries 0, 2, 3, 4, 7
    assert got["shared"] == 2 / 3  # 2 shared dynamic entries of the smaller set (3)
    assert got["chance"] == pytest.approx(3 / 8 * 4 / 8 + 5 / 8 * 4 / 8)
    assert glue_masks.mask_agreement(a, a)["agreement"] == 1.0
    with pytest.raises(ValueError, match="different weights"):
        glue_masks.mask_agreement(a, {"v": a["w"]})


def test_compare_pairs_variants_of_a_seed_and_seeds_of_a_variant(tmp_path):
    variants = {"imp": {"mode": "pad", "partition": "imp"}, "random": {"mode": "pad", "partition": "random"}}
    runs = []
    for variant, seed in (("imp", 42), ("random", 42), ("imp", 43)):
        settings = {"task": "stsb", "seed": seed, **variants[variant]}
        save_pad(glue_quality.run_dir(settings, tmp_path), seed=seed if variant == "imp" else 7)
        runs.append({"task": "stsb", "seed": seed, "variant": variant, "settings": settings})
    moe = {"task": "stsb", "seed": 42, "mode": "moe"}
    runs.append({"task": "stsb", "seed": 42, "variant": "moe", "settings": moe})  # skipped: not a PAD run
    report = glue_masks.compare({"table": "fig4", "runs": runs}, tmp_path)
    pairs = {(p["kind"], tuple(p["a"]), tuple(p["b"])): p for p in report["pairs"]}
    assert set(pairs) == {
        ("variants, one seed", ("imp", 42), ("random", 42)),
        ("seeds, one variant", ("imp", 42), ("imp", 43)),
    }
    for pair in pairs.values():
        assert 0.3 < pair["agreement"] < 0.7 and pair["chance"] == pytest.approx(0.5, abs=0.05)
    md = glue_masks.markdown(report)
    assert "| stsb | variants, one seed | imp s42 | random s42 |" in md
    json.dumps(report)  # serialisable as written


def test_a_run_without_weights_is_named(tmp_path):
    settings = {"task": "stsb", "seed": 42, "mode": "pad", "partition": "imp"}
    result = {"table": "fig4", "runs": [{"task": "stsb", "seed": 42, "variant": "imp", "settings": settings}]}
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        glue_masks.compare(result, tmp_path)


def test_skip_missing_compares_the_runs_that_are_there_and_names_the_rest(tmp_path):
    runs = []
    for variant, seed in (("imp", 42), ("imp", 43), ("mp", 42)):
        settings = {"task": "stsb", "seed": seed, "mode": "pad", "partition": variant}
        if variant == "imp":  # the MP run's weights are not saved
            save_pad(glue_quality.run_dir(settings, tmp_path), seed=seed)
        runs.append({"task": "stsb", "seed": seed, "variant": variant, "settings": settings})
    report = glue_masks.compare({"table": "fig4", "runs": runs}, tmp_path, skip_missing=True)
    assert report["missing"] == [["stsb", "mp", 42]]
    assert [(p["a"], p["b"]) for p in report["pairs"]] == [(["imp", 42], ["imp", 43])]
    assert "Runs left out (their weights are not in the work dir): stsb mp s42." in glue_masks.markdown(report)


def test_tasks_keeps_only_the_runs_of_those_tasks(tmp_path):
    runs = []
    for task in ("rte", "stsb"):
        for seed in (42, 43):
            settings = {"task": task, "seed": seed, "mode": "pad", "partition": "mp"}
            if task == "rte":  # the STS-B runs' weights are not here: with tasks=["rte"] that is no error
                save_pad(glue_quality.run_dir(settings, tmp_path), seed=seed)
            runs.append({"task": task, "seed": seed, "variant": "mp", "settings": settings})
    report = glue_masks.compare({"table": "fig4", "runs": runs}, tmp_path, tasks=["rte"])
    assert [(p["task"], p["a"], p["b"]) for p in report["pairs"]] == [("rte", ["mp", 42], ["mp", 43])]
    assert report["missing"] == []
