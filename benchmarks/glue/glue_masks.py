"""How much the masks of a GLUE table's PAD runs agree: between partition methods (IMP / MP / Random) of one
seed, and between seeds of one method.

    python benchmarks/glue/glue_masks.py --table fig4      # -> benchmarks/results/glue_fig4_masks.{json,md}

It reads the finished runs that `glue_quality.py` lists in the table's result file and the masks their
compact checkpoints hold (`<run>/model.safetensors`, `*.mask_packed`), so it needs the run directories
(`--work_dir`, default `outputs/glue_quality`) but no model and no training. For two masks A and B of
the same weights it reports

    agreement   the fraction of entries where A and B choose the same mode (static or dynamic)
    shared      |A and B| / min(|A|, |B|): the fraction of the smaller dynamic set that the other one holds
    chance      the agreement two independent random masks of the same densities would have on average

over all PAD weights of the model (and the lowest and highest agreement of one weight). Why it matters: two
partition methods whose masks mostly agree cannot be told apart by fine-tuning scores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
from glue_quality import run_dir  # benchmarks/glue/glue_quality.py
from glue_tables import TABLE_ALIASES  # benchmarks/glue/glue_tables.py
from safetensors import safe_open

from pad_moe_transformers.checkpoint import unpack_mask

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _paths
from _paths import ROOT, relative_path  # noqa: E402

MASK_SUFFIX = ".mask_packed"


def read_masks(checkpoint: Path) -> dict[str, np.ndarray]:
    """`{weight prefix: flat bool mask}` of a compact PAD checkpoint (the layout of `core/compact.py`: the
    mask's length is the number of static plus dynamic entries)."""
    masks = {}
    with safe_open(str(checkpoint), "pt") as f:
        for key in f.keys():
            if not key.endswith(MASK_SUFFIX):
                continue
            prefix = key[: -len(MASK_SUFFIX)]
            numel = f.get_slice(f"{prefix}.static_values").get_shape()[0]
            numel += f.get_slice(f"{prefix}.expert_values").get_shape()[-1]
            masks[prefix] = unpack_mask(f.get_tensor(key), numel).numpy()
    if not masks:
        raise ValueError(f"{checkpoint} holds no packed PAD mask: is it a PAD run saved in the compact format?")
    return masks


def mask_agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    """Agreement, shared dynamic fraction and chance agreement of two masks of the same model (see the module
    docstring); `min_weight` / `max_weight`: the lowest and highest agreement of a single weight."""
    if a.keys() != b.keys():
        raise ValueError("the two runs have PAD masks on different weights; compare runs of one model")
    per_weight, equal, both, chance, total = [], 0, 0, 0.0, 0
    size_a = size_b = 0
    for key in a:
        x, y = a[key], b[key]
        if x.shape != y.shape:
            raise ValueError(f"mask {key}: {x.shape} vs {y.shape}")
        same = int((x == y).sum())
        per_weight.append(same / x.size)
        equal, both, total = equal + same, both + int((x & y).sum()), total + x.size
        da, db = x.mean(), y.mean()
        chance += x.size * (da * db + (1 - da) * (1 - db))
        size_a, size_b = size_a + int(x.sum()), size_b + int(y.sum())
    return {
        "agreement": equal / total,
        "shared": both / max(1, min(size_a, size_b)),
        "chance": chance / total,
        "density_a": size_a / total,
        "density_b": size_b / total,
        "min_weight": min(per_weight),
        "max_weight": max(per_weight),
    }


def compare(result: dict, work_dir: Path, skip_missing: bool = False, tasks: list[str] | None = None) -> dict:
    """Pairwise mask agreement of the PAD runs of a `glue_quality.py` result: within each (task, seed) across
    variants, and within each (task, variant) across seeds. `skip_missing`: leave out runs whose weights are
    not in `work_dir` (runs reused from another machine's report) and name them under `"missing"`. `tasks`: only
    the runs of these tasks (default: all)."""
    masks: dict[tuple[str, str, int], dict[str, np.ndarray]] = {}
    missing = []
    for run in result["runs"]:
        if run["settings"]["mode"] != "pad" or (tasks and run["task"] not in tasks):
            continue
        checkpoint = run_dir(run["settings"], work_dir) / "model.safetensors"
        if not checkpoint.is_file():
            if skip_missing:
                missing.append([run["task"], run["variant"], run["seed"]])
                continue
            raise FileNotFoundError(
                f"{checkpoint} is missing: the run's weights were deleted or never saved "
                "(--skip_missing compares the runs that are there)"
            )
        masks[(run["task"], run["variant"], run["seed"])] = read_masks(checkpoint)
    pairs = []
    for (ka, ma), (kb, mb) in itertools.combinations(sorted(masks.items()), 2):
        same_seed = ka[0] == kb[0] and ka[2] == kb[2]
        same_variant = ka[0] == kb[0] and ka[1] == kb[1]
        if same_seed or same_variant:
            kind = "variants, one seed" if same_seed else "seeds, one variant"
            pairs.append({"task": ka[0], "kind": kind, "a": [ka[1], ka[2]], "b": [kb[1], kb[2]],
                          **mask_agreement(ma, mb)})  # fmt: skip
    return {"table": result["table"], "tasks": tasks, "work_dir": relative_path(work_dir), "pairs": pairs,
            "missing": missing}  # fmt: skip


def markdown(report: dict) -> str:
    missing = ", ".join(f"{task} {variant} s{seed}" for task, variant, seed in report.get("missing", []))
    left_out = [f"Runs left out (their weights are not in the work dir): {missing}.", ""] if missing else []
    lines = [
        f"# Mask agreement of the PAD runs of {report['table']}"
        + (f" ({', '.join(report['tasks'])})" if report.get("tasks") else ""),
        "",
        "agreement: fraction of entries with the same mode; shared: fraction of the smaller dynamic set that the "
        "other mask holds; chance: the agreement of independent random masks of the same densities; "
        "weights: lowest - highest agreement of one weight.",
        "",
        *left_out,
        "| task | compared | a | b | agreement | shared | chance | weights |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for p in report["pairs"]:
        lines.append(
            f"| {p['task']} | {p['kind']} | {p['a'][0]} s{p['a'][1]} | {p['b'][0]} s{p['b'][1]} | "
            f"{p['agreement']:.4f} | {p['shared']:.4f} | {p['chance']:.4f} | "
            f"{p['min_weight']:.3f} - {p['max_weight']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=list(TABLE_ALIASES), default="fig4")
    parser.add_argument("--results", default=None, help="Result file (default: benchmarks/results/glue_<table>.json)")
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / "glue_quality"))
    parser.add_argument("--out", default=None, help="Path stem (default: benchmarks/results/glue_<table>_masks)")
    parser.add_argument("--skip_missing", action="store_true", help="Leave out (and name) runs without weights.")
    parser.add_argument("--tasks", nargs="+", default=None, help="Only the runs of these tasks (default: all).")
    args = parser.parse_args(argv)
    name = TABLE_ALIASES[args.table]
    results = Path(args.results or ROOT / "benchmarks" / "results" / f"glue_{name}.json")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"glue_{name}_masks")
    result = json.loads(results.read_text())
    report = compare(result, Path(args.work_dir), skip_missing=args.skip_missing, tasks=args.tasks)
    report["results"] = relative_path(results)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
