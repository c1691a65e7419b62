"""The reader of the original GLUE TSVs (as `download_glue_data.py` writes them).

    from pad_moe_transformers.glue import load_glue_tsv, read_glue_columns, glue_split_path
    raw = load_glue_tsv("rte", "../shared/data/glue")     # DatasetDict: train / validation (/ test)
    columns = read_glue_columns("rte", glue_split_path("rte", "../shared/data/glue", "validation"), "validation")

Rows get the columns of the hub dataset `nyu-mll/glue` (text columns, `label`, `idx`), so the same
preprocessing serves both sources. The files are read with quoting off (quotes are part of the
sentences) and no NA conversion (the text "null" or "NA" stays text). `read_glue_columns` needs only
the standard library (the `pad-moe` CLI uses it); `read_glue_tsv` / `load_glue_tsv` return
`datasets` objects and need the `datasets` package (the `examples` extra).
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .tasks import GlueTask, get_task

__all__ = ["find_task_dir", "glue_features", "glue_split_path", "load_glue_tsv", "read_glue_columns", "read_glue_tsv"]


def _csv_field_limit() -> None:
    # QNLI/MNLI contain long fields; csv's default limit is 128 KiB.
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 10


def _parse_label(raw: str, task: GlueTask, where: str) -> float | int:
    if task.is_regression:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{where}: label {raw!r} is not a number.") from None
    label2id = task.label2id
    if raw in label2id:
        return label2id[raw]
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value < task.num_labels:
        raise ValueError(
            f"{where}: label {raw!r} is neither a class name {list(task.label_names)} "
            f"nor a class id in [0, {task.num_labels})."
        )
    return value


def _column_positions(task: GlueTask, spec: dict, header: list[str] | None, path: Path) -> dict[str, int]:
    """Output column -> field index, from the header names (or the fixed positions of a header-less file)."""
    if header is None:
        return {name: column for name, column in spec.items() if isinstance(column, int)}
    header = [h.strip() for h in header]
    positions = {}
    for name, column in spec.items():
        if isinstance(column, int):
            positions[name] = column
        elif column in header:
            positions[name] = header.index(column)
        elif name != "idx":  # no index column: the row number is used
            raise ValueError(f"{path}: no column {column!r} in the header {header} (task {task.name}).")
    return positions


def read_glue_columns(
    task: str | GlueTask, path: str | os.PathLike, split: str = "train", *, skip_bad_rows: bool = False
) -> dict[str, list[Any]]:
    """Read one original GLUE TSV into columns (standard library only).

    Args:
        task: task name or `GlueTask`.
        path: the TSV file.
        split: hub split name (decides labelled vs. test layout; `test*` splits get `label = -1`).
        skip_bad_rows: drop rows with too few fields instead of raising.

    Returns:
        ``{text column: [str], "label": [int class id, or float for STS-B; -1 on test splits],
        "idx": [int]}`` (`idx`: the row number; the file's index/id column on test splits).

    The file is decoded as UTF-8 with a leading BOM stripped (MRPC), split on tabs only (no quote
    handling, `csv.QUOTE_NONE`) and every field is kept as the literal text.
    """
    task = get_task(task) if isinstance(task, str) else task
    path = Path(path)
    labelled = task.split_has_labels(split)
    spec = dict(task.columns if labelled else task.test_columns)
    has_header = task.has_header if labelled else True
    _csv_field_limit()
    out: dict[str, list[Any]] = {name: [] for name in (*task.text_columns, "label", "idx")}
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = None
        if has_header:
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path}: empty file, expected a header.")
        positions = _column_positions(task, spec, header, path)
        needed = max(positions.values()) + 1
        for line, row in enumerate(reader, start=2 if has_header else 1):
            if not row:  # blank line (e.g. a trailing one)
                continue
            if len(row) < needed:
                if skip_bad_rows:
                    continue
                raise ValueError(
                    f"{path}, line {line}: {len(row)} tab-separated fields, expected at least {needed} "
                    f"(task {task.name}, split {split})."
                )
            row_number = len(out["idx"])
            for name in task.text_columns:
                out[name].append(row[positions[name]])
            if labelled:
                out["label"].append(_parse_label(row[positions["label"]].strip(), task, f"{path}, line {line}"))
            else:
                out["label"].append(-1.0 if task.is_regression else -1)
            try:
                out["idx"].append(int(row[positions["idx"]]) if "idx" in positions else row_number)
            except ValueError:
                out["idx"].append(row_number)
    return out


def glue_features(task: str | GlueTask):
    """The `datasets.Features` of a task's rows: text columns (string), `label` (`ClassLabel`, or float32
    for STS-B) and `idx` (int32)."""
    from datasets import ClassLabel, Features, Value

    task = get_task(task) if isinstance(task, str) else task
    features = {name: Value("string") for name in task.text_columns}
    features["label"] = Value("float32") if task.is_regression else ClassLabel(names=list(task.label_names))
    features["idx"] = Value("int32")
    return Features(features)


def read_glue_tsv(task: str | GlueTask, path: str | os.PathLike, split: str = "train", *, skip_bad_rows: bool = False):
    """Read one original GLUE TSV into a `datasets.Dataset` with the hub's columns and features
    (`read_glue_columns` for the arguments and the format rules)."""
    from datasets import Dataset

    task = get_task(task) if isinstance(task, str) else task
    columns = read_glue_columns(task, path, split, skip_bad_rows=skip_bad_rows)
    return Dataset.from_dict(columns, features=glue_features(task), split=split)


def find_task_dir(task: str | GlueTask, data_dir: str | os.PathLike) -> Path:
    """The folder holding `task`'s TSVs: `data_dir/<TaskDir>` (e.g. `glue_data/RTE`) or `data_dir` itself."""
    task = get_task(task) if isinstance(task, str) else task
    data_dir = Path(data_dir)
    for name in (task.tsv_dir, task.tsv_dir.replace("-", ""), task.name, task.name.upper()):
        if (data_dir / name).is_dir():
            return data_dir / name
    if any((data_dir / f).is_file() for f in task.files.values()):
        return data_dir
    raise FileNotFoundError(
        f"No {task.tsv_dir} data under {data_dir}: expected {data_dir / task.tsv_dir}/ or the files "
        f"{sorted(set(task.files.values()))} directly in {data_dir}."
    )


def glue_split_path(task: str | GlueTask, data_dir: str | os.PathLike, split: str) -> Path:
    """The TSV file of `split` under the GLUE root (or task folder) `data_dir`; `ValueError` for a split the
    task does not have, `FileNotFoundError` when the file is missing."""
    task = get_task(task) if isinstance(task, str) else task
    if split not in task.files:
        raise ValueError(f"Task {task.name} has no split {split!r}; splits: {list(task.files)}.")
    path = find_task_dir(task, data_dir) / task.files[split]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (split {split!r} of {task.name}).")
    return path


def load_glue_tsv(
    task: str | GlueTask,
    data_dir: str | os.PathLike,
    splits: Sequence[str] | None = None,
    *,
    skip_bad_rows: bool = False,
):
    """Read a task's original TSVs into a `datasets.DatasetDict` keyed by hub split names.

    `data_dir` is the GLUE root (with `CoLA/`, `RTE/`, ...) or the task's own folder. With
    `splits=None` every split whose file exists is read (the test files are optional); a split
    asked for explicitly must exist.
    """
    from datasets import DatasetDict

    task = get_task(task) if isinstance(task, str) else task
    folder = find_task_dir(task, data_dir)
    result = {}
    for split in task.files if splits is None else splits:
        try:
            path = glue_split_path(task, folder, split)
        except FileNotFoundError:
            if splits is None:
                continue
            raise
        result[split] = read_glue_tsv(task, path, split, skip_bad_rows=skip_bad_rows)
    if not result:
        raise FileNotFoundError(f"No {task.name} TSV found in {folder} (looked for {sorted(task.files.values())}).")
    return DatasetDict(result)
