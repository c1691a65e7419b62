"""What every PAD config shares: a nested base config whose task-head fields it mirrors, and keyword overrides
that belong to that base config (`PADMoEConfig` for text, `PADDyConvConfig` for vision)."""

from __future__ import annotations

import functools
import math
import numbers
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

from transformers import PreTrainedConfig
from transformers.utils import logging

from ._compat import own_config_fields

# Arguments of `from_base` that describe the task head; they go to the nested base config,
# which the head reads, and are mirrored on the PAD config, which Trainer/pipelines read.
_HEAD_FIELDS = ("num_labels", "id2label", "label2id", "problem_type")
_HEAD_MAPS = ("id2label", "label2id", "problem_type")
# Head fields that are given (and adopted) together: `num_labels` sets both maps.
_HEAD_GROUPS = (("id2label", "label2id"), ("problem_type",))
_DEFAULT_HEAD = {
    "id2label": {0: "LABEL_0", 1: "LABEL_1"},
    "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "problem_type": None,
}
# Instance flag, set once construction is over: from then on assignments are validated and head fields are
# written through to the base config. Kept out of `to_dict` (it is state, not configuration).
_READY = "_pad_config_ready"

logger = logging.get_logger(__name__)


def python_number(value: Any) -> Any:
    """`value` as a plain Python number when it is a number of another type: a numpy scalar, a 0-d numpy array or
    torch tensor, a `fractions.Fraction`, ... (`bool` stays `bool`); anything else is returned unchanged, for the
    field's validation to refuse. The one conversion of every numeric field of the PAD configs: a config must hold
    what `json` writes (`save_pretrained`) and what `from_pretrained` reads back as the same value."""
    if type(value) in (bool, int, float):
        return value
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        dtype = getattr(value, "dtype", None)
        try:
            value = value.item()  # 0-d numpy array / torch tensor (and numpy scalars)
        except (RuntimeError, ValueError):  # e.g. a tensor on the meta device: no value to take
            return value
        if isinstance(value, float):
            return _shortest_decimal(value, dtype)
    if isinstance(value, bool):  # numpy's bool_ became a bool above
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


_STRUCT_FORMATS = {"float32": "f", "float16": "e"}


def _shortest_decimal(value: float, dtype: Any) -> float:
    """`value`, read from a float32/float16 number, as the shortest decimal that reads back as it in that precision:
    `np.float32(0.3)` gives 0.3, not 0.30000001192092896 (what was meant, and what the JSON then shows)."""
    fmt = _STRUCT_FORMATS.get(str(dtype).removeprefix("torch."))
    if fmt is None or not math.isfinite(value):
        return value
    for digits in range(1, 18):
        candidate = float(f"{value:.{digits}g}")
        if struct.unpack(fmt, struct.pack(fmt, candidate))[0] == value:
            return candidate
    return value


@dataclass(frozen=True)
class NumberField:
    """How one numeric field of a PAD config is checked: an integer or a finite real number, in an interval.

    The config classes list theirs in `number_fields`; values are converted by `python_number` first (at
    construction and on assignment), then checked here."""

    integer: bool = False
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    note: str = ""
    """Appended to the interval in range errors (e.g. what the upper end means)."""

    def interval(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"
        if self.low is not None:
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.open_high else '<='} {self.high:g}"
        return ""

    def check(self, name: str, value: Any) -> None:
        """Raise a `ValueError` naming `name`, the allowed values and `value` unless `value` is allowed."""
        if self.integer:
            # bool is an int subclass, and 8.0 is not a count: both are refused.
            if isinstance(value, bool) or not isinstance(value, int) or not self._in_interval(value):
                kind = " ".join(filter(None, ("an integer", self.interval())))
                raise ValueError(f"{name} must be {kind}{self.note}, got {value!r}.")
            return
        # str/None would fail deep inside float(): name the field instead.
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite real number, got {value!r}.")
        if not self._in_interval(value):
            raise ValueError(f"{name} must be {self.interval()}{self.note}, got {value!r}.")

    def _in_interval(self, value: float) -> bool:
        low_ok = self.low is None or (value > self.low if self.open_low else value >= self.low)
        return low_ok and (self.high is None or (value < self.high if self.open_high else value <= self.high))


@functools.cache
def _own_fields(config_class: type) -> frozenset[str]:
    return frozenset(own_config_fields(config_class))


def _apply_head_fields(config: PreTrainedConfig, fields: dict[str, Any]) -> None:
    # `num_labels` rebuilds id2label/label2id, so it goes first and explicit maps override it.
    if "num_labels" in fields:
        config.num_labels = fields["num_labels"]
    for key in _HEAD_MAPS:
        if key in fields and fields[key] is not None:
            setattr(config, key, dict(fields[key]) if isinstance(fields[key], dict) else fields[key])
    if isinstance(config.id2label, dict):
        config.id2label = {int(k): v for k, v in config.id2label.items()}


def _describe_head(key: str, value: Any) -> str:
    if key == "id2label" and isinstance(value, dict):
        return f"num_labels={len(value)} (id2label={value!r})"
    return f"{key}={value!r}"


class PADConfigMixin:
    """Mixed into a PAD config class (before `PreTrainedConfig`) that nests `base_config`.

    It gives the PAD configs two rules (documented in docs/concepts.md, "The config"):

    - Numbers: every numeric field (`number_fields`, and the items of `number_list_fields`) is converted to a
      plain Python number by `python_number` (numpy scalars, 0-d arrays and tensors) when set, at construction and
      on assignment. After construction, assigning a PAD field re-runs `validate_pad_fields`; an invalid value is
      refused with a `ValueError` and the field keeps its old value.
    - Task head: the PAD config owns `num_labels` / `id2label` / `label2id` / `problem_type` (Trainer and
      pipelines read it, the head is built from `base_config`). At construction, head fields given to the PAD
      config win (a warning names a different value the base config had); those not given are taken from the
      base config. After construction, setting one on the PAD config (`config.num_labels = 3`,
      `from_pretrained(..., num_labels=3)`) writes it through to `base_config` at once; a `base_config` whose head
      fields were changed directly is refused by `sync_base_config` (run when a model is built, a config loaded or
      saved) with a `ValueError` naming both values. Except `problem_type` while the PAD config's is None
      ("inferred"): the family head sets it on `base_config` at its first forward with labels, and it is taken over.
    """

    is_pad_config: ClassVar[bool] = True  # the partition and checkpoint code accept any config marked so
    pad_kind: ClassVar[str] = "PAD"
    """How error messages name the config's kind of PAD model."""
    number_fields: ClassVar[dict[str, NumberField]] = {}
    """The numeric fields and their allowed values (converted by `python_number`, checked by `NumberField`)."""
    number_list_fields: ClassVar[tuple[str, ...]] = ()
    """Fields holding a list of numbers (items converted by `python_number`; checked by `validate_pad_fields`)."""

    def __setattr__(self, key: str, value: Any) -> None:
        if key in self.number_fields:
            value = python_number(value)
        elif key in self.number_list_fields and isinstance(value, (list, tuple)):
            value = type(value)(python_number(item) for item in value)
        if not self.__dict__.get(_READY, False):  # under construction: `__post_init__` validates and syncs
            super().__setattr__(key, value)
        elif key in _HEAD_MAPS:
            base = self.__dict__.get("base_config")
            if isinstance(base, PreTrainedConfig):
                # Base first (it validates, e.g. problem_type), then the same object here: the two configs share
                # it, so an in-place edit of a map (`config.id2label[0] = ...`) reaches both.
                setattr(base, key, value)
            super().__setattr__(key, value)
        elif key in _own_fields(type(self)):
            missing = object()
            old = self.__dict__.get(key, missing)
            super().__setattr__(key, value)
            try:
                self.validate_pad_fields()
            except ValueError:
                if old is missing:
                    del self.__dict__[key]
                else:
                    super().__setattr__(key, old)
                raise
        else:
            super().__setattr__(key, value)

    def validate_pad_fields(self) -> None:
        """Raise a `ValueError` naming the field and the allowed values for any invalid PAD field
        (extended by each config class with its other fields)."""
        for name, spec in self.number_fields.items():
            spec.check(name, getattr(self, name))

    def validate(self) -> None:
        """Transformers' validation (run by `save_pretrained`), plus the PAD fields and the head-field rule."""
        super().validate()
        self.validate_pad_fields()
        self.sync_base_config()

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output.pop(_READY, None)
        return output

    @classmethod
    def _route_to_base(cls, base: PreTrainedConfig, kwargs: dict[str, Any]) -> PreTrainedConfig:
        """`from_base`'s remaining keyword arguments: head fields and attributes of `base` are set on `base`; any
        other name raises a `ValueError` that lists the PAD fields. Returns `base`."""
        head_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _HEAD_FIELDS}
        for key, value in kwargs.items():
            if not hasattr(base, key):
                pad_fields = sorted(own_config_fields(cls))
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

    @staticmethod
    def _given_head_fields(config: Any, kwargs: dict[str, Any]) -> set[str]:
        """The head fields given to the constructor (before `PreTrainedConfig.__post_init__` fills defaults)."""
        given = {key for key in _HEAD_MAPS if config.__dict__.get(key) is not None}
        if kwargs.get("num_labels") is not None:
            given |= {"id2label", "label2id"}
        return given

    def _sync_head_fields(self, given: set[str]) -> None:
        """End of `__post_init__`: per group of head fields, the PAD config's wins when it was given (pushed to the
        base config, with a warning if the base config had a different, non-default value), else the base
        config's is taken over. Then the config is ready: assignments are validated and written through."""
        base = self.base_config
        for group in _HEAD_GROUPS:
            if given & set(group):
                differ = [k for k in group if _DEFAULT_HEAD[k] != getattr(base, k) != getattr(self, k)]
                if differ:
                    key = differ[0]
                    logger.warning(
                        f"{type(self).__name__} was given {_describe_head(key, getattr(self, key))} but its "
                        f"base_config has {_describe_head(key, getattr(base, key))}; the {self.pad_kind} config's "
                        "value is used (it owns the task-head fields and passes them to base_config)."
                    )
                for key in group:
                    setattr(base, key, getattr(self, key))
            else:
                for key in group:
                    setattr(self, key, getattr(base, key))
        if isinstance(self.id2label, dict):
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            base.id2label = self.id2label
        self.__dict__[_READY] = True

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
        """Check that the base config, which the head is built from, has this config's task-head fields
        (`id2label`, `label2id`, `problem_type`), which Trainer, pipelines and `from_pretrained(..., num_labels=...)`
        set; they are written through on assignment, so a difference means `base_config` was edited directly.
        Raises a `ValueError` naming both values then: set head fields on the PAD config. One exception:
        `problem_type=None` here means "inferred", and the family head infers it on `base_config` at its first
        forward with labels; that value is taken over."""
        base = self.base_config
        for key in _HEAD_MAPS:
            mine, theirs = getattr(self, key), getattr(base, key)
            if isinstance(mine, dict) and isinstance(theirs, dict) and key == "id2label":
                mine, theirs = _int_keys(mine), _int_keys(theirs)
            if key == "problem_type" and mine is None and theirs is not None:
                # None means "infer": the family head sets it on base_config at its first forward with labels.
                super().__setattr__(key, theirs)
                continue
            if mine != theirs:
                raise ValueError(
                    f"base_config has {_describe_head(key, theirs)} but the {type(self).__name__} has "
                    f"{_describe_head(key, mine)}. The {self.pad_kind} config owns the task-head fields and writes "
                    f"them to base_config: set them on the PAD config (`{_setter(key, theirs)}`), not on "
                    "`config.base_config`."
                )
            if getattr(base, key) is not getattr(self, key):
                setattr(base, key, getattr(self, key))  # equal: share the object (in-place edits reach both)


def _setter(key: str, value: Any) -> str:
    """The assignment on the PAD config that gives it `value` for head field `key` (for error messages)."""
    if key == "id2label" and isinstance(value, dict) and value == {i: f"LABEL_{i}" for i in range(len(value))}:
        return f"config.num_labels = {len(value)}"
    return f"config.{key} = {value!r}"


def _int_keys(mapping: dict) -> dict:
    try:
        return {int(k): v for k, v in mapping.items()}
    except (TypeError, ValueError):
        return mapping
