"""PAD-MoE model classes: a dense BERT-family model with its FFN blocks replaced by PAD-MoE layers.

Each PAD class wraps the family's own Transformers class for the same head (`self.model`, e.g. a
`BertForSequenceClassification`), so embeddings, attention, heads and losses are the family's own code;
only the FFN blocks are swapped (see `architectures.py`, `conversion.py`). The wrapper adds the router
losses to the task loss and returns the router outputs.

Entry points:
    config = PADMoEConfig.from_base(dense_path, num_labels=2)
    model = AutoModelForSequenceClassification.from_pretrained(dense_path, config=config)  # upcycle
    model.save_pretrained("out"); AutoModelForSequenceClassification.from_pretrained("out")  # PAD checkpoint
"""

# No `from __future__ import annotations` here: Transformers inspects the `forward` annotations at run time
# (`**kwargs: Unpack[TransformersKwargs]` says which outputs can be requested, the return type which fields exist).
from typing import ClassVar

import torch
from torch import Tensor
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, logging

from ._compat import set_own_experts_implementation
from .architectures import PAD_FFN_LAYOUTS, get_layout, iter_layers
from .checkpoint.hub import push_pad_to_hub
from .checkpoint.load import initialize_pad_weight, pad_from_pretrained
from .checkpoint.save import pad_save_pretrained
from .configuration_pad_moe import PADMoEConfig
from .conversion import convert_ffn_to_pad_moe
from .core.pad_weight import PADMergeMixin, PADWeight
from .input_checks import check_attention_mask, diagnose_inputs
from .modeling_outputs import (
    PADMoEMaskedLMOutput,
    PADMoEModelOutput,
    PADMoEQuestionAnsweringModelOutput,
    PADMoESequenceClassifierOutput,
    PADMoETokenClassifierOutput,
)
from .moe import PADMoEFeedForward
from .reports import ParameterReport, parameter_report
from .router import TopKRouter, expert_counts, load_balancing_loss, router_z_loss
from .routing_records import RoutingRecord, recording_routing

logger = logging.get_logger(__name__)


class PADMoEPreTrainedModel(PADMergeMixin, PreTrainedModel):
    config_class = PADMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # The router stays fp32 when the model is loaded in fp16 *or* bf16 (its math is fp32 in any case).
    _keep_in_fp32_modules_strict = ["router"]
    # A never-partitioned checkpoint ("moe" layout) stores the experts only; the static weights and masks
    # are rebuilt by `initialize_weights` (static = mean of the experts, mask all dynamic).
    _keys_to_ignore_on_load_missing = [r"\.fc_(in|out)\.static_weight$", r"\.fc_(in|out)\.mask$"]
    # The wrapped families' heads return a mean loss and ignore `num_items_in_batch`. Without this flag
    # Trainer (seeing `**kwargs` in `forward`) would pass it, skip its division by the gradient
    # accumulation steps and multiply the loss by the number of DDP ranks.
    accepts_loss_kwargs = False
    _auto_class_for_head: ClassVar[type] = AutoModel
    """The Transformers Auto class that builds the wrapped family model for this head."""
    _output_class: ClassVar[type[ModelOutput]] = PADMoEModelOutput

    def __init__(self, config: PADMoEConfig, base_model: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        config.sync_base_config()
        # The experts backend belongs to the PAD layers. Transformers' config setter also hands it to the family config,
        # whose model has no experts and refuses an explicit grouped_mm: the family model keeps its own default.
        set_own_experts_implementation(config.base_config, None)
        # Given a model, its FFNs are upcycled: every expert is a copy (exact at init). Built from the config alone,
        # the FFNs are random and identical experts would only be told apart by the router, so they are drawn
        # independently instead (`initialize_weights`, in `post_init`), as any MoE built from its config.
        upcycle = base_model is not None
        if base_model is None:
            base_model = self._auto_class_for_head.from_config(config.base_config)
        self.model = base_model
        convert_ffn_to_pad_moe(self.model.base_model, config, keep_copies=upcycle)
        num_layers = len(self.named_pad_layers())
        # Tokens routed to each expert of each MoE layer since `reset_expert_usage()`: cumulative statistics
        # (like BatchNorm's running stats), updated once per forward from that forward's routing record.
        self.register_buffer(
            "expert_counts", torch.zeros(num_layers, config.num_experts, dtype=torch.long), persistent=False
        )
        self.post_init()

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # Transformers decides this by finding its `use_experts_implementation` decorator in the model's source. The PAD
        # layers run their experts through the same `ALL_EXPERTS_FUNCTIONS` (`experts.py`, eq. 4 weights passed
        # in), which that heuristic cannot see; so `experts_implementation=` and `set_experts_implementation` apply.
        return True

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        # Transformers' default is grouped_mm. On the CPU the per-expert loop is faster (benchmarks/results/speed.json:
        # MoE FFN forward 0.76x / forward+backward 0.72x of grouped_mm, fp32, torch 2.13), and its host
        # synchronisation costs nothing there; so without a CUDA device the default is eager. An explicit
        # `experts_implementation=` is always kept.
        if requested_experts is None and not torch.cuda.is_available():
            requested_experts = "eager"
        return super().get_correct_experts_implementation(requested_experts)

    # ----------------------------------------------------------------------------------- structure
    def named_pad_layers(self) -> list[tuple[int, PADMoEFeedForward]]:
        """`(layer index, PAD-MoE layer)` pairs in order (ALBERT: one per distinct shared layer)."""
        layout = get_layout(self.config.base_model_type)
        layers = list(iter_layers(self.model.base_model, layout))
        indices = range(len(layers)) if self.config.moe_layers is None else self.config.moe_layers
        in_path = layout.ffn_in
        return [(index, layers[index].get_submodule(in_path)) for index in indices]

    @property
    def moe_layers(self) -> list[PADMoEFeedForward]:
        return [moe for _, moe in self.named_pad_layers()]

    # ----------------------------------------------------------------------------------- init
    def initialize_weights(self) -> None:
        # Extended, not replaced: Transformers hands the wrapped family model's subtree to that family's own
        # `_init_weights`, which does not know the PAD modules inside it. They are initialised here, and only
        # the tensors Transformers has not marked as loaded (so loading a "moe"-layout checkpoint rebuilds the
        # static weights from the loaded experts, and upcycled copies are left alone).
        super().initialize_weights()
        std = getattr(self.config.base_config, "initializer_range", 0.02)
        for module in self.modules():
            if isinstance(module, TopKRouter):
                init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, PADWeight):
                initialize_pad_weight(module, lambda weight: init.normal_(weight, mean=0.0, std=std))
        init.zeros_(self.expert_counts)

    # ----------------------------------------------------------------------------------- loading & saving
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """Load a PAD-MoE checkpoint, or upcycle a dense checkpoint when given a `PADMoEConfig`.

        With `config=PADMoEConfig.from_base(dense)` and a dense checkpoint, the dense model is loaded with its
        own class and every FFN is copied into each expert and into the static weights.
        """
        # Overridden for what Transformers' loader has no hook for: upcycling a checkpoint of another model
        # type, and the family's base-model prefix one level down (`model.bert.` vs `model.`) across heads.
        return pad_from_pretrained(
            cls, pretrained_model_name_or_path, model_args, config, kwargs, super().from_pretrained, PAD_FFN_LAYOUTS
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save the config, the compact PAD checkpoint (safetensors; masks bit-packed, only the used entries of
        the expert and static weights) and a generated model card (README.md).

        Same arguments as `PreTrainedModel.save_pretrained`, plus `model_card=False` to skip the card and
        `base_model=`, `eval_results=` (`{metric: value}`), `tags=` for it. Adapters (PEFT), distributed and
        quantized checkpoints fall back to Transformers' own format.
        """
        # Overridden because the compact format (bit-packed masks, per-file PAD metadata, a PAD linear never
        # split across shards, generated model card) is not expressible through Transformers' writer.
        return pad_save_pretrained(self, save_directory, args, kwargs, super().save_pretrained)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload the compact checkpoint, config and generated model card to the Hub."""
        # Overridden: Transformers' push_to_hub replaces the README that save_pretrained wrote with the repo's
        # card or a generic one.
        return push_pad_to_hub(self, repo_id, **kwargs)

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
        return_dict: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ModelOutput | tuple:
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
        check_attention_mask(attention_mask, input_ids if input_ids is not None else inputs_embeds)
        with recording_routing() as records:
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
        loss = outputs.get("loss")
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        # As Mixtral: the router losses only when a loss is computed (labels given) or router outputs are asked
        # for. Returned by default they would be 0-d fields in every output, which pipelines cannot split per
        # item (batch_size > 1) and which Trainer.predict would have to skip.
        aux_loss, z_loss = self._router_losses(
            records, attention_mask, with_losses=loss is not None or bool(output_router_logits)
        )
        if loss is not None:
            loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.dtype)
            if self.config.router_z_loss_coef > 0:
                loss = loss + self.config.router_z_loss_coef * z_loss.to(loss.dtype)
        fields = dict(outputs.items())
        if loss is not None:
            fields["loss"] = loss
        result = self._output_class(
            **fields,
            aux_loss=aux_loss,
            z_loss=z_loss,
            router_logits=tuple(r.decision.logits for r in records) if output_router_logits else None,
        )
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return result if return_dict else result.to_tuple()

    def _router_losses(
        self, records: list[RoutingRecord], attention_mask: Tensor | None, with_losses: bool = True
    ) -> tuple[Tensor | None, Tensor | None]:
        """Mean load-balancing and z-loss over the MoE layer calls, on the real tokens (`(None, None)` with
        `with_losses=False`); counts expert usage in either case.

        Padding is left out by weighting tokens with the attention mask (not by indexing the real tokens out):
        no data-dependent shapes, so the forward stays free of host synchronisation and compiles as one graph.
        """
        token_weights = None if attention_mask is None else attention_mask.reshape(-1)
        layer_index = {id(moe): row for row, moe in enumerate(self.moe_layers)}
        aux, z = [], []
        for record in records:
            decision = record.decision
            if with_losses:
                aux.append(
                    load_balancing_loss(decision.probs, decision.experts, self.config.num_experts, token_weights)
                )
                z.append(router_z_loss(decision.logits, token_weights))
            with torch.no_grad():
                self.expert_counts[layer_index[id(record.layer)]] += expert_counts(
                    decision.experts, self.config.num_experts, token_weights
                ).to(self.expert_counts.device)
        if not with_losses:
            return None, None
        return torch.stack(aux).mean(), torch.stack(z).mean()

    def _label_classes(self) -> int | None:
        """Number of classes the `labels` index (None when labels are not class ids)."""
        return getattr(self.config.base_config, "num_labels", None)

    # ----------------------------------------------------------------------------------- reports
    def expert_usage(self) -> dict[int, list[int]]:
        """Real tokens routed to each expert per layer since the last `reset_expert_usage()` (top-k slots)."""
        return {index: row.tolist() for (index, _), row in zip(self.named_pad_layers(), self.expert_counts)}

    def reset_expert_usage(self) -> None:
        self.expert_counts.zero_()

    def parameter_report(self) -> ParameterReport:
        """Total / dynamic / static parameter counts per layer and in all, counted as in the paper."""
        return parameter_report(self)


class PADMoEModel(PADMoEPreTrainedModel):
    _auto_class_for_head = AutoModel
    _output_class = PADMoEModelOutput


class PADMoEForSequenceClassification(PADMoEPreTrainedModel):
    _auto_class_for_head = AutoModelForSequenceClassification
    _output_class = PADMoESequenceClassifierOutput


class PADMoEForTokenClassification(PADMoEPreTrainedModel):
    _auto_class_for_head = AutoModelForTokenClassification
    _output_class = PADMoETokenClassifierOutput


class PADMoEForQuestionAnswering(PADMoEPreTrainedModel):
    _auto_class_for_head = AutoModelForQuestionAnswering
    _output_class = PADMoEQuestionAnsweringModelOutput

    def _label_classes(self) -> int | None:
        return None


class PADMoEForMaskedLM(PADMoEPreTrainedModel):
    _auto_class_for_head = AutoModelForMaskedLM
    _output_class = PADMoEMaskedLMOutput

    def _label_classes(self) -> int | None:
        return getattr(self.config.base_config, "vocab_size", None)


PAD_MODEL_CLASSES: dict[type, type[PADMoEPreTrainedModel]] = {
    AutoModel: PADMoEModel,
    AutoModelForSequenceClassification: PADMoEForSequenceClassification,
    AutoModelForTokenClassification: PADMoEForTokenClassification,
    AutoModelForQuestionAnswering: PADMoEForQuestionAnswering,
    AutoModelForMaskedLM: PADMoEForMaskedLM,
}
