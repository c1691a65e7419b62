"""Vision (PAD dynamic convolution) support of `pad-moe inspect` and `pad-moe analyze`: loading a
checkpoint, the per-convolution inspect table and plot, and the images the analysis runs on."""

from __future__ import annotations

from typing import Any

import torch
from transformers.utils import logging

from . import _common
from ._common import CLIError

logger = logging.get_logger("pad_moe_transformers.cli")

VISION_MODEL_TYPES = ("pad_dyconv", "resnet", "mobilenet_v2")


def load_vision_model(path: str):
    """A PAD dynamic-convolution checkpoint with the head it was saved with."""
    from ..vision import modeling_pad_dyconv

    path, config = _common.load_config(path)
    cls = next(
        (getattr(modeling_pad_dyconv, n) for n in config.architectures or [] if hasattr(modeling_pad_dyconv, n)),
        modeling_pad_dyconv.PADDyConvModel,
    )
    logger.info(f"Loading {path} as {cls.__name__}")
    return path, cls.from_pretrained(path)


def collect_inspect(path: str, model, sizes: dict[str, int], header_bytes: int, files: int) -> dict[str, Any]:
    """What `inspect` shows for a PAD dynamic-convolution checkpoint, per convolution (JSON-serialisable);
    `sizes` are the data bytes of every tensor in its `files` safetensors files, `header_bytes` the rest."""
    from ..checkpoint import theoretical_checkpoint_size
    from ..core import named_pad_linears
    from ..vision.complexity import count_parameters

    config = model.config
    params = count_parameters(model).to_dict()
    per_conv = params.pop("layers")
    convs, pad_bytes = [], 0
    for index, ref in enumerate(named_pad_linears(model)):
        conv = ref.module
        on_disk = sum(v for k, v in sizes.items() if k.startswith(ref.name + "."))
        pad_bytes += on_disk
        l_s, l_d = conv.scale_factors()
        counts = per_conv.get(ref.name, {})
        convs.append(
            {
                "index": index,
                "name": ref.name,
                "shape": list(conv.mask.shape),
                "groups": conv.groups,
                "stride": list(conv.stride),
                "dynamic_ratio": conv.dynamic_ratio(),
                "l_s": float(l_s.detach()),
                "l_d": float(l_d.detach()),
                "dynamic": counts.get("dynamic", 0),
                "static": counts.get("static", 0),
                "bytes_on_disk": on_disk,
            }
        )
    partition = config.partition
    keys = ("method", "score", "scope", "target_dynamic_ratio", "achieved_dynamic_ratio_total", "num_batches")
    return {
        "path": path,
        "class": type(model).__name__,
        "base_model_type": config.base_model_type,
        "num_kernels": config.num_kernels,
        "scale_factor_mode": config.scale_factor_mode,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "partition": None if partition is None else {k: partition.get(k) for k in keys},
        "parameters": params,
        "bytes_on_disk": {
            "total": sum(sizes.values()) + header_bytes,
            "pad_convs": pad_bytes,
            "other_tensors": sum(sizes.values()) - pad_bytes,
            "headers": header_bytes,
            "theory": theoretical_checkpoint_size(model)["total_bytes"],
            "files": files,
        },
        "convs": convs,
    }


def render_inspect(info: dict[str, Any]) -> str:
    h = _common
    part, params, disk = info["partition"], info["parameters"], info["bytes_on_disk"]
    lines = [
        f"{info['path']}: {info['class']} ({info['base_model_type']}), {info['num_kernels']} kernels per convolution, "
        f"scale factors {info['scale_factor_mode']}, {info['dtype']}",
        "partition: "
        + (
            "none (fully dynamic: DY-Conv)"
            if part is None
            else f"{part['method']}, kappa {part['target_dynamic_ratio']} (achieved "
            f"{part['achieved_dynamic_ratio_total']:.4f}), {part['num_batches']} batches"
        ),
        f"parameters: {h.human_count(params['total'])} total ({h.human_count(params['dynamic'])} dynamic, "
        f"{h.human_count(params['static'])} static, {h.human_count(params['attention'])} attention, "
        f"{h.human_count(params['classifier'] + params['other'])} other)",
        f"on disk: {h.human_bytes(disk['total'])} in {disk['files']} file(s) (PAD convolutions "
        f"{h.human_bytes(disk['pad_convs'])}, other tensors {h.human_bytes(disk['other_tensors'])}; "
        f"theory {h.human_bytes(disk['theory'])})",
        "",
    ]
    rows = [
        [
            r["index"],
            r["name"],
            "x".join(map(str, r["shape"])),
            r["groups"],
            f"{r['dynamic_ratio']:.4f}",
            f"{r['l_s']:.4f}",
            f"{r['l_d']:.4f}",
            f"{r['dynamic']:,}",
            f"{r['static']:,}",
            h.human_bytes(r["bytes_on_disk"]),
        ]
        for r in info["convs"]
    ]
    headers = ["#", "convolution", "kernel shape", "groups", "dynamic", "l_s", "l_d", "params dynamic",
               "params static", "on disk"]  # fmt: skip
    lines.append(h.format_table(headers, rows, right=[True, False, False] + [True] * 7))
    return "\n".join(lines)


def plot_inspect(info: dict[str, Any], path: str) -> None:
    plt = _common.pyplot()
    convs = info["convs"]
    index = [r["index"] for r in convs]
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.18 * len(convs) + 2), 5.5), sharex=True)
    axes[0].bar(index, [r["dynamic_ratio"] for r in convs])
    axes[0].set_ylim(0, 1)
    axes[0].set_ylabel("dynamic ratio")
    axes[1].plot(index, [r["l_s"] for r in convs], marker="o", label="l_s")
    axes[1].plot(index, [r["l_d"] for r in convs], marker="s", label="l_d")
    axes[1].set_ylabel("scale factor")
    axes[1].set_xlabel("convolution (module order, stem excluded)")
    axes[1].legend(fontsize=8)
    _common.save_inspect_figure(fig, info, path)


# ------------------------------------------------------------------------------------ analyze
def is_vision_checkpoint(path: str) -> bool:
    return _common.load_config(path)[1].model_type in VISION_MODEL_TYPES


def load_vision_any(path: str):
    """A PAD dynamic-convolution checkpoint (kind ``"pad"``) or a dense Transformers ResNet / MobileNetV2
    (``"dense"``), each with its saved head. Returns `(path, model, kind)`."""
    import transformers

    path, config = _common.load_config(path)
    if config.model_type == "pad_dyconv":
        return (*load_vision_model(path), "pad")
    if config.model_type not in VISION_MODEL_TYPES:
        raise CLIError(
            f"{path} is a {config.model_type!r} model and the other models are vision models; supported: "
            f"{list(VISION_MODEL_TYPES)}."
        )
    cls = next(
        (getattr(transformers, n) for n in config.architectures or [] if hasattr(transformers, n)),
        transformers.AutoModelForImageClassification,
    )
    return path, cls.from_pretrained(path), "dense"


def describe(model, kind: str) -> str:
    if kind == "dense":
        return "static"
    partition = model.config.partition
    if partition is None:
        return f"DY-Conv ({model.config.num_kernels} kernels)"
    return f"PAD ({partition.get('method')}, kappa {partition.get('target_dynamic_ratio')})"


def load_images(source: str, image_size: int, samples: int, batch_size: int, num_channels: int) -> list[torch.Tensor]:
    """Batches `(B, C, H, W)` of the first `samples` images of `source`: ``digits`` (scikit-learn's handwritten
    digits, the 540 test images of the fixed split of examples/run_image_classification.py, upsampled to
    `image_size`, grey replicated to `num_channels`, standardised) or a ``.pt`` file holding an `(N, C, H, W)`
    tensor (used as saved)."""
    if source == "digits":
        try:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split
        except ImportError:
            raise CLIError("--images digits needs scikit-learn: pip install scikit-learn.") from None
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        train, test = train_test_split(range(len(images)), test_size=0.3, stratify=digits.target, random_state=0)
        images = torch.nn.functional.interpolate(images, size=(image_size, image_size), mode="bilinear")
        images = (images - images[train].mean()) / images[train].std()
        images = images[test].expand(-1, num_channels, -1, -1)
    else:
        try:
            images = torch.load(source, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as error:
            raise CLIError(f"--images {source}: not 'digits' nor a readable .pt tensor file ({error}).") from None
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise CLIError(f"--images {source} must hold one (N, C, H, W) tensor.")
        if images.shape[1] != num_channels:
            raise CLIError(f"--images {source} has {images.shape[1]} channels; the models expect {num_channels}.")
    images = images[:samples].float().contiguous()
    return [images[i : i + batch_size] for i in range(0, images.shape[0], batch_size)]


def analyze(args, specs: list[tuple[str, str]]) -> dict[str, Any]:
    """`pad-moe analyze` on vision models: `analysis.conv_dynamic_property` of each on the same images."""
    from ..analysis import conv_dynamic_property

    loaded = [(label, *load_vision_any(path)) for label, path in specs]
    channels = {getattr(getattr(m.config, "base_config", m.config), "num_channels", 3) for _, _, m, _ in loaded}
    if len(channels) != 1:
        raise CLIError(f"the models expect different numbers of input channels ({sorted(channels)}).")
    batches = load_images(args.images, args.image_size, args.samples, args.batch_size, channels.pop())
    results = []
    for label, path, model, kind in loaded:
        result = conv_dynamic_property(model, batches, desc=f"Dynamic property ({label})")
        results.append({"label": label, "path": path, "kind": kind, "model": describe(model, kind), **result.to_dict()})
    return {
        "unit": "image",
        "samples": int(sum(b.shape[0] for b in batches)),
        "source": f"{args.images} ({args.image_size}x{args.image_size})" if args.images == "digits" else args.images,
        "models": results,
    }
