"""`PADMoEConfig`: a BERT-family config wrapped with the PAD-MoE options.

The config nests the dense base model's config (`base_config`, any of the families in
`architectures.PAD_FFN_LAYOUTS`) and adds the fields that turn its feed-forward blocks into
partially dynamic Mixture-of-Experts layers (PAD-Net, He et al. 2023, eq. 4).
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import AutoConfig, PreTrainedConfig

from ._compat import SubConfigSpec, own_config_fields
from .architectures import PAD_FFN_LAYOUTS
from .configuration_common import NumberField, PADConfigMixin
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

    Numbers: numeric fields (and the items of `moe_layers`) are stored as plain Python numbers: a numpy scalar, a
    0-d numpy array or a 0-d torch tensor is converted when set (at construction and on assignment), so the config
    saves as JSON. Assigning a PAD field after construction validates it; an invalid value raises a `ValueError`
    and the field keeps its old value.

    Task head: this config owns `num_labels`, `id2label`, `label2id` and `problem_type`; the head is built from
    `base_config`, which gets them from here. Given to the constructor (or `from_base`), they win over the base
    config's (a warning names a different value it had); not given, they are taken from the base config. Setting
    one later on this config (`config.num_labels = 3`, `from_pretrained(..., num_labels=3)`) writes it through to
    `base_config`. Do not set them on `config.base_config`: `sync_base_config` (run when a model is built, a
    config loaded or saved) raises a `ValueError` naming both values. One exception: `problem_type=None` here
    means "inferred", and the family head sets it on `base_config` at its first forward with labels; that value
    is taken over.
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

    number_fields: ClassVar[dict[str, NumberField]] = {
        "num_experts": NumberField(integer=True, low=1),
        "num_experts_per_tok": NumberField(integer=True, low=1),  # and <= num_experts: `validate_pad_fields`
        "dynamic_ratio": NumberField(low=0, high=1, open_low=True),
        "router_aux_loss_coef": NumberField(low=0),
        "router_z_loss_coef": NumberField(low=0),
        "router_jitter_noise": NumberField(low=0, high=1, open_high=True),
    }
    number_list_fields: ClassVar[tuple[str, ...]] = ("moe_layers",)

    def __post_init__(self, **kwargs):
        given = self._given_head_fields(self, kwargs)
        super().__post_init__(**kwargs)
        self.validate_pad_fields()
        self._sync_head_fields(given)

    def validate_pad_fields(self) -> None:
        """Raise a `ValueError` naming the field and the allowed values for any invalid PAD field."""
        base_type = getattr(self.base_config, "model_type", None)
        if base_type not in PAD_FFN_LAYOUTS:
            raise ValueError(
                f"base_config.model_type={base_type!r} has no PAD-MoE FFN mapping; supported model types: "
                f"{sorted(PAD_FFN_LAYOUTS)}."
            )
        super().validate_pad_fields()
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be an integer in [1, num_experts={self.num_experts}], "
                f"got {self.num_experts_per_tok!r}."
            )
        if self.scale_factor_mode not in SCALE_FACTOR_MODES:
            raise ValueError(
                f"scale_factor_mode must be one of {list(SCALE_FACTOR_MODES)}, got {self.scale_factor_mode!r}."
            )
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
        pad_fields = set(own_config_fields(cls))
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

