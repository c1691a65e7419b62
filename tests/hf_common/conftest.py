"""Marker, outcome recording and ordering for the Transformers common-test harness.

Marker: `hf_common` (declared here, set on the test module). The harness is collected only when
`-m` selects it, because importing it fetches the transformers sdist from PyPI:

    python -m pytest -q -p no:randomly -m hf_common tests/hf_common

The outcome of every test (and of its unittest subtests) is recorded, so that the final check
`test_pad_passes_what_bert_passes` (always moved to the end of the run) can compare the PAD classes
with plain BERT test by test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

MARKER = "hf_common"
HERE = Path(__file__).parent
FINAL_CHECK = "test_pad_passes_what_bert_passes"
# Markers that Transformers' own conftest declares and `test_modeling_common.py` uses.
_TRANSFORMERS_MARKERS = (
    "accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "torch_compile_test"
)
_SUBTEST_REPORT = getattr(pytest, "SubtestReport", ())  # pytest >= 9 reports unittest subtests itself


@dataclass
class Outcome:
    """What one test did: its own report plus those of its subtests (one per model class, mostly)."""

    status: str = "passed"  # of the test itself: passed / failed / skipped / xfailed
    detail: str = ""  # skip or xfail reason, or "[phase] first line of the error"
    subtests_passed: int = 0
    subtests_skipped: list[str] = field(default_factory=list)
    subtests_failed: list[str] = field(default_factory=list)

    def summary(self) -> tuple[str, str]:
        """`(outcome, detail)`; outcome is passed, partial (some subtests skipped), skipped, failed or xfailed."""
        if self.subtests_failed and self.status != "xfailed":
            return "failed", self.subtests_failed[0]
        if self.status != "passed":
            return self.status, self.detail
        if self.subtests_skipped:
            kind = "partial" if self.subtests_passed else "skipped"
            return kind, f"{len(self.subtests_skipped)} subtests skipped: {self.subtests_skipped[0]}"
        return "passed", ""


OUTCOMES = pytest.StashKey[dict]()
"""`config.stash[OUTCOMES][(class name, test name)]` is the `Outcome` of that test."""
_config: pytest.Config  # set in pytest_configure; `pytest_runtest_logreport` gets no config


def pytest_configure(config: pytest.Config) -> None:
    global _config
    _config = config
    config.addinivalue_line(
        "markers",
        f"{MARKER}: Transformers' own ModelTesterMixin on plain BERT and on the PAD classes (fetches the "
        "transformers sdist from PyPI; collected only when selected: `pytest -m hf_common tests/hf_common`)",
    )
    for marker in _TRANSFORMERS_MARKERS:
        config.addinivalue_line("markers", f"{marker}: used by Transformers' common tests")
    config.stash[OUTCOMES] = {}


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Collect the harness only when `-m` names the marker (not as `not hf_common`): importing it
    fetches the sdist, which a run that would deselect it (the default `-m "not slow"`) should not pay for."""
    if collection_path.parent != HERE or not collection_path.name.startswith("test_"):
        return None
    markexpr = config.getoption("markexpr") or ""
    wanted = re.search(rf"\b{MARKER}\b", markexpr) and not re.search(rf"\bnot\s+{MARKER}\b", markexpr)
    return None if wanted else True


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The final check reads the outcomes of the others: run it last, whatever the ordering plugins do.
    finals = [item for item in items if item.name == FINAL_CHECK and HERE in Path(str(item.path)).parents]
    for item in finals:
        items.remove(item)
        items.append(item)


def _first_line(report: pytest.TestReport) -> str:
    lines = [line.strip() for line in report.longreprtext.splitlines() if line.strip()]
    errors = [line[1:].strip() for line in lines if line.startswith("E ")]
    return f"[{report.when}] " + (errors[0] if errors else lines[-1] if lines else "")[:300]


def _skip_reason(report: pytest.TestReport) -> str:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # Called only for the items of this directory (conftest hooks are scoped to their directory).
    parts = report.nodeid.split("::")
    if len(parts) != 3:  # `file::Class::test`; the final check is a plain function
        return
    outcome = _config.stash[OUTCOMES].setdefault((parts[1], parts[2]), Outcome())
    if isinstance(report, _SUBTEST_REPORT):
        if report.failed:
            outcome.subtests_failed.append(_first_line(report))
        elif report.skipped:
            outcome.subtests_skipped.append(_skip_reason(report))
        elif report.passed:
            outcome.subtests_passed += 1
    elif hasattr(report, "wasxfail"):
        outcome.status, outcome.detail = "xfailed", report.wasxfail
    elif report.skipped:
        outcome.status, outcome.detail = "skipped", _skip_reason(report)
    elif report.failed and outcome.status != "failed":
        outcome.status, outcome.detail = "failed", _first_line(report)


@pytest.fixture
def common_test_outcomes(request: pytest.FixtureRequest) -> dict[tuple[str, str], Outcome]:
    """The outcomes recorded so far in this session (see `OUTCOMES`)."""
    return request.config.stash[OUTCOMES]
