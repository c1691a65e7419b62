"""benchmarks/frontier/frontier.py: the join of quality and cost files, ratios to static, the Pareto front."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "frontier"))
import frontier  # noqa: E402  (benchmarks/ is not a package)


def _glance(text: str) -> str:
    return text[text.index(frontier.GLANCE_BEGIN) : text.index(frontier.GLANCE_END)]


def test_pareto_front():
    points = {"a": (1.0, 80.0), "b": (2.0, 85.0), "c": (2.5, 84.0), "d": (3.0, 85.0), "e": (1.5, 80.0)}
    # c: b costs less and scores more; d: b scores the same for less; e: a scores the same for less
    assert frontier.pareto_front(points) == ["a", "b"]
    assert frontier.pareto_front({"only": (1.0, 1.0)}) == ["only"]


def _write(results: Path) -> None:
    variants = {"static": (80.0, 20e6), "moe": (81.0, 70e6), "pad_k0.5": (82.0, 47e6), "pad_k0.1": (81.5, 27e6)}
    seeds = {"pad_k0.1": 2, "moe": 1}  # a partial frontier: some rows have fewer seeds so far
    stats = {v: {"stsb": {"mean": m, "std": 0.5 if seeds.get(v, 3) > 1 else None, "n": seeds.get(v, 3)}}
             for v, (m, _) in variants.items()}  # fmt: skip
    per_variant = {v: {"parameters": p} for v, (_, p) in variants.items()}
    frontier_report = {"tasks": ["stsb"], "complete": False, "stats": {"variants": stats}, "per_variant": per_variant,
                       "git": {"commit": "abc"}, "variants": {}}  # fmt: skip
    (results / "glue_frontier.json").write_text(json.dumps(frontier_report))
    walls = (("static", 100.0), ("moe", 200.0), ("pad", 150.0), ("pad_k0.1", 120.0))
    runs = [{"variant": v, "wall_s": w} for v, w in walls]
    (results / "glue_wholerun_stsb.json").write_text(json.dumps({"runs": runs, "complete": True}))
    rows = {"dense": {"peak_train_bytes": 2**30, "train_step_s": 0.5},
            "moe": {"peak_train_bytes": 2 * 2**30, "train_step_s": 1.25}}  # fmt: skip
    (results / "train_cost.json").write_text(json.dumps({"seq32_bf16": {"rows": rows}, "setup": {}}))
    lat = {
        "dense": {"pipeline_b1_s": 0.005, "pipeline_b32_s": 0.001},
        "pad_k0.5": {"pipeline_b1_s": 0.01, "pipeline_b32_s": 0.002},
    }
    (results / "pipeline_latency.json").write_text(json.dumps({"bf16": {"rows": lat}}))
    sizes = [{"name": "dense", "bytes_bf16": 100}, {"name": "pad_kappa_0.1", "bytes_bf16": 150, "parameters": 27e6}]
    (results / "checkpoint_size.json").write_text(json.dumps({"rows": sizes}))


def test_frontier_joins_the_result_files(tmp_path):
    _write(tmp_path)
    report = frontier.main(["--results", str(tmp_path), "--out", str(tmp_path / "f")])
    rows = report["tasks"]["stsb"]["rows"]
    assert rows["pad_k0.5"]["wall_s"] == 150.0 and rows["pad_k0.5"]["wall_s_vs_static"] == pytest.approx(1.5)
    assert rows["moe"]["train_memory_bytes_vs_static"] == pytest.approx(2.0)
    assert rows["moe"]["train_step_s_vs_static"] == pytest.approx(2.5) and rows["pad_k0.5"]["train_step_s"] is None
    assert rows["pad_k0.5"]["latency_b1_s_vs_static"] == pytest.approx(2.0)
    # neuron PAD stores what element PAD stores at the same kappa
    assert rows["pad_neuron_k0.1"]["stored_bytes"] == rows["pad_k0.1"]["stored_bytes"] == 150
    assert "score" not in rows["pad_neuron_k0.3"] and rows["pad_neuron_k0.3"]["wall_s"] is None
    assert rows["pad_neuron_k0.1"]["parameters"] == 27e6  # from the checkpoint sizes where nothing is scored
    # front on (wall ratio, score): static 1.0/80, pad_k0.1 1.2/81.5, pad_k0.5 1.5/82; moe is dominated
    assert report["tasks"]["stsb"]["pareto_front"] == ["static", "pad_k0.1", "pad_k0.5"]
    md = (tmp_path / "f.md").read_text()
    assert "**Partial:**" in md and "| PAD element kappa 0.5 * | - | 82.00 +- 0.50 (n=3) | 47.0M | 1.50x (150 s)" in md
    assert "Empty cells are filled by:" in md and md.count("pipeline_latency.py") == 1
    assert "| MoE (8 experts, top-2) | - | 81.00 (n=1) | 70.0M | 2.00x (200 s) | 2.50x (1250.0 ms) |" in md
    assert (tmp_path / "f.png").stat().st_size > 10_000
    glance = _glance(md)
    assert "| PAD element kappa 0.5 | 47.0M | 82.00 +- 0.50 | 1.50x | - | - | 2.00x / 2.00x | - |" in glance
    assert "| MoE (8 experts, top-2) | 70.0M | 81.00 (n=1) | 2.00x | 2.50x | 2.00x | - / - | - |" in glance
    assert "| PAD neuron kappa 0.1 | 27.0M | - | - | - | - | - / - | 1.50x |" in glance
    assert "| PAD element kappa 0.1 | 27.0M | 81.50 +- 0.50 (n=2) |" in glance  # fewer seeds than the others so far


def test_readme_carries_the_committed_frontier():
    """The README's results table is the one `frontier.py` last wrote, not a hand copy that drifts from it."""
    root = Path(__file__).resolve().parents[1]
    committed = (root / "benchmarks" / "results" / "frontier.md").read_text(encoding="utf-8")
    assert _glance((root / "README.md").read_text(encoding="utf-8")) == _glance(committed)


def test_frontier_from_other_reports_is_provisional(tmp_path):
    """Scores from Table 1 (`pad` = element kappa 0.5) and Table 3 (`pad_k0.1`): the first report that scores a
    configuration wins, each row carries its learning rate, and the table says it is provisional."""
    _write(tmp_path)
    table1 = {"tasks": ["stsb"], "complete": True, "settings": {"learning_rate": 1e-4},
              "stats": {"variants": {"static": {"stsb": {"mean": 86.0, "std": 0.1, "n": 3}},
                                     "pad": {"stsb": {"mean": 85.0, "std": 0.2, "n": 3}}}},
              "per_variant": {"pad": {"parameters": 47e6}}, "variants": {"pad": {"mode": "pad"}}}  # fmt: skip
    table3 = {"tasks": ["stsb"], "complete": True, "settings": {"learning_rate": 1e-4},
              "stats": {"variants": {"pad_k0.5": {"stsb": {"mean": 99.0, "std": 0.2, "n": 3}},
                                     "pad_k0.1": {"stsb": {"mean": 85.5, "std": 0.3, "n": 3}}}},
              "variants": {"pad_k0.1": {"mode": "pad", "learning_rate": {"stsb": 5e-5}}}}  # fmt: skip
    (tmp_path / "t1.json").write_text(json.dumps(table1))
    (tmp_path / "t3.json").write_text(json.dumps(table3))
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{frontier.GLANCE_BEGIN}\nold table\n{frontier.GLANCE_END}\n\nafter\n")
    argv = ["--results", str(tmp_path), "--out", str(tmp_path / "p"), "--quality", "t1.json", "t3.json",
            "--readme", str(readme)]  # fmt: skip
    report = frontier.main(argv)
    rows = report["tasks"]["stsb"]["rows"]
    assert rows["pad_k0.5"]["score"] == 85.0 and rows["pad_k0.5"]["learning_rate"] == 1e-4  # Table 1's, not Table 3's
    assert rows["pad_k0.1"]["score"] == 85.5 and rows["pad_k0.1"]["learning_rate"] == 5e-5  # per-task lr resolved
    assert "score" not in rows["moe"]
    assert report["provisional"] and not report["frontier_complete"] and report["sources"]["lr_picks"] is None
    md = (tmp_path / "p.md").read_text()
    assert "**Provisional:**" in md and "`t1.json`, `t3.json`" in md
    assert "| PAD element kappa 0.1 | 5e-05 | 85.50 +- 0.30 (n=3) |" in md
    pasted = readme.read_text()
    assert pasted.startswith("# title\n\n") and pasted.endswith("\n\nafter\n") and "old table" not in pasted
    assert _glance(pasted) == _glance(md)
    (tmp_path / "bare.md").write_text("no marks")
    with pytest.raises(ValueError, match="add the two marks"):
        frontier.paste_glance(tmp_path / "bare.md", "x")
