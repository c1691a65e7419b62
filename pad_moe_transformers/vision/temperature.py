"""The softmax temperature of DY-Conv's kernel attention and its training schedule.

DY-Conv (Chen et al. 2020) anneals the temperature ``tau`` of ``softmax(z / tau)`` linearly from 30 to 1 over the
first 10 epochs: near-uniform attention first, so that every kernel is trained, then sharper attention. PAD-Net
follows it (sec. 5.1). ``tau`` is the state of that schedule, held by each `KernelAttention` as a non-persistent
buffer; a model is built and loaded at the final temperature, the one inference uses.

    trainer = Trainer(model=model, args=args, ..., callbacks=[TemperatureScheduleCallback()])

This module imports `transformers.trainer_callback`; the package imports it on first access only.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn
from transformers import TrainerCallback

from .dynamic_conv import KernelAttention

__all__ = ["TemperatureScheduleCallback", "set_temperature", "temperature_at"]


def temperature_at(epoch: float, initial: float = 30.0, final: float = 1.0, epochs: float = 10) -> float:
    """``tau`` at (fractional) `epoch`: linear from `initial` at epoch 0 to `final` at `epochs`, then `final`."""
    if epochs <= 0:
        return float(final)
    progress = min(max(float(epoch), 0.0) / float(epochs), 1.0)
    return float(initial) + (float(final) - float(initial)) * progress


def set_temperature(model: nn.Module, tau: float) -> int:
    """Set the temperature of every `KernelAttention` of `model` to `tau` (in place); returns how many were set."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"The attention temperature must be a finite number > 0, got {tau!r}.")
    count = 0
    for module in model.modules():
        if isinstance(module, KernelAttention):
            module.temperature.fill_(float(tau))
            count += 1
    return count


class TemperatureScheduleCallback(TrainerCallback):
    """Anneal the attention temperature during `Trainer.train()` (DY-Conv's schedule, `temperature_at`).

    The temperature follows ``state.epoch`` (fractional, so it moves every step) and is set at the start of
    training (also when resuming: ``state.epoch`` is restored), of every epoch and of every step. `initial`,
    `final`, `epochs` default to the model config's `temperature_init`, `temperature_final`, `temperature_epochs`.
    """

    def __init__(self, initial: float | None = None, final: float | None = None, epochs: float | None = None) -> None:
        self.initial, self.final, self.epochs = initial, final, epochs

    def schedule(self, model: nn.Module) -> tuple[float, float, float]:
        """`(initial, final, epochs)`: the arguments given, else the model config's fields."""
        config = getattr(model, "config", None)

        def pick(given: float | None, field: str, default: float) -> float:
            return float(given) if given is not None else float(getattr(config, field, default))

        return (
            pick(self.initial, "temperature_init", 30.0),
            pick(self.final, "temperature_final", 1.0),
            pick(self.epochs, "temperature_epochs", 10),
        )

    def _apply(self, state: Any, model: nn.Module | None) -> None:
        if model is None:
            return
        initial, final, epochs = self.schedule(model)
        set_temperature(model, temperature_at(state.epoch or 0.0, initial, final, epochs))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._apply(state, model)

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        self._apply(state, model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._apply(state, model)
