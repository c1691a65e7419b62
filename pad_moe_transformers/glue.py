"""GLUE for fine-tuning with the HF Trainer: task table, original-TSV reader, GLUE metrics.

    from pad_moe_transformers.glue import GLUE_TASKS, load_glue_tsv, build_compute_metrics
    raw = load_glue_tsv("rte", "/path/to/glue_data")           # DatasetDict: train / validation (/ test)
    trainer = Trainer(..., compute_metrics=build_compute_metrics("rte"))

The reader turns the TSVs of the original GLUE distribution (as `download_glue_data.py` writes
them) into datasets with the columns of the hub dataset `nyu-mll/glue` (text columns, `label`,
`idx`), so the same preprocessing serves both sources. The files are read with quoting off
(quotes are part of the sentences) and no NA conversion (the text "null" or "NA" stays text).

The metrics are GLUE's own: Matthews correlation for CoLA, accuracy and binary F1 (positive
class 1) for MRPC and QQP, Pearson and Spearman correlation for STS-B, accuracy otherwise. They
come from `evaluate.load("glue", task)` when that loads (it needs the hub or a local copy of the
metric script, and scikit-learn) and are otherwise computed here with numpy/scipy, with the same
result keys (`matthews_correlation`, `accuracy`, `f1`, `pearson`, `spearmanr`).
"""

from __future__ import annotations

import csv
import functools
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "GLUE_HUB_DATASET",
    "GLUE_TASKS",
    "METRIC_BACKENDS",
    "GlueTask",
    "build_compute_metrics",
    "compute_glue_metrics",
    "f1_binary",
    "find_task_dir",
    "get_task",
    "glue_metrics_local",
    "load_glue_tsv",
    "matthews_corrcoef",
    "read_glue_tsv",
]

GLUE_HUB_DATASET = "nyu-mll/glue"
METRIC_BACKENDS = ("auto", "evaluate", "local")

Column = str | int
"""A TSV column: its header name, or its 0-based position in a file without a header."""


@dataclass(frozen=True)
class GlueTask:
    """How one GLUE task looks on disk and on the hub, and how it is scored."""

    name: str
    """Config name on the hub (`nyu-mll/glue`) and in `evaluate.load("glue", name)`."""
    tsv_dir: str
    """Folder of the task in the original GLUE data (`CoLA`, `SST-2`, ...)."""
    text_columns: tuple[str, ...]
    """Input text column(s), named as in the hub dataset; one (single sentence) or two (pair)."""
    label_names: tuple[str, ...] | None
    """Class names in label-id order (as on the hub); `None` for regression (STS-B)."""
    metric_names: tuple[str, ...]
    """Keys of the GLUE metric result, as `evaluate`'s glue metric names them."""
    files: Mapping[str, str]
    """TSV file name per split (hub split names: `train`, `validation`, `test`; MNLI has
    `validation_matched`, `validation_mismatched`, `test_matched`, `test_mismatched`)."""
    columns: Mapping[str, Column]
    """Output column -> TSV column for the labelled splits (train / validation): text columns and `label`."""
    test_columns: Mapping[str, Column]
    """Output column -> TSV column for the unlabelled test split(s): text columns and `idx`."""
    has_header: bool = True
    """Whether the labelled TSVs start with a header (CoLA's do not; its test file does)."""

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def id2label(self) -> dict[int, str] | None:
        return None if self.label_names is None else dict(enumerate(self.label_names))

    @property
    def label2id(self) -> dict[str, int] | None:
        return None if self.label_names is None else {name: i for i, name in enumerate(self.label_names)}

    @property
    def train_split(self) -> str:
        return "train"

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return tuple(s for s in self.files if s.startswith("validation"))

    @property
    def test_splits(self) -> tuple[str, ...]:
        return tuple(s for s in self.files if s.startswith("test"))

    def split_has_labels(self, split: str) -> bool:
        return not split.startswith("test")


_PAIR_NLI = ("sentence1", "sentence2")
_DEFAULT_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}

GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        # No header; columns: source, label, original mark, sentence. The test file has "index\tsentence".
        GlueTask(
            name="cola",
            tsv_dir="CoLA",
            text_columns=("sentence",),
            label_names=("unacceptable", "acceptable"),
            metric_names=("matthews_correlation",),
            files=_DEFAULT_FILES,
            columns={"sentence": 3, "label": 1},
            test_columns={"sentence": "sentence", "idx": "index"},
            has_header=False,
        ),
        # sentence, label
        GlueTask(
            name="sst2",
            tsv_dir="SST-2",
            text_columns=("sentence",),
            label_names=("negative", "positive"),
            metric_names=("accuracy",),
            files=_DEFAULT_FILES,
            columns={"sentence": "sentence", "label": "label"},
            test_columns={"sentence": "sentence", "idx": "index"},
        ),
        # \ufeffQuality, #1 ID, #2 ID, #1 String, #2 String (BOM in the header). Test: index, #1 ID, ...
        GlueTask(
            name="mrpc",
            tsv_dir="MRPC",
            text_columns=_PAIR_NLI,
            label_names=("not_equivalent", "equivalent"),
            metric_names=("accuracy", "f1"),
            files=_DEFAULT_FILES,
            columns={"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"},
            test_columns={"sentence1": "#1 String", "sentence2": "#2 String", "idx": "index"},
        ),
        # index, genre, filename, year, old_index, source1, source2, sentence1, sentence2, score
        GlueTask(
            name="stsb",
            tsv_dir="STS-B",
            text_columns=_PAIR_NLI,
            label_names=None,
            metric_names=("pearson", "spearmanr"),
            files=_DEFAULT_FILES,
            columns={"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"},
            test_columns={"sentence1": "sentence1", "sentence2": "sentence2", "idx": "index"},
        ),
        # id, qid1, qid2, question1, question2, is_duplicate. Test: id, question1, question2
        GlueTask(
            name="qqp",
            tsv_dir="QQP",
            text_columns=("question1", "question2"),
            label_names=("not_duplicate", "duplicate"),
            metric_names=("accuracy", "f1"),
            files=_DEFAULT_FILES,
            columns={"question1": "question1", "question2": "question2", "label": "is_duplicate"},
            test_columns={"question1": "question1", "question2": "question2", "idx": "id"},
        ),
        # index, promptID, pairID, genre, 4 parse columns, sentence1, sentence2, label1[..label5], gold_label
        GlueTask(
            name="mnli",
            tsv_dir="MNLI",
            text_columns=("premise", "hypothesis"),
            label_names=("entailment", "neutral", "contradiction"),
            metric_names=("accuracy",),
            files={
                "train": "train.tsv",
                "validation_matched": "dev_matched.tsv",
                "validation_mismatched": "dev_mismatched.tsv",
                "test_matched": "test_matched.tsv",
                "test_mismatched": "test_mismatched.tsv",
            },
            columns={"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"},
            test_columns={"premise": "sentence1", "hypothesis": "sentence2", "idx": "index"},
        ),
        # index, question, sentence, label
        GlueTask(
            name="qnli",
            tsv_dir="QNLI",
            text_columns=("question", "sentence"),
            label_names=("entailment", "not_entailment"),
            metric_names=("accuracy",),
            files=_DEFAULT_FILES,
            columns={"question": "question", "sentence": "sentence", "label": "label"},
            test_columns={"question": "question", "sentence": "sentence", "idx": "index"},
        ),
        # index, sentence1, sentence2, label
        GlueTask(
            name="rte",
            tsv_dir="RTE",
            text_columns=_PAIR_NLI,
            label_names=("entailment", "not_entailment"),
            metric_names=("accuracy",),
            files=_DEFAULT_FILES,
            columns={"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"},
            test_columns={"sentence1": "sentence1", "sentence2": "sentence2", "idx": "index"},
        ),
        # index, sentence1, sentence2, label (0/1, 1 = entailment)
        GlueTask(
            name="wnli",
            tsv_dir="WNLI",
            text_columns=_PAIR_NLI,
            label_names=("not_entailment", "entailment"),
            metric_names=("accuracy",),
            files=_DEFAULT_FILES,
            columns={"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"},
            test_columns={"sentence1": "sentence1", "sentence2": "sentence2", "idx": "index"},
        ),
    )
}

_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli_matched": "mnli"}


def get_task(name: str) -> GlueTask:
    """The `GlueTask` of a task name (case-insensitive; `SST-2` / `STS-B` spellings accepted)."""
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in GLUE_TASKS:
        raise ValueError(f"Unknown GLUE task {name!r}; choose one of {sorted(GLUE_TASKS)}.")
    return GLUE_TASKS[key]


# ------------------------------------------------------------------------------------------ TSV reader
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


def read_glue_tsv(task: str | GlueTask, path: str | os.PathLike, split: str = "train", *, skip_bad_rows: bool = False):
    """Read one original GLUE TSV into a `datasets.Dataset` with the hub's columns.

    Args:
        task: task name or `GlueTask`.
        path: the TSV file.
        split: hub split name (decides labelled vs. test layout; `test*` splits get `label = -1`).
        skip_bad_rows: drop rows with too few fields instead of raising.

    Returns:
        A `Dataset` with the task's text columns, `label` (int class id, or float for STS-B; -1 on
        test splits) and `idx` (row number; the file's index/id column on test splits).

    The file is decoded as UTF-8 with a leading BOM stripped (MRPC), split on tabs only (no quote
    handling, `csv.QUOTE_NONE`) and every field is kept as the literal text.
    """
    from datasets import ClassLabel, Dataset, Features, Value

    task = get_task(task) if isinstance(task, str) else task
    path = Path(path)
    labelled = task.split_has_labels(split)
    spec = task.columns if labelled else task.test_columns
    has_header = task.has_header if labelled else True
    _csv_field_limit()
    out: dict[str, list] = {name: [] for name in task.text_columns}
    out["label"] = []
    out["idx"] = []
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        positions: dict[str, int] = {}
        if has_header:
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path}: empty file, expected a header.")
            header = [h.strip() for h in header]
            for name, column in spec.items():
                if isinstance(column, int):
                    positions[name] = column
                elif column in header:
                    positions[name] = header.index(column)
                elif name == "idx":
                    continue  # no index column: fall back to the row number
                else:
                    raise ValueError(f"{path}: no column {column!r} in the header {header} (task {task.name}).")
        else:
            positions = {name: column for name, column in spec.items() if isinstance(column, int)}
        needed = max(positions.values()) + 1
        row_number = 0
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
            for name in task.text_columns:
                out[name].append(row[positions[name]])
            if labelled:
                out["label"].append(_parse_label(row[positions["label"]].strip(), task, f"{path}, line {line}"))
            else:
                out["label"].append(-1.0 if task.is_regression else -1)
            if "idx" in positions:
                try:
                    out["idx"].append(int(row[positions["idx"]]))
                except ValueError:
                    out["idx"].append(row_number)
            else:
                out["idx"].append(row_number)
            row_number += 1
    features = {name: Value("string") for name in task.text_columns}
    features["label"] = Value("float32") if task.is_regression else ClassLabel(names=list(task.label_names))
    features["idx"] = Value("int32")
    return Dataset.from_dict(out, features=Features(features), split=split)


def find_task_dir(task: str | GlueTask, data_dir: str | os.PathLike) -> Path:
    """The folder holding `task`'s TSVs: `data_dir/<TaskDir>` (e.g. `glue_data/RTE`) or `data_dir` itself."""
    task = get_task(task) if isinstance(task, str) else task
    data_dir = Path(data_dir)
    names = [task.tsv_dir, task.tsv_dir.replace("-", ""), task.name, task.name.upper()]
    for name in names:
        if (data_dir / name).is_dir():
            return data_dir / name
    if any((data_dir / f).is_file() for f in task.files.values()):
        return data_dir
    raise FileNotFoundError(
        f"No {task.tsv_dir} data under {data_dir}: expected {data_dir / task.tsv_dir}/ or the files "
        f"{sorted(set(task.files.values()))} directly in {data_dir}."
    )


def load_glue_tsv(
    task: str | GlueTask,
    data_dir: str | os.PathLike,
    splits: Sequence[str] | None = None,
    *,
    skip_bad_rows: bool = False,
):
    """Read a task's original TSVs into a `DatasetDict` keyed by hub split names.

    `data_dir` is the GLUE root (with `CoLA/`, `RTE/`, ...) or the task's own folder. With
    `splits=None` every split whose file exists is read (the test files are optional); a split
    asked for explicitly must exist.
    """
    from datasets import DatasetDict

    task = get_task(task) if isinstance(task, str) else task
    folder = find_task_dir(task, data_dir)
    wanted = list(task.files) if splits is None else list(splits)
    result = {}
    for split in wanted:
        if split not in task.files:
            raise ValueError(f"Task {task.name} has no split {split!r}; splits: {list(task.files)}.")
        path = folder / task.files[split]
        if not path.is_file():
            if splits is None:
                continue
            raise FileNotFoundError(f"{path} not found (split {split!r} of {task.name}).")
        result[split] = read_glue_tsv(task, path, split, skip_bad_rows=skip_bad_rows)
    if not result:
        raise FileNotFoundError(f"No {task.name} TSV found in {folder} (looked for {sorted(task.files.values())}).")
    return DatasetDict(result)


# ------------------------------------------------------------------------------------------ metrics
def matthews_corrcoef(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """Matthews correlation coefficient (multi-class form, equal to sklearn's); 0.0 when undefined."""
    y = np.asarray(labels).astype(np.int64).ravel()
    p = np.asarray(predictions).astype(np.int64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels and predictions differ in length: {y.shape} vs {p.shape}.")
    classes, encoded = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = len(classes)
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (encoded[: len(y)], encoded[len(y):]), 1)
    t_k = conf.sum(axis=1)  # true occurrences per class
    p_k = conf.sum(axis=0)  # predicted occurrences per class
    c = np.trace(conf)
    s = conf.sum()
    cov_ytyp = c * s - np.dot(t_k, p_k)
    cov_ypyp = s * s - np.dot(p_k, p_k)
    cov_ytyt = s * s - np.dot(t_k, t_k)
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp))


def f1_binary(labels: Sequence[int], predictions: Sequence[int], pos_label: int = 1) -> float:
    """F1 of the positive class (GLUE's F1 for MRPC / QQP); 0.0 when there is no true or predicted positive."""
    y = np.asarray(labels).ravel() == pos_label
    p = np.asarray(predictions).ravel() == pos_label
    tp = np.sum(y & p)
    denominator = np.sum(y) + np.sum(p)
    return 0.0 if denominator == 0 else float(2 * tp / denominator)


def _correlation(fn, labels, predictions) -> float:
    x = np.asarray(predictions, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")  # undefined for constant input (scipy warns and gives nan too)
    return float(fn(x, y)[0])


def glue_metrics_local(task: str | GlueTask, predictions, references) -> dict[str, float]:
    """GLUE's metric for `task` computed with numpy/scipy (same keys as `evaluate`'s glue metric).

    `predictions` are class ids (or scores for STS-B), `references` the gold labels.
    """
    task = get_task(task) if isinstance(task, str) else task
    predictions = np.asarray(predictions)
    references = np.asarray(references)
    if predictions.shape[0] != references.shape[0]:
        raise ValueError(f"{predictions.shape[0]} predictions for {references.shape[0]} references.")
    if task.name == "cola":
        return {"matthews_correlation": matthews_corrcoef(references, predictions)}
    if task.name == "stsb":
        return {
            "pearson": _correlation(stats.pearsonr, references, predictions),
            "spearmanr": _correlation(stats.spearmanr, references, predictions),
        }
    accuracy = float(np.mean(predictions.ravel() == references.ravel())) if len(references) else float("nan")
    if task.name in ("mrpc", "qqp"):
        return {"accuracy": accuracy, "f1": f1_binary(references, predictions)}
    return {"accuracy": accuracy}


@functools.cache
def _evaluate_metric(task_name: str):
    """`evaluate.load("glue", task)` or `None` when it cannot be loaded (offline, no script). Cached."""
    try:
        import evaluate

        return evaluate.load("glue", task_name)
    except Exception as err:  # noqa: BLE001  (any failure means: use the local implementation)
        _warn_once(f"evaluate.load('glue', {task_name!r}) failed ({type(err).__name__}: {err}); using the local GLUE metric.")
        return None


@functools.cache
def _warn_once(message: str) -> None:
    from transformers.utils import logging

    logging.get_logger(__name__).warning(message)


def compute_glue_metrics(task: str | GlueTask, predictions, references, backend: str = "auto") -> dict[str, float]:
    """GLUE's metric for `task`.

    `backend`: ``"evaluate"`` (must load, else raise), ``"local"`` (numpy/scipy), or ``"auto"``
    (`evaluate` when its glue metric loads and computes, else local).
    """
    task = get_task(task) if isinstance(task, str) else task
    if backend not in METRIC_BACKENDS:
        raise ValueError(f"backend must be one of {list(METRIC_BACKENDS)}, got {backend!r}.")
    if backend == "local":
        return glue_metrics_local(task, predictions, references)
    if backend == "evaluate":
        import evaluate

        metric = evaluate.load("glue", task.name)
        result = metric.compute(predictions=predictions, references=references)
        return {k: float(v) for k, v in result.items()}
    metric = _evaluate_metric(task.name)
    if metric is not None:
        try:
            result = metric.compute(predictions=predictions, references=references)
            return {k: float(v) for k, v in result.items()}
        except Exception as err:  # noqa: BLE001  (e.g. scikit-learn missing)
            _warn_once(f"evaluate's glue metric failed to compute ({type(err).__name__}: {err}); using the local one.")
    return glue_metrics_local(task, predictions, references)


def build_compute_metrics(
    task: str | GlueTask, backend: str = "auto", combined_score: bool = True
) -> Callable[[Any], dict[str, float]]:
    """A `compute_metrics` function for `Trainer`: logits -> class ids (argmax) or scores (STS-B) -> GLUE metric.

    With `combined_score`, tasks with two metrics also get their mean as `combined_score`
    (as transformers' `run_glue.py` does).
    """
    task = get_task(task) if isinstance(task, str) else task
    if backend not in METRIC_BACKENDS:
        raise ValueError(f"backend must be one of {list(METRIC_BACKENDS)}, got {backend!r}.")

    def compute_metrics(eval_pred) -> dict[str, float]:
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(predictions, (tuple, list)):
            predictions = predictions[0]
        predictions = np.asarray(predictions)
        if task.is_regression:
            predictions = predictions.reshape(predictions.shape[0], -1)[:, 0]
        else:
            predictions = np.argmax(predictions, axis=-1)
        result = compute_glue_metrics(task, predictions, np.asarray(labels), backend=backend)
        if combined_score and len(result) > 1:
            result["combined_score"] = float(np.mean(list(result.values())))
        return result

    return compute_metrics
