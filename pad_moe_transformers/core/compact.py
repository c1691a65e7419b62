"""The compact form of one PAD weight: the mask bit-packed, and only the entries eq. 4 reads.

A PAD weight (one per PAD linear today, one per PAD convolution next) holds ``K`` dynamic weights
``(K, *shape)`` (experts, or the kernels of a dynamic convolution), one static weight ``(*shape)`` and
one boolean mask ``(*shape)`` (True = dynamic). Eq. 4 reads ``W_k[M]`` of every dynamic weight and
``W_static[~M]`` of the static one, so those are all that is stored:

    mask_packed    uint8  [ceil(numel / 8)]   M bit-packed, row-major, LSB first
    static_values  float  [numel - nnz(M)]    W_static[~M] in row-major order
    expert_values  float  [K, nnz(M)]         W_k[M] in row-major order, one row per dynamic weight

Pure tensor functions: no module, file or model knowledge (the checkpoint package adds those).
"""

from __future__ import annotations

import torch
from torch import Tensor

_BIT_WEIGHTS = [1 << i for i in range(8)]  # bit i of a byte <-> element 8*byte + i (LSB first)


def pack_mask(mask: Tensor) -> Tensor:
    """Bit-pack a boolean mask: row-major order, 8 entries per byte, entry ``8 * b + i`` in bit ``i``
    (LSB first) of byte ``b``, unused bits of the last byte zero. Same as
    ``numpy.packbits(mask.ravel(), bitorder="little")``."""
    flat = mask.detach().reshape(-1).to(device="cpu", dtype=torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.int32)
    return (flat.view(-1, 8).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def packed_mask_bytes(numel: int) -> int:
    """Length of the packed form of a mask of `numel` entries: ``ceil(numel / 8)``."""
    return (numel + 7) // 8


def _bits(packed: Tensor) -> Tensor:
    """Every bit of the packed bytes, as a flat int32 tensor of 0/1 in entry order (padding bits included)."""
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    return ((packed.reshape(-1).to(torch.int32).unsqueeze(1) >> shifts) & 1).reshape(-1)


def unpack_mask(packed: Tensor, numel: int) -> Tensor:
    """Inverse of `pack_mask`: a flat bool tensor of `numel` entries."""
    return _bits(packed)[:numel].bool()


def popcount(packed: Tensor) -> int:
    """Number of set bits of a packed mask (padding bits included)."""
    return int(_bits(packed).sum())


def encode_compact(dynamic: Tensor, static: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """`dynamic` `(K, *shape)`, `static` `(*shape)`, `mask` `(*shape)` bool -> the three compact tensors (CPU)."""
    flat_mask = mask.detach().reshape(-1).cpu().bool()
    dynamic = dynamic.detach().cpu()
    return {
        "mask_packed": pack_mask(flat_mask),
        "static_values": static.detach().cpu().reshape(-1)[~flat_mask].contiguous(),
        "expert_values": dynamic.reshape(dynamic.shape[0], -1)[:, flat_mask].contiguous(),
    }


def decode_compact(
    mask_packed: Tensor, static_values: Tensor, expert_values: Tensor, shape: tuple[int, ...]
) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of `encode_compact`: `(dynamic (K, *shape), static (*shape), mask (*shape) bool)`; the entries
    eq. 4 never reads are zero. The caller has validated the sizes (`checkpoint.validate`)."""
    numel = 1
    for size in shape:
        numel *= size
    flat_mask = unpack_mask(mask_packed, numel)
    dynamic = expert_values.new_zeros(expert_values.shape[0], numel)
    dynamic[:, flat_mask] = expert_values
    static = static_values.new_zeros(numel)
    static[~flat_mask] = static_values
    return dynamic.view(-1, *shape), static.view(*shape), flat_mask.view(*shape)
