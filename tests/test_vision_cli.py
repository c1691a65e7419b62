"""`pad-moe inspect` and `pad-moe analyze` on vision checkpoints (PAD dynamic convolution, plain ResNet)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageClassification, ResNetConfig, ResNetForImageClassification

import pad_moe_transformers  # noqa: F401
from pad_moe_transformers.cli import main
from pad_moe_transformers.core import named_pad_linears
from pad_moe_transformers.partition import partition_model
from pad_moe_transformers.vision import PADDyConvConfig
from pad_moe_transformers.vision.complexity import count_parameters

CONFIG = ResNetConfig(layer_type="basic", depths=[1, 1], hidden_sizes=[8, 16], embedding_size=8, num_labels=3)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A plain ResNet and a PAD (random partition, kappa 0.3) and a DY-Conv model of the same shape, saved."""
    root = tmp_path_factory.mktemp("vision_ckpts")
    torch.manual_seed(0)
    ResNetForImageClassification(CONFIG).save_pretrained(root / "static")
    dy = AutoModelForImageClassification.from_config(PADDyConvConfig.from_base(CONFIG, dynamic_ratio=1.0))
    dy.save_pretrained(root / "dyconv")
    pad = AutoModelForImageClassification.from_config(PADDyConvConfig.from_base(CONFIG, dynamic_ratio=0.3))
    with torch.no_grad():  # kernels apart so the per-image kernels vary
        for ref in named_pad_linears(pad):
            ref.module.expert_weight.add_(0.1 * torch.randn_like(ref.module.expert_weight))
    batches = [{"pixel_values": torch.randn(4, 3, 16, 16), "labels": torch.randint(0, 3, (4,))} for _ in range(2)]
    partition_model(pad, batches, method="random", dynamic_ratio=0.3, num_batches=2, progress=False)
    pad.save_pretrained(root / "pad")
    return root, pad


def test_inspect_vision_checkpoint_json_and_plot(capsys, checkpoints, tmp_path):
    root, pad = checkpoints
    code, out, err = run(capsys, "inspect", root / "pad", "--json", "--plot", tmp_path / "pad.png")
    assert code == 0, err
    info = json.loads(out)
    assert info["class"] == "PADDyConvForImageClassification" and info["base_model_type"] == "resnet"
    assert info["partition"]["method"] == "random"
    assert len(info["convs"]) == len(named_pad_linears(pad))
    assert all(r["dynamic_ratio"] == pytest.approx(0.3, abs=0.02) for r in info["convs"])
    assert info["parameters"]["total"] == count_parameters(pad).total
    assert info["bytes_on_disk"]["pad_convs"] > 0 and info["bytes_on_disk"]["theory"] > 0
    assert (tmp_path / "pad.png").stat().st_size > 0


def test_inspect_vision_table_and_errors(capsys, checkpoints, tmp_path):
    root, _ = checkpoints
    code, out, err = run(capsys, "inspect", root / "dyconv")
    assert code == 0, err
    assert "none (fully dynamic: DY-Conv)" in out and "kernel shape" in out
    text = tmp_path / "t.txt"
    text.write_text("a sentence\n")
    code, _, err = run(capsys, "inspect", root / "pad", "--text_file", text)
    assert code == 2 and "inspected without inputs" in err


def test_analyze_vision_models_on_digits(capsys, checkpoints, tmp_path):
    pytest.importorskip("sklearn")
    root, _ = checkpoints
    code, out, err = run(
        capsys, "analyze", f"static={root / 'static'}", f"pad={root / 'pad'}", f"dy={root / 'dyconv'}",
        "--images", "digits", "--samples", "24", "--image_size", "16", "--batch_size", "8", "--json",
        "--plot", tmp_path / "fig6.png",
    )  # fmt: skip
    assert code == 0, err
    info = json.loads(out)
    assert info["unit"] == "image" and info["samples"] == 24
    static, pad, dy = info["models"]
    assert static["model"] == "static" and pad["model"].startswith("PAD (random") and dy["model"].startswith("DY-Conv")
    assert len(static["layers"]) == len(pad["layers"]) == len(dy["layers"]) > 0
    assert all(layer["parameter_variance"] == 0 and layer["output_variance"] > 0 for layer in static["layers"])
    assert all(layer["dynamic"] and layer["units"] == 24 for layer in pad["layers"])
    assert sum(layer["parameter_variance"] for layer in pad["layers"]) > 0
    assert (tmp_path / "fig6.png").stat().st_size > 0
    code, out, err = run(capsys, "analyze", root / "pad", "--images", "digits", "--samples", "8", "--image_size", "16")
    assert code == 0 and "param var" in out, err


def test_analyze_vision_bad_images(capsys, checkpoints, tmp_path):
    root, _ = checkpoints
    torch.save(torch.randn(4, 1, 16, 16), tmp_path / "gray.pt")
    code, _, err = run(capsys, "analyze", root / "pad", "--images", tmp_path / "gray.pt")
    assert code == 2 and "1 channels; the models expect 3" in err


def test_conv_dynamic_property_matches_per_image_kernels(checkpoints):
    from pad_moe_transformers.analysis import conv_dynamic_property

    _, pad = checkpoints
    images = [torch.randn(5, 3, 16, 16) for _ in range(2)]
    result = conv_dynamic_property(pad, images, progress=False)
    conv = named_pad_linears(pad)[0].module
    inputs = []
    handle = conv.register_forward_hook(lambda module, args, output: inputs.append(args[0]))
    with torch.no_grad():
        outputs = [pad.eval()(pixel_values=x) for x in images]
    handle.remove()
    assert outputs
    with torch.no_grad():
        x = torch.cat(inputs)
        kernels = conv.sample_kernels(conv.attention_weights(x)).reshape(x.shape[0], -1).double()
        y = conv(x).reshape(x.shape[0], -1).double()
    first = result.layers[0]
    assert first.parameter_variance == pytest.approx(kernels.var(dim=0, unbiased=False).mean().item(), rel=1e-6)
    assert first.output_variance == pytest.approx(y.var(dim=0, unbiased=False).mean().item(), rel=1e-5)
