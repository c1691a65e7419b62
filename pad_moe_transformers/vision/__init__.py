"""PAD-Net with dynamic convolution (DY-Conv) as the dynamic function, for Transformers' ResNet and MobileNetV2.

    config = PADDyConvConfig.from_base(dense_path, dynamic_ratio=0.3, num_labels=10)
    model = AutoModelForImageClassification.from_pretrained(dense_path, config=config)   # upcycle
    partition_model(model, [{"pixel_values": x, "labels": y}, ...])                       # IMP, kappa = 0.3

`TemperatureScheduleCallback`, `temperature_at` and `set_temperature` (`vision.temperature`) import the Trainer
callback machinery and are imported on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from .configuration_pad_dyconv import PAD_DYCONV_STEMS, PADDyConvConfig
from .conversion import convert_convs_to_pad_dyconv
from .dynamic_conv import KernelAttention, PADDynamicConv2d
from .modeling_pad_dyconv import (
    PAD_DYCONV_MODEL_CLASSES,
    PADDyConvForImageClassification,
    PADDyConvModel,
    PADDyConvPreTrainedModel,
)

_LAZY = {name: ".temperature" for name in ("TemperatureScheduleCallback", "set_temperature", "temperature_at")}

__all__ = [
    "PAD_DYCONV_MODEL_CLASSES",
    "PAD_DYCONV_STEMS",
    "KernelAttention",
    "PADDyConvConfig",
    "PADDyConvForImageClassification",
    "PADDyConvModel",
    "PADDyConvPreTrainedModel",
    "PADDynamicConv2d",
    "TemperatureScheduleCallback",
    "convert_convs_to_pad_dyconv",
    "set_temperature",
    "temperature_at",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
