"""Clear errors for bad model inputs.

The wrapped families report bad inputs (token ids outside the vocabulary, too-long sequences, labels
outside the classes, ...) as raw `IndexError`s or shape errors deep inside embedding or loss code.
`diagnose_inputs` runs only after a forward has failed, so good inputs pay nothing for it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .configuration_pad_moe import PADMoEConfig


def check_attention_mask(attention_mask: Tensor | None, reference: Tensor | None) -> None:
    """A 2-D attention mask must have the `(batch, seq)` shape of the inputs: the MoE layers use it to
    skip padding tokens, and the families' own code may silently slice or broadcast a mismatched one."""
    if attention_mask is None or reference is None or attention_mask.dim() != 2:
        return
    if tuple(attention_mask.shape) != tuple(reference.shape[:2]):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the inputs have (batch, seq) = "
            f"{tuple(reference.shape[:2])}; pass one mask value per token (the tokenizer's `attention_mask`)."
        )


# Families whose position ids start after the padding index (positions 0..pad_token_id are reserved).
_OFFSET_POSITION_FAMILIES = ("roberta", "xlm-roberta", "camembert")


def diagnose_inputs(config: PADMoEConfig, inputs: dict[str, Any], label_classes: int | None) -> str | None:
    """A clear message for the bad inputs that the families report as a raw `IndexError` / shape error
    (token ids outside the vocabulary, too-long sequences, labels outside the classes, ...), or `None`."""
    base = config.base_config
    input_ids = inputs.get("input_ids")
    reference = input_ids if input_ids is not None else inputs.get("inputs_embeds")
    if reference is not None:
        expected = 2 if input_ids is not None else 3
        name = "input_ids" if input_ids is not None else "inputs_embeds"
        if reference.dim() != expected:
            return (
                f"{name} must have {expected} dimensions ({'batch, seq' if expected == 2 else 'batch, seq, hidden'}), "
                f"got shape {tuple(reference.shape)}; add the batch dimension, e.g. `{name}.unsqueeze(0)`."
            )
        if reference.shape[0] == 0 or reference.shape[1] == 0:
            return f"Empty batch: {name} has shape {tuple(reference.shape)}; every batch needs at least one token."
        if input_ids is not None and (input_ids.is_floating_point() or input_ids.is_complex()):
            return f"input_ids must be integer token ids (torch.long), got dtype {input_ids.dtype}."
        seq_len = reference.shape[1]
        max_positions = getattr(base, "max_position_embeddings", None)
        if max_positions is not None and inputs.get("position_ids") is None:
            if base.model_type in _OFFSET_POSITION_FAMILIES:
                max_positions -= (getattr(base, "pad_token_id", None) or 0) + 1
            if seq_len > max_positions:
                return (
                    f"Sequence length {seq_len} exceeds the model's {max_positions} positions "
                    f"(max_position_embeddings={base.max_position_embeddings}); truncate the inputs, e.g. "
                    f"tokenizer(..., truncation=True, max_length={max_positions})."
                )
    for name, limit in (
        ("input_ids", getattr(base, "vocab_size", None)),
        ("token_type_ids", getattr(base, "type_vocab_size", None)),
    ):
        ids = inputs.get(name)
        if ids is None or limit is None or ids.numel() == 0 or ids.is_floating_point():
            continue
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= limit:
            field_name = "vocab_size" if name == "input_ids" else "type_vocab_size"
            return (
                f"{name} holds values in [{low}, {high}] but the model has {field_name}={limit} "
                f"(valid ids 0..{limit - 1}); "
                "check that the tokenizer matches the model."
            )
    labels = inputs.get("labels")
    if labels is not None and label_classes and label_classes > 1 and not labels.is_floating_point() and labels.numel():
        real = labels[labels != -100]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= label_classes):
            return (
                f"labels hold class ids in [{int(real.min())}, {int(real.max())}] but the model has "
                f"{label_classes} classes "
                f"(valid 0..{label_classes - 1}, or -100 to ignore a position); build the config with the right "
                "num_labels."
            )
    return None
