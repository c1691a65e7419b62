"""`PADDyConvConfig`: a ResNet / MobileNetV2 config wrapped with the options of PAD dynamic convolution.

The config nests the dense model's config (`base_config`) and adds the fields that turn every convolution
except the stem into a `PADDynamicConv2d` (PAD-Net with DY-Conv as the dynamic function, paper sec. 3-4).
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import AutoConfig, PreTrainedConfig

from .._compat import SubConfigSpec
from ..configuration_common import NumberField, PADConfigMixin
from ..core.scale_factors import SCALE_FACTOR_MODES

PAD_DYCONV_STEMS: dict[str, tuple[str, ...]] = {
    "resnet": ("embedder.embedder.convolution",),
    "mobilenet_v2": ("conv_stem.first_conv.convolution",),
}
"""The convolutions that stay static, by base `model_type` (paths inside the family's base model, e.g.
`ResNetModel`): the first layer, as in the paper ("all convolution layers except the first layer", after
DY-Conv). Every other `nn.Conv2d` of the base model becomes a PAD dynamic convolution: for ResNet the 3x3 and
1x1 convolutions of every block and the 1x1 projection shortcuts; for MobileNetV2 the 1x1 expansion, the 3x3
depthwise and the 1x1 projection convolution of every inverted residual (the stem's included, after its first
conv) and the final 1x1 convolution, as DY-Conv's MobileNetV2 does. A new family is one row here."""


class PADDyConvConfig(PADConfigMixin, PreTrainedConfig):
    r"""Configuration of a PAD dynamic-convolution model: a dense ResNet or MobileNetV2 whose convolutions (except
    the stem) are partially dynamic DY-Conv layers.

    Args:
        base_config (`PreTrainedConfig` or `dict`):
            Config of the dense model (`resnet` or `mobilenet_v2`). Build it with [`PADDyConvConfig.from_base`].
        num_kernels (`int`, defaults to 4):
            Kernels ``K`` per convolution, mixed by the attention ``pi(x)`` (DY-Conv uses 4).
        dynamic_ratio (`float`, defaults to 0.3):
            Target fraction ``kappa`` of each convolution's weight entries that stay dynamic after mode partition
            (the paper's best, Fig. 3). 1.0 is DY-Conv itself (fully dynamic: do not partition).
        scale_factor_mode (`str`, defaults to `"sum2"`):
            One of ``"sum2"``, ``"none"``, ``"static_only"``, ``"dynamic_only"``, ``"free"`` (see `SCALE_FACTOR_MODES`).
        attention_reduction (`int`, defaults to 4):
            Reduction ratio of the attention's hidden layer (``max(in_channels // r, 4)`` units; 4 in DY-Conv).
        temperature_init (`float`, defaults to 30.0), temperature_final (`float`, defaults to 1.0),
        temperature_epochs (`float`, defaults to 10):
            The softmax temperature ``tau`` of the attention is annealed linearly from `temperature_init` to
            `temperature_final` over the first `temperature_epochs` epochs (DY-Conv's schedule, applied by
            `TemperatureScheduleCallback`). A model is built (and loaded) at `temperature_final`, the value
            inference uses.
        partition_granularity (`str`, defaults to `"element"`):
            What one mask decision selects; only ``"element"`` (one weight entry, as in the paper) for convolutions.
        partition (`dict`, *optional*):
            Metadata of the mode partition that produced the masks; `None` while fully dynamic. Written by the
            partition code, not by users.

    Numbers and task head follow the rules of [`PADMoEConfig`]: numeric fields are stored as plain Python numbers
    (numpy scalars, 0-d arrays and 0-d tensors are converted when set) and validated on assignment; this config
    owns `num_labels` / `id2label` / `label2id` / `problem_type` and writes them through to `base_config`, whose
    head fields must not be set directly (`sync_base_config` raises a `ValueError` naming both values).
    """

    model_type = "pad_dyconv"
    pad_kind: ClassVar[str] = "PAD dynamic-convolution"
    sub_configs_defaults = {"base_config": SubConfigSpec(config_class=AutoConfig, model_type="resnet")}

    base_config: dict | PreTrainedConfig | None = None
    num_kernels: int = 4
    dynamic_ratio: float | int = 0.3
    scale_factor_mode: str = "sum2"
    attention_reduction: int = 4
    temperature_init: float | int = 30.0
    temperature_final: float | int = 1.0
    temperature_epochs: float | int = 10
    partition_granularity: str = "element"
    partition: dict | None = None

    number_fields: ClassVar[dict[str, NumberField]] = {
        "num_kernels": NumberField(integer=True, low=1),
        "dynamic_ratio": NumberField(low=0, high=1, open_low=True, note=" (1.0 = fully dynamic DY-Conv)"),
        "attention_reduction": NumberField(integer=True, low=1),
        "temperature_init": NumberField(low=0, open_low=True),
        "temperature_final": NumberField(low=0, open_low=True),
        "temperature_epochs": NumberField(low=0),
    }

    def __post_init__(self, **kwargs):
        given = self._given_head_fields(self, kwargs)
        super().__post_init__(**kwargs)
        self.validate_pad_fields()
        self._sync_head_fields(given)

    def validate_pad_fields(self) -> None:
        """Raise a `ValueError` naming the field and the allowed values for any invalid PAD field."""
        base_type = getattr(self.base_config, "model_type", None)
        if base_type not in PAD_DYCONV_STEMS:
            raise ValueError(
                f"base_config.model_type={base_type!r} has no PAD dynamic-convolution mapping; supported model "
                f"types: {sorted(PAD_DYCONV_STEMS)}."
            )
        super().validate_pad_fields()
        if self.scale_factor_mode not in SCALE_FACTOR_MODES:
            raise ValueError(
                f"scale_factor_mode must be one of {list(SCALE_FACTOR_MODES)}, got {self.scale_factor_mode!r}."
            )
        if self.partition_granularity != "element":
            raise ValueError(
                "partition_granularity must be 'element' for dynamic convolutions (neuron-structured partitions are "
                f"defined for MoE feed-forward blocks only), got {self.partition_granularity!r}."
            )
        if self.partition is not None and not isinstance(self.partition, dict):
            raise ValueError(
                f"partition must be None or a dict of partition metadata (written by the partition code), "
                f"got {type(self.partition).__name__}."
            )

    @classmethod
    def from_base(
        cls,
        base_or_path: str | PreTrainedConfig,
        *,
        num_kernels: int = 4,
        dynamic_ratio: float = 0.3,
        scale_factor_mode: str = "sum2",
        attention_reduction: int = 4,
        temperature_init: float = 30.0,
        temperature_final: float = 1.0,
        temperature_epochs: float = 10,
        hub_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> PADDyConvConfig:
        """Build a PAD config around the config of a dense ResNet / MobileNetV2 (a path, a hub id or a config).

        Task-head arguments (`num_labels`, `id2label`, `label2id`, `problem_type`) go to the base config and are
        mirrored; `partition` is refused (it is written by the partition code); any other keyword overrides a
        base-config attribute (e.g. `depths=[1, 1, 1, 1]`).

        Example:
            ```python
            config = PADDyConvConfig.from_base("microsoft/resnet-18", dynamic_ratio=0.3, num_labels=10)
            ```
        """
        if isinstance(base_or_path, PreTrainedConfig):
            base = base_or_path.__class__.from_dict(base_or_path.to_dict())
        else:
            base = AutoConfig.from_pretrained(base_or_path, **(hub_kwargs or {}))
        if getattr(base, "is_pad_config", False) or base.model_type == "pad_moe":
            raise ValueError(
                f"{base_or_path!r} is already a PAD checkpoint ({base.model_type}); load it with "
                "`AutoModel*.from_pretrained` directly instead of `PADDyConvConfig.from_base`."
            )
        extra_pad = {k: kwargs.pop(k) for k in list(kwargs) if k == "partition_granularity"}
        cls._route_to_base(base, kwargs)
        config = cls(
            base_config=base,
            num_kernels=num_kernels,
            dynamic_ratio=dynamic_ratio,
            scale_factor_mode=scale_factor_mode,
            attention_reduction=attention_reduction,
            temperature_init=temperature_init,
            temperature_final=temperature_final,
            temperature_epochs=temperature_epochs,
            **extra_pad,
        )
        config._mirror_head_of_base()
        return config

    def checkpoint_fingerprint(self) -> dict[str, Any]:
        """The fields the tensors of a checkpoint depend on (stored in the `pad_moe.config` header metadata)."""
        return {
            "model_type": self.model_type,
            "base_model_type": self.base_model_type,
            "num_kernels": self.num_kernels,
            "scale_factor_mode": self.scale_factor_mode,
            "attention_reduction": self.attention_reduction,
            "partitioned": bool(self.is_partitioned),
        }

    @property
    def base_model_type(self) -> str:
        return self.base_config.model_type

    @property
    def is_partitioned(self) -> bool:
        return self.partition is not None
