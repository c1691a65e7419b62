"""benchmarks/glue/glue_quality.py on tiny fixtures: paired seeds, resume, statistics, markdown and plot.

The real tables take hours; here a 2-layer hidden-32 BERT trains 3 steps on a few dozen GLUE-format rows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from _fixtures import save_tiny_bert, write_glue_tsvs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "glue"))
import glue_paired  # noqa: E402  (benchmarks/ is not a package)
import glue_quality  # noqa: E402

WORDS = "the a cat dog man woman is was on in park ball plays runs sleeps red big small".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, Path]:
    model = tmp_path_factory.mktemp("tiny_bert")
    save_tiny_bert(model, WORDS)
    return str(model), write_glue_tsvs(tmp_path_factory.mktemp("glue"), WORDS, train_rows=40, dev_rows=12)


def _argv(mode: str, model: str, data: Path, out: Path, seed: int = 7) -> list[str]:
    argv = [
        "--task", "rte", "--mode", mode, "--model_name_or_path", model, "--data_dir", str(data),
        "--output_dir", str(out), "--do_train", "--max_steps", "4", "--per_device_train_batch_size", "8",
        "--num_experts", "4", "--partition_batches", "2", "--partition_rounds", "2", "--report_to", "none",
        "--dataloader_pin_memory", "false", "--disable_tqdm", "true", "--seed", str(seed), "--data_seed", str(seed),
        "--save_strategy", "no",
    ]  # fmt: skip
    return argv


def test_paired_runs_share_head_routers_and_data_order(tiny, tmp_path):
    model, data = tiny
    records = {
        mode: glue_paired.run(_argv(mode, model, data, tmp_path / mode), init_seed=7)
        for mode in ("static", "moe", "pad")
    }
    static, moe, pad = records["static"], records["moe"], records["pad"]
    # The same head at init and before the first step (after PAD's partition), whatever the model.
    assert static["init"]["head"] == moe["init"]["head"] == pad["init"]["head"]
    assert static["step0"]["head"] == pad["step0"]["head"] == static["init"]["head"]
    # The same routers for the MoE-like models; the dense model has none.
    assert moe["init"]["router"] == pad["init"]["router"] and static["init"]["router"] is None
    # The same batches in the same order (PAD's partition reads its batches without moving the sampler).
    assert static["steps"] == pad["steps"] == 4
    assert static["batches"] == moe["batches"] == pad["batches"] and len(set(pad["batches"])) == 4
    # Another seed: another head, routers and data order.
    other = glue_paired.run(_argv("moe", model, data, tmp_path / "other", seed=8), init_seed=8)
    assert other["init"]["head"] != moe["init"]["head"] and other["init"]["router"] != moe["init"]["router"]
    assert other["data_order"] != moe["data_order"]


def test_pairing_ignores_the_global_rng(tiny, tmp_path):
    """Head and routers depend on the init seed only, not on what the model build drew before them."""
    import torch

    run_glue = glue_paired.load_run_glue()
    model_args, data_args, pad_args, _ = run_glue.parse_args(_argv("moe", tiny[0], tiny[1], tmp_path / "m"))
    checksums = []
    for draws, init_seed in ((0, 7), (1000, 7), (0, 8)):
        torch.manual_seed(draws)
        torch.rand(draws)  # another amount of randomness consumed before the build
        model = run_glue.build_model(model_args, data_args, pad_args)
        checksums.append(glue_paired.pair_initialisation(model, init_seed))
    assert checksums[0] == checksums[1]
    assert checksums[2]["head"] != checksums[0]["head"] and checksums[2]["router"] != checksums[0]["router"]


def _smoke(work: Path, *extra: str) -> dict:
    argv = ["--smoke", "--in_process", "--seeds", "42", "43", "--work_dir", str(work), "--out", str(work / "t1")]
    return glue_quality.main([*argv, *extra])


def test_smoke_table_runs_resumes_and_reports(tmp_path):
    report = _smoke(tmp_path, "--table", "1")
    assert report["complete"] and report["status"] == "ok" and len(report["runs"]) == 12  # 2 tasks x 3 x 2 seeds
    assert report["pairing"] == {"groups": 4, "ok": True, "problems": []}
    assert report["tasks"] == ["rte", "stsb"] and "precision" in report and report["git"]["commit"]
    run = report["runs"][0]
    for key in ("seed", "data_seed", "head_init_checksum", "router_init_checksum", "settings", "wall_s", "score"):
        assert key in run, key
    assert run["settings"]["max_steps"] == 3 and run["precision"] == report["precision"]
    diff = report["stats"]["differences"]["pad - moe"]
    assert set(diff) == {"rte", "stsb", "avg"} and diff["avg"]["n"] == 2
    by_seed = {(r["variant"], r["task"], r["seed"]): r["score"] for r in report["runs"]}
    expected = sum(by_seed[("pad", "rte", s)] - by_seed[("moe", "rte", s)] for s in (42, 43)) / 2
    assert diff["rte"]["mean"] == pytest.approx(expected)
    md = (tmp_path / "t1.md").read_text()
    assert "| pad - moe |" in md and "paper (BERT-base)" in md and "Pairing verified for 4" in md
    assert (tmp_path / "t1.png").stat().st_size > 10_000

    # Resume: every run is reused (none runs again); Table 5 reuses Table 1's MoE and PAD runs.
    again = _smoke(tmp_path, "--table", "1")
    assert all(r.get("reused") for r in again["runs"]) and again["stats"] == report["stats"]
    t5 = _smoke(tmp_path, "--table", "5", "--report_only")
    assert not t5["complete"] and {r["variant"] for r in t5["runs"]} == {"moe", "pad"}


def test_runs_in_subprocesses(tmp_path):
    """The default path: each run in its own `glue_paired.py` process (its command line, its thread count)."""
    argv = ["--modes", "static", "--tasks", "rte", "--seeds", "42", "--smoke", "--parallel", "1"]
    report = glue_quality.main([*argv, "--work_dir", str(tmp_path), "--out", str(tmp_path / "c")])
    (run,) = report["runs"]
    assert report["complete"] and run["variant"] == "static" and run["router_init_checksum"] is None
    assert run["steps"] == 3 and run["argv"][:4] == ["--task_name", "rte", "--mode", "static"]


def test_heldout_offline_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["--table", "heldout", "--smoke", "--work_dir", str(tmp_path), "--out", str(tmp_path / "h")]
    report = glue_quality.main(argv)
    assert report["status"] == "not run: offline" and report["runs"] == []
    assert json.loads((tmp_path / "h.json").read_text())["status"] == "not run: offline"
    assert "not run: offline" in (tmp_path / "h.md").read_text()


def test_precision_is_stated(monkeypatch):
    monkeypatch.setattr(glue_quality, "native_bf16_cpu", lambda: True)
    assert glue_quality.resolve_precision("auto") == ("bf16 autocast (native on this CPU)", ["--bf16", "--use_cpu"])
    monkeypatch.setattr(glue_quality, "native_bf16_cpu", lambda: False)
    assert glue_quality.resolve_precision("auto") == ("fp32 (no native bf16 on this CPU)", [])
    assert glue_quality.resolve_precision("fp32")[1] == []


def test_finished_runs_are_reused_from_reports(tmp_path):
    """A fresh machine has no work directory: the runs recorded in the committed reports are reused from them."""
    settings = {"task": "rte", "mode": "pad", "seed": 42, "epochs": 3.0}
    record = {"task": "rte", "seed": 42, "settings": settings, "score": 61.0}
    other = {**record, "settings": {**settings, "seed": 43}, "seed": 43}
    reports, work = tmp_path / "results", tmp_path / "work"
    reports.mkdir()
    runs = [{**record, "variant": "pad", "reused": True}, {**other, "variant": "pad"}]
    (reports / "glue_table1.json").write_text(json.dumps({"runs": runs}))
    (reports / "glue_table1.md").write_text("not a report")
    (reports / "glue_analysis.json").write_text(json.dumps([{"no": "runs"}]))  # other result shapes are skipped

    reported = glue_quality.reported_runs(reports)
    assert len(reported) == 2
    assert glue_quality.finished_run(settings, work, reported) == record  # without the report-only keys
    written = glue_quality.run_dir(settings, work) / "benchmark_run.json"
    assert json.loads(written.read_text()) == record  # written back: found without the reports next time
    assert glue_quality.finished_run(settings, work) == record
    assert glue_quality.finished_run({**settings, "epochs": 10.0}, work, reported) is None


def test_wholerun_table_passes_every_variant_setting_to_run_glue(tmp_path):
    """The whole-run table's variants reach `examples/run_glue.py` (kappa, and the neuron granularity)."""
    from glue_tables import get_table

    table = get_table("wholerun")
    assert set(table.variants) == {"static", "moe", "pad", "pad_k0.1", "pad_neuron_k0.3", "pad_neuron_k0.1",
                                   "pad_neuron_k0.5"}  # fmt: skip
    settings = {"task": "stsb", **table.variants["pad_neuron_k0.3"], "seed": 42, "data_seed": 42, "epochs": 3.0,
                "learning_rate": 1e-4, "batch_size": 32, "max_train_samples": 0, "max_steps": 0, "precision": [],
                "model": "default (packaged MiniLM)", "data": "../shared/data/glue", "extra": []}  # fmt: skip
    argv = glue_quality.run_argv(settings, tmp_path)
    assert argv[argv.index("--partition_granularity") + 1] == "neuron"
    assert argv[argv.index("--dynamic_ratio") + 1] == "0.3"


def _settings(table, variant: str, task: str = "rte", seed: int = 42):
    args = glue_quality.parse_args([])
    args.precision_args, args.extra = ["--bf16", "--use_cpu"], []
    return glue_quality.run_settings(table, task, variant, seed, args)


def test_lr_table_runs_each_variant_at_its_rate_and_reuses_table1():
    from glue_tables import get_table

    lr, table1 = get_table("lr"), get_table("1")
    assert set(lr.best_of) == {"static", "moe", "pad"} and len(lr.variants) == 12
    settings = _settings(lr, "pad@0.0002")
    assert settings["learning_rate"] == 2e-4 and settings["dynamic_ratio"] == 0.5
    argv = glue_quality.run_argv(settings, Path("out"))
    assert argv[argv.index("--learning_rate") + 1] == "0.0002"
    # lr 1e-4 is Table 1's run: the same settings, so the same run directory (finished runs are reused)
    for model in ("static", "moe", "pad"):
        assert _settings(lr, f"{model}@0.0001") == _settings(table1, model)
        assert glue_quality.run_dir(_settings(lr, f"{model}@0.0001"), Path("w")) == glue_quality.run_dir(
            _settings(table1, model), Path("w")
        )


def test_lr_table_report_picks_each_models_best_rate_and_compares_there(tmp_path):
    import glue_report
    from glue_tables import get_table

    table = get_table("lr")
    # static is best at 5e-5, MoE at 2e-4, PAD at 1e-4 on RTE; on STS-B every model is best at 5e-4.
    best = {"rte": {"static": 5e-5, "moe": 2e-4, "pad": 1e-4}, "stsb": {"static": 5e-4, "moe": 5e-4, "pad": 5e-4}}
    runs = []
    for variant, settings in table.variants.items():
        model, rate = variant.split("@")[0], settings["learning_rate"]
        for task in ("rte", "stsb"):
            for seed in (42, 43, 44):
                score = 60.0 + (5.0 if rate == best[task][model] else 0.0) + {"static": 0, "moe": 1, "pad": 2}[model]
                score += 0.1 * (seed - 42)
                pairing = {"data_order": f"{task}{seed}", "head_init_checksum": seed, "router_init_checksum": None}
                runs.append({"variant": variant, "task": task, "seed": seed, "score": score, "wall_s": 1.0, **pairing})
    report = glue_report.build(table, runs, glue_quality.MAIN_METRIC, ["rte", "stsb"])
    selection = report["selection"]
    assert selection["complete"]
    assert selection["picks"]["static"] == {"rte": "static@5e-05", "stsb": "static@0.0005"}
    assert selection["picks"]["moe"]["rte"] == "moe@0.0002" and selection["picks"]["pad"]["rte"] == "pad@0.0001"
    diff = selection["stats"]["differences"]
    assert diff["pad - moe"]["rte"]["mean"] == pytest.approx(1.0)
    assert diff["pad - static"]["avg"]["mean"] == pytest.approx(2.0)
    assert report["stats"]["differences"] == {}  # no comparison at one fixed rate
    md = _markdown(table, report, runs, complete=True, tasks=["rte", "stsb"], seeds=[42, 43, 44],
                   learning_rate="per variant", parallel_runs=2, threads_per_run=1)  # fmt: skip
    assert "| static | 5e-05 | 0.0005 |" in md and "| pad - moe |" in md and "lr per variant" in md
    assert "Complete: 72 runs." in md
    # an untimed table's runs shared the cores: no wall column, which would read as a cost
    assert "| variant | #params | rte | stsb | avg |\n" in md and "wall/run" not in md and "No wall times here" in md
    glue_report.plot(table, report, tmp_path / "lr.png")
    assert (tmp_path / "lr.png").stat().st_size > 10_000
    # a candidate with fewer seeds leaves the selection partial
    partial = glue_report.build(table, [r for r in runs if not (r["variant"] == "moe@5e-05" and r["seed"] == 44)],
                                glue_quality.MAIN_METRIC, ["rte", "stsb"])  # fmt: skip
    assert not partial["selection"]["complete"]
    partial.update({k: report[k] for k in ("status", "precision", "device", "git", "settings")}, complete=False,
                   runs=runs[:-2])  # fmt: skip
    partial_md = glue_report.markdown(table, partial, glue_quality.MAIN_METRIC)
    assert "**Partial**: 70 of 72 runs (2 still missing)." in partial_md


def _markdown(table, report: dict, runs: list[dict], complete: bool, **settings) -> str:
    """`report` (from `glue_report.build`) rendered once the fields `glue_quality.write` adds are filled in."""
    import glue_report

    settings = {"epochs": 3.0, "batch_size": 32, "max_train_samples": "all", "max_steps": 0, "model": "m", "extra": [],
                "smoke": False, **settings}  # fmt: skip
    report.update(status="ok", complete=complete, precision="bf16", device="cpu", git={"commit": "abc"}, runs=runs,
                  settings=settings)  # fmt: skip
    return glue_report.markdown(table, report, glue_quality.MAIN_METRIC)


def test_a_diverged_run_counts_as_zero_not_as_missing():
    """A run whose STS-B predictions are constant has an undefined Pearson (NaN): it must count as 0 in the means
    and the learning-rate selection (left out, it would flatter the rate that diverged), and the report names it."""
    import glue_report
    from glue_tables import get_table

    table = get_table("lr")
    runs = []
    for variant in ("static@0.0001", "static@0.0005"):
        for seed in (42, 43):
            score = float("nan") if (variant, seed) == ("static@0.0005", 43) else 86.0 + (variant == "static@0.0005")
            pairing = {"data_order": f"stsb{seed}", "head_init_checksum": seed, "router_init_checksum": None}
            runs.append({"variant": variant, "task": "stsb", "seed": seed, "score": score, "wall_s": 1.0, **pairing})
    report = glue_report.build(table, runs, glue_quality.MAIN_METRIC, ["stsb"])
    assert report["stats"]["variants"]["static@0.0005"]["stsb"]["mean"] == pytest.approx(43.5)  # (87 + 0) / 2
    assert report["selection"]["picks"]["static"]["stsb"] == "static@0.0001"  # not the rate that diverged
    assert report["undefined_scores"] == ["stsb static@0.0005 seed 43"]
    md = _markdown(table, report, runs, complete=False, tasks=["stsb"], seeds=[42, 43], learning_rate="per variant",
                   parallel_runs=2, threads_per_run=1)  # fmt: skip
    assert "Diverged, scored 0: stsb static@0.0005 seed 43" in md


def test_frontier_table_runs_each_configuration_at_its_models_pick(tmp_path):
    from glue_tables import get_table

    picks = {
        "static": {"rte": "static@5e-05", "stsb": "static@0.0001"},
        "moe": {"rte": "moe@0.0002", "stsb": "moe@0.0002"},
        "pad": {"rte": "pad@0.0001", "stsb": "pad@0.0005"},
    }
    table = get_table("frontier", picks)
    assert set(table.variants) == {"static", "moe", "pad_k0.5", "pad_k0.1", "pad_neuron_k0.1", "pad_neuron_k0.3",
                                   "pad_neuron_k0.5"}  # fmt: skip
    assert _settings(table, "static", "rte")["learning_rate"] == 5e-5
    # every configuration is compared with dense (paired), and PAD with the MoE
    assert set(table.comparisons) == {("pad_k0.5", "moe")} | {(v, "static") for v in table.variants if v != "static"}
    neuron = _settings(table, "pad_neuron_k0.3", "stsb")
    assert neuron["learning_rate"] == 5e-4 and neuron["partition_granularity"] == "neuron"
    # PAD kappa 0.5 at PAD's pick is the lr table's run (reused)
    assert _settings(table, "pad_k0.5", "rte") == _settings(get_table("lr"), "pad@0.0001", "rte")
    with pytest.raises(ValueError, match="lack"):
        get_table("frontier", {"static": picks["static"]})
    # the command refuses to run before the lr table has finished
    lr_report = tmp_path / "glue_lr.json"
    lr_report.write_text(json.dumps({"complete": False, "selection": {"complete": False, "picks": picks}}))
    with pytest.raises(SystemExit, match="partial"):
        argv = ["--table", "frontier", "--lr_report", str(lr_report), "--report_only", "--out", str(tmp_path / "f")]
        glue_quality.main(argv)
    # once it has, the report names each configuration's learning rate per task
    lr_report.write_text(json.dumps({"complete": True, "selection": {"complete": True, "picks": picks}}))
    argv = ["--table", "frontier", "--lr_report", str(lr_report), "--report_only", "--out", str(tmp_path / "f"),
            "--work_dir", str(tmp_path / "work"), "--reports_dir", str(tmp_path / "none")]  # fmt: skip
    report = glue_quality.main(argv)
    assert report["settings"]["learning_rate"] == "per variant"
    md = (tmp_path / "f.md").read_text()
    assert "lr per variant" in md and "static 5e-05 / 0.0001; moe 0.0002 / 0.0002; pad_k0.5 0.0001 / 0.0005;" in md


def test_timed_table_reuses_only_runs_that_ran_alone(tmp_path, monkeypatch):
    """The whole-run table's figure is the wall time: a run that ran beside another is measured again."""
    from glue_tables import get_table

    table = get_table("wholerun")
    assert table.timed and not get_table("1").timed
    with pytest.raises(SystemExit, match="--parallel 1"):
        glue_quality.main(["--table", "wholerun", "--parallel", "2", "--out", str(tmp_path / "w")])
    args = glue_quality.parse_args(["--parallel", "1", "--work_dir", str(tmp_path)])
    args.precision_args, args.extra, args.threads, args.timed, args.reported = [], [], 2, True, {}
    settings = glue_quality.run_settings(table, "rte", "static", 42, args)
    record = glue_quality.run_dir(settings, tmp_path) / "benchmark_run.json"
    record.parent.mkdir(parents=True)
    ran = []

    def start(*command, **kwargs):  # the run is started (and stopped here)
        ran.append(command)
        raise OSError("not run in the test")

    monkeypatch.setattr(glue_quality.subprocess, "run", start)
    probes = []  # the host's speed is probed next to every timed run (`_timing.host_probe`)
    monkeypatch.setattr(glue_quality, "host_probe", lambda threads: probes.append(threads) or {"matmul_ms": 1.0})
    for threads, reused in ((2, True), (1, False)):  # 1 thread: it ran beside another job
        record.write_text(json.dumps({"settings": settings, "threads": threads, "score": 50.0}))
        ran.clear()
        if reused:
            assert glue_quality.execute(settings, args)["reused"] and not ran and not probes
        else:
            with pytest.raises(OSError):
                glue_quality.execute(settings, args)
            assert ran and ran[0][0][1].endswith("glue_paired.py")  # it started the run again
            assert probes == [2]  # with the run's thread count, before it


def test_host_probe_and_its_column_in_timed_reports():
    """`_timing.host_probe` times its two workloads in a fresh process; a timed report shows the mean probe of each
    variant's runs (before and after each) next to the wall time, and an untimed report no such column."""
    import _timing
    import glue_report
    from glue_tables import get_table

    probe = _timing.host_probe(1)
    assert set(probe) == {"matmul_ms", "memory_ms"} and all(0 < v < 60_000 for v in probe.values())
    table = get_table("wholerun")
    runs = []
    for i, variant in enumerate(table.variants):
        before, after = {"matmul_ms": 50.0 + i, "memory_ms": 100.0}, {"matmul_ms": 52.0 + i, "memory_ms": 110.0}
        host = {"before": before, "after": after}
        pairing = {"data_order": "x", "head_init_checksum": 42, "router_init_checksum": None}
        runs.append({"variant": variant, "task": "stsb", "seed": 42, "score": 80.0 + i, "wall_s": 300.0 + i,
                     "host_probe": host if variant != "moe" else None, **pairing})  # fmt: skip
    report = glue_report.build(table, runs, glue_quality.MAIN_METRIC, ["stsb"])
    assert report["per_variant"]["static"]["host_probe_ms"] == {"matmul_ms": 51.0, "memory_ms": 105.0}
    assert report["per_variant"]["moe"]["host_probe_ms"] is None
    md = _markdown(table, report, runs, complete=True, tasks=["stsb"], seeds=[42], learning_rate=1e-4,
                   parallel_runs=1, threads_per_run=2)  # fmt: skip
    assert "| wall/run (s) | host probe matmul / memory (ms) |" in md
    assert "| static | ? | 80.00 | 80.00 | 300 | 51.0 / 105 |" in md and "| moe | ? | 81.00 | 81.00 | 301 | - |" in md
    for run in runs:
        run["host_probe"] = None
    untimed = glue_report.build(table, runs, glue_quality.MAIN_METRIC, ["stsb"])
    untimed.update({k: report[k] for k in ("status", "complete", "precision", "device", "git", "runs", "settings")})
    assert "host probe" not in glue_report.markdown(table, untimed, glue_quality.MAIN_METRIC)
