"""PAD dynamic-convolution model classes: a dense ResNet / MobileNetV2 whose convolutions (except the stem) are
`PADDynamicConv2d` layers.

Each PAD class wraps the family's own Transformers class for the same head (`self.model`, e.g. a
`ResNetForImageClassification`), so the stem, normalisation, pooling, head and loss are the family's own code;
only the convolutions are swapped (`vision.conversion`). Loading and saving go through the same PAD checkpoint
code as the MoE models (`checkpoint`: compact codec, validation, Transformers' loader with the PAD conversions).

Entry points:
    config = PADDyConvConfig.from_base(dense_path, num_labels=10)
    model = AutoModelForImageClassification.from_pretrained(dense_path, config=config)  # upcycle
    model = AutoModelForImageClassification.from_config(config)  # from scratch (the paper's setting)
    model.save_pretrained("out"); AutoModelForImageClassification.from_pretrained("out")  # PAD checkpoint
"""

# No `from __future__ import annotations` here: Transformers inspects the `forward` annotations at run time.
import math
from functools import partial
from typing import ClassVar

import torch
from torch import Tensor, nn
from transformers import AutoModel, AutoModelForImageClassification, PreTrainedModel
from transformers import initialization as init
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs

from .._compat import init_family_module, is_initialized
from ..checkpoint.load import initialize_pad_weight, pad_from_pretrained, register_pad_conversions
from ..checkpoint.save import pad_save_pretrained
from ..core.pad_weight import PADMergeMixin
from .configuration_pad_dyconv import PAD_DYCONV_STEMS, PADDyConvConfig
from .conversion import convert_convs_to_pad_dyconv
from .dynamic_conv import KernelAttention, PADDynamicConv2d

register_pad_conversions(PADDyConvConfig.model_type)


class PADDyConvPreTrainedModel(PADMergeMixin, PreTrainedModel):
    config_class = PADDyConvConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False
    # A never-partitioned checkpoint ("moe" layout) stores the kernels only; the static weights and masks are
    # rebuilt by `initialize_weights` (static = the kernels' mean, mask all dynamic).
    _keys_to_ignore_on_load_missing = [r"\.convolution\.static_weight$", r"\.convolution\.mask$"]
    # The families' heads return a mean loss and ignore `num_items_in_batch` (see PADMoEPreTrainedModel).
    accepts_loss_kwargs = False
    _auto_class_for_head: ClassVar[type] = AutoModel
    """The Transformers Auto class that builds the wrapped family model for this head."""

    def __init__(self, config: PADDyConvConfig, base_model: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        config.sync_base_config()
        upcycled = base_model is not None
        if base_model is None:
            base_model = self._auto_class_for_head.from_config(config.base_config)
        self.model = base_model
        # Built from a config (from scratch, or a skeleton to load into): every kernel is drawn by `initialize_weights`
        # (or loaded); given a dense model (upcycling): the kernels are its weights.
        convert_convs_to_pad_dyconv(self.model.base_model, config, keep_weights=upcycled)
        self.post_init()

    # ----------------------------------------------------------------------------------- structure
    @property
    def pad_unit_prefix(self) -> str:
        """Dropped from the PAD convolutions' names in partition metadata and reports (`core.registry`): the path
        of the family's base model (``"model.resnet."`` in a head class, ``"model."`` in the base class), so the
        names (``"encoder.stages.0.layers.0.layer.0.convolution"``) are the same for every head."""
        family = self.model
        return "model." if family.base_model is family else f"model.{family.base_model_prefix}."

    @property
    def pad_convs(self) -> list[PADDynamicConv2d]:
        """The PAD dynamic convolutions, in module order."""
        return [module for module in self.modules() if isinstance(module, PADDynamicConv2d)]

    # ----------------------------------------------------------------------------------- init
    def initialize_weights(self) -> None:
        # Extended, not replaced: the family's own `_init_weights` initialises its subtree (and the attention's
        # linears inside it) but does not know the PAD convolutions. They are initialised here, only the tensors
        # Transformers has not marked as loaded: from scratch each kernel gets its own draw of the family's conv
        # init (as DY-Conv) and the static weight is their mean (what the dynamic entries compute under the
        # near-uniform attention of tau = 30, and what a never-partitioned checkpoint implies); a "moe"-layout
        # checkpoint gets its static weights and masks rebuilt from the loaded kernels; upcycled copies stay.
        super().initialize_weights()
        for module in self.modules():
            if isinstance(module, PADDynamicConv2d):
                initialize_pad_weight(module, partial(_init_kernels, self.model, module))
            elif isinstance(module, KernelAttention):
                _init_attention(module)
                # Non-persistent: never loaded, so set on every build (the inference temperature).
                init.constant_(module.temperature, float(self.config.temperature_final))

    # ----------------------------------------------------------------------------------- loading & saving
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """Load a PAD dynamic-convolution checkpoint, or upcycle a dense ResNet / MobileNetV2 checkpoint (with
        `config=PADDyConvConfig.from_base(dense)`, or a default one): every kernel and the static weight of each
        convolution are copies of the dense one, so the outputs equal the dense model's."""
        return pad_from_pretrained(
            cls, pretrained_model_name_or_path, model_args, config, kwargs, super().from_pretrained, PAD_DYCONV_STEMS
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save the config and the compact PAD checkpoint (safetensors; masks bit-packed, only the entries eq. 4
        reads). Same arguments as `PreTrainedModel.save_pretrained`. No model card is written for vision models."""
        if kwargs.pop("model_card", False):
            raise ValueError("model_card=True is not supported for PAD vision models (the card describes PAD-MoE).")
        for key in ("base_model", "eval_results", "tags"):
            kwargs.pop(key, None)
        kwargs["model_card"] = False
        return pad_save_pretrained(self, save_directory, args, kwargs, super().save_pretrained)

    # ----------------------------------------------------------------------------------- forward
    def forward(
        self,
        pixel_values: Tensor | None = None,
        labels: Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ModelOutput | tuple:
        inputs = {"pixel_values": pixel_values, "labels": labels, "output_hidden_states": output_hidden_states}
        outputs = self.model(**{k: v for k, v in inputs.items() if v is not None}, **kwargs, return_dict=True)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return outputs if return_dict else outputs.to_tuple()


def _init_kernels(family: PreTrainedModel, conv: PADDynamicConv2d, weights: Tensor) -> None:
    """Each of the kernels `weights` `(n, out, in/g, kh, kw)` drawn by the family's own init of an `nn.Conv2d` of
    the same geometry (ResNet: Kaiming normal, fan-out; MobileNetV2: normal(0, initializer_range)), independently,
    as DY-Conv initialises its kernels. Skipped for tensors Transformers marked as loaded."""
    if is_initialized(weights) or weights.device.type == "meta":
        return
    with torch.no_grad():
        for k in range(weights.shape[0]):
            dense = nn.Conv2d(
                conv.in_channels, conv.out_channels, conv.kernel_size, groups=conv.groups, bias=False,
                device=weights.device, dtype=weights.dtype,
            )
            init_family_module(family, dense)
            weights[k].copy_(dense.weight)


def _init_attention(attention: KernelAttention) -> None:
    """PyTorch's `nn.Linear` init for the attention's layers, whatever the family (as DY-Conv's implementations
    build them), replacing the family's init (MobileNetV2's normal(0, 0.02) would make ``pi`` uniform to ~1e-3, so
    the kernels of an upcycled model could not drift apart). Loaded tensors are left alone."""
    for linear in (attention.fc1, attention.fc2):
        init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(linear.in_features)
        init.uniform_(linear.bias, -bound, bound)


class PADDyConvModel(PADDyConvPreTrainedModel):
    _auto_class_for_head = AutoModel


class PADDyConvForImageClassification(PADDyConvPreTrainedModel):
    _auto_class_for_head = AutoModelForImageClassification


PAD_DYCONV_MODEL_CLASSES: dict[type, type[PADDyConvPreTrainedModel]] = {
    AutoModel: PADDyConvModel,
    AutoModelForImageClassification: PADDyConvForImageClassification,
}
