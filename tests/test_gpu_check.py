"""benchmarks/gpu/gpu_check.sh, the one prepared GPU check, runs end to end on the CPU with --smoke."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_writes_every_result(tmp_path):
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu" / "gpu_check.sh"), "--smoke"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (tmp_path / "gpu_check.log").read_text()
    assert "passed" in log and "failed" not in log and "done" in log
    speed = json.loads((tmp_path / "speed.json").read_text())
    assert speed["setup"]["smoke"] and {"moe__forward_backward_s", "pad__forward_backward_s"} <= set(
        speed["minilm_layer"]
    )
    assert "pad_vs_moe__forward_backward_s" in speed["minilm_layer_ratios"]
    glue = json.loads((tmp_path / "glue_table1.json").read_text())
    assert set(glue["per_variant"]) >= {"static", "moe", "pad"}
