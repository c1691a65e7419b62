"""Output classes of the PAD-MoE models: the Transformers output of each head plus the router fields.

Static classes (defined at import, not built at run time), so outputs pickle and `to_tuple()` is stable.
The base-model class is the superset of the families' base outputs (fields a family does not return
stay None and are left out of `to_tuple()`). The router fields are None unless asked for (as in Mixtral), so a
default output holds only batch-leading tensors and pipelines can split it per item.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndCrossAttentions,
    MaskedLMOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

_ROUTER_FIELDS_DOC = """
    aux_loss (`torch.Tensor`, 0-d, *optional*, when a loss is computed (labels given) or with
        `output_router_logits=True`): load-balancing loss (mean over MoE layer calls, real tokens only, unweighted).
    z_loss (`torch.Tensor`, 0-d, *optional*, as `aux_loss`): router z-loss (mean over MoE layer calls, real tokens
        only, unweighted).
    router_logits (`tuple[torch.Tensor]`, *optional*, with `output_router_logits=True`): one `(batch * seq, E)`
        fp32 tensor per MoE layer call, padding positions included (mask them with the attention mask).
"""


@dataclass
class PADMoEModelOutput(BaseModelOutputWithPoolingAndCrossAttentions):
    __doc__ = (BaseModelOutputWithPoolingAndCrossAttentions.__doc__ or "") + _ROUTER_FIELDS_DOC
    aux_loss: Tensor | None = None
    z_loss: Tensor | None = None
    router_logits: tuple[Tensor, ...] | None = None


@dataclass
class PADMoESequenceClassifierOutput(SequenceClassifierOutput):
    __doc__ = (SequenceClassifierOutput.__doc__ or "") + _ROUTER_FIELDS_DOC
    aux_loss: Tensor | None = None
    z_loss: Tensor | None = None
    router_logits: tuple[Tensor, ...] | None = None


@dataclass
class PADMoETokenClassifierOutput(TokenClassifierOutput):
    __doc__ = (TokenClassifierOutput.__doc__ or "") + _ROUTER_FIELDS_DOC
    aux_loss: Tensor | None = None
    z_loss: Tensor | None = None
    router_logits: tuple[Tensor, ...] | None = None


@dataclass
class PADMoEQuestionAnsweringModelOutput(QuestionAnsweringModelOutput):
    __doc__ = (QuestionAnsweringModelOutput.__doc__ or "") + _ROUTER_FIELDS_DOC
    aux_loss: Tensor | None = None
    z_loss: Tensor | None = None
    router_logits: tuple[Tensor, ...] | None = None


@dataclass
class PADMoEMaskedLMOutput(MaskedLMOutput):
    __doc__ = (MaskedLMOutput.__doc__ or "") + _ROUTER_FIELDS_DOC
    aux_loss: Tensor | None = None
    z_loss: Tensor | None = None
    router_logits: tuple[Tensor, ...] | None = None
