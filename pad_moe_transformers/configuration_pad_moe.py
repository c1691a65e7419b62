"""`PADMoEConfig`: a BERT-family config wrapped with the PAD-MoE options.

The config nests the dense base model's config (`base_config`, any of the families in
`architectures.PAD_FFN_LAYOUTS`) and adds the fields that turn its feed-forward blocks into
partially dynamic Mixture-of-Experts layers (PAD-Net, He et al. 2023, eq. 4).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, ClassVar

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .architectures import PAD_FFN_LAYOUTS
from .configuration_common import PADConfigMixin
from .core.scale_factors import SCALE_FACTOR_MODES

PARTITION_GRANULARITIES = ("element", "neuron")


class PADMoEConfig(PADConfigMixin, PreTrainedConfig):
    r"""Configuration of a PAD-MoE model: a dense BERT-family encoder whose FFN blocks are
    replaced by partially dynamic Mixture-of-Experts layers.

    Args:
        base_config (`PreTrainedConfig` or `dict`):
            Config of the dense model that is upcycled (bert, roberta, xlm-roberta, electra, albert,
            distilbert). Build it with [`PADMoEConfig.from_base`] rather than by hand.
        num_experts (`int`, defaults to 8):
            Experts per MoE layer. Each expert is a whole FFN (input linear -> activation -> output linear).
        num_experts_per_tok (`int`, defaults to 2):
            Experts selected per token (top-k). Their gates are renormalised to sum to 1.
        dynamic_ratio (`float`, defaults to 0.5):
            Target fraction ``kappa`` of each FFN weight that stays dynamic (per expert) after mode partition.
            A model is fully dynamic (a plain MoE) until a partition sets its masks.
        scale_factor_mode (`str`, defaults to `"sum2"`):
            One of ``"sum2"``, ``"none"``, ``"static_only"``, ``"dynamic_only"``, ``"free"`` (see `SCALE_FACTOR_MODES`).
        router_aux_loss_coef (`float`, defaults to 0.01):
            Weight of the Switch-style load-balancing loss added to the task loss when labels are given.
            The loss is 1.0 for perfectly balanced routing.
        router_z_loss_coef (`float`, defaults to 0.0):
            Weight of the router z-loss (mean squared log-sum-exp of the router logits).
        router_jitter_noise (`float`, defaults to 0.0):
            In training, router inputs are multiplied by ``U(1 - eps, 1 + eps)`` noise.
        moe_layers (`list[int]`, *optional*):
            Indices of the transformer layers whose FFN becomes a PAD-MoE layer; all layers when `None`.
            For ALBERT the indices refer to the distinct (shared) layers, not to the depth.
        partition_granularity (`str`, defaults to `"element"`):
            What one mask decision selects: ``"element"`` (one weight element, as in the paper) or
            ``"neuron"`` (a whole intermediate neuron: a row of the FFN's input linear and the matching
            column of its output linear). Neuron-structured PAD computes static neurons once per token
            and only the dynamic neurons per expert, so it is cheaper than the MoE at run time.
        partition (`dict`, *optional*):
            Metadata of the mode partition that produced the masks (method, achieved ratios, ...);
            `None` while the model is fully dynamic. Written by the partition code, not by users.
        output_router_logits (`bool`, defaults to `False`):
            Return the per-layer router logits in the model outputs.
    """

    model_type = "pad_moe"
    pad_kind: ClassVar[str] = "PAD-MoE"
    sub_configs_defaults = {"base_config": SubConfigSpec(config_class=AutoConfig, model_type="bert")}
    # Keys of the outputs that Trainer must not treat as predictions.
    keys_to_ignore_at_inference: ClassVar[list[str]] = [
        "aux_loss",
        "z_loss",
        "router_logits",
        "hidden_states",
        "attentions",
    ]

    base_config: dict | PreTrainedConfig | None = None
    num_experts: int = 8
    num_experts_per_tok: int = 2
    dynamic_ratio: float | int = 0.5
    scale_factor_mode: str = "sum2"
    router_aux_loss_coef: float | int = 0.01
    router_z_loss_coef: float | int = 0.0
    router_jitter_noise: float | int = 0.0
    moe_layers: list[int] | None = None
    partition_granularity: str = "element"
    partition: dict | None = None
    output_router_logits: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_pad_fields()
        self._sync_head_fields()

    def validate_pad_fields(self) -> None:
        """Raise a `ValueError` naming the field and the allowed values for any invalid PAD field."""
        base_type = getattr(self.base_config, "model_type", None)
        if base_type not in PAD_FFN_LAYOUTS:
            raise ValueError(
                f"base_config.model_type={base_type!r} has no PAD-MoE FFN mapping; supported model types: "
                f"{sorted(PAD_FFN_LAYOUTS)}."
            )
        if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {self.num_experts!r}.")
        k = self.num_experts_per_tok
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be an integer in [1, num_experts={self.num_experts}], got {k!r}."
            )
        for name in ("dynamic_ratio", "router_aux_loss_coef", "router_z_loss_coef", "router_jitter_noise"):
            value = getattr(self, name)
            # bool is an int subclass and str/None would fail deep inside float(): name the field instead.
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite real number, got {value!r}.")
        if not 0.0 < float(self.dynamic_ratio) <= 1.0:
            raise ValueError(f"dynamic_ratio must be in (0, 1], got {self.dynamic_ratio!r}.")
        if self.scale_factor_mode not in SCALE_FACTOR_MODES:
            raise ValueError(
                f"scale_factor_mode must be one of {list(SCALE_FACTOR_MODES)}, got {self.scale_factor_mode!r}."
            )
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_jitter_noise"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}.")
        if float(self.router_jitter_noise) >= 1:
            raise ValueError(f"router_jitter_noise must be in [0, 1), got {self.router_jitter_noise!r}.")
        if self.partition_granularity not in PARTITION_GRANULARITIES:
            raise ValueError(
                f"partition_granularity must be one of {list(PARTITION_GRANULARITIES)}, "
                f"got {self.partition_granularity!r}."
            )
        if self.partition is not None and not isinstance(self.partition, dict):
            raise ValueError(
                f"partition must be None or a dict of partition metadata (written by the partition code), "
                f"got {type(self.partition).__name__}."
            )
        if self.moe_layers is not None:
            if not isinstance(self.moe_layers, (list, tuple)):
                raise ValueError(
                    f"moe_layers must be None (all layers) or a list of layer indices, got {self.moe_layers!r}."
                )
            if len(self.moe_layers) == 0 or len(set(self.moe_layers)) != len(self.moe_layers):
                raise ValueError(
                    f"moe_layers must be a non-empty list of distinct layer indices, got {self.moe_layers!r}."
                )
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.moe_layers):
                raise ValueError(f"moe_layers must hold non-negative integers, got {self.moe_layers!r}.")

    @classmethod
    def from_base(
        cls,
        pretrained_model_name_or_path: str | PreTrainedConfig,
        *,
        num_experts: int = 8,
        num_experts_per_tok: int = 2,
        dynamic_ratio: float = 0.5,
        hub_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> PADMoEConfig:
        """Build a PAD config around the config of a dense checkpoint (a path, a hub id or a config).

        Keyword arguments that are PAD fields configure the MoE layers; task-head arguments
        (`num_labels`, `id2label`, `label2id`, `problem_type`) go to the base config and are mirrored;
        any other keyword overrides a base-config attribute (e.g. `hidden_dropout_prob=0.0`).

        Example:
            ```python
            config = PADMoEConfig.from_base("bert-base-uncased", dynamic_ratio=0.5, num_labels=2)
            ```
        """
        if isinstance(pretrained_model_name_or_path, PreTrainedConfig):
            base = pretrained_model_name_or_path.__class__.from_dict(pretrained_model_name_or_path.to_dict())
        else:
            base = AutoConfig.from_pretrained(pretrained_model_name_or_path, **(hub_kwargs or {}))
        if base.model_type == cls.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path!r} is already a PAD-MoE checkpoint; load it with "
                "`AutoModel*.from_pretrained` directly instead of `PADMoEConfig.from_base`."
            )
        pad_fields = {f for f in cls.__dataclass_fields__ if f not in PreTrainedConfig.__dataclass_fields__}
        pad_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in pad_fields}
        cls._route_to_base(base, kwargs)
        config = cls(
            base_config=base,
            num_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            dynamic_ratio=dynamic_ratio,
            **pad_kwargs,
        )
        config._mirror_head_of_base()
        return config

    def get_text_config(self, *args: Any, **kwargs: Any) -> PreTrainedConfig:
        # Overridden: Transformers finds the text config of composite configs under fixed attribute names
        # (`text_config`, ...); a PAD config keeps it as `base_config` (vocab size, embeddings, resizing).
        return self.base_config.get_text_config(*args, **kwargs)

    @property
    def base_model_type(self) -> str:
        return self.base_config.model_type

    @property
    def is_partitioned(self) -> bool:
        return self.partition is not None

