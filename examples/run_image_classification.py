#!/usr/bin/env python
"""Train a static, CondConv, DY-Conv or PAD-Net (DY-Conv in PAD form) ResNet / MobileNetV2 on images.

In the style of transformers' `examples/pytorch/image-classification`: dataclass arguments parsed by
`HfArgumentParser` (command line or one `.json` / `.yaml` file) and the `Trainer`. Models are built from a
config (`--model_config resnet10|resnet18|resnet50|mobilenetv2` or a config / checkpoint path) and trained
from scratch as the paper does, or upcycled from a dense checkpoint (`--model_name_or_path`).

    python examples/run_image_classification.py --mode pad --output_dir out/digits_pad     # offline: digits
    python examples/run_image_classification.py --dataset_name cifar10 --mode dyconv --output_dir out/c10

Modes (as `run_glue.py`'s):
    static     the plain Transformers model
    condconv   every convolution but the stem a CondConv (timm's CondConv2d, k = --condconv_experts)
    dyconv     every convolution but the stem a DY-Conv (PAD with kappa = 1, k = --num_kernels)
    pad        DY-Conv partitioned at the start of training on --partition_batches batches
               (`IMPTrainerCallback`, --partition_method imp|mp|random, --kappa)
DY-Conv and PAD anneal the attention temperature from 30 to 1 (`TemperatureScheduleCallback`).

Data: `--dataset_name digits` (default, offline: scikit-learn's 1,797 handwritten digits, a fixed stratified
70/30 split, upsampled to --image_size, 3 channels), a hub dataset (`--dataset_name cifar10`) or an image
folder (`--train_dir`). Results: `all_results.json` (accuracy, wall time, parameters) and `image_run.json`
in `--output_dir`, and the model (`save_model`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import transformers
from image_data import DIGITS, ImageData, load_digits_data, load_hub_or_folder_data  # next to this script
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    HfArgumentParser,
    MobileNetV2Config,
    ResNetConfig,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

import pad_moe_transformers  # noqa: F401  (registers the pad_dyconv Auto classes)
from pad_moe_transformers.vision import PADDyConvConfig
from pad_moe_transformers.vision.complexity import count_parameters

logger = logging.getLogger(__name__)

MODES = ("static", "condconv", "dyconv", "pad")
PARTITION_METHODS = ("imp", "mp", "random")
MODEL_CONFIGS = ("resnet10", "resnet18", "resnet50", "mobilenetv2")


@dataclass
class ModelArguments:
    model_config: str = field(
        default="resnet10",
        metadata={"help": f"{', '.join(MODEL_CONFIGS)}, or a config.json / checkpoint folder (built from its config)."},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A dense checkpoint to start from (upcycled for dyconv/pad), or a saved PAD checkpoint."},
    )
    width_multiplier: float = field(
        default=1.0,
        metadata={
            "help": "Scales ResNet's channel widths (hidden_sizes, embedding_size) or MobileNetV2's depth_multiplier."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder for hub downloads."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=DIGITS, metadata={"help": "'digits' (offline, scikit-learn) or a hub dataset such as cifar10."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder (one subfolder per class)."})
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder of the eval split."})
    image_size: int = field(default=32, metadata={"help": "Images are resized to image_size x image_size."})
    test_size: float = field(default=0.3, metadata={"help": "Digits: held-out fraction (stratified, fixed)."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the digits split / the held-out split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on N images drawn with split_seed."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on N images drawn with split_seed."})

    def __post_init__(self):
        if self.train_dir is not None:
            self.dataset_name = None


@dataclass
class DynamicArguments:
    mode: str = field(default="pad", metadata={"help": "static, condconv, dyconv or pad.", "choices": list(MODES)})
    num_kernels: int = field(default=4, metadata={"help": "DY-Conv / PAD kernels per convolution (paper: 4)."})
    condconv_experts: int = field(default=8, metadata={"help": "CondConv experts per convolution (paper: 8)."})
    kappa: float = field(
        default=0.3,
        metadata={
            "help": "PAD dynamic ratio: fraction of each kernel kept dynamic (paper: 0.3).",
            "aliases": ["--dynamic_ratio"],
        },
    )
    partition_method: str = field(
        default="imp", metadata={"help": "imp, mp or random.", "choices": list(PARTITION_METHODS)}
    )
    partition_batches: int = field(default=10, metadata={"help": "Training batches the partition scores (paper: 10)."})
    scale_factor_mode: str = field(default="sum2", metadata={"help": "Scale factors of eq. 4 (default sum2)."})
    temperature_init: float = field(default=30.0, metadata={"help": "Attention temperature at step 0 (DY-Conv: 30)."})
    temperature_final: float = field(default=1.0, metadata={"help": "Temperature after the annealing (DY-Conv: 1)."})
    temperature_epochs: float | None = field(
        default=None,
        metadata={"help": "Epochs of linear annealing (default: 10% of num_train_epochs, as DY-Conv's 10 of 100)."},
    )


@dataclass
class ImageTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the paper's (sec. 5.1) CNN recipe as defaults: SGD momentum 0.9, cosine with warm-up."""

    learning_rate: float = field(
        default=0.1, metadata={"help": "Peak learning rate (paper: 0.1 ResNet, 0.05 MobileNetV2)."}
    )
    optim: str = field(default="sgd", metadata={"help": "Optimizer (paper: SGD)."})
    optim_args: str | None = field(
        default="momentum=0.9", metadata={"help": "Optimizer arguments (paper: momentum 0.9)."}
    )
    weight_decay: float = field(default=1e-4, metadata={"help": "Weight decay (paper: 1e-4 ResNet, 4e-5 MobileNetV2)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Schedule (paper: cosine)."})
    warmup_steps: float = field(
        default=0.1, metadata={"help": "Warm-up steps, or a ratio < 1 (paper: 10 of 100 epochs)."}
    )
    num_train_epochs: float = field(default=15.0, metadata={"help": "Epochs."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Training batch size."})
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Evaluation batch size."})
    save_strategy: str = field(
        default="no", metadata={"help": "Checkpointing during training; the final model is saved."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the image column for the transform."})


def base_config(model_args: ModelArguments, num_labels: int, image_size: int, num_channels: int):
    """The dense config of `--model_config` (ImageNet-shaped; `--width_multiplier` scales the channels)."""
    name, w = model_args.model_config, model_args.width_multiplier
    common = dict(num_labels=num_labels, num_channels=num_channels)
    if name in ("resnet10", "resnet18"):
        return ResNetConfig(
            layer_type="basic", depths=[1, 1, 1, 1] if name == "resnet10" else [2, 2, 2, 2],
            hidden_sizes=[max(1, round(c * w)) for c in (64, 128, 256, 512)], embedding_size=max(1, round(64 * w)),
            **common,
        )  # fmt: skip
    if name == "resnet50":
        return ResNetConfig(
            layer_type="bottleneck", depths=[3, 4, 6, 3],
            hidden_sizes=[max(1, round(c * w)) for c in (256, 512, 1024, 2048)], embedding_size=max(1, round(64 * w)),
            downsample_in_bottleneck=True, **common,
        )  # fmt: skip
    if name == "mobilenetv2":
        return MobileNetV2Config(depth_multiplier=w, image_size=image_size, **common)
    config = AutoConfig.from_pretrained(name, cache_dir=model_args.cache_dir)
    return config.base_config if isinstance(config, PADDyConvConfig) else config


def build_model(model_args, data: ImageData, data_args: DataArguments, dyn: DynamicArguments, epochs: float):
    labels = dict(id2label=dict(enumerate(data.label_names)), label2id={n: i for i, n in enumerate(data.label_names)})
    path = model_args.model_name_or_path
    if path is not None and AutoConfig.from_pretrained(path).model_type == PADDyConvConfig.model_type:
        logger.info(f"{path} is a PAD dynamic-convolution checkpoint: loading it as is.")
        return AutoModelForImageClassification.from_pretrained(path)
    base = (
        AutoConfig.from_pretrained(path)
        if path
        else base_config(model_args, len(data.label_names), data_args.image_size, data.num_channels)
    )
    base.update(dict(num_labels=len(data.label_names), **labels))
    if dyn.mode in ("static", "condconv"):
        model = (
            AutoModelForImageClassification.from_pretrained(path, config=base, ignore_mismatched_sizes=True)
            if path
            else AutoModelForImageClassification.from_config(base)
        )
        if dyn.mode == "condconv":
            from pad_moe_transformers.vision.condconv import convert_convs_to_condconv

            convert_convs_to_condconv(model, num_experts=dyn.condconv_experts)
        return model
    config = PADDyConvConfig.from_base(
        base, num_kernels=dyn.num_kernels, dynamic_ratio=1.0 if dyn.mode == "dyconv" else dyn.kappa,
        scale_factor_mode=dyn.scale_factor_mode, temperature_init=dyn.temperature_init,
        temperature_final=dyn.temperature_final,
        temperature_epochs=dyn.temperature_epochs if dyn.temperature_epochs is not None else max(0.1 * epochs, 1e-6),
    )  # fmt: skip
    if path:
        return AutoModelForImageClassification.from_pretrained(path, config=config, ignore_mismatched_sizes=True)
    return AutoModelForImageClassification.from_config(config)


def subset(dataset, limit: int | None, seed: int):
    if limit is None:
        return dataset
    if hasattr(dataset, "subset"):
        return dataset.subset(limit, seed)
    return dataset.shuffle(seed=seed).select(range(min(limit, len(dataset))))


def compute_metrics(prediction) -> dict[str, float]:
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == prediction.label_ids).mean())}


def parse_args(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataArguments, DynamicArguments, ImageTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(yaml_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the example; returns the evaluation metrics (with `eval_accuracy` and `train_wall_s`)."""
    model_args, data_args, dyn, training_args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", handlers=[logging.StreamHandler(sys.stdout)]
    )
    logger.setLevel(training_args.get_process_log_level())
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    if not 0.0 < dyn.kappa <= 1.0:
        raise ValueError(f"--kappa must be in (0, 1] (the fraction of each kernel kept dynamic), got {dyn.kappa}.")
    set_seed(training_args.seed)

    if data_args.dataset_name == DIGITS:
        data = load_digits_data(data_args.image_size, data_args.test_size, data_args.split_seed)
    elif data_args.dataset_name is None and data_args.train_dir is None:
        raise ValueError("Give --dataset_name (digits or a hub dataset) or --train_dir (an image folder).")
    else:
        data = load_hub_or_folder_data(
            data_args.dataset_name, data_args.dataset_config_name, data_args.train_dir, data_args.validation_dir,
            data_args.image_size, split_seed=data_args.split_seed, cache_dir=model_args.cache_dir,
        )  # fmt: skip
    train_dataset = subset(data.train, data_args.max_train_samples, data_args.split_seed)
    eval_dataset = subset(data.eval, data_args.max_eval_samples, data_args.split_seed)

    model = build_model(model_args, data, data_args, dyn, training_args.num_train_epochs)
    callbacks = []
    if dyn.mode in ("dyconv", "pad"):
        from pad_moe_transformers.vision import TemperatureScheduleCallback

        callbacks.append(TemperatureScheduleCallback())
    if dyn.mode == "pad" and not getattr(model.config, "is_partitioned", False) and training_args.do_train:
        from pad_moe_transformers import IMPTrainerCallback

        callbacks.append(
            IMPTrainerCallback(dynamic_ratio=dyn.kappa, num_batches=dyn.partition_batches, method=dyn.partition_method)
        )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )

    metrics: dict[str, float] = {}
    if training_args.do_train:
        start = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics.update(result.metrics, train_wall_s=time.perf_counter() - start, train_samples=len(train_dataset))
        trainer.save_model()
    if training_args.do_eval:
        metrics.update(trainer.evaluate(), eval_samples=len(eval_dataset))
    parameters = count_parameters(model).to_dict()
    parameters.pop("layers")
    metrics.update({f"parameters_{k}": v for k, v in parameters.items()})
    trainer.log_metrics("all", metrics)
    trainer.save_metrics("all", metrics, combined=False)
    if trainer.is_world_process_zero():
        run = {"model": asdict(model_args), "data": asdict(data_args), "dynamic": asdict(dyn), "metrics": metrics}
        run["partition"] = getattr(model.config, "partition", None)
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(training_args.output_dir) / "image_run.json").write_text(json.dumps(run, indent=2, default=str))
    return metrics


if __name__ == "__main__":
    main()
