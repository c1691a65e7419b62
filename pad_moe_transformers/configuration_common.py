"""What every PAD config shares: a nested base config whose task-head fields it mirrors, and keyword overrides
that belong to that base config (`PADMoEConfig` for text, `PADDyConvConfig` for vision)."""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import PreTrainedConfig

# Arguments of `from_base` that describe the task head; they go to the nested base config,
# which the head reads, and are mirrored on the PAD config, which Trainer/pipelines read.
_HEAD_FIELDS = ("num_labels", "id2label", "label2id", "problem_type")
_HEAD_MAPS = ("id2label", "label2id", "problem_type")


def _apply_head_fields(config: PreTrainedConfig, fields: dict[str, Any]) -> None:
    # `num_labels` rebuilds id2label/label2id, so it goes first and explicit maps override it.
    if "num_labels" in fields:
        config.num_labels = fields["num_labels"]
    for key in _HEAD_MAPS:
        if key in fields and fields[key] is not None:
            setattr(config, key, dict(fields[key]) if isinstance(fields[key], dict) else fields[key])
    if isinstance(config.id2label, dict):
        config.id2label = {int(k): v for k, v in config.id2label.items()}


class PADConfigMixin:
    """Mixed into a PAD config class (before `PreTrainedConfig`) that nests `base_config`."""

    is_pad_config: ClassVar[bool] = True  # the partition and checkpoint code accept any config marked so
    pad_kind: ClassVar[str] = "PAD"
    """How error messages name the config's kind of PAD model."""

    @classmethod
    def _route_to_base(cls, base: PreTrainedConfig, kwargs: dict[str, Any]) -> PreTrainedConfig:
        """`from_base`'s remaining keyword arguments: head fields and attributes of `base` are set on `base`; any
        other name raises a `ValueError` that lists the PAD fields. Returns `base`."""
        head_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _HEAD_FIELDS}
        for key, value in kwargs.items():
            if not hasattr(base, key):
                own = PreTrainedConfig.__dataclass_fields__
                pad_fields = sorted(f for f in cls.__dataclass_fields__ if f not in own)
                raise ValueError(
                    f"Unknown argument {key!r}: it is neither a {cls.pad_kind} field ({pad_fields}) "
                    f"nor an attribute of the {base.model_type} config."
                )
            setattr(base, key, value)
        _apply_head_fields(base, head_kwargs)
        return base

    def _mirror_head_of_base(self) -> None:
        """Take the head fields of the base config (after construction from it)."""
        _apply_head_fields(self, {k: getattr(self.base_config, k) for k in _HEAD_MAPS})

    def _sync_head_fields(self) -> None:
        """After `__post_init__`: the task-head fields live on both configs (Trainer and pipelines read this one,
        the head is built from the base config). A PAD config built around a base config with its own head (e.g.
        num_labels=1) takes it over unless it was given head fields of its own, which then win."""
        default_labels = {i: f"LABEL_{i}" for i in range(2)}
        if self.id2label == default_labels and self.base_config.id2label != default_labels:
            self._mirror_head_of_base()
        else:
            self.sync_base_config()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        """`PreTrainedConfig.from_dict`, plus: keyword overrides that are attributes of the base config
        (e.g. `hidden_dropout_prob=0.3` at `from_pretrained`) go to the base config, as they would for the
        plain family model, instead of being passed on to the model's `__init__`."""
        return_unused_kwargs = kwargs.pop("return_unused_kwargs", False)
        config, unused = super().from_dict(config_dict, return_unused_kwargs=True, **kwargs)
        for key in list(unused):
            if isinstance(config.base_config, PreTrainedConfig) and hasattr(config.base_config, key):
                setattr(config.base_config, key, unused.pop(key))
        config.sync_base_config()
        return (config, unused) if return_unused_kwargs else config

    def sync_base_config(self) -> None:
        """Copy the task-head fields (`id2label`, `label2id`, `problem_type`) of this config, which Trainer,
        pipelines and `from_pretrained(..., num_labels=...)` set, to the base config the head is built from."""
        _apply_head_fields(self.base_config, {k: getattr(self, k) for k in _HEAD_MAPS})
