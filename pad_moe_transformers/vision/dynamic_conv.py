"""`PADDynamicConv2d`: dynamic convolution (DY-Conv, Chen et al. 2020) in PAD form (PAD-Net eqs. 2-4).

DY-Conv keeps ``K`` kernels ``Theta_i`` and convolves sample ``x`` with ``sum_i pi_i(x) Theta_i``, where
``pi(x) = softmax(FC2(ReLU(FC1(GAP(x)))) / tau)`` (eq. 2). PAD-Net makes only the entries of a binary mask
``M`` (one per convolution, shared by the ``K`` kernels) dynamic:

    W(x) = l_d * M * sum_i pi_i(x) Theta_i + l_s * (1 - M) * Theta_static          (eq. 4)

Because the attention sums to one, this equals ``sum_i pi_i(x) W_eff_i`` with the per-kernel eq. 4 weights
``W_eff_i = l_d * M * Theta_i + l_s * (1 - M) * Theta_static`` (``core.PADWeight.effective_weight``). The
layer uses that form: eq. 4 is applied to the ``K`` kernels once per forward instead of to ``B`` per-sample
mixtures, and the per-sample kernels are one ``(B, K) @ (K, numel)`` product. With the relaxed float mask of
IMP the identity holds too (eq. 4 is affine in ``M``), so the mask scores are those of eq. 7.

The ``B`` per-sample kernels are applied as one grouped convolution: the batch is folded into the channel
dimension (``x -> (1, B*C, H, W)``, ``groups = B*groups``), so there is no per-sample loop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from ..core.pad_weight import PADWeight


class KernelAttention(nn.Module):
    """DY-Conv's kernel attention: ``pi(x) = softmax(fc2(relu(fc1(GAP(x)))) / temperature)``, `(B, C, H, W) -> (B, K)`.

    The squeeze-and-excitation block of DY-Conv with reduction ratio `reduction` (4 in DY-Conv): ``hidden =
    max(in_channels // reduction, 4)``; the floor of 4 keeps thin layers (e.g. a depthwise conv of 8 channels in
    MobileNetV2 x0.5) from getting a 1- or 2-unit bottleneck. `temperature` is a non-persistent 0-d buffer: the
    state of a training schedule (`vision.temperature`), not part of the weights.
    """

    def __init__(
        self,
        in_channels: int,
        num_kernels: int = 4,
        reduction: int = 4,
        temperature: float = 30.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if reduction < 1:
            raise ValueError(f"reduction must be an integer >= 1, got {reduction!r}.")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}.")
        factory = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.num_kernels = num_kernels
        self.hidden_channels = max(in_channels // reduction, 4)
        self.fc1 = nn.Linear(in_channels, self.hidden_channels, **factory)
        self.fc2 = nn.Linear(self.hidden_channels, num_kernels, **factory)
        self.register_buffer(
            "temperature", torch.tensor(float(temperature), dtype=dtype or torch.get_default_dtype(), device=device),
            persistent=False,
        )

    def forward(self, x: Tensor) -> Tensor:
        """`x` `(B, C, H, W)` -> attention over the kernels `(B, K)`, rows summing to 1 (softmax in fp32)."""
        logits = self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3)))))
        return torch.softmax(logits.float() / self.temperature.float(), dim=-1)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_kernels={self.num_kernels}, hidden={self.hidden_channels}, "
            f"temperature={float(self.temperature):g}"
        )


class PADDynamicConv2d(PADWeight):
    """A partially dynamic convolution: `nn.Conv2d`'s arguments plus `num_kernels` kernels and the PAD core.

    Tensors (the `core.PADWeight` contract): ``expert_weight`` `(K, out, in/groups, kh, kw)` the kernels,
    ``static_weight`` `(out, in/groups, kh, kw)`, ``mask`` of the same shape (True = dynamic, all True until a
    partition), scale factors of `scale_factor_mode`; ``expert_bias`` `(K, out)` when `bias` (mixed by ``pi`` as
    DY-Conv mixes its biases; fully dynamic and never partitioned: ``K * out`` values, like the MoE's expert
    biases). ``attention`` is the `KernelAttention` that computes ``pi(x)``.

    Gradients follow eq. 4: kernel entries with ``M = 0`` and static entries with ``M = 1`` get exactly zero.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        num_kernels: int = 4,
        scale_factor_mode: str = "sum2",
        reduction: int = 4,
        temperature: float = 30.0,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})."
            )
        if isinstance(num_kernels, bool) or not isinstance(num_kernels, int) or num_kernels < 1:
            raise ValueError(f"num_kernels must be an integer >= 1, got {num_kernels!r}.")
        if padding_mode != "zeros":
            raise ValueError(f"PADDynamicConv2d supports padding_mode='zeros' only, got {padding_mode!r}.")
        stride, dilation = _pair(stride), _pair(dilation)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}.")
            if padding == "same" and any(s != 1 for s in stride):
                raise ValueError("padding='same' is not supported for strided convolutions (as in nn.Conv2d).")
        else:
            padding = _pair(padding)
        kernel_size = _pair(kernel_size)
        shape = (out_channels, in_channels // groups, *kernel_size)
        super().__init__(num_kernels, shape, scale_factor_mode, device=device, dtype=dtype)
        factory = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        self.groups, self.padding_mode = groups, padding_mode
        self.expert_bias = nn.Parameter(torch.zeros(num_kernels, out_channels, **factory)) if bias else None
        self.attention = KernelAttention(in_channels, num_kernels, reduction, temperature, **factory)

    @property
    def num_kernels(self) -> int:
        return self.num_experts

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> PADDynamicConv2d:
        # `Module.to(memory_format=torch.channels_last)` converts every 4-D and 5-D tensor and refuses a 5-D one
        # (a rank-4 format), so the (K, out, in/g, kh, kw) kernels stopped the whole model's conversion. A
        # conversion that fails on them is applied to them as K*out stacked 4-D weights (its device / dtype part),
        # and they keep their standard layout: the conv never reads them directly (the per-sample kernels are a
        # fresh product, `sample_kernels`), so a channels_last copy would only cost a reshape copy per forward and
        # a non-contiguous tensor for the checkpoint writer. Every other conversion runs unchanged.
        def apply(tensor: Tensor) -> Tensor:
            if tensor.dim() != 5:
                return fn(tensor)
            try:
                return fn(tensor)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as error:
                try:
                    return fn(tensor.flatten(0, 1)).unflatten(0, tensor.shape[:2]).contiguous()
                except RuntimeError:
                    raise error from None

        return super()._apply(apply, recurse)

    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv2d,
        num_kernels: int = 4,
        scale_factor_mode: str = "sum2",
        reduction: int = 4,
        temperature: float = 30.0,
    ) -> PADDynamicConv2d:
        """Every kernel and the static weight (and every kernel's bias) copied from `conv`, so the output equals
        `conv`'s whatever the attention gives (the ``pi`` sum to 1). The attention is freshly initialised."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_dense expects an nn.Conv2d, got {type(conv).__name__}.")
        weight = conv.weight
        module = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, num_kernels, scale_factor_mode, reduction, temperature,
            conv.padding_mode, device=weight.device, dtype=weight.dtype,
        )
        if weight.device.type == "meta":  # built to be loaded into: nothing to copy
            return module
        with torch.no_grad():
            module.expert_weight.copy_(weight.detach().unsqueeze(0).expand_as(module.expert_weight))
            module.static_weight.copy_(weight.detach())
            if conv.bias is not None:
                module.expert_bias.copy_(conv.bias.detach().unsqueeze(0).expand_as(module.expert_bias))
        return module

    # --- the dynamic function --------------------------------------------------------------------
    def attention_weights(self, x: Tensor) -> Tensor:
        """``pi(x)`` `(B, K)` for `x` `(B, C, H, W)`."""
        return self.attention(x)

    def sample_kernels(self, pi: Tensor) -> Tensor:
        """Eq. 4 of the mixture ``sum_i pi_i Theta_i`` for every sample: `pi` `(B, K)` -> `(B, out, in/g, kh, kw)`.

        Computed as ``pi @ W_eff`` with the per-kernel eq. 4 weights (equal because ``sum_i pi_i = 1``)."""
        kernels = self.effective_weight()  # (K, out, in/g, kh, kw)
        return (pi.to(kernels.dtype) @ kernels.reshape(self.num_experts, -1)).view(pi.shape[0], *kernels.shape[1:])

    def sample_biases(self, pi: Tensor) -> Tensor | None:
        """``sum_i pi_i b_i`` `(B, out)`, or None without bias."""
        if self.expert_bias is None:
            return None
        return pi.to(self.expert_bias.dtype) @ self.expert_bias

    def forward(self, x: Tensor) -> Tensor:
        """`x` `(B, C, H, W)` (or unbatched `(C, H, W)`) -> `(B, out, H', W')`, as `nn.Conv2d` with the same args."""
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if x.dim() != 4:
            raise ValueError(
                f"PADDynamicConv2d expects an input of shape (batch, channels, height, width) or (channels, height, "
                f"width), got shape {tuple(x.shape)}."
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"PADDynamicConv2d expected {self.in_channels} input channels, got {x.shape[1]} "
                f"(input shape {tuple(x.shape[1:] if unbatched else x.shape)})."
            )
        batch = x.shape[0]
        pi = self.attention_weights(x)
        weight = self.sample_kernels(pi)
        bias = self.sample_biases(pi)
        if batch == 0:
            # Folding no sample into the groups would give groups=0. The per-sample kernels summed over no sample
            # (zeros, still in the graph of every parameter) give nn.Conv2d's empty output and zero gradients.
            bias = None if bias is None else bias.sum(0)
            return F.conv2d(x, weight.sum(0), bias, self.stride, self.padding, self.dilation, self.groups)
        out = F.conv2d(
            x.reshape(1, batch * self.in_channels, *x.shape[2:]),
            weight.reshape(batch * self.out_channels, *weight.shape[2:]),
            None if bias is None else bias.reshape(-1),
            self.stride,
            self.padding,
            self.dilation,
            batch * self.groups,
        )
        out = out.view(batch, self.out_channels, *out.shape[2:])
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"bias={self.expert_bias is not None}, num_kernels={self.num_experts}, "
            f"scale_factor_mode={self.scale_factor_mode!r}"
        )
