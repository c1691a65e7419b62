"""benchmarks/glue_analysis.py: which run folders it measures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import glue_analysis  # noqa: E402  (benchmarks/ is not a package)


def test_select_runs_takes_finished_runs_or_the_named_ones(tmp_path):
    for name in ("stsb_pad_s43_b", "stsb_pad_s42_a", "rte_moe_s42_c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "glue_run.json").write_text("{}")
    (tmp_path / "unfinished").mkdir()  # no glue_run.json: not a run
    (tmp_path / "notes.txt").write_text("not a folder")

    found = glue_analysis.select_runs(tmp_path)
    assert [p.name for p in found] == ["rte_moe_s42_c", "stsb_pad_s42_a", "stsb_pad_s43_b"]
    named = glue_analysis.select_runs(tmp_path, ["stsb_pad_s43_b", "stsb_pad_s42_a"])
    assert named == [tmp_path / "stsb_pad_s43_b", tmp_path / "stsb_pad_s42_a"]  # in the order asked
    with pytest.raises(FileNotFoundError, match=r"\['unfinished'\]"):
        glue_analysis.select_runs(tmp_path, ["stsb_pad_s42_a", "unfinished"])
