"""benchmarks/glue/glue_stats.py against hand-computed values (paired differences, t intervals, task averages)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "glue"))
import glue_stats  # noqa: E402  (benchmarks/ is not a package)

PAD = {42: 85.0, 43: 86.0, 44: 84.0}
MOE = {42: 84.0, 43: 84.5, 44: 83.5}
# d = PAD - MoE = (1.0, 1.5, 0.5): mean 1.0, std sqrt((0 + 0.25 + 0.25) / 2) = 0.5,
# 95% half width t_{0.975,2} * 0.5 / sqrt(3) = 4.303 * 0.288675 = 1.24217.
HALF = 4.303 * 0.5 / math.sqrt(3)


def test_t_quantile_table_and_scipy(monkeypatch):
    assert glue_stats.t_quantile(2) == pytest.approx(4.3027, abs=1e-3)
    assert glue_stats.t_quantile(1) == pytest.approx(12.706, abs=1e-3)
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # scipy missing: the table
    assert glue_stats.t_quantile(2) == 4.303 and glue_stats.t_quantile(4) == 2.776
    with pytest.raises(ValueError, match="install scipy"):
        glue_stats.t_quantile(2, confidence=0.9)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        glue_stats.t_quantile(0)


def test_paired_difference_by_hand(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    diff = glue_stats.paired_difference(PAD, MOE)
    assert (diff.mean, diff.std, diff.n, diff.seeds) == (pytest.approx(1.0), pytest.approx(0.5), 3, (42, 43, 44))
    assert diff.low == pytest.approx(1.0 - HALF) and diff.high == pytest.approx(1.0 + HALF)
    assert diff.half_width == pytest.approx(HALF) and not diff.excludes_zero  # -0.242 < 0 < 2.242
    # Unpaired noise would be much larger: std of PAD alone is 1.0, of MoE 0.5; pairing removes the shared part.
    assert glue_stats.seed_estimate(PAD).std == pytest.approx(1.0)
    # Only shared seeds count; one shared seed gives a mean without interval.
    single = glue_stats.paired_difference(PAD, {43: 80.0, 45: 1.0})
    assert (single.mean, single.n, single.low, single.std) == (6.0, 1, None, None)
    assert glue_stats.paired_difference(PAD, {45: 1.0}) is None


def test_resolved_difference():
    diff = glue_stats.paired_difference({1: 2.0, 2: 2.2, 3: 1.9}, {1: 1.0, 2: 1.1, 3: 1.0})
    # d = (1.0, 1.1, 0.9): mean 1.0, std 0.1, half width 4.303 * 0.1 / sqrt(3) = 0.248
    assert diff.low == pytest.approx(1.0 - 0.2484, abs=1e-3) and diff.excludes_zero


def test_summarise_tasks_and_average():
    scores = {
        "pad": {"rte": PAD, "stsb": {42: 90.0, 43: 91.0}},
        "moe": {"rte": MOE, "stsb": {42: 89.0, 43: 89.0, 44: 88.0}},
    }
    out = glue_stats.summarise(scores, ["rte", "stsb"], [("pad", "moe"), ("pad", "static")])
    assert set(out["differences"]) == {"pad - moe"}  # no static runs: that comparison is left out
    # Average over tasks only for seeds with every task: PAD seed 44 has no STS-B.
    pad_avg = out["variants"]["pad"]["avg"]
    assert pad_avg["seeds"] == [42, 43] and pad_avg["mean"] == pytest.approx((87.5 + 88.5) / 2)
    moe_avg = out["variants"]["moe"]["avg"]
    assert moe_avg["n"] == 3 and moe_avg["mean"] == pytest.approx((86.5 + 86.75 + 85.75) / 3)
    avg = out["differences"]["pad - moe"]["avg"]
    # per seed: 42: 87.5 - 86.5 = 1.0; 43: 88.5 - 86.75 = 1.75 -> mean 1.375, std 0.53033, t_{0.975,1} = 12.706
    assert avg["n"] == 2 and avg["mean"] == pytest.approx(1.375)
    assert avg["half_width"] == pytest.approx(12.706 * 0.53033 / math.sqrt(2), rel=1e-3)
    assert out["differences"]["pad - moe"]["rte"]["mean"] == pytest.approx(1.0)


def test_format():
    diff = glue_stats.paired_difference({1: 2.0, 2: 2.2, 3: 1.9}, {1: 1.0, 2: 1.1, 3: 1.0}).to_dict()
    assert glue_stats.format_estimate(diff, signed=True) == "+1.00 [+0.75, +1.25]*"
    assert glue_stats.format_estimate(glue_stats.seed_estimate(PAD).to_dict()) == "85.00 +- 1.00"
    assert glue_stats.format_estimate(None) == "-"


def test_verdict():
    resolved = glue_stats.paired_difference({1: 2.0, 2: 2.2, 3: 1.9}, {1: 1.0, 2: 1.1, 3: 1.0}).to_dict()
    assert glue_stats.verdict(resolved) == "holds"
    assert glue_stats.verdict(resolved, 1.9) == "holds; paper +1.9 above CI"  # CI [0.75, 1.25]
    assert glue_stats.verdict(resolved, 1.0) == "holds; paper +1.0 in CI"
    reversed_ = glue_stats.paired_difference({1: 1.0, 2: 1.1, 3: 1.0}, {1: 2.0, 2: 2.2, 3: 1.9}).to_dict()
    assert glue_stats.verdict(reversed_, 0.5) == "reversed; paper +0.5 above CI"
    spans = glue_stats.paired_difference(PAD, MOE).to_dict()  # CI [-0.24, 2.24]
    assert glue_stats.verdict(spans, -1.0) == "unresolved; paper -1.0 below CI"
    assert glue_stats.verdict(glue_stats.paired_difference(PAD, {43: 80.0}).to_dict()) == "n=1, no CI"
    assert glue_stats.verdict(None) == "-"
