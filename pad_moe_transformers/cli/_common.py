"""Helpers shared by the `pad-moe` subcommands: errors, argument types, model / tokenizer / data
loading, batches, text tables and the lazy matplotlib import."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

logger = logging.get_logger("pad_moe_transformers.cli")


class CLIError(Exception):
    """A bad input the user can fix: printed as ``pad-moe <command>: error: <message>``, exit code 2."""


class HelpFormatter(argparse.HelpFormatter):
    """Wraps description paragraphs to the terminal width but keeps indented lines (examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        blocks, prose = [], []

        def flush() -> None:
            if prose:
                blocks.append(textwrap.fill(" ".join(prose), width, initial_indent=indent, subsequent_indent=indent))
                prose.clear()

        for line in text.splitlines():
            if line.startswith("  ") or not line.strip():
                flush()
                blocks.append(indent + line)
            else:
                prose.append(line.strip())
        flush()
        return "\n".join(blocks)


# ------------------------------------------------------------------------------------ argument types
def ratio(text: str) -> float:
    """argparse type of `--dynamic_ratio`: a float in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (the fraction of each weight kept dynamic), got {text}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def int_list(text: str) -> list[int]:
    """`0,1,5` -> [0, 1, 5] (for `--moe_layers`)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer indices such as 0,1,2, got {text!r}"
        ) from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative layer indices such as 0,1,2, got {text!r}")
    return values


def glue_task_name(text: str) -> str:
    from ..glue import get_task

    try:
        return get_task(text).name
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# ------------------------------------------------------------------------------------ models
def _looks_local(path: str) -> bool:
    """A path that cannot be a hub id (`org/name` or `name`): absolute, relative with ./ or ../, ~, or deeper."""
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path


def check_model_path(path: str, what: str = "checkpoint") -> str:
    """Fail early with a clear message for a local path that does not exist or is not a checkpoint folder."""
    expanded = os.path.expanduser(path)
    if os.path.exists(expanded):
        if not os.path.isdir(expanded):
            raise CLIError(f"{path} is a file; expected a {what} folder (with config.json).")
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise CLIError(f"{path} has no config.json: not a Transformers {what} folder.")
        return expanded
    if _looks_local(path):
        raise CLIError(f"{path}: no such {what} folder.")
    return path  # a hub id: resolved (and reported if unknown) by Transformers


def load_config(path: str, what: str = "checkpoint"):
    from transformers import AutoConfig

    import pad_moe_transformers  # noqa: F401  (registers the pad_moe config)

    path = check_model_path(path, what)
    try:
        return path, AutoConfig.from_pretrained(path)
    except OSError as error:
        raise CLIError(
            f"could not load a config from {path!r}: it is neither a local folder nor a reachable hub id ({error})."
        ) from None


def pad_class_for(config: Any):
    """The PAD class named in `config.architectures` (the head the checkpoint was saved with)."""
    from .. import modeling_pad_moe

    for name in config.architectures or []:
        cls = getattr(modeling_pad_moe, name, None)
        if isinstance(cls, type) and issubclass(cls, modeling_pad_moe.PADMoEPreTrainedModel):
            return cls
    return modeling_pad_moe.PADMoEModel


def load_pad_model(path: str):
    """Load a PAD-MoE checkpoint with the head it was saved with; `CLIError` if it is not one."""
    from ..configuration_pad_moe import PADMoEConfig

    path, config = load_config(path)
    if config.model_type != PADMoEConfig.model_type:
        raise CLIError(
            f"{path} is not a PAD-MoE checkpoint (model_type {config.model_type!r}, expected 'pad_moe'); "
            "make one with `pad-moe convert`."
        )
    cls = pad_class_for(config)
    logger.info(f"Loading {path} as {cls.__name__}")
    return path, cls.from_pretrained(path)


def load_any_model(path: str):
    """A PAD-MoE checkpoint (its saved head) or a dense checkpoint of a supported family (its saved head,
    else the base model). Returns `(path, model, kind)` with kind ``"pad"`` or ``"dense"``."""
    import transformers

    from ..architectures import PAD_FFN_LAYOUTS
    from ..configuration_pad_moe import PADMoEConfig

    path, config = load_config(path)
    if config.model_type == PADMoEConfig.model_type:
        cls = pad_class_for(config)
        return path, cls.from_pretrained(path), "pad"
    if config.model_type not in PAD_FFN_LAYOUTS:
        raise CLIError(
            f"{path} is a {config.model_type!r} model; supported families: {sorted(PAD_FFN_LAYOUTS)} "
            "(or a PAD-MoE checkpoint)."
        )
    cls = next(
        (getattr(transformers, name) for name in config.architectures or [] if hasattr(transformers, name)),
        transformers.AutoModel,
    )
    return path, cls.from_pretrained(path), "dense"


def load_tokenizer(candidates: Sequence[str | None]):
    """The first tokenizer that loads from `candidates` (paths / hub ids; None entries skipped)."""
    from transformers import AutoTokenizer

    tried = []
    for candidate in candidates:
        if candidate is None:
            continue
        try:
            return AutoTokenizer.from_pretrained(candidate)
        except (OSError, ValueError, TypeError) as error:
            tried.append(f"{candidate} ({type(error).__name__})")
    raise CLIError(
        "no tokenizer could be loaded (tried: " + (", ".join(tried) or "nothing") + "); pass --tokenizer PATH."
    )


# ------------------------------------------------------------------------------------ data
def add_data_arguments(parser: argparse.ArgumentParser, *, split_default: str | None, samples_default: int) -> None:
    group = parser.add_argument_group("input samples (GLUE TSVs or a text file)")
    group.add_argument(
        "--task",
        type=glue_task_name,
        help="GLUE task whose TSVs are read (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli).",
    )
    group.add_argument("--data_dir", help="GLUE root (holding RTE/, CoLA/, ...) or the task's own folder.")
    group.add_argument(
        "--split",
        default=split_default,
        help="split to read (train, validation, ...; default: %s)." % (split_default or "the task's first dev split"),
    )
    group.add_argument("--text_file", help="a UTF-8 text file, one input per line (a tab separates a sentence pair).")
    group.add_argument(
        "--samples",
        type=positive_int,
        default=samples_default,
        help="number of inputs used (the first N; default %(default)s).",
    )
    group.add_argument(
        "--batch_size", type=positive_int, default=16, help="inputs per forward pass (default %(default)s)."
    )
    group.add_argument(
        "--max_seq_length", type=positive_int, default=128, help="longer inputs are truncated (default %(default)s)."
    )
    group.add_argument("--tokenizer", help="tokenizer path or hub id (default: the model's own).")


def has_data(args: argparse.Namespace) -> bool:
    return bool(args.data_dir or args.text_file)


def read_texts(args: argparse.Namespace) -> tuple[list[tuple[str, ...]], list[float] | None]:
    """The first `args.samples` inputs (1 or 2 texts each) and their labels (None for a text file)."""
    if args.text_file and args.data_dir:
        raise CLIError("give either --text_file or --task/--data_dir, not both.")
    if not args.text_file and not args.data_dir:
        raise CLIError("no input samples: pass --task TASK --data_dir GLUE_DIR, or --text_file FILE.")
    if args.text_file:
        path = Path(args.text_file)
        if not path.is_file():
            raise CLIError(f"--text_file {path}: no such file.")
        lines = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise CLIError(f"--text_file {path} holds no text.")
        return [tuple(line.split("\t")[:2]) for line in lines[: args.samples]], None
    if not args.task:
        raise CLIError("--data_dir needs --task (the GLUE task whose TSVs to read).")
    from ..glue import get_task, glue_split_path, read_glue_columns

    task = get_task(args.task)
    split = args.split or task.eval_splits[0]
    if not Path(args.data_dir).is_dir():
        raise CLIError(f"--data_dir {args.data_dir}: no such folder.")
    try:
        columns = read_glue_columns(task, glue_split_path(task, args.data_dir, split), split)
    except (FileNotFoundError, ValueError) as error:
        raise CLIError(str(error)) from None
    rows = len(columns["label"])
    # The order `datasets.Dataset.shuffle(seed)` gives (a numpy permutation), without needing `datasets`.
    order = np.random.default_rng(args.seed).permutation(rows) if getattr(args, "shuffle", False) else range(rows)
    chosen = [int(i) for i in order[: args.samples]]
    texts = [tuple(columns[c][i] for c in task.text_columns) for i in chosen]
    return texts, [columns["label"][i] for i in chosen]


def make_batches(
    tokenizer,
    texts: list[tuple[str, ...]],
    labels: list[float] | None,
    batch_size: int,
    max_length: int,
    *,
    regression: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Tokenised, padded batches of `texts` (pairs when two texts), with `labels` if given."""
    batches = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        first = [t[0] for t in chunk]
        second = [t[1] for t in chunk] if all(len(t) > 1 for t in chunk) else None
        batch = dict(
            tokenizer(first, second, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        )
        if labels is not None:
            values = labels[start : start + batch_size]
            batch["labels"] = torch.tensor(values, dtype=torch.float32 if regression else torch.long)
        batches.append(batch)
    return batches


# ------------------------------------------------------------------------------------ output
def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool] | None = None) -> str:
    """A plain-text table with aligned columns (numbers right-aligned by default)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    if right is None:
        right = [i > 0 for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def human_count(n: float) -> str:
    return f"{n / 1e6:.2f}M" if abs(n) >= 1e5 else f"{int(n):,}"


def pyplot():
    """`matplotlib.pyplot` with the non-interactive Agg backend; a `CLIError` if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise CLIError(
            "--plot needs matplotlib, which is not installed: pip install matplotlib "
            "(or pip install 'pad_moe_transformers[plot]')."
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_inspect_figure(fig: Any, info: dict[str, Any], path: str) -> None:
    """Title an `inspect --plot` figure with the checkpoint and its partition, write it to `path`, close it."""
    part = info["partition"]
    fig.suptitle(
        f"{info['path']} - "
        + ("not partitioned" if part is None else f"{part['method']}, kappa {part['target_dynamic_ratio']}"),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def check_plot_path(path: str | None) -> None:
    """Fail before any work if the plot cannot be written (missing folder, not .png/.pdf/.svg)."""
    if path is None:
        return
    target = Path(path)
    if target.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise CLIError(f"--plot {path}: use a .png, .pdf or .svg file name.")
    if not target.parent.exists():
        raise CLIError(f"--plot {path}: folder {target.parent} does not exist.")
    pyplot()  # fail early without matplotlib


def stdout_write(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
