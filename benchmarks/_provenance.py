"""The commit a result file records: which code produced the figure."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

from _paths import ROOT

CODE = ("pad_moe_transformers", "examples", "benchmarks", ":(exclude)benchmarks/results")
"""What makes a figure's code dirty. Result files are left out: a benchmark that rewrites them as it runs would
otherwise mark its own code dirty."""


def git_state(root: Path = ROOT) -> dict:
    """`{"commit": HEAD's full hash (None outside a git checkout), "dirty": whether CODE has uncommitted changes,
    new files included}`."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--", *CODE))}


def state_label(state: Mapping | None) -> str:
    """`<commit, 10 digits>[ (dirty)]` of a `git_state` record (`?` when unknown: an old run record may lack one)."""
    state = state or {}
    return f"{(state.get('commit') or '?')[:10]}{' (dirty)' if state.get('dirty') else ''}"


def commit_label(root: Path = ROOT) -> str:
    """The code's state now, as `state_label` writes it."""
    return state_label(git_state(root))
