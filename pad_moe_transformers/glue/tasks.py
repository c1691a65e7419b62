"""The GLUE tasks: how each one looks on disk and on the hub, and how it is scored.

    from pad_moe_transformers.glue import GLUE_TASKS, get_task
    task = get_task("STS-B")        # GLUE_TASKS["stsb"]: regression, metrics pearson / spearmanr

Plain data, no third-party imports: the `pad-moe` CLI reads it to validate `--task`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["GLUE_HUB_DATASET", "GLUE_TASKS", "GlueTask", "get_task"]

GLUE_HUB_DATASET = "nyu-mll/glue"

Column = str | int
"""A TSV column: its header name, or its 0-based position in a file without a header."""


@dataclass(frozen=True)
class GlueTask:
    """How one GLUE task looks on disk and on the hub, and how it is scored."""

    name: str
    """Config name on the hub (`nyu-mll/glue`)."""
    tsv_dir: str
    """Folder of the task in the original GLUE data (`CoLA`, `SST-2`, ...)."""
    text_columns: tuple[str, ...]
    """Input text column(s), named as in the hub dataset; one (single sentence) or two (pair)."""
    label_names: tuple[str, ...] | None
    """Class names in label-id order (as on the hub); `None` for regression (STS-B)."""
    metric_names: tuple[str, ...]
    """Keys of the GLUE metric result (as GLUE and `evaluate`'s glue metric name them)."""
    files: Mapping[str, str]
    """TSV file name per split (hub split names: `train`, `validation`, `test`; MNLI has
    `validation_matched`, `validation_mismatched`, `test_matched`, `test_mismatched`)."""
    columns: Mapping[str, Column]
    """Output column -> TSV column for the labelled splits (train / validation): text columns and `label`."""
    test_columns: Mapping[str, Column]
    """Output column -> TSV column for the unlabelled test split(s): text columns and `idx`."""
    has_header: bool = True
    """Whether the labelled TSVs start with a header (CoLA's do not; its test file does)."""

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def id2label(self) -> dict[int, str] | None:
        return None if self.label_names is None else dict(enumerate(self.label_names))

    @property
    def label2id(self) -> dict[str, int] | None:
        return None if self.label_names is None else {name: i for i, name in enumerate(self.label_names)}

    @property
    def train_split(self) -> str:
        return "train"

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return tuple(s for s in self.files if s.startswith("validation"))

    @property
    def test_splits(self) -> tuple[str, ...]:
        return tuple(s for s in self.files if s.startswith("test"))

    def split_has_labels(self, split: str) -> bool:
        return not split.startswith("test")


_PAIR_NLI = ("sentence1", "sentence2")
_DEFAULT_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}

GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        # No header; columns: source, label, original mark, sentence. The test file has "index\tsentence".
        GlueTask(
            name="cola",
            tsv_dir="CoLA",
            text_columns=("sentence",),
            label_names=("unacceptable", "acceptable"),
            metric_names=("matthews_correlation",),
            files=_DEFAULT_FILES,
            columns={"sentence": 3, "label": 1},
            test_columns={"sentence": "sentence", "idx": "index"},
            has_header=False,
        ),
        # sentence, label
        GlueTask(
            name="sst2",
            tsv_dir="SST-2",
            text_columns=("sentence",),
            label_names=("negative", "positive"),
            metric_names=("accuracy",),
            files=_DEFAULT_FILES,
            columns={"sentence": "sentence", "label": "label"},
            test_columns={"sentence": "sentence", "idx": "index"},
        ),
        # \ufeffQuality, #1 ID, #2 ID, #1 String, #2 String (BOM in the header). Test: index, #1 ID, ...
        GlueTask(
            name="mrpc",
            tsv_dir="MRPC",
            text_columns=_PAIR_NLI,
            label_names=("not_equivalent", "equivalent"),
            metric_names=("accuracy", "f1"),
            files=_DEFAULT_FILES,
            columns={"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"},
            test_columns={"sentence1": "#1 String", "sentence2": "#2 String", "idx": "index"},
        ),
        # index, genre, filename, year, old_index, source1, source2, sentence1, sentence2, score
        GlueTask(
            name="stsb",
            tsv_dir="STS-B",
            text_columns=_PAIR_NLI,
            label_names=None,
            metric_names=("pearson", "spearmanr"),
            files=_DEFAULT_FILES,
            columns={"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"},
            test_columns={"sentence1": "sentence1", "sentence2": "sentence2", "idx": "index"},
        ),
        # id, qid1, qid2, question1, question2, is_duplicate. Test: id, question1, question2
        GlueTask(
            name="qqp",
            tsv_dir="QQP",
            text_columns=("question1", "question2"),
            label_names=("not_duplicate", "duplicate"),
            metric_names=("accuracy", "f1"),
            files=_DEFAULT_FILES,
            columns={"question1": "question1", "question2": "question2", "label": "is_duplicate"},
            test_columns={"question1": "question1", "question2": "question2", "idx": "id"},
        ),
        # index, promptID, pairID, genre, 4 parse columns, sentence1, sentence2, label1[..label5], gold_label
        GlueTask(
            name="mnli",
            tsv_dir="MNLI",
            text_columns=("premise", "hypothesis"),
            label_names=("entailment", "neutral", "contradiction"),
            metric_names=("accuracy",),
            files={
                "train": "train.tsv",
                "validation_matched": "dev_matched.tsv",
                "validation_mismatched": "dev_mismatched.tsv",
                "test_matched": "test_matched.tsv",
                "test_mismatched": "test_mismatched.tsv",
            },
            columns={"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"},
            test_columns={"premise": "sentence1", "hypothesis": "sentence2", "idx": "index"},
        ),
        # index, question, sentence, label
        GlueTask(
            name="qnli",
            tsv_dir="QNLI",
            text_columns=("question", "sentence"),
            label_names=("entailment", "not_entailment"),
            metric_names=("accuracy",),
            files=_DEFAULT_FILES,
            columns={"question": "question", "sentence": "sentence", "label": "label"},
            test_columns={"question": "question", "sentence": "sentence", "idx": "index"},
        ),
        # index, sentence1, sentence2, label
        GlueTask(
            name="rte",
            tsv_dir="RTE",
            text_columns=_PAIR_NLI,
            label_names=("entailment", "not_entailment"),
            metric_names=("accuracy",),
            files=_DEFAULT_FILES,
            columns={"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"},
            test_columns={"sentence1": "sentence1", "sentence2": "sentence2", "idx": "index"},
        ),
        # index, sentence1, sentence2, label (0/1, 1 = entailment)
        GlueTask(
            name="wnli",
            tsv_dir="WNLI",
            text_columns=_PAIR_NLI,
            label_names=("not_entailment", "entailment"),
            metric_names=("accuracy",),
            files=_DEFAULT_FILES,
            columns={"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"},
            test_columns={"sentence1": "sentence1", "sentence2": "sentence2", "idx": "index"},
        ),
    )
}

_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli_matched": "mnli"}


def get_task(name: str) -> GlueTask:
    """The `GlueTask` of a task name (case-insensitive; `SST-2` / `STS-B` spellings accepted)."""
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in GLUE_TASKS:
        raise ValueError(f"Unknown GLUE task {name!r}; choose one of {sorted(GLUE_TASKS)}.")
    return GLUE_TASKS[key]
