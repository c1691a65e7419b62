"""The paper's GLUE tables as benchmark definitions: tasks, variants, comparisons and the paper's numbers.

Each variant is the set of `examples/run_glue.py` settings that make it (a run's reuse key includes them,
so a variant with the same settings in two tables is run once). `paper` holds the paper's BERT-base
differences (score points x100) for each comparison, from PAD-Net Tables 1, 3, 4 and 5.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PAD = {"mode": "pad", "dynamic_ratio": 0.5, "partition": "imp"}
"""PAD-Net as the paper runs it: kappa 0.5, IMP, scale factors l_s + l_d = 2 (the config's default)."""
BASE = {"static": {"mode": "static"}, "moe": {"mode": "moe"}, "pad": PAD}


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    claim: str
    tasks: tuple[str, ...]
    """The default tasks (`--tasks` may name others; the paper's numbers cover RTE too for Tables 3-5)."""
    variants: dict[str, dict]
    comparisons: tuple[tuple[str, str], ...]
    epochs: float = 3.0
    paper: dict[str, dict[str, float]] = field(default_factory=dict)
    """`{"a - b": {task: paper's difference}}` (BERT-base)."""
    hub: bool = False
    """Data from the hub (`nyu-mll/glue`) instead of the local TSVs."""
    timed: bool = False
    """The table's figure is the wall time: a finished run is reused only if it ran alone with this run's thread
    count (never a run of a table that ran several at a time), and the table itself runs one at a time."""
    best_of: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """`{model: its variants}` (e.g. one per learning rate): the report picks each model's best variant per task on
    the dev seed mean, and `comparisons` (between models) are made at those picks. Empty: no selection."""


# Paper Table 1 (BERT-base, 5 runs): static 54.6/66.4/84.6/85.8, MoE 58.0/69.3/85.0/87.1, PAD 59.7/71.5/85.5/90.3.
TABLE1_PAPER = {
    "pad - moe": {"cola": 1.7, "rte": 2.2, "mrpc": 0.5, "stsb": 3.2},
    "pad - static": {"cola": 5.1, "rte": 5.1, "mrpc": 0.9, "stsb": 4.5},
    "moe - static": {"cola": 3.4, "rte": 2.9, "mrpc": 0.4, "stsb": 1.3},
}
TABLE1_COMPARISONS = (("pad", "moe"), ("pad", "static"), ("moe", "static"))
KAPPAS = (0.1, 0.3, 0.7)
LEARNING_RATES = (5e-5, 1e-4, 2e-4, 5e-4)
"""The learning-rate grid (the paper's is 1e-5, 5e-5, 1e-4, 5e-4; 1e-5 gives way to 2e-4 on a small model)."""


def at_lr(variant: str, lr: float) -> str:
    """The name of `variant` run at learning rate `lr` (`pad@0.0002`)."""
    return f"{variant}@{lr:g}"


LR_VARIANTS = {at_lr(name, lr): {**BASE[name], "learning_rate": lr} for name in BASE for lr in LEARNING_RATES}

TABLES = {
    table.name: table
    for table in (
        Table(
            "table1", "Table 1: static vs MoE vs PAD (kappa 0.5, IMP), 3 epochs",
            "PAD > MoE > static on every task (paper, BERT-base: PAD - MoE +1.9 on average)",
            ("cola", "rte", "mrpc", "stsb"), BASE, TABLE1_COMPARISONS, paper=TABLE1_PAPER,
        ),
        Table(
            "table1_long", "Table 1 at 10 epochs (RTE, STS-B): does longer training change the order?",
            "PAD > MoE > static (the paper trains 5-20 epochs)",
            ("rte", "stsb"), BASE, TABLE1_COMPARISONS, epochs=10.0, paper=TABLE1_PAPER,
        ),
        Table(
            "table5", "Table 5: PAD vs MoE-P (SNIP-pruned MoE at PAD's parameter count)",
            "PAD > MoE > MoE-P at equal parameters",
            ("rte", "stsb"),
            {"moe": BASE["moe"], "pad": PAD, "moe_p": {"mode": "moe_pruned", "dynamic_ratio": 0.5}},
            (("pad", "moe_p"), ("moe", "moe_p"), ("pad", "moe")),
            paper={
                "pad - moe_p": {"rte": 5.8, "stsb": 4.5, "cola": 4.1, "mrpc": 0.7},
                "moe - moe_p": {"rte": 3.6, "stsb": 1.3, "cola": 2.4, "mrpc": 0.3},
                "pad - moe": TABLE1_PAPER["pad - moe"],
            },
        ),
        Table(
            "fig4", "Fig. 4: partition methods IMP vs MP vs Random (kappa 0.5)",
            "IMP > MP > Random, and Random below the fully dynamic MoE (paper: a figure, no numbers for BERT)",
            ("rte", "stsb"),
            {"moe": BASE["moe"], "imp": PAD, **{p: {**PAD, "partition": p} for p in ("mp", "random")}},
            (("imp", "mp"), ("imp", "random"), ("mp", "random"), ("random", "moe")),
        ),
        Table(
            "table3", "Table 3: dynamic ratio kappa (IMP)",
            "kappa 0.5 is near-optimal and every kappa in 0.1-0.7 beats the MoE",
            ("stsb",),
            {"moe": BASE["moe"], "pad_k0.5": PAD, **{f"pad_k{k}": {**PAD, "dynamic_ratio": k} for k in KAPPAS}},
            (
                *((f"pad_k{k}", "moe") for k in (0.1, 0.3, 0.5, 0.7)),
                *(("pad_k0.5", f"pad_k{k}") for k in KAPPAS),
            ),
            paper={
                "pad_k0.1 - moe": {"stsb": 1.2, "rte": 0.9}, "pad_k0.3 - moe": {"stsb": 2.3, "rte": 1.9},
                "pad_k0.5 - moe": {"stsb": 3.2, "rte": 2.2}, "pad_k0.7 - moe": {"stsb": 2.5, "rte": 1.3},
                "pad_k0.5 - pad_k0.1": {"stsb": 2.0, "rte": 1.3}, "pad_k0.5 - pad_k0.3": {"stsb": 0.9, "rte": 0.3},
                "pad_k0.5 - pad_k0.7": {"stsb": 0.7, "rte": 0.9},
            },  # fmt: skip
        ),
        Table(
            "table4", "Table 4: scale factors of eq. 4 (kappa 0.5, IMP)",
            "l_s + l_d = 2 > both free > one factor > none",
            ("stsb",),
            {
                "sum2": PAD,
                **{m: {**PAD, "scale_factor_mode": m} for m in ("free", "dynamic_only", "static_only", "none")},
            },
            tuple(("sum2", m) for m in ("free", "dynamic_only", "static_only", "none")),
            paper={
                "sum2 - free": {"rte": 0.2, "stsb": 0.5}, "sum2 - dynamic_only": {"rte": 0.6, "stsb": 0.7},
                "sum2 - static_only": {"rte": 0.8, "stsb": 2.2}, "sum2 - none": {"rte": 1.9, "stsb": 2.9},
            },  # fmt: skip
        ),
        Table(
            "wholerun", "Whole runs: what a full fine-tune costs (one run at a time, same session)",
            "PAD costs what its parameters say: kappa 0.5 <= 1.0x the MoE and <= 2.0x static, kappa 0.1 <= 1.4x static",
            ("stsb", "rte"),
            {
                **BASE, "pad_k0.1": {**PAD, "dynamic_ratio": 0.1},
                **{f"pad_neuron_k{k}": {**PAD, "dynamic_ratio": k, "partition_granularity": "neuron"}
                   for k in (0.3, 0.1, 0.5)},  # 0.3 first: issue 27's set; 0.1 and 0.5 for the frontier
            },
            (("pad", "moe"), ("pad", "static"), ("pad_k0.1", "static"), ("pad_neuron_k0.3", "moe"), ("moe", "static")),
            timed=True,
        ),
        Table(
            "lr", "Learning rate per model: static / MoE / PAD (kappa 0.5, IMP) at lr 5e-5, 1e-4, 2e-4, 5e-4",
            "each model at its best dev learning rate: PAD > MoE > static (Table 1 redone at the picks)",
            ("rte", "stsb"), LR_VARIANTS, TABLE1_COMPARISONS, paper=TABLE1_PAPER,
            best_of={name: tuple(at_lr(name, lr) for lr in LEARNING_RATES) for name in BASE},
        ),
        Table(
            "heldout", "Held-out task SST-2 (not used to tune the benchmark): static vs MoE vs PAD",
            "PAD > MoE > static (paper Table 3, BERT-base SST-2: 91.4 / 91.7 / 92.2)",
            ("sst2",), BASE, TABLE1_COMPARISONS,
            paper={"pad - moe": {"sst2": 0.5}, "pad - static": {"sst2": 0.8}, "moe - static": {"sst2": 0.3}},
            hub=True,
        ),
    )
}  # fmt: skip
FRONTIER_PAD = {
    "pad_k0.5": PAD,
    "pad_k0.1": {**PAD, "dynamic_ratio": 0.1},
    **{f"pad_neuron_k{k}": {**PAD, "dynamic_ratio": k, "partition_granularity": "neuron"} for k in (0.1, 0.3, 0.5)},
}
"""The PAD configurations of the quality-cost frontier (element-wise as the paper, and neuron-structured)."""


def frontier_table(picks: dict[str, dict[str, str]]) -> Table:
    """The frontier's quality runs: static, MoE and the `FRONTIER_PAD` configurations, each at its model's best dev
    learning rate per task (`picks`: the `lr` table's `{model: {task: "model@lr"}}`; PAD configurations use PAD's).
    Only tasks every model has a pick for."""
    rates = {model: {task: float(pick.split("@")[1]) for task, pick in tasks.items()} for model, tasks in picks.items()}
    missing = [model for model in BASE if model not in rates]
    if missing:
        raise ValueError(f"The learning-rate picks lack {missing}: finish `glue_quality.py --table lr` first.")
    variants = {
        "static": {**BASE["static"], "learning_rate": rates["static"]},
        "moe": {**BASE["moe"], "learning_rate": rates["moe"]},
        **{name: {**settings, "learning_rate": rates["pad"]} for name, settings in FRONTIER_PAD.items()},
    }
    tasks = tuple(t for t in ("rte", "stsb") if all(t in rates[model] for model in BASE))
    return Table(
        "frontier", "Quality-cost frontier: each configuration at its model's best dev learning rate",
        "which configuration to pick: dev score next to what it costs (benchmarks/frontier)",
        tasks, variants,
        # Every configuration against dense: the README's recommendation rests on each row's paired CI.
        (("pad_k0.5", "moe"), *((name, "static") for name in variants if name != "static")),
    )


# The table names of the command line (`--table 1-long`) -> the result file names (glue_table1_long).
TABLE_ALIASES = {"1": "table1", "1-long": "table1_long", "5": "table5", "fig4": "fig4", "3": "table3",
                 "4": "table4", "heldout": "heldout", "wholerun": "wholerun", "lr": "lr",
                 "frontier": "frontier"}  # fmt: skip


def get_table(name: str, picks: dict[str, dict[str, str]] | None = None) -> Table:
    """The table `name`; the frontier is built from the learning-rate `picks` (see `frontier_table`)."""
    name = TABLE_ALIASES.get(name, name)
    if name == "frontier":
        if picks is None:
            raise ValueError("The frontier table needs the learning-rate picks of the `lr` table.")
        return frontier_table(picks)
    return TABLES[name]


def custom_table(modes: list[str]) -> Table:
    """A table of the plain modes (static / moe / pad / moe_pruned at kappa 0.5) on the four local tasks."""
    variants = {**BASE, "moe_p": {"mode": "moe_pruned", "dynamic_ratio": 0.5}}
    names = {"moe_pruned": "moe_p"}
    chosen = {names.get(m, m): variants[names.get(m, m)] for m in modes}
    comparisons = tuple((a, b) for a, b in (*TABLE1_COMPARISONS, ("pad", "moe_p")) if a in chosen and b in chosen)
    return Table("custom", f"GLUE: {' / '.join(chosen)}", "", ("cola", "rte", "mrpc", "stsb"), chosen, comparisons)
