"""GLUE for the examples and the `pad-moe` CLI: task table, original-TSV reader, metrics (docs/glue.md).

    from pad_moe_transformers.glue import get_task, load_glue_tsv, build_compute_metrics
    raw = load_glue_tsv("rte", "../shared/data/glue")      # DatasetDict: train / validation (/ test)
    trainer = Trainer(..., compute_metrics=build_compute_metrics("rte"))

Not part of the model library: nothing in `pad_moe_transformers` outside `cli/` imports it. The
task table (`tasks.py`) and `read_glue_columns` need only the standard library; `precision.py` turns
`pad_moe_transformers.precision` (native bf16 or not) into `--bf16 auto` and the line a run prints; the `datasets`
readers and the metrics (`metrics.py`: scikit-learn, scipy) need the `examples` extra. The metric
names load on first use, so `from pad_moe_transformers.glue import get_task` works without them.
"""

from __future__ import annotations

import importlib
from typing import Any

from .precision import cpu_bf16_flags, describe_precision, native_bf16_cpu, resolve_bf16
from .tasks import GLUE_HUB_DATASET, GLUE_TASKS, GlueTask, get_task
from .tsv import find_task_dir, glue_features, glue_split_path, load_glue_tsv, read_glue_columns, read_glue_tsv

_LAZY = {"build_compute_metrics": ".metrics", "compute_glue_metrics": ".metrics"}

__all__ = [
    "GLUE_HUB_DATASET",
    "GLUE_TASKS",
    "GlueTask",
    "build_compute_metrics",
    "compute_glue_metrics",
    "cpu_bf16_flags",
    "describe_precision",
    "find_task_dir",
    "get_task",
    "glue_features",
    "glue_split_path",
    "load_glue_tsv",
    "native_bf16_cpu",
    "read_glue_columns",
    "read_glue_tsv",
    "resolve_bf16",
]


def __getattr__(name: str) -> Any:  # PEP 562: the metrics import scikit-learn and scipy only when used
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
