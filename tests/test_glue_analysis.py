"""benchmarks/glue/glue_analysis.py: which run folders it measures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "glue"))
import glue_analysis  # noqa: E402  (benchmarks/ is not a package)


def test_select_runs_takes_finished_runs_or_the_named_ones(tmp_path):
    for name in ("stsb_pad_s43_b", "stsb_pad_s42_a", "rte_moe_s42_c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "glue_run.json").write_text("{}")
    (tmp_path / "unfinished").mkdir()  # no glue_run.json: not a run
    (tmp_path / "notes.txt").write_text("not a folder")

    found = glue_analysis.select_runs(tmp_path)
    assert [p.name for p in found] == ["rte_moe_s42_c", "stsb_pad_s42_a", "stsb_pad_s43_b"]
    named = glue_analysis.select_runs(tmp_path, ["stsb_pad_s43_b", "stsb_pad_s42_a"])
    assert named == [tmp_path / "stsb_pad_s43_b", tmp_path / "stsb_pad_s42_a"]  # in the order asked
    with pytest.raises(FileNotFoundError, match=r"\['unfinished'\]"):
        glue_analysis.select_runs(tmp_path, ["stsb_pad_s42_a", "unfinished"])


def test_table_runs_finds_each_run_once_and_names_those_without_weights(tmp_path):
    from glue_quality import run_dir  # the folder glue_quality.py wrote the run to

    def run(variant, seed, kappa):
        settings = {"task": "stsb", "mode": "pad", "seed": seed, "dynamic_ratio": kappa}
        return {"task": "stsb", "variant": variant, "seed": seed, "settings": settings}

    table3 = {"runs": [run("pad_k0.5", 42, 0.5), run("pad_k0.1", 42, 0.1), run("pad_k0.1", 43, 0.1)]}
    table4 = {"runs": [run("sum2", 42, 0.5), run("sum2", 43, 0.1)]}  # Table 3's settings again: same folders
    for r in table3["runs"][:2]:
        folder = run_dir(r["settings"], tmp_path)
        folder.mkdir()
        (folder / "glue_run.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"")
    no_weights = run_dir(table3["runs"][2]["settings"], tmp_path)
    no_weights.mkdir()
    (no_weights / "glue_run.json").write_text("{}")  # finished, but saved with --delete_models

    found, missing = glue_analysis.table_runs([table3, table4], tmp_path)
    assert found == [run_dir(r["settings"], tmp_path) for r in table3["runs"][:2]]
    assert missing == [f"stsb pad_k0.1 s43 ({no_weights.name})"]


def test_router_measures_average_the_top1_gate_over_real_tokens_only(tmp_path):
    import torch
    from _fixtures import save_tiny_bert, write_glue_tsvs
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import pad_moe_transformers as pmt
    from pad_moe_transformers.glue import get_task, load_glue_tsv

    words = "the a cat dog man woman is was on in park ball plays runs sleeps red big small".split()
    save_tiny_bert(tmp_path / "bert", words)
    data = write_glue_tsvs(tmp_path / "glue", words, train_rows=8, dev_rows=12)
    config = pmt.PADMoEConfig.from_base(str(tmp_path / "bert"), num_experts=4, num_labels=2)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "bert"), config=config)
    measures = glue_analysis.router_measures(model, tmp_path / "bert", "rte", str(data), samples=12)

    task = get_task("rte")
    dev = load_glue_tsv(task, str(data), [task.eval_splits[0]])[task.eval_splits[0]].select(range(12))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "bert")
    batch = tokenizer(*[list(dev[c]) for c in task.text_columns], truncation=True, max_length=128, padding=True,
                      return_tensors="pt")  # fmt: skip
    real = batch["attention_mask"].reshape(-1).bool()
    assert not real.all()  # the batch has padding, so the two averages differ
    logits = model(**batch, output_router_logits=True).router_logits
    expected = [torch.softmax(x[real].float(), -1).max(-1).values.mean().item() for x in logits]
    with_padding = [torch.softmax(x.float(), -1).max(-1).values.mean().item() for x in logits]
    assert measures["top1_gate"] == pytest.approx(sum(expected) / len(expected))
    assert measures["top1_gate"] != pytest.approx(sum(with_padding) / len(with_padding))
