#!/usr/bin/env python
"""Fine-tune a dense, MoE, PAD-MoE or MoE-P (SNIP-pruned MoE) BERT-family encoder on a GLUE task.

In the style of transformers' `examples/pytorch/text-classification/run_glue.py`: arguments come in
dataclass groups (model / data / PAD / training) parsed by `HfArgumentParser`, from the command
line or from one `.json` / `.yaml` file.

    python examples/run_glue.py --task rte --mode pad --data_dir glue_data \
        --do_train --do_eval --output_dir out/rte_pad [--bf16 auto]

Precision: fp32 by default; `--bf16 --use_cpu` runs bf16 autocast on a CPU (Trainer needs both; `--bf16` alone
also works on a machine without an accelerator), `--bf16 auto` takes bf16 where the hardware computes it
natively (a bf16 GPU, or a CPU with AVX512-BF16 / AMX-BF16 / Arm BF16). The output says which, and whether
the CPU's bf16 is native. The routers stay fp32 under autocast.

Modes:
    static      the dense model (`AutoModelForSequenceClassification`)
    moe         the dense model upcycled to a PAD-MoE model that stays fully dynamic (a plain MoE)
    pad         upcycled, then partitioned into dynamic / static parameters at the start of
                training (`IMPTrainerCallback`, `--partition imp|mp|random`, `--dynamic_ratio`)
    moe_pruned  upcycled, then SNIP-pruned to PAD's parameter count (paper Table 5, MoE-P)

Data: the original GLUE TSVs under `--data_dir`, or the hub dataset `nyu-mll/glue` without it.
Results: `eval_results.json` / `all_results.json` in `--output_dir`, plus the model (`save_model`).
The arguments are in `glue_arguments.py` (next to this script); docs/glue.md says why the defaults are what they are.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

import datasets
import numpy as np
import transformers
from glue_arguments import DataTrainingArguments, ModelArguments, PADArguments, parse_args  # next to this script
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

import pad_moe_transformers as pmt
from pad_moe_transformers.core import named_pad_linears
from pad_moe_transformers.glue import build_compute_metrics, describe_precision, get_task, load_glue_tsv
from pad_moe_transformers.training import pad_optimizer_cls_and_kwargs

logger = logging.getLogger(__name__)


def setup_logging(training_args: TrainingArguments) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments):
    task = get_task(data_args.task_name)
    if data_args.data_dir is not None:
        return load_glue_tsv(task, data_args.data_dir)
    return datasets.load_dataset(
        data_args.dataset_name, task.name, cache_dir=model_args.cache_dir, token=model_args.token
    )


def is_pad_checkpoint(model_args: ModelArguments) -> bool:
    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
    )
    return config.model_type == pmt.PADMoEConfig.model_type


def build_model(model_args: ModelArguments, data_args: DataTrainingArguments, pad_args: PADArguments):
    """The model of `--mode`: dense, or upcycled to PAD-MoE (or a saved PAD-MoE checkpoint, loaded as is)."""
    task = get_task(data_args.task_name)
    hub_kwargs = dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token)
    head = dict(num_labels=task.num_labels)
    if not task.is_regression:
        head.update(id2label=task.id2label, label2id=task.label2id)
    path = model_args.model_name_or_path
    if is_pad_checkpoint(model_args):
        if pad_args.mode == "static":
            raise ValueError(f"{path} is a PAD-MoE checkpoint; --mode static needs a dense checkpoint.")
        logger.info(f"{path} is a PAD-MoE checkpoint: loading it as is (no upcycling).")
        model = AutoModelForSequenceClassification.from_pretrained(
            path, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **hub_kwargs
        )
        partition = model.config.partition or {}
        if partition.get("method") == "moe_p":
            from pad_moe_transformers.partition import attach_moe_p_constraints

            attach_moe_p_constraints(model)
        return model
    if pad_args.mode == "static":
        return AutoModelForSequenceClassification.from_pretrained(
            path, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **head, **hub_kwargs
        )
    extra = {}
    if pad_args.router_aux_loss_coef is not None:
        extra["router_aux_loss_coef"] = pad_args.router_aux_loss_coef
    if pad_args.scale_factor_mode is not None:
        extra["scale_factor_mode"] = pad_args.scale_factor_mode
    if pad_args.partition_granularity is not None:
        extra["partition_granularity"] = pad_args.partition_granularity
    config = pmt.PADMoEConfig.from_base(
        path,
        num_experts=pad_args.num_experts,
        num_experts_per_tok=pad_args.num_experts_per_tok,
        dynamic_ratio=pad_args.dynamic_ratio,
        hub_kwargs=hub_kwargs,
        **head,
        **extra,
    )
    return AutoModelForSequenceClassification.from_pretrained(
        path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **hub_kwargs
    )


def build_partition_callback(pad_args: PADArguments):
    """`IMPTrainerCallback` partitioning (pad) or SNIP-pruning (moe_pruned) the model when training starts."""
    try:
        from pad_moe_transformers.callbacks import IMPTrainerCallback
    except ImportError as err:
        raise ImportError(
            f"--mode {pad_args.mode} needs `pad_moe_transformers.callbacks.IMPTrainerCallback`, which could not be "
            f"imported ({err}). Use --mode moe or --mode static meanwhile."
        ) from err
    method = pad_args.partition if pad_args.mode == "pad" else "moe_p"  # MoE-P: SNIP-pruned MoE
    kwargs = dict(dynamic_ratio=pad_args.dynamic_ratio, num_batches=pad_args.partition_batches, method=method)
    optional = {
        "rounds": pad_args.partition_rounds,
        "score": pad_args.partition_score,
        "scope": pad_args.partition_scope,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    return IMPTrainerCallback(**kwargs)


def build_optimizer(model, training_args: TrainingArguments, pad_args: PADArguments):
    """The Trainer's optimizer (`--optim`); for a PAD model with PAD's groups (own lr for routers / scale factors
    when asked, and the scale factors always out of weight decay, which would pull a free l_s / l_d towards 0)."""
    if not isinstance(model, pmt.PADMoEPreTrainedModel):
        if pad_args.router_learning_rate is not None or pad_args.scale_learning_rate is not None:
            raise ValueError("--router_learning_rate / --scale_learning_rate need a PAD-MoE model (not --mode static).")
        return None
    return pad_optimizer_cls_and_kwargs(
        model,
        training_args,
        router_learning_rate=pad_args.router_learning_rate,
        scale_learning_rate=pad_args.scale_learning_rate,
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the example; returns the evaluation metrics (empty without --do_eval)."""
    model_args, data_args, pad_args, training_args = parse_args(argv)
    setup_logging(training_args)
    logger.warning(
        f"Process rank: {training_args.local_process_index}, device: {training_args.device}, "
        f"n_gpu: {training_args.n_gpu}, distributed: {training_args.parallel_mode.value == 'distributed'}, "
        f"16-bits: {training_args.fp16 or training_args.bf16}"
    )
    precision = "fp16 autocast" if training_args.fp16 else describe_precision(training_args.bf16, training_args.use_cpu)
    logger.warning(f"Precision: {precision}")
    logger.info(f"Model {model_args}\nData {data_args}\nPAD {pad_args}")
    task = get_task(data_args.task_name)

    last_checkpoint = None
    if (
        training_args.do_train
        and os.path.isdir(training_args.output_dir)
        and training_args.resume_from_checkpoint is None
        and not training_args.overwrite_output_dir
    ):
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
        if last_checkpoint is not None:
            logger.info(
                f"Checkpoint found at {last_checkpoint}; resuming from it (set --resume_from_checkpoint to choose)."
            )

    set_seed(training_args.seed)

    # ------------------------------------------------------------------ data
    raw = load_raw_datasets(data_args, model_args)
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
    )
    if data_args.max_seq_length > tokenizer.model_max_length:
        logger.warning(
            f"max_seq_length={data_args.max_seq_length} exceeds the tokenizer's model_max_length="
            f"{tokenizer.model_max_length}; using {tokenizer.model_max_length}."
        )
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)
    padding = "max_length" if data_args.pad_to_max_length else False

    def preprocess(examples):
        texts = [examples[column] for column in task.text_columns]
        result = tokenizer(*texts, padding=padding, max_length=max_seq_length, truncation=True)
        result["label"] = examples["label"]
        return result

    def prepare(split: str, limit: int | None, sample_seed: int | None = None):
        dataset = raw[split]
        if limit is not None:
            if sample_seed is not None:
                dataset = dataset.shuffle(seed=sample_seed).flatten_indices()
            dataset = dataset.select(range(min(limit, len(dataset))))
        with training_args.main_process_first(desc=f"tokenizing {split}"):
            return dataset.map(
                preprocess,
                batched=True,
                num_proc=data_args.preprocessing_num_workers,
                remove_columns=dataset.column_names,
                desc=f"Tokenizing {task.name} {split}",
            )

    train_dataset = eval_datasets = predict_datasets = None
    if training_args.do_train:
        if task.train_split not in raw:
            raise ValueError(f"--do_train needs a {task.train_split!r} split; found {list(raw)}.")
        train_dataset = prepare(task.train_split, data_args.max_train_samples, data_args.train_sample_seed)
    if training_args.do_eval:
        missing = [s for s in task.eval_splits if s not in raw]
        if missing:
            raise ValueError(
                f"--do_eval needs the splits {list(task.eval_splits)}; missing {missing} (found {list(raw)})."
            )
        eval_datasets = {s: prepare(s, data_args.max_eval_samples) for s in task.eval_splits}
    if training_args.do_predict:
        missing = [s for s in task.test_splits if s not in raw]
        if missing:
            raise ValueError(
                f"--do_predict needs the splits {list(task.test_splits)}; missing {missing} (found {list(raw)})."
            )
        predict_datasets = {
            s: prepare(s, data_args.max_predict_samples).remove_columns("label") for s in task.test_splits
        }

    # ------------------------------------------------------------------ model
    model = build_model(model_args, data_args, pad_args)
    callbacks = []
    if pad_args.mode in ("pad", "moe_pruned"):
        if getattr(model.config, "is_partitioned", False):
            logger.info(f"The model is already partitioned ({model.config.partition.get('method')}); no new partition.")
        elif training_args.do_train:
            callbacks.append(build_partition_callback(pad_args))
        else:
            logger.warning(
                f"--mode {pad_args.mode} without --do_train: the model is evaluated unpartitioned (fully dynamic)."
            )
    if isinstance(model, pmt.PADMoEPreTrainedModel):
        report = model.parameter_report()
        logger.info(
            f"PAD-MoE parameters: total {report.total:,}, MoE-equivalent {report.moe_equivalent:,}, "
            f"dense-equivalent {report.dense_equivalent:,}"
        )

    if data_args.pad_to_max_length:
        data_collator = default_data_collator
    else:
        pad_multiple = 8 if (training_args.fp16 or training_args.bf16) else None
        data_collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_multiple)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_datasets[task.eval_splits[0]] if eval_datasets else None,
        processing_class=tokenizer,
        data_collator=data_collator,
        compute_metrics=build_compute_metrics(task),
        callbacks=callbacks,
        optimizer_cls_and_kwargs=build_optimizer(model, training_args, pad_args),
    )

    # ------------------------------------------------------------------ train
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        metrics = dict(train_result.metrics)
        metrics["train_samples"] = len(train_dataset)
        trainer.save_model()  # also saves the tokenizer
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    # ------------------------------------------------------------------ evaluate
    eval_results: dict[str, float] = {}
    if training_args.do_eval:
        for split, dataset in eval_datasets.items():
            # MNLI: matched keeps the plain keys, mismatched gets the suffix "_mm" (as transformers' run_glue).
            prefix = "eval_mm" if split.endswith("_mismatched") else "eval"
            metrics = trainer.evaluate(eval_dataset=dataset, metric_key_prefix=prefix)
            metrics[f"{prefix}_samples"] = len(dataset)
            eval_results.update(metrics)
        trainer.log_metrics("eval", eval_results)
        trainer.save_metrics("eval", eval_results)

    # ------------------------------------------------------------------ predict
    if training_args.do_predict:
        for split, dataset in predict_datasets.items():
            predictions = trainer.predict(dataset, metric_key_prefix="predict").predictions
            if isinstance(predictions, tuple):
                predictions = predictions[0]
            predictions = np.squeeze(predictions) if task.is_regression else np.argmax(predictions, axis=-1)
            if trainer.is_world_process_zero():
                path = Path(training_args.output_dir) / f"predict_results_{task.name}{split[len('test') :]}.txt"
                with open(path, "w") as writer:
                    writer.write("index\tprediction\n")
                    for index, item in enumerate(np.atleast_1d(predictions)):
                        value = f"{item:3.3f}" if task.is_regression else task.label_names[int(item)]
                        writer.write(f"{index}\t{value}\n")
                logger.info(f"Predictions for {split} written to {path}.")

    # Parameter counts (as the paper counts them for PAD models: after the partition) go to
    # all_results.json as `parameters_*` and, with the arguments, to glue_run.json.
    if isinstance(model, pmt.PADMoEPreTrainedModel):
        parameters = model.parameter_report().to_dict()
        parameters.pop("layers")
        partition = model.config.partition or {}
        if partition.get("method") == "moe_p" and "kept_expert_entries" in partition:
            # MoE-P keeps M = 1 and zeroes the pruned expert entries, which `parameter_report` still
            # counts as dynamic; count only the kept ones, as the paper does (Table 5).
            entries = sum(ref.module.expert_weight.numel() for ref in named_pad_linears(model))
            parameters["pruned"] = entries - int(partition["kept_expert_entries"])
            parameters["dynamic"] -= parameters["pruned"]
            parameters["total"] -= parameters["pruned"]
    else:
        parameters = {"total": model.num_parameters()}
    os.makedirs(training_args.output_dir, exist_ok=True)
    trainer.save_metrics("parameters", {f"parameters_{k}": v for k, v in parameters.items()})
    if trainer.is_world_process_zero():
        run_info = {"model": asdict(model_args), "data": asdict(data_args), "pad": asdict(pad_args)}
        run_info["parameters"] = parameters
        run_info["partition"] = getattr(model.config, "partition", None)
        run_info["precision"] = precision
        with open(Path(training_args.output_dir) / "glue_run.json", "w") as handle:
            json.dump(run_info, handle, indent=2, default=str)
    return eval_results


if __name__ == "__main__":
    main()
