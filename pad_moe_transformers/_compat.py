"""The supported Transformers window, and every private Transformers name this package relies on, in one place.

Transformers ships a minor release every few weeks and changes its internals in them; each private name used here
is a bet on the releases it was tested with. So:

- the package refuses to import on a release outside `TRANSFORMERS_WINDOW` (the tested window, also declared in
  setup.cfg), with a message naming the window (`PAD_MOE_ALLOW_UNTESTED_TRANSFORMERS=1` skips the check: used by
  `tools/check_newest_transformers.sh` to try a release before the window is raised);
- the rest of the package takes private names from this module only (re-exports and small accessors below);
- `PRIVATE_INTERNALS` lists each one: what it is for, the releases it was tested on and the public alternative
  where one exists. `missing_internals()` resolves them all on the installed release; `tests/test_compat.py`
  fails naming the missing one.

Public APIs are used wherever they exist (`transformers.MODEL_MAPPING`, `dataclasses.fields`, `huggingface_hub`'s
`hf_hub_download` / `HfApi`, `config.name_or_path`, public `from_pretrained` keywords).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
from dataclasses import dataclass
from typing import Any

import transformers
from packaging.version import Version

TRANSFORMERS_MIN = "5.23.0"
"""The oldest release tested (CI runs the suite on it): 5.22 lacks `ConversionOps.supports_many_to_many`."""
TRANSFORMERS_BELOW = "5.26"
"""The first minor release not yet tested: raised on purpose once `tools/check_newest_transformers.sh` passes."""
TRANSFORMERS_WINDOW = f">={TRANSFORMERS_MIN},<{TRANSFORMERS_BELOW}"
TESTED_RELEASES = ("5.23.0", "5.24.0", "5.25.0")
"""Releases the suite passed on (CI: both ends of the window)."""
ALLOW_UNTESTED_ENV = "PAD_MOE_ALLOW_UNTESTED_TRANSFORMERS"


class UnsupportedTransformersError(ImportError):
    """The installed Transformers release is outside the tested window."""


def check_transformers_version(version: str | None = None, allow_untested: bool | None = None) -> None:
    """Raise `UnsupportedTransformersError` naming the window when `version` (default: the installed release) is
    outside it, unless `allow_untested` (default: whether `PAD_MOE_ALLOW_UNTESTED_TRANSFORMERS=1`)."""
    version = transformers.__version__ if version is None else version
    if allow_untested is None:
        allow_untested = os.environ.get(ALLOW_UNTESTED_ENV) == "1"
    if allow_untested:
        return
    # A pre-release of the next minor (5.26.0.dev0) counts as that minor: its internals may already have moved.
    base = Version(Version(version).base_version)
    if not Version(TRANSFORMERS_MIN) <= base < Version(TRANSFORMERS_BELOW):
        raise UnsupportedTransformersError(
            f"pad_moe_transformers supports transformers{TRANSFORMERS_WINDOW} (tested: {', '.join(TESTED_RELEASES)}), "
            f"but transformers {version} is installed. Install a release in the window, e.g. "
            f"`pip install 'transformers{TRANSFORMERS_WINDOW}'`, or set {ALLOW_UNTESTED_ENV}=1 to try it anyway."
        )


# ------------------------------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class PrivateInternal:
    """One private Transformers name the package relies on."""

    name: str
    """Dotted path: `module.Name`, `module.Class.attribute`, or `module.function(keyword=)` for a keyword."""
    purpose: str
    public_alternative: str | None = None
    """What would replace it, if Transformers has a public equivalent (None: there is none)."""
    tested: tuple[str, ...] = TESTED_RELEASES

    def is_available(self) -> bool:
        """Whether the installed Transformers still has it (import, attribute, or a name in a function's source)."""
        path, _, keyword = self.name.partition("(")
        parts = path.split(".")
        for split in range(len(parts), 0, -1):  # the longest importable module prefix
            try:
                obj: Any = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            for attribute in parts[split:]:
                if not hasattr(obj, attribute):
                    return False
                obj = getattr(obj, attribute)
            if keyword:  # a keyword or flag the object reads: look for it in its source
                return keyword.rstrip("=)") in inspect.getsource(obj)
            return True
        return False


PRIVATE_INTERNALS: tuple[PrivateInternal, ...] = (
    PrivateInternal(
        "transformers.configuration_utils.SubConfigSpec",
        "declares `base_config` a sub-config that defaults to a BERT (ResNet) config, so `PADMoEConfig()` and "
        "`from_pretrained` build the nested family config as for any composite config",
        "`sub_configs = {'base_config': AutoConfig}` (public, but without a default model type)",
    ),
    PrivateInternal(
        "transformers.conversion_mapping.register_checkpoint_conversion_mapping",
        "registers the compact-checkpoint decoding (`DecodeCompact`, scale-factor shapes) for the `pad_moe` and "
        "`pad_dyconv` model types, so Transformers' own loader reads PAD checkpoints",
    ),
    PrivateInternal(
        "transformers.core_model_loading.WeightConverter",
        "declares the 3-to-3 tensor conversion of one PAD linear (packed mask + values -> experts, static, mask)",
    ),
    PrivateInternal(
        "transformers.core_model_loading.ConversionOps.supports_many_to_many",
        "base class of the PAD conversions; `supports_many_to_many` (5.23+) lets the loader accept the 3-to-3 one",
    ),
    PrivateInternal(
        "transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS",
        "runs the PAD experts through Transformers' experts backends (eager / grouped_mm / batched_mm), with the "
        "eq. 4 weights passed in an `ExpertWeights` stand-in for an experts module (the attributes it reads)",
        "`use_experts_implementation` (public decorator), which needs the expert weights as module parameters: "
        "PAD's are formed per forward",
    ),
    PrivateInternal(
        "transformers.utils.output_capturing.CompileableContextVar",
        "context-local routing records and merged-weight cache that `torch.compile` traces through",
        "`contextvars.ContextVar` (not traceable by torch.compile)",
    ),
    PrivateInternal(
        "transformers.configuration_utils.PreTrainedConfig._experts_implementation",
        "reads and sets the experts backend of the PAD layers on the PAD config alone (the setter would also push "
        "it into the family config, whose model has no experts and refuses grouped_mm)",
        "`model.set_experts_implementation(...)` / `from_pretrained(experts_implementation=...)`, which PAD models "
        "accept; the config attribute itself has no public form",
    ),
    PrivateInternal(
        "transformers.modeling_utils.PreTrainedModel._can_set_experts_implementation",
        "overridden by the PAD model: Transformers finds `use_experts_implementation` in the model's source to "
        "allow `experts_implementation=`, which cannot see PAD's experts",
    ),
    PrivateInternal(
        "transformers.initialization.normal_(_is_hf_initialized)",
        "the tensor flag Transformers' init skips: upcycled experts and static weights are marked as loaded",
    ),
    PrivateInternal(
        "transformers.modeling_utils.PreTrainedModel._init_weights",
        "the family's own init of one `nn.Conv2d`, to draw each DY-Conv kernel as the dense family would",
        "`PreTrainedModel.initialize_weights()` (whole model only)",
    ),
    PrivateInternal(
        "transformers.modeling_utils.PreTrainedModel.save_pretrained(_hf_peft_config_loaded)",
        "detects a PEFT adapter on the model, whose save falls back to Transformers' own writer",
    ),
    PrivateInternal(
        "transformers.modeling_utils.PreTrainedModel.post_init(all_tied_weights_keys)",
        "the tied weights a checkpoint leaves out (the compact writer follows Transformers' choice)",
        "`PreTrainedModel.get_expanded_tied_weights_keys` (also undocumented)",
    ),
    PrivateInternal(
        "transformers.trainer_callback.ExportableState",
        "lets `IMPTrainerCallback` store its partition state in Trainer checkpoints (resume)",
    ),
    PrivateInternal(
        "transformers.trainer.Trainer.get_decay_parameter_names",
        "Trainer's weight-decay rule, reused unbound for PAD's optimizer groups",
        "`transformers.trainer_pt_utils.get_parameter_names` with Trainer's patterns (copying the rule)",
    ),
    PrivateInternal(
        "transformers.modeling_utils.PreTrainedModel._keep_in_fp32_modules_strict",
        "model-contract class attributes read by the loader: fp32 router, keys rebuilt when missing, attention "
        "backends (`_keys_to_ignore_on_load_missing`, `_supports_sdpa`, ... set on every Transformers model)",
        "none: the documented way to declare these for a model class",
    ),
)


def missing_internals() -> list[PrivateInternal]:
    """The entries of `PRIVATE_INTERNALS` that the installed Transformers release lacks."""
    return [internal for internal in PRIVATE_INTERNALS if not internal.is_available()]


# --------------------------------------------------------------------------------- re-exports and accessors
check_transformers_version()

try:
    from transformers.configuration_utils import SubConfigSpec
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import ConversionOps, WeightConverter
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    from transformers.trainer_callback import ExportableState
    from transformers.utils.output_capturing import CompileableContextVar
except ImportError as error:  # pragma: no cover - only on an untested release
    raise UnsupportedTransformersError(
        f"transformers {transformers.__version__} lacks an internal pad_moe_transformers needs ({error}); tested "
        f"window: transformers{TRANSFORMERS_WINDOW}."
    ) from error


def mark_initialized(tensor: Any) -> None:
    """Flag `tensor` as loaded, so Transformers' init pass leaves it alone (upcycled copies)."""
    tensor._is_hf_initialized = True


def is_initialized(tensor: Any) -> bool:
    """Whether Transformers marked `tensor` as loaded (its init pass skips it)."""
    return bool(getattr(tensor, "_is_hf_initialized", False))


def get_experts_implementation(config: Any) -> str | None:
    """The experts backend set on `config` (by `from_pretrained(experts_implementation=...)` or
    `set_experts_implementation`)."""
    return getattr(config, "_experts_implementation", None)


def set_own_experts_implementation(config: Any, implementation: str | None) -> None:
    """Set the experts backend of `config` alone, not of its sub-configs (the public setter cascades)."""
    config._experts_implementation_internal = implementation


def init_family_module(model: Any, module: Any) -> None:
    """The family model's own init of one module (e.g. a ResNet's Kaiming normal of an `nn.Conv2d`)."""
    model._init_weights(module)


def has_peft_adapter(model: Any) -> bool:
    """Whether a PEFT adapter was loaded into `model` with Transformers' PEFT integration."""
    return bool(getattr(model, "_hf_peft_config_loaded", False))


def tied_weight_keys(model: Any) -> set[str]:
    """The names of the tied weights that Transformers leaves out of a checkpoint."""
    return set(getattr(model, "all_tied_weights_keys", {}) or {})


def decay_parameter_names(model: Any) -> list[str]:
    """Trainer's weight-decay rule: the parameter names that get weight decay (`Trainer.get_decay_parameter_names`,
    which does not read `self`)."""
    return transformers.Trainer.get_decay_parameter_names(None, model)


def own_config_fields(config_class: type) -> list[str]:
    """The dataclass fields `config_class` adds to `PreTrainedConfig` (public `dataclasses.fields`)."""
    base = {f.name for f in dataclasses.fields(transformers.PreTrainedConfig)}
    return [f.name for f in dataclasses.fields(config_class) if f.name not in base]


__all__ = [
    "ALLOW_UNTESTED_ENV",
    "ALL_EXPERTS_FUNCTIONS",
    "PRIVATE_INTERNALS",
    "TESTED_RELEASES",
    "TRANSFORMERS_BELOW",
    "TRANSFORMERS_MIN",
    "TRANSFORMERS_WINDOW",
    "CompileableContextVar",
    "ConversionOps",
    "ExportableState",
    "PrivateInternal",
    "SubConfigSpec",
    "UnsupportedTransformersError",
    "WeightConverter",
    "check_transformers_version",
    "decay_parameter_names",
    "get_experts_implementation",
    "has_peft_adapter",
    "init_family_module",
    "is_initialized",
    "mark_initialized",
    "missing_internals",
    "own_config_fields",
    "register_checkpoint_conversion_mapping",
    "set_own_experts_implementation",
    "tied_weight_keys",
]
