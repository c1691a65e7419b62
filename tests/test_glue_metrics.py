"""GLUE helpers: task table, the original-TSV reader (format quirks) and the GLUE metrics."""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from pad_moe_transformers.glue import (
    GLUE_TASKS,
    build_compute_metrics,
    compute_glue_metrics,
    get_task,
    glue_split_path,
    load_glue_tsv,
    read_glue_columns,
    read_glue_tsv,
)

# The shared GLUE data sits next to the checkout (README); $GLUE_DIR points elsewhere.
REAL_GLUE = Path(os.environ.get("GLUE_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))


# ------------------------------------------------------------------------------------------ task table
def test_task_table_covers_glue():
    assert sorted(GLUE_TASKS) == sorted(["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"])
    expected = {
        "cola": (2, ("matthews_correlation",)),
        "sst2": (2, ("accuracy",)),
        "mrpc": (2, ("accuracy", "f1")),
        "stsb": (1, ("pearson", "spearmanr")),
        "qqp": (2, ("accuracy", "f1")),
        "mnli": (3, ("accuracy",)),
        "qnli": (2, ("accuracy",)),
        "rte": (2, ("accuracy",)),
        "wnli": (2, ("accuracy",)),
    }
    for name, (num_labels, metrics) in expected.items():
        task = GLUE_TASKS[name]
        assert task.num_labels == num_labels and task.metric_names == metrics
        assert task.is_regression == (name == "stsb")
        assert "train" in task.files and task.eval_splits and task.test_splits
    assert GLUE_TASKS["mnli"].files["validation_matched"] == "dev_matched.tsv"
    assert GLUE_TASKS["mnli"].eval_splits == ("validation_matched", "validation_mismatched")
    assert GLUE_TASKS["rte"].label2id == {"entailment": 0, "not_entailment": 1}
    assert get_task("STS-B").name == "stsb" and get_task("SST-2").name == "sst2"
    with pytest.raises(ValueError, match="Unknown GLUE task"):
        get_task("squad")


# ------------------------------------------------------------------------------------------ TSV reader
def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def test_cola_without_header_and_final_newline(tmp_path):
    path = _write(
        tmp_path / "CoLA" / "dev.tsv",
        "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n"
        'gj04\t0\t*\tThe "weights" made the rope stretch.\n'
        "cj99\t1\t\tnull",  # no final newline; "null" must stay text
    )
    ds = read_glue_tsv("cola", path, "validation")
    assert ds.column_names == ["sentence", "label", "idx"]
    assert ds["sentence"] == [
        "The sailors rode the breeze clear of the rocks.",
        'The "weights" made the rope stretch.',
        "null",
    ]
    assert ds["label"] == [1, 0, 1]
    assert ds["idx"] == [0, 1, 2]
    assert ds.features["label"].names == ["unacceptable", "acceptable"]


def test_mrpc_bom_header_and_quotes(tmp_path):
    _write(
        tmp_path / "MRPC" / "train.tsv",
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        '1\t702876\t702977\tAmrozi called him " the witness " .\tReferring to him as " the witness " .\n'
        '0\t2108705\t2108831\t"Yucaipa owned 2 stores\tYucaipa bought them"\n',
    )
    ds = load_glue_tsv("mrpc", tmp_path)["train"]  # GLUE root given: finds MRPC/
    assert ds.column_names == ["sentence1", "sentence2", "label", "idx"]
    assert ds["sentence1"] == ['Amrozi called him " the witness " .', '"Yucaipa owned 2 stores']
    assert ds["sentence2"] == ['Referring to him as " the witness " .', 'Yucaipa bought them"']
    assert ds["label"] == [1, 0]


def test_string_labels_stsb_floats_and_test_split(tmp_path):
    folder = tmp_path / "RTE"
    _write(
        folder / "train.tsv", 'index\tsentence1\tsentence2\tlabel\n0\tA "b".\tC.\tnot_entailment\n1\tD\tE\tentailment\n'
    )
    _write(folder / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\tX\tY\tentailment\n")
    _write(folder / "test.tsv", "index\tsentence1\tsentence2\n7\tP\tQ\n")
    raw = load_glue_tsv("rte", folder)  # the task folder itself also works
    assert list(raw) == ["train", "validation", "test"]
    assert raw["train"]["label"] == [1, 0]
    assert raw["train"]["sentence1"] == ['A "b".', "D"]
    assert raw["test"]["label"] == [-1] and raw["test"]["idx"] == [7]

    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    _write(
        tmp_path / "STS-B" / "dev.tsv", header + '0\tmain-news\tf\t2012\t0001\tnone\tnone\tA man.\tA "man".\t3.800\n'
    )
    ds = load_glue_tsv("stsb", tmp_path, splits=["validation"])["validation"]
    assert ds["sentence2"] == ['A "man".']
    assert ds["label"] == [pytest.approx(3.8)]
    assert ds.features["label"].dtype == "float32"


def test_mnli_uses_header_names(tmp_path):
    header = ["index", "promptID", "pairID", "genre", "s1b", "s2b", "s1p", "s2p", "sentence1", "sentence2"]
    dev = header + ["label1", "label2", "label3", "label4", "label5", "gold_label"]
    row = [
        "0",
        "1",
        "2",
        "fiction",
        "(",
        "(",
        "(",
        "(",
        "Prem.",
        "Hyp.",
        "neutral",
        "neutral",
        "x",
        "x",
        "x",
        "contradiction",
    ]
    _write(tmp_path / "MNLI" / "dev_matched.tsv", "\t".join(dev) + "\n" + "\t".join(row) + "\n")
    ds = load_glue_tsv("mnli", tmp_path, splits=["validation_matched"])["validation_matched"]
    assert ds.column_names == ["premise", "hypothesis", "label", "idx"]
    assert ds["premise"] == ["Prem."] and ds["label"] == [2]


def test_reader_errors(tmp_path):
    path = _write(tmp_path / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\tonly two\n")
    with pytest.raises(ValueError, match="line 2"):
        read_glue_tsv("rte", path, "validation")
    assert len(read_glue_tsv("rte", path, "validation", skip_bad_rows=True)) == 0
    path = _write(tmp_path / "bad_label.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match="maybe"):
        read_glue_tsv("rte", path, "validation")
    with pytest.raises(FileNotFoundError):
        load_glue_tsv("qnli", tmp_path / "nowhere")


def test_columns_reader_matches_dataset_and_split_paths(tmp_path):
    folder = tmp_path / "RTE"
    _write(folder / "dev.tsv", 'index\tsentence1\tsentence2\tlabel\n0\tX "y"\tY\tentailment\n1\tA\tB\tnot_entailment\n')
    path = glue_split_path("rte", tmp_path, "validation")
    assert path == folder / "dev.tsv"
    columns = read_glue_columns("rte", path, "validation")  # plain lists, no `datasets`
    assert columns == {"sentence1": ['X "y"', "A"], "sentence2": ["Y", "B"], "label": [0, 1], "idx": [0, 1]}
    assert read_glue_tsv("rte", path, "validation").to_dict() == columns
    with pytest.raises(FileNotFoundError, match="train.tsv not found"):
        glue_split_path("rte", tmp_path, "train")
    with pytest.raises(ValueError, match="no split 'validation_matched'"):
        glue_split_path("rte", tmp_path, "validation_matched")


@pytest.mark.slow
@pytest.mark.skipif(not REAL_GLUE.is_dir(), reason="shared GLUE data not available")
def test_real_glue_label_counts():
    counts = {"cola": (2528, 6023), "mrpc": (1194, 2474), "rte": (1249, 1241)}
    for name, expected in counts.items():
        labels = np.asarray(load_glue_tsv(name, REAL_GLUE, splits=["train"])["train"]["label"])
        assert tuple(np.bincount(labels)) == expected
    assert len(load_glue_tsv("stsb", REAL_GLUE)["validation"]) == 1500


# ------------------------------------------------------------------------------------------ metrics
def test_matthews_against_hand_computed():
    # TP=2, TN=1, FP=1, FN=1: (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    labels = [1, 1, 1, 0, 0]
    preds = [1, 1, 0, 1, 0]
    assert compute_glue_metrics("cola", preds, labels) == {"matthews_correlation": pytest.approx(1 / 6)}
    assert compute_glue_metrics("cola", labels, labels)["matthews_correlation"] == pytest.approx(1.0)
    assert compute_glue_metrics("cola", [1, 0, 1, 0], [0, 1, 0, 1])["matthews_correlation"] == pytest.approx(-1.0)
    # constant prediction: undefined, reported as 0 (a CoLA model that always says "acceptable")
    assert compute_glue_metrics("cola", [1, 1, 1], [1, 1, 0])["matthews_correlation"] == 0.0


def test_f1_and_accuracy_hand_computed():
    labels = [1, 1, 1, 0, 0, 0]
    preds = [1, 1, 0, 1, 0, 0]  # TP=2, FP=1, FN=1 -> F1 = 4/6
    assert compute_glue_metrics("mrpc", preds, labels) == {"accuracy": pytest.approx(4 / 6), "f1": pytest.approx(2 / 3)}
    assert compute_glue_metrics("qqp", preds, labels).keys() == {"accuracy", "f1"}
    # F1 is the positive class's (1), not the mean over classes: swapping the classes changes it.
    assert compute_glue_metrics("mrpc", [0, 0, 1, 0], [0, 0, 0, 1])["f1"] == pytest.approx(0.0)
    assert compute_glue_metrics("mrpc", [1, 1], [0, 0])["f1"] == 0.0  # no true positive at all
    for name in ("sst2", "mnli", "qnli", "rte", "wnli"):
        assert compute_glue_metrics(name, preds, labels) == {"accuracy": pytest.approx(4 / 6)}
    with pytest.raises(ValueError, match="3 predictions for 2 references"):
        compute_glue_metrics("rte", [0, 1, 1], [0, 1])


def test_stsb_correlations_hand_computed():
    labels = np.array([0.0, 1.2, 2.5, 3.1, 4.0, 5.0])
    preds = np.array([0.3, 1.0, 3.0, 2.8, 4.4, 4.9])
    result = compute_glue_metrics("stsb", preds, labels)
    assert result.keys() == {"pearson", "spearmanr"}
    # Spearman by hand: ranks of preds (1,2,4,3,5,6) vs labels (1..6), sum d^2 = 2 -> 1 - 6*2/(6*35)
    assert result["spearmanr"] == pytest.approx(1 - 12 / 210)
    centred_p, centred_l = preds - preds.mean(), labels - labels.mean()
    pearson = (centred_p @ centred_l) / np.sqrt((centred_p @ centred_p) * (centred_l @ centred_l))
    assert result["pearson"] == pytest.approx(pearson)
    with pytest.warns(stats.ConstantInputWarning):
        assert math.isnan(compute_glue_metrics("stsb", np.ones(4), np.arange(4.0))["pearson"])
    assert math.isnan(compute_glue_metrics("stsb", [1.0], [2.0])["spearmanr"])


def test_compute_metrics_for_trainer():
    logits = np.array([[2.0, -1.0], [0.1, 0.3], [1.0, 0.0], [-1.0, 1.0]])
    labels = np.array([0, 1, 1, 1])
    fn = build_compute_metrics("mrpc")
    result = fn(SimpleNamespace(predictions=(logits, np.zeros(3)), label_ids=labels))  # tuple: logits first
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["f1"] == pytest.approx(0.8)  # TP=2, FN=1, FP=0
    assert result["combined_score"] == pytest.approx((0.75 + 0.8) / 2)
    assert build_compute_metrics("rte")(SimpleNamespace(predictions=logits, label_ids=labels)) == {
        "accuracy": pytest.approx(0.75)
    }

    scores = np.array([[0.5], [1.5], [2.0], [4.5]])
    gold = np.array([0.0, 2.0, 1.5, 5.0])
    result = build_compute_metrics("stsb")(SimpleNamespace(predictions=scores, label_ids=gold))
    assert result["pearson"] == pytest.approx(stats.pearsonr(scores[:, 0], gold)[0])
    assert result["spearmanr"] == pytest.approx(0.8)  # ranks (1,2,3,4) vs (1,3,2,4): 1 - 6*2/60
    assert "combined_score" in result
