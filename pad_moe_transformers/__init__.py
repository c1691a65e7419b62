"""pad_moe_transformers: partially dynamic Mixture-of-Experts (PAD-Net) for BERT-family encoders.

Importing the package registers the `pad_moe` model type with the Transformers Auto classes, so
`AutoConfig` / `AutoModel*` `.from_pretrained` load PAD-MoE checkpoints without `trust_remote_code`.
"""

from transformers import AutoConfig

from .architectures import PAD_FFN_LAYOUTS, FFNLayout
from .configuration_pad_moe import SCALE_FACTOR_MODES, PADMoEConfig
from .modeling_pad_moe import (
    PAD_MODEL_CLASSES,
    PADMoEForMaskedLM,
    PADMoEForQuestionAnswering,
    PADMoEForSequenceClassification,
    PADMoEForTokenClassification,
    PADMoEModel,
    PADMoEPreTrainedModel,
    ParameterReport,
    convert_ffn_to_pad_moe,
)
from .moe import PADMoEFeedForward
from .pad_linear import PADExpertLinear
from .router import TopKRouter, load_balancing_loss, router_z_loss

__version__ = "0.1.0"

AutoConfig.register(PADMoEConfig.model_type, PADMoEConfig, exist_ok=True)
for _auto_class, _pad_class in PAD_MODEL_CLASSES.items():
    _auto_class.register(PADMoEConfig, _pad_class, exist_ok=True)

__all__ = [
    "PAD_FFN_LAYOUTS",
    "SCALE_FACTOR_MODES",
    "FFNLayout",
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
    "TopKRouter",
    "convert_ffn_to_pad_moe",
    "load_balancing_loss",
    "router_z_loss",
]

# Mode partition (paper sec. 4.2) and its Trainer callback.
from .callbacks import IMPTrainerCallback  # noqa: E402
from .partition import (  # noqa: E402
    PartitionResult,
    apply_partition,
    attach_moe_p_constraints,
    moe_p_prune,
    partition_model,
    perturb_experts,
)

__all__ += [
    "IMPTrainerCallback",
    "PartitionResult",
    "apply_partition",
    "attach_moe_p_constraints",
    "moe_p_prune",
    "partition_model",
    "perturb_experts",
]

# Compact PAD checkpoints and generated model cards (docs/checkpoint_format.md).
from .checkpoint import FORMAT_VERSION as CHECKPOINT_FORMAT_VERSION  # noqa: E402
from .checkpoint import PADCheckpointError, theoretical_checkpoint_size  # noqa: E402
from .modelcard import build_model_card  # noqa: E402

__all__ += ["CHECKPOINT_FORMAT_VERSION", "PADCheckpointError", "build_model_card", "theoretical_checkpoint_size"]

# Optimizer groups with their own lr for routers and scale factors (pad_moe_transformers/training.py).
from .training import pad_optimizer_cls_and_kwargs, pad_optimizer_grouped_parameters  # noqa: E402

__all__ += ["pad_optimizer_cls_and_kwargs", "pad_optimizer_grouped_parameters"]
