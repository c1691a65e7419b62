"""`pad-moe convert`: a dense BERT-family checkpoint -> an upcycled (and optionally partitioned) PAD-MoE checkpoint.

    pad-moe convert bert-base-uncased out/bert_moe                      # upcycle only: a plain MoE checkpoint
    pad-moe convert bert-base-uncased out/rte_pad --task rte --data_dir glue_data --partition imp

Upcycling: `PADMoEConfig.from_base` + `AutoModelFor*.from_pretrained(dense, config=...)`. Partition:
`partition_model` on the first `--partition_batches` batches of the task's (shuffled) training TSV,
read with `pad_moe_transformers.glue.read_glue_columns`. The result is written by `save_pretrained`
(compact safetensors once partitioned) together with the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from transformers.utils import logging

from . import _common
from ._common import CLIError

logger = logging.get_logger("pad_moe_transformers.cli")

HEADS = {
    "base": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "masked-lm": "AutoModelForMaskedLM",
}
PARTITION_METHODS = ("imp", "mp", "random")


def add_parser(subparsers, parents: list[argparse.ArgumentParser] | None = None) -> argparse.ArgumentParser:
    from ..configuration_pad_moe import PARTITION_GRANULARITIES, SCALE_FACTOR_MODES
    from ..partition import DEFAULT_ROUNDS, SCOPES, SCORES

    parser = subparsers.add_parser(
        "convert",
        parents=parents or [],
        help="upcycle a dense checkpoint to a PAD-MoE checkpoint (optionally partitioned on GLUE data)",
        description="Upcycle a dense BERT-family checkpoint (bert, roberta, xlm-roberta, camembert, electra, albert, "
        "distilbert) into a PAD-MoE checkpoint: every FFN becomes a MoE layer whose experts and static weight are "
        "copies of the FFN. With --task and --data_dir the model is also mode-partitioned (IMP by default) on "
        "training batches of that GLUE task and saved in the compact format.",
        epilog="examples:\n  pad-moe convert bert-base-uncased out/bert_moe\n"
        "  pad-moe convert bert-base-uncased out/rte_pad --task rte --data_dir glue_data --dynamic_ratio 0.5",
        formatter_class=_common.HelpFormatter,
    )
    parser.add_argument("source", help="dense checkpoint: a local folder or a hub id.")
    parser.add_argument("output", help="folder to write the PAD-MoE checkpoint to.")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder.")

    pad = parser.add_argument_group("PAD-MoE options")
    pad.add_argument(
        "--num_experts", type=_common.positive_int, default=8, help="experts per MoE layer (default %(default)s)."
    )
    pad.add_argument(
        "--top_k",
        "--num_experts_per_tok",
        dest="top_k",
        type=_common.positive_int,
        default=2,
        help="experts selected per token (default %(default)s).",
    )
    pad.add_argument(
        "--dynamic_ratio",
        type=_common.ratio,
        default=0.5,
        help="kappa: fraction of each expert weight kept dynamic, in (0, 1] (default %(default)s).",
    )
    pad.add_argument(
        "--scale_factor_mode",
        choices=SCALE_FACTOR_MODES,
        default="sum2",
        help="scale factors of eq. 4 (default %(default)s: trainable, l_s + l_d = 2).",
    )
    pad.add_argument(
        "--granularity",
        choices=PARTITION_GRANULARITIES,
        default="element",
        help="what one mask entry selects: a weight element or a whole FFN neuron (default %(default)s).",
    )
    pad.add_argument(
        "--moe_layers", type=_common.int_list, help="comma-separated layer indices to convert (default: all)."
    )
    pad.add_argument(
        "--head",
        choices=sorted(HEADS),
        help="task head of the saved model (default: sequence-classification with --task or --num_labels, else base).",
    )
    pad.add_argument(
        "--num_labels", type=_common.positive_int, help="labels of the classification head (default: the task's)."
    )

    part = parser.add_argument_group("mode partition (needs --task and --data_dir)")
    part.add_argument("--task", type=_common.glue_task_name, help="GLUE task: sets the head and the partition data.")
    part.add_argument("--data_dir", help="GLUE root (holding RTE/, CoLA/, ...) or the task's own folder.")
    part.add_argument(
        "--partition", choices=PARTITION_METHODS, help="partition method (default: imp when --data_dir is given)."
    )
    part.add_argument(
        "--partition_batches",
        type=_common.positive_int,
        default=10,
        help="training batches scored (default %(default)s).",
    )
    part.add_argument(
        "--batch_size", type=_common.positive_int, default=8, help="rows per partition batch (default %(default)s)."
    )
    part.add_argument(
        "--max_seq_length", type=_common.positive_int, default=128, help="truncation length (default %(default)s)."
    )
    part.add_argument(
        "--rounds", type=_common.positive_int, default=DEFAULT_ROUNDS, help="IMP rounds (default %(default)s)."
    )
    part.add_argument(
        "--score",
        choices=SCORES,
        default="warmup_grad",
        help="partition score (default %(default)s; docs/partition.md).",
    )
    part.add_argument(
        "--scope",
        choices=SCOPES,
        default="linear",
        help="exact ratio per linear, or one global threshold (default %(default)s).",
    )
    part.add_argument(
        "--seed", type=int, default=0, help="seed of the row shuffle and of the random mask (default %(default)s)."
    )
    part.add_argument("--tokenizer", help="tokenizer path or hub id (default: the source's).")

    save = parser.add_argument_group("saving")
    save.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="dtype of the saved weights (default %(default)s; the router stays fp32).",
    )
    save.add_argument(
        "--max_shard_size", default="5GB", help="shard the safetensors above this size (default %(default)s)."
    )
    save.add_argument("--json", action="store_true", help="print the summary as JSON.")
    parser.set_defaults(run=run)
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if args.top_k > args.num_experts:
        raise CLIError(f"--top_k {args.top_k} exceeds --num_experts {args.num_experts}.")
    if args.data_dir and not args.task:
        raise CLIError("--data_dir needs --task (the GLUE task whose training TSV is used for the partition).")
    if args.partition and not args.data_dir:
        raise CLIError(f"--partition {args.partition} needs --task and --data_dir (labelled training batches).")
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise CLIError(f"--data_dir {args.data_dir}: no such folder.")
    if args.task and args.num_labels is not None:
        from ..glue import get_task

        if args.num_labels != get_task(args.task).num_labels:
            raise CLIError(
                f"--num_labels {args.num_labels} does not match task {args.task} "
                f"({get_task(args.task).num_labels} labels)."
            )
    if args.head and args.head != "sequence-classification" and args.task:
        raise CLIError(f"--task sets a sequence-classification head; it cannot be combined with --head {args.head}.")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise CLIError(f"output {out} is a file.")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise CLIError(f"output folder {out} is not empty; pass --overwrite to write into it.")


def _head_kwargs(args: argparse.Namespace) -> tuple[str, dict]:
    head = args.head or ("sequence-classification" if args.task or args.num_labels else "base")
    kwargs = {}
    if args.task:
        from ..glue import get_task

        task = get_task(args.task)
        kwargs["num_labels"] = task.num_labels
        if not task.is_regression:
            kwargs.update(id2label=task.id2label, label2id=task.label2id)
    elif args.num_labels is not None:
        kwargs["num_labels"] = args.num_labels
    return head, kwargs


def _partition(model, tokenizer, args: argparse.Namespace):
    from ..glue import get_task
    from ..partition import partition_model

    task = get_task(args.task)
    data = argparse.Namespace(
        text_file=None,
        data_dir=args.data_dir,
        task=args.task,
        split="train",
        samples=args.partition_batches * args.batch_size,
        shuffle=True,
        seed=args.seed,
    )
    texts, labels = _common.read_texts(data)
    batches = _common.make_batches(
        tokenizer, texts, labels, args.batch_size, args.max_seq_length, regression=task.is_regression
    )
    logger.info(
        f"Partitioning ({args.partition}, kappa={args.dynamic_ratio}) on {len(batches)} batches of "
        f"{task.name} train ({len(texts)} rows)"
    )
    return partition_model(
        model,
        batches,
        num_batches=len(batches),
        method=args.partition,
        dynamic_ratio=args.dynamic_ratio,
        rounds=args.rounds,
        scope=args.scope,
        score=args.score,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    import transformers

    from ..checkpoint import checkpoint_file_bytes, checkpoint_layout, theoretical_checkpoint_size
    from ..configuration_pad_moe import PADMoEConfig

    _check_args(args)
    if args.data_dir and not args.partition:
        args.partition = "imp"
    source, base_config = _common.load_config(args.source, "dense checkpoint")
    if base_config.model_type == PADMoEConfig.model_type:
        raise CLIError(
            f"{args.source} is already a PAD-MoE checkpoint; `pad-moe inspect` it, or convert its dense source."
        )
    head, head_kwargs = _head_kwargs(args)
    extra = {"scale_factor_mode": args.scale_factor_mode, "partition_granularity": args.granularity}
    if args.moe_layers is not None:
        extra["moe_layers"] = args.moe_layers
    config = PADMoEConfig.from_base(
        base_config,
        num_experts=args.num_experts,
        num_experts_per_tok=args.top_k,
        dynamic_ratio=args.dynamic_ratio,
        **head_kwargs,
        **extra,
    )
    auto_class = getattr(transformers, HEADS[head])
    logger.info(
        f"Upcycling {args.source} ({base_config.model_type}) with {auto_class.__name__}: "
        f"{args.num_experts} experts, top-{args.top_k}"
    )
    model = auto_class.from_pretrained(source, config=config)

    tokenizer = None
    if args.partition or args.tokenizer:
        tokenizer = _common.load_tokenizer([args.tokenizer or source])
    else:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, TypeError):
            logger.warning(f"{args.source} has no tokenizer; the checkpoint is saved without one.")
    result = _partition(model, tokenizer, args) if args.partition else None
    if result is None:
        logger.warning(
            "No partition (no --data_dir): the checkpoint is a fully dynamic MoE. Partition it later, e.g. "
            "with IMPTrainerCallback in training (docs/partition.md), or convert with --task/--data_dir."
        )
    if args.dtype != "float32":
        model.to(getattr(torch, args.dtype))
    os.makedirs(args.output, exist_ok=True)
    model.save_pretrained(args.output, max_shard_size=args.max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.output)

    report = model.parameter_report()
    theory = theoretical_checkpoint_size(model)
    summary = {
        "output": str(args.output),
        "source": args.source,
        "class": type(model).__name__,
        "layout": checkpoint_layout(model),
        "num_experts": args.num_experts,
        "top_k": args.top_k,
        "granularity": args.granularity,
        "partition": None
        if result is None
        else {
            "method": args.partition,
            "task": args.task,
            "target_dynamic_ratio": args.dynamic_ratio,
            "achieved_dynamic_ratio": model.config.partition.get("achieved_dynamic_ratio_total"),
            "batches": result.metadata.get("num_batches"),
            "seconds": round(result.seconds, 2),
        },
        "parameters": {
            "total": report.total,
            "moe_equivalent": report.moe_equivalent,
            "dense_equivalent": report.dense_equivalent,
        },
        "bytes_on_disk": checkpoint_file_bytes(args.output),
        "bytes_theory": theory["total_bytes"],
        "tokenizer_saved": tokenizer is not None,
    }
    if args.json:
        _common.stdout_write(json.dumps(summary, indent=2))
        return 0
    lines = [f"Wrote {summary['class']} to {args.output} ({summary['layout']} layout)"]
    if result is None:
        lines.append("  partition: none (fully dynamic MoE)")
    else:
        part = summary["partition"]
        lines.append(
            f"  partition: {part['method']} on {part['task']} train, {part['batches']} batches, "
            f"kappa {part['target_dynamic_ratio']} -> achieved {part['achieved_dynamic_ratio']:.4f} "
            f"({part['seconds']} s)"
        )
    lines.append(
        f"  parameters: {_common.human_count(report.total)} (MoE {_common.human_count(report.moe_equivalent)}, "
        f"dense {_common.human_count(report.dense_equivalent)})"
    )
    lines.append(
        f"  on disk: {_common.human_bytes(summary['bytes_on_disk'])} "
        f"(theory {_common.human_bytes(summary['bytes_theory'])})"
    )
    lines.append(f"  inspect it with: pad-moe inspect {args.output}")
    _common.stdout_write("\n".join(lines))
    return 0
