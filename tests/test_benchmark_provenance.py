"""The commit label result files record (`benchmarks/_provenance.py`): dirty only when code changed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _provenance import commit_label, git_state  # noqa: E402  (benchmarks/ is not a package)


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def test_commit_label_is_dirty_for_code_changes_not_for_result_files(tmp_path):
    for path in ("pad_moe_transformers/layer.py", "benchmarks/results/speed.json", "README.md"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("0\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    clean = commit_label(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{10}", clean)
    state = git_state(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{40}", state["commit"]) and state["commit"].startswith(clean)
    assert state["dirty"] is False
    # a benchmark rewriting its result file, or an edited README, is not a code change
    (tmp_path / "benchmarks/results/speed.json").write_text("1\n")
    (tmp_path / "README.md").write_text("1\n")
    assert commit_label(tmp_path) == clean
    # a new, untracked benchmark module is
    (tmp_path / "benchmarks/_helper.py").write_text("")
    assert commit_label(tmp_path) == clean + " (dirty)"
    (tmp_path / "benchmarks/_helper.py").unlink()
    (tmp_path / "pad_moe_transformers/layer.py").write_text("1\n")
    assert commit_label(tmp_path) == clean + " (dirty)"


def test_outside_a_checkout_the_commit_is_unknown(tmp_path):
    assert git_state(tmp_path) == {"commit": None, "dirty": False}
    assert commit_label(tmp_path) == "?"
