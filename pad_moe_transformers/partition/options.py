"""The names and defaults of the partition options, and their validation (shared by `partition_model` and
`IMPTrainerCallback`, so both accept the same values and report errors the same way).

Validation follows `PADMoEConfig.validate_pad_fields`: a wrong value raises a `ValueError` that names the
argument and the allowed values. NumPy scalars (``np.float64(0.5)``, ``np.int64(10)``) are accepted and
returned as plain Python ``float`` / ``int`` / ``bool``, so everything recorded in ``config.partition`` is
JSON-safe.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

PARTITION_METHODS = ("imp", "mp", "random", "moe_p")
SCORES = ("warmup_grad", "grad", "connection")
SCOPES = ("linear", "global")
GRANULARITIES = ("element", "neuron")
"""What one mask decision covers: one weight element, or one FFN intermediate neuron (a row of fc_in and
the matching column of fc_out, plus its fc_in bias)."""
DEFAULT_SCORE = "warmup_grad"
"""Chosen on real RTE batches, see docs/partition.md."""
DEFAULT_ROUNDS = 5
DEFAULT_WARMUP_LR = 1e-4
DEFAULT_NUM_BATCHES = 10
"""Partition batches read by default (the paper uses 10)."""


def as_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}.")
    return value


def as_int(name: str, value: Any, minimum: int | None = None, hint: str = "") -> int:
    """`value` as a plain int (NumPy integers accepted); bools and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be an integer{bound}{hint}, got {value!r}.")
    if minimum is not None and int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}{hint}, got {value!r}.")
    return int(value)


def as_real(name: str, value: Any) -> float:
    """`value` as a plain finite float (NumPy floats and integers accepted); bools, strings, NaN refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}.")
    return float(value)


def as_ratio(name: str, value: Any) -> float:
    """A dynamic ratio: a real number in (0, 1]."""
    ratio = as_real(name, value)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}.")
    return ratio


def as_bool(name: str, value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):  # numpy.bool_ is not a bool subclass
        return bool(value)
    raise ValueError(f"{name} must be True or False, got {value!r}.")


def check_options(
    *,
    method: Any,
    dynamic_ratio: Any,
    num_batches: Any,
    rounds: Any,
    scope: Any,
    score: Any,
    seed: Any,
    warmup_steps: Any,
    warmup_lr: Any,
    progress: Any,
) -> dict[str, Any]:
    """Validate the partition options and return them as plain Python values.

    `dynamic_ratio` and `seed` may be None (the model's `config.dynamic_ratio`; the Trainer's seed);
    `warmup_steps` may be None (one warm-up step per partition batch).
    """
    return {
        "method": as_choice("method", method, PARTITION_METHODS),
        "dynamic_ratio": None if dynamic_ratio is None else as_ratio("dynamic_ratio", dynamic_ratio),
        "num_batches": as_int("num_batches", num_batches, 1, " (the paper uses 10)"),
        "rounds": as_int("rounds", rounds, 1),
        "scope": as_choice("scope", scope, SCOPES),
        "score": as_choice("score", score, SCORES),
        "seed": None if seed is None else as_int("seed", seed),
        "warmup_steps": (
            None if warmup_steps is None else as_int("warmup_steps", warmup_steps, 0, " (None: one step per batch)")
        ),
        "warmup_lr": _warmup_lr(warmup_lr, method, score),
        "progress": as_bool("progress", progress),
    }


def _warmup_lr(value: Any, method: str, score: str) -> float:
    lr = as_real("warmup_lr", value)
    if score == "warmup_grad" and method in ("imp", "mp") and not lr > 0:
        raise ValueError(f"warmup_lr must be > 0 for score='warmup_grad', got {value!r}.")
    return lr
