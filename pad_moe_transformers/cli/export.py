"""`pad-moe export PATH OUT`: a checkpoint (PAD-MoE or dense BERT-family) to an ONNX serving folder, verified.

Writes ``OUT/model.onnx`` (`pad_moe_transformers.export.export_onnx`: eq. 4 merged into constants, dynamic batch
size and sequence length), the model's ``config.json`` (labels) and, when the checkpoint has one, its tokenizer;
then runs the file in ONNX Runtime and the model in PyTorch on a random batch of another shape than the traced
one and prints the largest absolute difference (exit code 1 when it exceeds ``--atol``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from transformers.utils import logging

from . import _common
from ._common import CLIError

logger = logging.get_logger("pad_moe_transformers.cli")


def add_parser(subparsers, parents: list[argparse.ArgumentParser] | None = None) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        parents=parents or [],
        help="export a PAD-MoE or dense checkpoint to ONNX (merged weights, dynamic shapes) and verify it with "
        "ONNX Runtime",
        description="Export a PAD-MoE or dense BERT-family checkpoint to OUT/model.onnx: eq. 4 merged into constants "
        "(only the selected experts run), dynamic batch size and sequence length, inputs input_ids / attention_mask "
        "(/ token_type_ids), the head's outputs (logits). OUT also gets config.json and the checkpoint's tokenizer. "
        "The file is then run in ONNX Runtime against PyTorch on a random batch; the largest absolute difference is "
        "printed. Needs onnx, onnxscript and onnxruntime (pip install 'pad_moe_transformers[onnx]'). "
        "docs/deploy.md covers serving.",
        epilog="examples:\n  pad-moe export out/rte_pad out/rte_pad_onnx\n"
        "  pad-moe export out/rte_pad out/rte_pad_onnx --batch_size 8 --seq_len 128 --atol 1e-5",
        formatter_class=_common.HelpFormatter,
    )
    parser.add_argument("path", help="PAD-MoE or dense BERT-family checkpoint: a local folder or a hub id.")
    parser.add_argument("out", help="output folder (created); model.onnx is written there.")
    group = parser.add_argument_group("verification (ONNX Runtime vs PyTorch on a random batch)")
    group.add_argument(
        "--batch_size", type=_common.positive_int, default=3, help="rows of the batch (default %(default)s)."
    )
    group.add_argument("--seq_len", type=_common.positive_int, default=11, help="tokens per row (default %(default)s).")
    group.add_argument(
        "--atol",
        type=float,
        default=1e-4,
        help="fail (exit code 1) when the largest absolute difference exceeds it (default %(default)g, fp32).",
    )
    parser.add_argument("--opset", type=_common.positive_int, help="ONNX opset version (default: the exporter's).")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..export import export_onnx, onnx_inputs

    out = Path(os.path.expanduser(args.out))
    if out.exists() and not out.is_dir():
        raise CLIError(f"{args.out} is a file; OUT must be a folder (model.onnx is written into it).")
    path, model, kind = _common.load_any_model(args.path)
    positions = getattr(getattr(model.config, "base_config", model.config), "max_position_embeddings", None)
    if positions is not None and args.seq_len > positions:
        raise CLIError(f"--seq_len {args.seq_len} exceeds the model's {positions} positions.")
    logger.info(f"Exporting {path} ({kind}, {type(model).__name__}) to {out / 'model.onnx'}")
    verify = onnx_inputs(model, args.batch_size, args.seq_len, seed=1)
    result = export_onnx(model, out / "model.onnx", verify_inputs=verify, opset_version=args.opset, atol=args.atol)
    model.config.save_pretrained(out)
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(path).save_pretrained(out)
    except (OSError, ValueError, TypeError) as error:  # a checkpoint without tokenizer files: the ONNX file is done
        logger.info(f"No tokenizer saved ({type(error).__name__}: {error}).")
    size = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("model.onnx"))
    _common.stdout_write(
        f"wrote {result.path} ({_common.human_bytes(size)}): inputs {', '.join(result.input_names)} (batch, sequence), "
        f"outputs {', '.join(result.output_names)}\n"
        f"ONNX Runtime vs PyTorch on a {args.batch_size} x {args.seq_len} batch: max abs diff "
        f"{result.max_abs_diff:.3g} (atol {args.atol:g})"
    )
    return 0
