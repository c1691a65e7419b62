"""PAD-MoE model classes: a dense BERT-family model with its FFN blocks replaced by PAD-MoE layers.

Each PAD class wraps the family's own Transformers class for the same head (`self.model`, e.g. a
`BertForSequenceClassification`), so embeddings, attention, heads and losses are the family's own
code; only the FFN blocks are swapped (see `architectures.py`). The wrapper adds the router losses
to the task loss and returns the router outputs.

Entry points:
    config = PADMoEConfig.from_base(dense_path, num_labels=2)
    model = AutoModelForSequenceClassification.from_pretrained(dense_path, config=config)  # upcycle
    model.save_pretrained("out"); AutoModelForSequenceClassification.from_pretrained("out")  # PAD checkpoint
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.utils import ModelOutput, logging

from .architectures import get_layout, get_submodule_parent, iter_layers
from .configuration_pad_moe import PADMoEConfig
from .input_checks import check_attention_mask, diagnose_inputs
from .moe import PADMoEFeedForward

logger = logging.get_logger(__name__)

_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


def convert_ffn_to_pad_moe(base_model: nn.Module, config: PADMoEConfig) -> list[PADMoEFeedForward]:
    """Replace the FFN of the selected layers of `base_model` (the family's base model) in place.

    Each PAD-MoE layer is upcycled from the FFN it replaces, so the output is unchanged as long
    as the experts are not trained apart. Returns the new layers in order.
    """
    layout = get_layout(config.base_model_type)
    try:
        layers = list(iter_layers(base_model, layout))
    except (AttributeError, TypeError) as error:
        raise ValueError(
            f"The PAD-MoE FFN layout of {config.base_model_type!r} (layers at {layout.layers!r}) does not match the "
            f"{type(base_model).__name__} it was applied to: {error}. Pass the family's base model (`model.base_model`) "
            "or fix the `FFNLayout` row in `pad_moe_transformers.architectures.PAD_FFN_LAYOUTS`."
        ) from None
    selected = range(len(layers)) if config.moe_layers is None else config.moe_layers
    out_of_range = [i for i in selected if i >= len(layers)]
    if out_of_range:
        raise ValueError(
            f"moe_layers={config.moe_layers} names layers {out_of_range}, but the "
            f"{config.base_model_type} model has {len(layers)} FFN layers (0..{len(layers) - 1})."
        )
    std = getattr(config.base_config, "initializer_range", 0.02)
    moe_layers = []
    for index in selected:
        layer = layers[index]
        try:
            in_parent, in_name = get_submodule_parent(layer, layout.ffn_in)
            act_parent, act_name = get_submodule_parent(layer, layout.activation)
            out_parent, out_name = get_submodule_parent(layer, layout.ffn_out)
            fc_in, activation, fc_out = getattr(in_parent, in_name), getattr(act_parent, act_name), getattr(out_parent, out_name)
        except AttributeError as error:
            raise ValueError(
                f"Layer {index} ({type(layer).__name__}) has no FFN at the paths of the {config.base_model_type!r} "
                f"layout ({layout.ffn_in!r}, {layout.activation!r}, {layout.ffn_out!r}): {error}. Fix the `FFNLayout` "
                "row in `pad_moe_transformers.architectures.PAD_FFN_LAYOUTS`."
            ) from None
        if not isinstance(fc_in, nn.Linear) or not isinstance(fc_out, nn.Linear):
            raise TypeError(
                f"Layer {index}: expected nn.Linear at {layout.ffn_in!r} and {layout.ffn_out!r}, found "
                f"{type(fc_in).__name__} and {type(fc_out).__name__} (already converted?)."
            )
        if not isinstance(activation, nn.Module):  # a plain function given as `hidden_act`
            activation = _FunctionModule(activation)
        moe = PADMoEFeedForward.from_dense(
            fc_in,
            activation,
            fc_out,
            num_experts=config.num_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            scale_factor_mode=config.scale_factor_mode,
            router_jitter_noise=float(config.router_jitter_noise),
            router_init_std=std,
            partition_granularity=config.partition_granularity,
        )
        # Mark the new parameters initialised so HF's init pass in `post_init` leaves the upcycled copies alone.
        for tensor in list(moe.parameters()) + list(moe.buffers()):
            tensor._is_hf_initialized = True
        setattr(in_parent, in_name, moe)
        setattr(act_parent, act_name, nn.Identity())
        setattr(out_parent, out_name, nn.Identity())
        moe_layers.append(moe)
    return moe_layers


class _FunctionModule(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


@functools.cache
def _pad_output_class(base_cls: type[ModelOutput]) -> type[ModelOutput]:
    """The family's output class plus the router fields (`aux_loss`, `z_loss`, `router_logits`)."""
    namespace = {
        "__annotations__": {"aux_loss": Tensor | None, "z_loss": Tensor | None, "router_logits": tuple | None},
        "__doc__": f"{base_cls.__name__} with the PAD-MoE router outputs: `aux_loss` and `z_loss` (mean over "
        "MoE layers, unweighted) and, when requested, `router_logits` (one `(N_real, E)` tensor per layer call).",
        "__module__": __name__,
        "aux_loss": None,
        "z_loss": None,
        "router_logits": None,
    }
    return dataclass(type(f"PADMoE{base_cls.__name__}", (base_cls,), namespace))


@dataclass
class LayerParameterCount:
    layer: int
    linear: str
    dynamic_ratio: float
    dynamic: int
    """Weight entries that are dynamic, over all experts (`E * nnz(M)`)."""
    static: int
    """Weight entries of the shared static weight that are used (`numel - nnz(M)`)."""
    other: int
    """Biases and scale factors of the linear."""

    @property
    def total(self) -> int:
        return self.dynamic + self.static + self.other


@dataclass
class ParameterReport:
    """Parameter counts as the paper counts them: after partition, each expert counts only its
    dynamic entries and the static weight only its static entries (the compact size)."""

    layers: list[LayerParameterCount] = field(default_factory=list)
    router: int = 0
    non_moe: int = 0
    moe_equivalent: int = 0
    """Parameters of the same model as a fully dynamic MoE (every expert dense)."""
    dense_equivalent: int = 0
    """Parameters of the dense model it was upcycled from."""

    @property
    def dynamic(self) -> int:
        return sum(row.dynamic for row in self.layers)

    @property
    def static(self) -> int:
        return sum(row.static for row in self.layers)

    @property
    def total(self) -> int:
        return self.dynamic + self.static + sum(row.other for row in self.layers) + self.router + self.non_moe

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "dynamic": self.dynamic,
            "static": self.static,
            "router": self.router,
            "non_moe": self.non_moe,
            "moe_equivalent": self.moe_equivalent,
            "dense_equivalent": self.dense_equivalent,
            "layers": [dict(vars(row), total=row.total) for row in self.layers],
        }


class PADMoEPreTrainedModel(PreTrainedModel):
    config_class = PADMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _keep_in_fp32_modules = ["router"]
    # The wrapped families' heads return a mean loss and ignore `num_items_in_batch`. Without this flag
    # Trainer (seeing `**kwargs` in `forward`) would pass it, skip its division by the gradient
    # accumulation steps and multiply the loss by the number of DDP ranks.
    accepts_loss_kwargs = False
    _auto_class_for_head: ClassVar[type] = AutoModel
    """The Transformers Auto class that builds the wrapped family model for this head."""

    def __init__(self, config: PADMoEConfig, base_model: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        if base_model is None:
            base_model = self._auto_class_for_head.from_config(config.base_config)
        self.model = base_model
        self.moe_layers = convert_ffn_to_pad_moe(self.model.base_model, config)
        self.post_init()

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """Load a PAD-MoE checkpoint, or upcycle a dense checkpoint when given a `PADMoEConfig`.

        With `config=PADMoEConfig.from_base(dense)` and a dense checkpoint, the dense model is loaded
        with its own class and every FFN is copied into each expert and into the static weights.
        """
        if pretrained_model_name_or_path is not None and kwargs.get("state_dict") is None:
            hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
            checkpoint_type = PreTrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub_kwargs)[0].get(
                "model_type"
            )
            if isinstance(config, PADMoEConfig) and checkpoint_type != PADMoEConfig.model_type:
                return cls._upcycle(pretrained_model_name_or_path, checkpoint_type, config, *model_args, **kwargs)
            if checkpoint_type == PADMoEConfig.model_type:  # a PAD checkpoint: see "checkpoints" below
                return cls._load_pad_checkpoint(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)

    @classmethod
    def _upcycle(cls, path, checkpoint_type: str | None, config: PADMoEConfig, *model_args, **kwargs):
        if checkpoint_type != config.base_model_type:
            raise ValueError(
                f"The checkpoint at {path!r} is a {checkpoint_type!r} model but the PAD config wraps a "
                f"{config.base_model_type!r} config; build the config with PADMoEConfig.from_base({str(path)!r})."
            )
        dense = cls._auto_class_for_head.from_pretrained(path, *model_args, config=config.base_config, **kwargs)
        config.base_config = dense.config
        config.dtype = dense.config.dtype
        model = cls(config, base_model=dense)
        model.name_or_path = str(path)
        model.eval()  # like from_pretrained: the model comes back in eval mode
        return model

    # ------------------------------------------------------------------------- checkpoints & Hub (issue #4)
    # Compact safetensors checkpoints (docs/checkpoint_format.md) and the generated model card. Thin
    # hooks: the logic lives in the `checkpoint` package and `modelcard.py`.
    @classmethod
    def _load_pad_checkpoint(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """Load a checkpoint written by `save_pretrained`: validated and decoded by the `checkpoint` package,
        then built by Transformers' loader from the dense state dict (dtype, device map, fp32 router)."""
        from .checkpoint import load_pad_checkpoint

        return load_pad_checkpoint(
            cls, pretrained_model_name_or_path, model_args, config, kwargs, super().from_pretrained
        )

    def save_pretrained(
        self,
        save_directory,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        push_to_hub: bool = False,
        max_shard_size: int | str = "50GB",
        variant: str | None = None,
        token: str | bool | None = None,
        save_peft_format: bool = True,
        save_original_format: bool = True,
        distributed_checkpoint: bool = False,
        **kwargs,
    ):
        """Save the config, the compact PAD checkpoint (safetensors; masks bit-packed, only the used
        entries of the expert and static weights) and a generated model card (README.md).

        Same arguments as `PreTrainedModel.save_pretrained`, plus `model_card=False` to skip the card and
        `base_model=`, `eval_results=` (`{metric: value}`), `tags=` for it. Adapters (PEFT), distributed
        and quantized checkpoints fall back to Transformers' own format.
        """
        if distributed_checkpoint or getattr(self, "_hf_peft_config_loaded", False) or getattr(self, "hf_quantizer", None):
            for key in ("model_card", "base_model", "eval_results", "tags"):
                kwargs.pop(key, None)
            return super().save_pretrained(
                save_directory, is_main_process=is_main_process, state_dict=state_dict, push_to_hub=push_to_hub,
                max_shard_size=max_shard_size, variant=variant, token=token, save_peft_format=save_peft_format,
                save_original_format=save_original_format, distributed_checkpoint=distributed_checkpoint, **kwargs,
            )
        from .checkpoint import save_pad_pretrained

        save_pad_pretrained(
            self, save_directory, is_main_process=is_main_process, state_dict=state_dict, push_to_hub=push_to_hub,
            max_shard_size=max_shard_size, variant=variant, token=token, **kwargs,
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | str | None = None,
        base_model: str | None = None,
        eval_results: dict | None = None,
    ):
        """Upload the compact checkpoint, config and generated model card to the Hub (through
        `huggingface_hub`'s `create_repo` / `create_commit`, as `PreTrainedModel.push_to_hub` does)."""
        from .checkpoint import push_pad_to_hub

        return push_pad_to_hub(
            self, repo_id, commit_message=commit_message, commit_description=commit_description, private=private,
            token=token, revision=revision, create_pr=create_pr, max_shard_size=max_shard_size, tags=tags,
            base_model=base_model, eval_results=eval_results,
        )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """`nn.Module.load_state_dict` that also accepts the tensors of a PAD checkpoint file (compact
        or plain-MoE entries of the PAD linears are decoded first), e.g. when Trainer resumes from one."""
        from .checkpoint import expand_compact_entries

        return super().load_state_dict(expand_compact_entries(self, state_dict), strict=strict, assign=assign)

    # ----------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        start_positions: Tensor | None = None,
        end_positions: Tensor | None = None,
        output_router_logits: bool | None = None,
        **kwargs: Any,
    ) -> ModelOutput:
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "position_ids": position_ids,
            "inputs_embeds": inputs_embeds,
            "labels": labels,
            "start_positions": start_positions,
            "end_positions": end_positions,
        }
        inputs = {k: v for k, v in inputs.items() if v is not None}
        kwargs.pop("return_dict", None)
        check_attention_mask(attention_mask, input_ids if input_ids is not None else inputs_embeds)
        token_mask = None if attention_mask is None else attention_mask.bool()
        for moe in self.moe_layers:
            moe.token_mask = token_mask
            moe.router_records.clear()
        try:
            outputs = self.model(**inputs, **kwargs, return_dict=True)
        except (IndexError, RuntimeError, ValueError) as error:
            # Only on the error path: name the bad input instead of the raw indexing/shape error.
            try:
                problem = diagnose_inputs(self.config, inputs, self._label_classes())
            except Exception:  # e.g. a device that cannot be read after a device-side assert
                problem = None
            if problem is not None:
                raise ValueError(problem) from error
            raise
        finally:
            for moe in self.moe_layers:
                moe.token_mask = None
        records = [record for moe in self.moe_layers for record in moe.router_records]
        for moe in self.moe_layers:
            moe.router_records = []
        aux_loss = torch.stack([r.aux_loss for r in records]).mean()
        z_loss = torch.stack([r.z_loss for r in records]).mean()
        loss = outputs.get("loss")
        if loss is not None:
            loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.dtype)
            if self.config.router_z_loss_coef > 0:
                loss = loss + self.config.router_z_loss_coef * z_loss.to(loss.dtype)
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        fields = dict(outputs.items())
        if loss is not None:
            fields["loss"] = loss
        return _pad_output_class(type(outputs))(
            **fields,
            aux_loss=aux_loss,
            z_loss=z_loss,
            router_logits=tuple(r.logits for r in records) if output_router_logits else None,
        )

    def _label_classes(self) -> int | None:
        """Number of classes the `labels` index (None when labels are not class ids)."""
        return getattr(self.config.base_config, "num_labels", None)

    # ----------------------------------------------------------------------------------- reports
    def named_pad_layers(self) -> list[tuple[int, PADMoEFeedForward]]:
        """`(layer index, PAD-MoE layer)` pairs in order."""
        indices = range(len(self.moe_layers)) if self.config.moe_layers is None else self.config.moe_layers
        return list(zip(indices, self.moe_layers))

    def expert_usage(self) -> dict[int, list[int]]:
        """Tokens routed to each expert per layer since the last `reset_expert_usage()` (counts top-k slots)."""
        return {index: moe.expert_counts.tolist() for index, moe in self.named_pad_layers()}

    def reset_expert_usage(self) -> None:
        for moe in self.moe_layers:
            moe.reset_expert_usage()

    def parameter_report(self) -> ParameterReport:
        """Total / dynamic / static parameter counts per layer and in all, counted as in the paper."""
        report = ParameterReport()
        moe_param_ids = set()
        for index, moe in self.named_pad_layers():
            moe_param_ids.update(id(p) for p in moe.parameters())
            report.router += moe.router.weight.numel()
            for name, linear in moe.pad_linears().items():
                nnz = linear.num_dynamic()
                other = sum(p.numel() for n, p in linear.named_parameters() if n not in ("expert_weight", "static_weight"))
                report.layers.append(
                    LayerParameterCount(
                        layer=index,
                        linear=name,
                        dynamic_ratio=nnz / linear.mask.numel(),
                        dynamic=linear.num_experts * nnz,
                        static=linear.mask.numel() - nnz,
                        other=other,
                    )
                )
                bias = 0 if linear.expert_bias is None else linear.out_features
                report.moe_equivalent += linear.num_experts * (linear.mask.numel() + bias)
                report.dense_equivalent += linear.mask.numel() + bias
        report.non_moe = sum(p.numel() for p in self.parameters() if id(p) not in moe_param_ids)
        report.moe_equivalent += report.non_moe + report.router
        report.dense_equivalent += report.non_moe
        return report


class PADMoEModel(PADMoEPreTrainedModel):
    _auto_class_for_head = AutoModel


class PADMoEForSequenceClassification(PADMoEPreTrainedModel):
    _auto_class_for_head = AutoModelForSequenceClassification


class PADMoEForTokenClassification(PADMoEPreTrainedModel):
    _auto_class_for_head = AutoModelForTokenClassification


class PADMoEForQuestionAnswering(PADMoEPreTrainedModel):
    _auto_class_for_head = AutoModelForQuestionAnswering

    def _label_classes(self) -> int | None:
        return None


class PADMoEForMaskedLM(PADMoEPreTrainedModel):
    _auto_class_for_head = AutoModelForMaskedLM

    def _label_classes(self) -> int | None:
        return getattr(self.config.base_config, "vocab_size", None)


PAD_MODEL_CLASSES: dict[type, type[PADMoEPreTrainedModel]] = {
    AutoModel: PADMoEModel,
    AutoModelForSequenceClassification: PADMoEForSequenceClassification,
    AutoModelForTokenClassification: PADMoEForTokenClassification,
    AutoModelForQuestionAnswering: PADMoEForQuestionAnswering,
    AutoModelForMaskedLM: PADMoEForMaskedLM,
}
