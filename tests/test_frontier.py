"""benchmarks/frontier/frontier.py: the join of quality and cost files, ratios to static, the Pareto front."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "frontier"))
import frontier  # noqa: E402  (benchmarks/ is not a package)


def test_pareto_front():
    points = {"a": (1.0, 80.0), "b": (2.0, 85.0), "c": (2.5, 84.0), "d": (3.0, 85.0), "e": (1.5, 80.0)}
    # c: b costs less and scores more; d: b scores the same for less; e: a scores the same for less
    assert frontier.pareto_front(points) == ["a", "b"]
    assert frontier.pareto_front({"only": (1.0, 1.0)}) == ["only"]


def _write(results: Path) -> None:
    variants = {"static": (80.0, 20e6), "moe": (81.0, 70e6), "pad_k0.5": (82.0, 47e6), "pad_k0.1": (81.5, 27e6)}
    stats = {v: {"stsb": {"mean": m, "std": 0.5, "n": 3}} for v, (m, _) in variants.items()}
    per_variant = {v: {"parameters": p} for v, (_, p) in variants.items()}
    frontier_report = {"tasks": ["stsb"], "complete": False, "stats": {"variants": stats}, "per_variant": per_variant,
                       "git": {"commit": "abc"}, "variants": {}}  # fmt: skip
    (results / "glue_frontier.json").write_text(json.dumps(frontier_report))
    walls = (("static", 100.0), ("moe", 200.0), ("pad", 150.0), ("pad_k0.1", 120.0))
    runs = [{"variant": v, "wall_s": w} for v, w in walls]
    (results / "glue_wholerun_stsb.json").write_text(json.dumps({"runs": runs, "complete": True}))
    rows = {"dense": {"peak_train_bytes": 2**30}, "moe": {"peak_train_bytes": 2 * 2**30}}
    (results / "train_cost.json").write_text(json.dumps({"seq32_bf16": {"rows": rows}, "setup": {}}))
    lat = {
        "dense": {"pipeline_b1_s": 0.005, "pipeline_b32_s": 0.001},
        "pad_k0.5": {"pipeline_b1_s": 0.01, "pipeline_b32_s": 0.002},
    }
    (results / "pipeline_latency.json").write_text(json.dumps({"bf16": {"rows": lat}}))
    sizes = [{"name": "dense", "bytes_bf16": 100}, {"name": "pad_kappa_0.1", "bytes_bf16": 150}]
    (results / "checkpoint_size.json").write_text(json.dumps({"rows": sizes}))


def test_frontier_joins_the_result_files(tmp_path):
    _write(tmp_path)
    report = frontier.main(["--results", str(tmp_path), "--out", str(tmp_path / "f")])
    rows = report["tasks"]["stsb"]["rows"]
    assert rows["pad_k0.5"]["wall_s"] == 150.0 and rows["pad_k0.5"]["wall_s_vs_static"] == pytest.approx(1.5)
    assert rows["moe"]["train_memory_bytes_vs_static"] == pytest.approx(2.0)
    assert rows["pad_k0.5"]["latency_b1_s_vs_static"] == pytest.approx(2.0)
    # neuron PAD stores what element PAD stores at the same kappa
    assert rows["pad_neuron_k0.1"]["stored_bytes"] == rows["pad_k0.1"]["stored_bytes"] == 150
    assert "score" not in rows["pad_neuron_k0.3"] and rows["pad_neuron_k0.3"]["wall_s"] is None
    # front on (wall ratio, score): static 1.0/80, pad_k0.1 1.2/81.5, pad_k0.5 1.5/82; moe is dominated
    assert report["tasks"]["stsb"]["pareto_front"] == ["static", "pad_k0.1", "pad_k0.5"]
    md = (tmp_path / "f.md").read_text()
    assert "**Partial:**" in md and "| PAD element kappa 0.5 * | 82.00 +- 0.50 (n=3) | 47.0M | 1.50x (150 s)" in md
    assert "Empty cells are filled by:" in md and "pipeline_latency.py" in md
    assert (tmp_path / "f.png").stat().st_size > 10_000
