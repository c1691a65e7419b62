"""GLUE's metrics, computed with scikit-learn and scipy (the `examples` extra), as GLUE defines them.

    from pad_moe_transformers.glue import build_compute_metrics
    trainer = Trainer(..., compute_metrics=build_compute_metrics("rte"))

Matthews correlation for CoLA, accuracy and binary F1 (positive class 1) for MRPC and QQP, Pearson
and Spearman correlation for STS-B, accuracy otherwise; the result keys are those of `evaluate`'s
glue metric (`matthews_correlation`, `accuracy`, `f1`, `pearson`, `spearmanr`), which computes the
same functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from .tasks import GlueTask, get_task

__all__ = ["build_compute_metrics", "compute_glue_metrics"]


def _correlation(fn: Callable, references: np.ndarray, predictions: np.ndarray) -> float:
    if len(references) < 2:
        return float("nan")  # undefined (scipy raises); nan like a constant input
    return float(fn(predictions.astype(np.float64), references.astype(np.float64))[0])


def compute_glue_metrics(task: str | GlueTask, predictions, references) -> dict[str, float]:
    """GLUE's metric for `task`: `predictions` are class ids (scores for STS-B), `references` the gold labels,
    both of shape `(N,)`."""
    task = get_task(task) if isinstance(task, str) else task
    predictions = np.asarray(predictions).ravel()
    references = np.asarray(references).ravel()
    if predictions.shape != references.shape:
        raise ValueError(f"{predictions.shape[0]} predictions for {references.shape[0]} references.")
    if task.name == "stsb":
        return {
            "pearson": _correlation(stats.pearsonr, references, predictions),
            "spearmanr": _correlation(stats.spearmanr, references, predictions),
        }
    if task.name == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
    result = {"accuracy": float(accuracy_score(references, predictions)) if len(references) else float("nan")}
    if task.name in ("mrpc", "qqp"):
        result["f1"] = float(f1_score(references, predictions, pos_label=1, average="binary", zero_division=0.0))
    return result


def build_compute_metrics(task: str | GlueTask, combined_score: bool = True) -> Callable[[Any], dict[str, float]]:
    """A `compute_metrics` function for `Trainer`: logits `(N, num_labels)` -> class ids (argmax) or scores
    (STS-B) -> GLUE metric.

    With `combined_score`, tasks with two metrics also get their mean as `combined_score`
    (as transformers' `run_glue.py` does).
    """
    task = get_task(task) if isinstance(task, str) else task

    def compute_metrics(eval_pred) -> dict[str, float]:
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(predictions, (tuple, list)):
            predictions = predictions[0]
        predictions = np.asarray(predictions)
        if task.is_regression:
            predictions = predictions.reshape(predictions.shape[0], -1)[:, 0]
        else:
            predictions = np.argmax(predictions, axis=-1)
        result = compute_glue_metrics(task, predictions, np.asarray(labels))
        if combined_score and len(result) > 1:
            result["combined_score"] = float(np.mean(list(result.values())))
        return result

    return compute_metrics
