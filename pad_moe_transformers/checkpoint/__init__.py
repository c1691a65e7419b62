"""Compact PAD-MoE checkpoints: encode, write, read, validate and decode (format described in
`docs/checkpoint_format.md`).

After mode partition each `PADExpertLinear` uses, of its stored tensors, only the dynamic entries of
every expert (mask ``M = 1``) and the static entries of the shared weight (``M = 0``); the rest are
zeros that eq. 4 never reads. A compact checkpoint stores exactly the used entries:

    <prefix>.mask_packed    uint8  [ceil(out*in/8)]   M bit-packed, row-major, LSB first
    <prefix>.static_values  float  [out*in - nnz(M)]  W_static[~M] in row-major order
    <prefix>.expert_values  float  [E, nnz(M)]        W_e[M] in row-major order, one row per expert
    <prefix>.expert_bias    float  [E, out]           unchanged (if the linear has a bias)
    <prefix>.scale_logit | lambda_static | lambda_dynamic   0-d scale factors (the `(1,)` parameters, squeezed)

A model whose masks are all ones and which was never partitioned (a plain MoE) is stored in the
``"moe"`` layout instead: ``<prefix>.expert_weight [E, out, in]`` plus bias and scales; no mask, no
static weight. Every other tensor of the model is stored under its own state-dict name.

The layout and the format version are in the safetensors header metadata of every file (and in
the shard index): ``pad_moe.format_version``, ``pad_moe.layout``, ``pad_moe.config`` (the config
fields the tensors depend on) and ``pad_moe.linears`` (``{prefix: [out, in]}`` of the PAD linears
in that file). Only safetensors are read or written (no pickle).

Modules: `format` (version, names, bit packing, model-side helpers), `validate` (`PADCheckpointError`
and the checks), `codec` (encode / decode of the PAD linears), `load` (reading the files,
`from_pretrained`), `save` (writing and sharding, `save_pretrained`), `hub` (`push_to_hub`) and
`size` (theoretical and on-disk size). Everything public is re-exported here.
"""

from .codec import compact_state_dict
from .format import (
    FORMAT_VERSION,
    LAYOUT_COMPACT,
    LAYOUT_MOE,
    LAYOUTS,
    METADATA_CONFIG,
    METADATA_LAYOUT,
    METADATA_LINEARS,
    METADATA_VERSION,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    checkpoint_layout,
    pack_mask,
    pad_linear_modules,
    unpack_mask,
)
from .hub import push_pad_to_hub
from .load import load_pad_checkpoint, read_checkpoint_metadata, resolve_checkpoint_files
from .save import SavedCheckpoint, save_checkpoint_files, save_pad_pretrained
from .size import checkpoint_file_bytes, theoretical_checkpoint_size
from .validate import PADCheckpointError, check_metadata

__all__ = [
    "FORMAT_VERSION",
    "LAYOUTS",
    "LAYOUT_COMPACT",
    "LAYOUT_MOE",
    "METADATA_CONFIG",
    "METADATA_LAYOUT",
    "METADATA_LINEARS",
    "METADATA_VERSION",
    "PADCheckpointError",
    "SavedCheckpoint",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "check_metadata",
    "checkpoint_file_bytes",
    "checkpoint_layout",
    "compact_state_dict",
    "load_pad_checkpoint",
    "pack_mask",
    "pad_linear_modules",
    "push_pad_to_hub",
    "read_checkpoint_metadata",
    "resolve_checkpoint_files",
    "save_checkpoint_files",
    "save_pad_pretrained",
    "theoretical_checkpoint_size",
    "unpack_mask",
]
