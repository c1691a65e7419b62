"""The `pad-moe` command line on tiny models: convert, inspect, analyze, help, bad input.

Fixtures: a tiny random BERT with a WordPiece tokenizer built from a small vocab file, and
RTE / STS-B TSVs in the original GLUE layout (header, tab-separated, string labels for RTE), all in
tmp paths. Commands run in-process through `main(argv)`; one test runs the installed script.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _fixtures import save_tiny_bert, write_glue_tsvs
from transformers import AutoModel, AutoModelForSequenceClassification, BertModel

import pad_moe_transformers as pmt
from pad_moe_transformers.cli import main
from pad_moe_transformers.partition import perturb_experts

WORDS = "the a cat dog man woman is was on in park ball plays runs sleeps red big small".split()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("dense")
    save_tiny_bert(path, WORDS)
    return str(path)


@pytest.fixture(scope="module")
def glue(tmp_path_factory) -> Path:
    return write_glue_tsvs(tmp_path_factory.mktemp("glue"), WORDS, train_rows=24, dev_rows=10)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def pad_checkpoint(dense, glue, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("pad") / "rte_pad"
    code = main(["convert", dense, str(out), "--num_experts", "4", "--task", "rte", "--data_dir", str(glue),
                 "--partition_batches", "2", "--batch_size", "4", "-q"])
    assert code == 0
    return str(out)


# ------------------------------------------------------------------------------------ help
def test_help(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and all(c in out for c in ("convert", "inspect", "analyze"))
    for command, options in {
        "convert": ["--num_experts", "--top_k", "--dynamic_ratio", "--scale_factor_mode", "--granularity", "--head",
                    "--num_labels", "--task", "--data_dir", "--partition", "--partition_batches", "examples:"],
        "inspect": ["--json", "--plot", "--task", "--text_file", "examples:"],
        "analyze": ["--unit", "--json", "--plot", "--samples", "LABEL=PATH", "examples:"],
    }.items():
        code, out, _ = run(capsys, command, "--help")
        assert code == 0
        assert all(option in out for option in options), (command, out)
    code, out, _ = run(capsys, "--version")
    assert code == 0 and pmt.__version__ in out
    code, _, err = run(capsys)
    assert code == 2 and "usage: pad-moe" in err


# ------------------------------------------------------------------------------------ convert
def test_convert_upcycles_exactly(dense, tmp_path, capsys):
    out = tmp_path / "moe"
    code, stdout, _ = run(capsys, "convert", dense, out, "--num_experts", "4", "--top_k", "1", "--json", "-q")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["layout"] == "moe" and summary["partition"] is None and summary["class"] == "PADMoEModel"
    assert summary["bytes_on_disk"] > 0 and summary["tokenizer_saved"]
    model = AutoModel.from_pretrained(out)
    assert isinstance(model, pmt.PADMoEModel) and not model.config.is_partitioned
    assert model.config.num_experts == 4 and model.config.num_experts_per_tok == 1
    reference = BertModel.from_pretrained(dense).eval()
    ids = torch.randint(5, 26, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, reference(input_ids=ids).last_hidden_state)
    assert (out / "tokenizer.json").is_file()


def test_convert_partitions_on_glue(pad_checkpoint, capsys):
    model = AutoModelForSequenceClassification.from_pretrained(pad_checkpoint)
    assert isinstance(model, pmt.PADMoEForSequenceClassification)
    partition = model.config.partition
    assert partition["method"] == "imp" and partition["num_batches"] == 2
    assert partition["achieved_dynamic_ratio_total"] == pytest.approx(0.5)
    assert model.config.id2label == {0: "entailment", 1: "not_entailment"}
    assert (Path(pad_checkpoint) / "tokenizer.json").is_file() and (Path(pad_checkpoint) / "README.md").is_file()


def test_convert_regression_neuron_random(dense, glue, tmp_path, capsys):
    out = tmp_path / "stsb"
    code, stdout, _ = run(capsys, "convert", dense, out, "--task", "stsb", "--data_dir", glue, "--partition", "random",
                          "--granularity", "neuron", "--dynamic_ratio", "0.25", "--num_experts", "2",
                          "--partition_batches", "1", "--scale_factor_mode", "free", "--dtype", "bfloat16",
                          "--json", "-q")
    assert code == 0, stdout
    summary = json.loads(stdout)
    assert summary["layout"] == "compact" and summary["partition"]["method"] == "random"
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.partition_granularity == "neuron"
    assert model.config.scale_factor_mode == "free"
    assert model.config.partition["neuron_dynamic_ratio_total"] == pytest.approx(0.25)
    assert model.moe_layers[0].fc_in.expert_values.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------ inspect
def test_inspect_table_json_and_plot(pad_checkpoint, glue, tmp_path, capsys):
    code, out, _ = run(capsys, "inspect", pad_checkpoint)
    assert code == 0
    for text in ("imp, kappa 0.5", "fc_in", "fc_out", "l_s", "params dynamic", "on disk", "neuron density",
                 "expert usage: not recorded"):
        assert text in out, out

    code, out, _ = run(capsys, "inspect", pad_checkpoint, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["layout"] == "compact" and info["num_experts"] == 4 and info["expert_usage"] is None
    linears = [(r["layer"], r["linear"]) for r in info["linears"]]
    assert linears == [(0, "fc_in"), (0, "fc_out"), (1, "fc_in"), (1, "fc_out")]
    for row in info["linears"]:
        assert row["dynamic_ratio"] == pytest.approx(0.5) and row["l_s"] + row["l_d"] == pytest.approx(2.0)
        assert row["dynamic"] == 4 * 48 * 32 // 2 and row["static"] == 48 * 32 // 2
        # bit-packed mask + static half + 4 experts' dynamic half (fp32) + bias + scale logit
        assert row["bytes_on_disk"] == 48 * 32 // 8 + (48 * 32 // 2) * 4 * 5 + 4 * row["shape"][0] * 4 + 4
    disk = info["bytes_on_disk"]
    assert disk["total"] == (Path(pad_checkpoint) / "model.safetensors").stat().st_size
    assert disk["total"] == disk["pad_linears"] + disk["other_tensors"] + disk["headers"]

    plot = tmp_path / "pad.png"
    code, out, _ = run(capsys, "inspect", pad_checkpoint, "--json", "--plot", plot, "--task", "rte", "--data_dir", glue,
                       "--samples", "6", "--batch_size", "4")
    assert code == 0
    info = json.loads(out)
    assert plot.read_bytes()[:8] == PNG_MAGIC and plot.stat().st_size > 1000
    usage = info["expert_usage"]
    assert usage["samples"] == 6 and usage["tokens"] > 0
    assert all(sum(counts) == 2 * usage["tokens"] for counts in usage["counts"].values())


def test_inspect_moe_layout_and_text_file(dense, tmp_path, capsys):
    out = tmp_path / "moe"
    assert run(capsys, "convert", dense, out, "--num_experts", "3", "-q")[0] == 0
    texts = tmp_path / "texts.txt"
    texts.write_text("the cat runs .\nthe dog\tplays in the park .\n")
    code, stdout, _ = run(capsys, "inspect", out, "--json", "--text_file", texts)
    assert code == 0
    info = json.loads(stdout)
    assert info["layout"] == "moe" and info["partition"] is None
    assert all(r["dynamic_ratio"] == 1.0 and r["static"] == 0 for r in info["linears"])
    assert info["expert_usage"]["samples"] == 2


def test_inspect_sharded_checkpoint(dense, glue, tmp_path, capsys):
    out = tmp_path / "sharded"
    code, _, _ = run(capsys, "convert", dense, out, "--num_experts", "4", "--task", "rte", "--data_dir", glue,
                     "--partition", "random", "--partition_batches", "1", "--max_shard_size", "40KB", "-q")
    assert code == 0 and (out / "model.safetensors.index.json").is_file()
    code, stdout, _ = run(capsys, "inspect", out, "--json")
    assert code == 0
    disk = json.loads(stdout)["bytes_on_disk"]
    files = sorted(out.glob("model-*.safetensors"))
    assert disk["files"] == len(files) > 1
    assert disk["total"] == sum(f.stat().st_size for f in files)


# ------------------------------------------------------------------------------------ analyze
def test_analyze_dense_moe_pad(dense, pad_checkpoint, glue, tmp_path, capsys):
    # Trained experts differ; here they are perturbed apart so that the parameter variance is not 0.
    moe_dir, pad_dir = tmp_path / "moe", tmp_path / "pad"
    assert run(capsys, "convert", dense, moe_dir, "--num_experts", "4", "--num_labels", "2", "-q")[0] == 0
    for source, target in ((moe_dir, moe_dir), (pad_checkpoint, pad_dir)):
        model = AutoModelForSequenceClassification.from_pretrained(source)
        torch.manual_seed(1)
        perturb_experts(model, relative_std=0.1)
        model.save_pretrained(target)
    plot = tmp_path / "dyn.png"
    code, out, _ = run(capsys, "analyze", f"dense={dense}", f"moe={moe_dir}", f"pad={pad_dir}", "--task", "rte",
                       "--data_dir", glue, "--samples", "8", "--batch_size", "4", "--json", "--plot", plot)
    assert code == 0
    info = json.loads(out)
    assert [m["label"] for m in info["models"]] == ["dense", "moe", "pad"]
    assert [m["kind"] for m in info["models"]] == ["dense", "pad", "pad"]
    dense_r, moe_r, pad_r = ({x["layer"]: x for x in m["layers"]} for m in info["models"])
    assert all(x["parameter_variance"] == 0.0 and x["output_variance"] > 0 for x in dense_r.values())
    assert all(x["parameter_variance"] > 0 for x in moe_r.values())
    # Layer 0 sees the same inputs and the PAD model was perturbed like the MoE: its static half adds no variance.
    assert 0 < pad_r[0]["parameter_variance"] < moe_r[0]["parameter_variance"]
    assert info["samples"] == 8 and dense_r[0]["units"] == info["tokens"]
    assert plot.read_bytes()[:8] == PNG_MAGIC

    code, _, err = run(capsys, "analyze", pad_dir, "--task", "rte", "--data_dir", glue)
    assert code == 2 and "no tokenizer could be loaded" in err  # save_pretrained above wrote no tokenizer
    code, out, _ = run(capsys, "analyze", pad_dir, "--task", "rte", "--data_dir", glue, "--samples", "5",
                       "--unit", "sample", "--tokenizer", dense)
    assert code == 0
    assert "unit = sample" in out and "pad param var" in out and "mean" in out


# ------------------------------------------------------------------------------------ bad input
def test_bad_input_exits_with_a_message(dense, pad_checkpoint, glue, tmp_path, capsys):
    missing = tmp_path / "missing" / "model"
    not_empty = tmp_path / "not_empty"
    not_empty.mkdir()
    (not_empty / "keep.txt").write_text("x")
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    cases = [
        (["convert", missing, tmp_path / "o1"], 2, "no such"),
        (["convert", dense, tmp_path / "o2", "--dynamic_ratio", "1.5"], 2, "must be in (0, 1]"),
        (["convert", dense, tmp_path / "o3", "--dynamic_ratio", "abc"], 2, "expected a number"),
        (["convert", dense, tmp_path / "o4", "--task", "nosuch"], 2, "Unknown GLUE task"),
        (["convert", dense, tmp_path / "o5", "--partition", "imp"], 2, "needs --task and --data_dir"),
        (["convert", dense, tmp_path / "o6", "--data_dir", glue], 2, "needs --task"),
        (["convert", dense, tmp_path / "o7", "--top_k", "9", "--num_experts", "4"], 2, "exceeds --num_experts"),
        (["convert", dense, not_empty], 2, "not empty"),
        (["convert", pad_checkpoint, tmp_path / "o8"], 2, "already a PAD-MoE checkpoint"),
        (["convert", dense, tmp_path / "o9", "--task", "rte", "--data_dir", tmp_path / "nowhere"], 2, "no such folder"),
        (["inspect", dense], 2, "not a PAD-MoE checkpoint"),
        (["inspect", missing], 2, "no such"),
        (["inspect", no_config], 2, "no config.json"),
        (["inspect", pad_checkpoint, "--plot", tmp_path / "plot.txt"], 2, ".png"),
        (["inspect", pad_checkpoint, "--task", "rte"], 2, "no input samples"),
        (["inspect", pad_checkpoint, "--task", "cola", "--data_dir", glue], 2, "No CoLA data"),
        (["analyze", dense], 2, "needs input samples"),
        (["analyze", dense, missing, "--text_file", tmp_path / "none.txt"], 2, "no such"),
        (["analyze", dense, "--task", "rte", "--data_dir", glue, "--unit", "word"], 2, "invalid choice"),
        (["frobnicate"], 2, "invalid choice"),
    ]
    for argv, expected, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == expected, (argv, code, err)
        assert message in err, (argv, err)
        assert "Traceback" not in err
    # A corrupt checkpoint: the loader's PADCheckpointError, reported in one line.
    corrupt = tmp_path / "corrupt"
    shutil.copytree(pad_checkpoint, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    code, _, err = run(capsys, "inspect", corrupt)
    assert code == 1 and "PADCheckpointError" in err and "Traceback" not in err


def test_plot_without_matplotlib(pad_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, _, err = run(capsys, "inspect", pad_checkpoint, "--plot", tmp_path / "x.png")
    assert code == 2 and "needs matplotlib" in err and "pip install" in err
    assert not (tmp_path / "x.png").exists()


def test_installed_console_script(tmp_path):
    script = shutil.which("pad-moe", path=os.path.dirname(sys.executable)) or shutil.which("pad-moe")
    command = [script] if script else [sys.executable, "-m", "pad_moe_transformers.cli"]
    result = subprocess.run([*command, "inspect", str(tmp_path / "nope" / "x")], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 2
    assert "pad-moe inspect: error:" in result.stderr and "no such" in result.stderr
