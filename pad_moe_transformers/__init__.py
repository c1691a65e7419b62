"""pad_moe_transformers: partially dynamic Mixture-of-Experts (PAD-Net) for BERT-family encoders, and PAD
dynamic convolution (`vision`) for ResNet and MobileNetV2.

Importing the package registers the `pad_moe` and `pad_dyconv` model types with the Transformers Auto classes,
so `AutoConfig` / `AutoModel*` `.from_pretrained` load PAD checkpoints without `trust_remote_code`.

The names that need the Trainer stack (`IMPTrainerCallback`, the optimizer-group helpers of
`training.py`) are imported on first access (PEP 562), so that `import pad_moe_transformers` (and the
`pad-moe` command) does not load `transformers.trainer`, `datasets`, `pandas` or `pyarrow`.
"""

from __future__ import annotations

import importlib
from typing import Any

from transformers import AutoConfig

# First: refuses a Transformers release outside the tested window, naming it, before anything else fails obscurely.
from ._compat import TRANSFORMERS_WINDOW, UnsupportedTransformersError
from ._version import __version__
from .architectures import PAD_FFN_LAYOUTS, FFNLayout
from .checkpoint import FORMAT_VERSION as CHECKPOINT_FORMAT_VERSION
from .checkpoint import PADCheckpointError, theoretical_checkpoint_size
from .configuration_pad_moe import SCALE_FACTOR_MODES, PADMoEConfig
from .conversion import convert_ffn_to_pad_moe
from .core import compact_pad_storage, dense_pad_storage, merged_pad_weights
from .modelcard import build_model_card
from .modeling_pad_moe import (
    PAD_MODEL_CLASSES,
    PADMoEForMaskedLM,
    PADMoEForQuestionAnswering,
    PADMoEForSequenceClassification,
    PADMoEForTokenClassification,
    PADMoEModel,
    PADMoEPreTrainedModel,
    ParameterReport,
)
from .moe import PADMoEFeedForward
from .pad_linear import PADExpertLinear
from .partition import (
    PartitionResult,
    apply_partition,
    attach_moe_p_constraints,
    moe_p_prune,
    partition_model,
    perturb_experts,
)
from .router import TopKRouter, load_balancing_loss, router_z_loss
from .vision import (
    PAD_DYCONV_MODEL_CLASSES,
    PAD_DYCONV_STEMS,
    KernelAttention,
    PADDyConvConfig,
    PADDyConvForImageClassification,
    PADDyConvModel,
    PADDyConvPreTrainedModel,
    PADDynamicConv2d,
    convert_convs_to_pad_dyconv,
)

AutoConfig.register(PADMoEConfig.model_type, PADMoEConfig, exist_ok=True)
for _auto_class, _pad_class in PAD_MODEL_CLASSES.items():
    _auto_class.register(PADMoEConfig, _pad_class, exist_ok=True)
AutoConfig.register(PADDyConvConfig.model_type, PADDyConvConfig, exist_ok=True)
for _auto_class, _pad_class in PAD_DYCONV_MODEL_CLASSES.items():
    _auto_class.register(PADDyConvConfig, _pad_class, exist_ok=True)

# Public names whose modules import the Trainer stack: name -> module, imported on first access.
_LAZY = {
    "IMPTrainerCallback": ".callbacks",  # partition inside Trainer.train()
    "pad_optimizer_cls_and_kwargs": ".training",  # own lr for routers and scale factors
    "pad_optimizer_grouped_parameters": ".training",
    "TemperatureScheduleCallback": ".vision.temperature",  # DY-Conv's temperature schedule in Trainer.train()
    "set_temperature": ".vision.temperature",
    "temperature_at": ".vision.temperature",
}

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "TRANSFORMERS_WINDOW",
    "UnsupportedTransformersError",
    "PAD_DYCONV_MODEL_CLASSES",
    "PAD_DYCONV_STEMS",
    "PAD_FFN_LAYOUTS",
    "SCALE_FACTOR_MODES",
    "FFNLayout",
    "IMPTrainerCallback",
    "KernelAttention",
    "PADCheckpointError",
    "PADDyConvConfig",
    "PADDyConvForImageClassification",
    "PADDyConvModel",
    "PADDyConvPreTrainedModel",
    "PADDynamicConv2d",
    "PADExpertLinear",
    "PADMoEConfig",
    "PADMoEFeedForward",
    "PADMoEForMaskedLM",
    "PADMoEForQuestionAnswering",
    "PADMoEForSequenceClassification",
    "PADMoEForTokenClassification",
    "PADMoEModel",
    "PADMoEPreTrainedModel",
    "ParameterReport",
    "PartitionResult",
    "TemperatureScheduleCallback",
    "TopKRouter",
    "__version__",
    "apply_partition",
    "attach_moe_p_constraints",
    "build_model_card",
    "convert_convs_to_pad_dyconv",
    "convert_ffn_to_pad_moe",
    "load_balancing_loss",
    "merged_pad_weights",
    "compact_pad_storage",
    "dense_pad_storage",
    "moe_p_prune",
    "pad_optimizer_cls_and_kwargs",
    "pad_optimizer_grouped_parameters",
    "partition_model",
    "perturb_experts",
    "router_z_loss",
    "set_temperature",
    "temperature_at",
    "theoretical_checkpoint_size",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
