"""CondConv (Yang et al. 2019), the k = 8 baseline of the paper's Table 2, built on timm's `CondConv2d`.

    from pad_moe_transformers.vision.condconv import convert_convs_to_condconv
    model = convert_convs_to_condconv(ResNetForImageClassification(config), num_experts=8)

CondConv mixes k expert kernels per sample, ``W(x) = sum_i r_i(x) W_i`` with the routing function
``r(x) = sigmoid(FC(GAP(x)))`` (independent sigmoids, no softmax: the weights do not sum to 1), and
runs the per-sample kernels as one grouped convolution. The kernel mixing and the grouped convolution
are timm's `CondConv2d`; this module adds the routing function (`CondConvWrapper`) and the conversion
of Transformers' ResNet / MobileNetV2 (every convolution except the stem, as the PAD conversion).

timm is optional (`pip install --no-deps timm`: its layers need only torch).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import math
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

_PRIVATE_PACKAGE = "_pad_moe_transformers_timm"
"""Where timm's layer files are imported when timm's package `__init__` cannot run (see below)."""

SUPPORTED_MODEL_TYPES = ("resnet", "mobilenet_v2")

__all__ = ["CondConvWrapper", "convert_convs_to_condconv", "load_timm_condconv2d"]


@contextlib.contextmanager
def _torchvision_unimportable() -> Iterator[None]:
    """Make `import torchvision` raise ImportError for the duration (unless it is already imported):
    timm's `layers/_fx.py` imports it optionally (`except ImportError`), but a torchvision built for
    another torch raises RuntimeError ("operator torchvision::nms does not exist") instead."""
    if "torchvision" in sys.modules:  # imported already, or already marked unimportable (None)
        yield
        return
    sys.modules["torchvision"] = None  # type: ignore[assignment]  # None in sys.modules: ImportError
    try:
        yield
    finally:
        sys.modules.pop("torchvision", None)


def _load_condconv_module_file() -> type[nn.Module]:
    """timm's `layers/cond_conv2d.py`, imported without running timm's package `__init__`.

    `cond_conv2d.py` needs only `layers/{helpers,padding,conv2d_same,_fx,config}.py` (torch only), but
    `import timm` (and so `import timm.layers`) first runs `timm/__init__.py`, which imports all of
    timm's models and through them torchvision. Where torchvision is missing or built for another torch
    (the CPU torch of this project has no matching torchvision on PyPI), that fails although CondConv
    does not need it. So the layer files are imported as submodules of two empty package modules
    registered under a private name whose `__path__` points at the installed `timm/` and
    `timm/layers/` folders: their relative imports resolve there, and `timm/__init__.py` never runs.
    """
    spec = importlib.util.find_spec("timm")  # finding a top-level package does not execute it
    layers = Path(next(iter(spec.submodule_search_locations))) / "layers"
    if not (layers / "cond_conv2d.py").is_file():
        raise ImportError(f"timm at {layers.parent} has no layers/cond_conv2d.py; pip install --no-deps 'timm>=1.0'.")
    for name, folder in ((_PRIVATE_PACKAGE, layers.parent), (f"{_PRIVATE_PACKAGE}.layers", layers)):
        if name not in sys.modules:
            package = types.ModuleType(name, "timm's files, imported without timm/__init__.py (CondConv only)")
            package.__path__ = [str(folder)]
            package.__package__ = name
            sys.modules[name] = package
    with _torchvision_unimportable():
        module = importlib.import_module(f"{_PRIVATE_PACKAGE}.layers.cond_conv2d")
    return module.CondConv2d


@functools.cache
def load_timm_condconv2d() -> type[nn.Module]:
    """timm's `CondConv2d` class: `timm.layers.CondConv2d` when timm imports, else timm's own
    `cond_conv2d.py` loaded from the installed distribution without timm's package `__init__`."""
    if importlib.util.find_spec("timm") is None:
        raise ImportError(
            "CondConv uses timm's CondConv2d, and timm is not installed: pip install --no-deps timm "
            "(--no-deps: CondConv needs only torch; timm's dependencies include torchvision)."
        )
    try:
        from timm.layers import CondConv2d

        return CondConv2d
    except Exception as error:  # a broken torchvision raises RuntimeError, not ImportError
        logger.info(f"`import timm` failed ({type(error).__name__}: {error}); loading timm's cond_conv2d.py alone.")
    return _load_condconv_module_file()


class CondConvWrapper(nn.Module):
    """timm's `CondConv2d` with CondConv's routing function ``r(x) = sigmoid(FC(GAP(x)))``.

    Shapes: input `(B, in_channels, H, W)`, routing weights `(B, num_experts)`, output
    `(B, out_channels, H', W')` as the `nn.Conv2d` with the same arguments. `stride`, `kernel_size`,
    `dilation`, `padding`, `groups` are exposed as on `nn.Conv2d` (MobileNetV2's TF padding reads them).
    The expert kernels are `self.conv.weight`, `(num_experts, out * in/groups * kh * kw)` as timm stores them.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        num_experts: int = 8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(padding, str):
            raise ValueError(f"CondConvWrapper needs integer padding, got {padding!r}.")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}.")
        factory = {"device": device, "dtype": dtype}
        condconv2d = load_timm_condconv2d()
        self.conv = condconv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
            groups=groups, bias=bias, num_experts=num_experts, **factory,
        )  # fmt: skip
        self.routing = nn.Linear(in_channels, num_experts, **factory)

    in_channels = property(lambda self: self.conv.in_channels)
    out_channels = property(lambda self: self.conv.out_channels)
    kernel_size = property(lambda self: self.conv.kernel_size)
    stride = property(lambda self: self.conv.stride)
    padding = property(lambda self: self.conv.padding)
    dilation = property(lambda self: self.conv.dilation)
    groups = property(lambda self: self.conv.groups)
    num_experts = property(lambda self: self.conv.num_experts)

    def routing_weights(self, x: Tensor) -> Tensor:
        """`(B, num_experts)` = sigmoid(FC(GAP(x))) for `x` `(B, C, H, W)`."""
        return torch.sigmoid(self.routing(x.mean(dim=(2, 3))))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"CondConvWrapper expects (batch, {self.in_channels}, height, width) inputs, got {tuple(x.shape)}."
            )
        return self.conv(x, self.routing_weights(x).to(self.conv.weight.dtype))

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, num_experts: int = 8, init_noise: float = 1e-2) -> CondConvWrapper:
        """A CondConv whose output equals `conv`'s at initialisation (up to rounding).

        The routing FC starts at weight 0 and bias logit(1/k), so every routing weight is 1/k for every
        input, and the experts are `conv.weight` plus zero-mean perturbations (relative size `init_noise`,
        summing to 0 over the experts): `sum_i W_i / k` is the dense kernel. Without the perturbations the
        experts, and with them the routing rows, would get identical gradients and never differ.
        """
        if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"from_dense needs an nn.Conv2d with integer zero padding, got {conv!r}.")
        weight = conv.weight
        module = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, num_experts=num_experts,
            device=weight.device, dtype=weight.dtype,
        )  # fmt: skip
        with torch.no_grad():
            dense = weight.detach().reshape(1, -1).float()
            noise = torch.randn(num_experts, dense.shape[1], device=weight.device)
            noise = (noise - noise.mean(dim=0, keepdim=True)) * init_noise * dense.std().clamp_min(1e-12)
            module.conv.weight.copy_(dense + noise if num_experts > 1 else dense)
            if conv.bias is not None:
                module.conv.bias.copy_(conv.bias.detach().expand(num_experts, -1))
            module.routing.weight.zero_()
            module.routing.bias.fill_(-math.log(num_experts - 1) if num_experts > 1 else 20.0)  # logit(1/k)
        return module


def _stem_conv(model: nn.Module) -> nn.Conv2d:
    """The first convolution (the stem), which stays static, as the paper's "all convolution layers
    except the first layer": ResNet's `embedder.embedder.convolution`, MobileNetV2's `conv_stem.first_conv`."""
    return next(module for module in model.modules() if isinstance(module, nn.Conv2d))


def convert_convs_to_condconv(model: nn.Module, num_experts: int = 8, init_noise: float = 1e-2) -> nn.Module:
    """Replace, in place, every `nn.Conv2d` of a Transformers ResNet / MobileNetV2 model except the stem by a
    `CondConvWrapper` initialised from it (`CondConvWrapper.from_dense`: outputs unchanged). Returns `model`.

    Trains from scratch as well: a model built with `from_config` starts from its own random dense
    kernels. `num_experts` = k (the paper's CondConv baseline: 8).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"convert_convs_to_condconv supports Transformers' {list(SUPPORTED_MODEL_TYPES)} models, got "
            f"{type(model).__name__} (model_type {model_type!r})."
        )
    stem = _stem_conv(model)
    targets = [
        (name, module) for name, module in model.named_modules() if isinstance(module, nn.Conv2d) and module is not stem
    ]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no convolution besides the stem: nothing to convert.")
    for name, conv in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, CondConvWrapper.from_dense(conv, num_experts=num_experts, init_noise=init_noise))
    logger.info(f"CondConv: {len(targets)} convolutions of {type(model).__name__} now have {num_experts} experts.")
    return model
