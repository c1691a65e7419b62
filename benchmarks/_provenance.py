"""The commit a result file records: which code produced the figure."""

from __future__ import annotations

import subprocess
from pathlib import Path

from _paths import ROOT


def commit_label(root: Path = ROOT) -> str:
    """`HEAD` as 10 hex digits, `" (dirty)"` appended when the code (package, examples, benchmarks) has uncommitted
    changes. Result files are left out of the check: a benchmark that rewrites them as it runs would otherwise mark
    its own code dirty."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True).stdout.strip()

    code = ("pad_moe_transformers", "examples", "benchmarks", ":(exclude)benchmarks/results")
    dirty = git("status", "--porcelain", "--", *code)
    return git("rev-parse", "--short=10", "HEAD") + (" (dirty)" if dirty else "")
