"""The tested Transformers window and the registry of private Transformers names (`pad_moe_transformers._compat`)."""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from pad_moe_transformers import _compat
from pad_moe_transformers._compat import (
    ALLOW_UNTESTED_ENV,
    PRIVATE_INTERNALS,
    TRANSFORMERS_WINDOW,
    PrivateInternal,
    UnsupportedTransformersError,
    check_transformers_version,
    missing_internals,
)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pad_moe_transformers"


def test_every_private_internal_exists_on_the_installed_release():
    missing = missing_internals()
    assert not missing, (
        f"transformers {transformers.__version__} lacks "
        + "; ".join(f"{m.name} (used for: {m.purpose}; public alternative: {m.public_alternative})" for m in missing)
    )


@pytest.mark.parametrize("internal", PRIVATE_INTERNALS, ids=lambda internal: internal.name)
def test_each_registry_entry_says_what_it_is_for(internal):
    assert internal.purpose and internal.tested
    assert internal.name.startswith("transformers.")


def test_the_registry_check_can_fail():
    assert not PrivateInternal("transformers.modeling_utils.NoSuchThing", "x").is_available()
    assert not PrivateInternal("transformers.no_such_module.Thing", "x").is_available()
    assert not PrivateInternal("transformers.initialization.normal_(_no_such_flag)", "x").is_available()
    assert PrivateInternal("transformers.initialization.normal_(_is_hf_initialized)", "x").is_available()


@pytest.mark.parametrize("version", ["5.22.2", "5.0.0", "4.57.6", "5.26.0", "5.26.0.dev0", "6.0.0"])
def test_a_release_outside_the_window_is_refused_naming_the_window(version, monkeypatch):
    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(UnsupportedTransformersError, match=re.escape(f"transformers{TRANSFORMERS_WINDOW}")):
        check_transformers_version(version)
    monkeypatch.setenv(ALLOW_UNTESTED_ENV, "1")
    check_transformers_version(version)  # the escape hatch of tools/check_newest_transformers.sh
    with pytest.raises(UnsupportedTransformersError):
        check_transformers_version(version, allow_untested=False)  # an explicit argument wins over the variable


@pytest.mark.parametrize("version", [*_compat.TESTED_RELEASES, "5.23.1", "5.25.3"])
def test_a_release_inside_the_window_is_accepted(version, monkeypatch):
    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)
    check_transformers_version(version)


@pytest.mark.skipif(os.environ.get(ALLOW_UNTESTED_ENV) == "1", reason="trying a release outside the window on purpose")
def test_the_installed_release_is_inside_the_window():
    check_transformers_version()


def test_import_on_an_untested_release_fails_with_the_window():
    """The real import path: the package refuses the release before any internal fails obscurely."""
    code = "import transformers; transformers.__version__ = '5.22.2'; import pad_moe_transformers"
    env = {k: v for k, v in os.environ.items() if k != ALLOW_UNTESTED_ENV}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    assert "UnsupportedTransformersError" in result.stderr
    assert f"transformers{TRANSFORMERS_WINDOW}" in result.stderr and "5.22.2" in result.stderr


def test_setup_cfg_and_readme_declare_the_same_window():
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    requirements = [line.strip() for line in parser["options"]["install_requires"].splitlines() if line.strip()]
    assert f"transformers{TRANSFORMERS_WINDOW}" in requirements
    assert f"transformers{TRANSFORMERS_WINDOW}" in (ROOT / "README.md").read_text(encoding="utf-8")


# Private Transformers names, as they appear in code. Only `_compat.py` may spell them.
_PRIVATE_PATTERNS = [
    r"from transformers\.(configuration_utils|conversion_mapping|core_model_loading|integrations\.moe"
    r"|trainer_callback|utils\.output_capturing|utils\.hub) import",
    r"\._is_hf_initialized\b",
    r"_experts_implementation_internal",
    r"\"_experts_implementation\"",
    r"\._init_weights\(",
    r"_hf_peft_config_loaded",
    r"\ball_tied_weights_keys\b",
    r"get_decay_parameter_names",
    r"_model_mapping",
    r"__dataclass_fields__",
    r"_raise_exceptions_for_missing_entries",
    r"\bcached_file\b",
]


def test_private_transformers_names_are_used_only_through_the_compat_module():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_compat.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if code.lstrip().startswith(('"""', "`")):
                continue
            for pattern in _PRIVATE_PATTERNS:
                if re.search(pattern, code):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    # `convert_file_size_to_int` (transformers.utils.hub) is a public helper: allowed.
    offenders = [o for o in offenders if "convert_file_size_to_int" not in o]
    assert not offenders, "private Transformers names outside _compat.py:\n" + "\n".join(offenders)
