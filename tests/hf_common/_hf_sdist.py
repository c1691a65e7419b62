"""Fetch Transformers' own common model tests from the sdist of the installed version, at test time.

`tests/test_modeling_common.py` (`ModelTesterMixin`) ships in the transformers sdist on PyPI, but
not in the wheel. `load_modeling_common()` downloads the sdist once with pip, extracts its top-level
`tests/*.py` into a cache directory outside the repository and imports `test_modeling_common` from
there as the package `transformers_sdist_tests`. Nothing is copied into the project.

The sdist ships only the top-level `tests/*.py`, not the sub-packages `tests/exporters/` and
`tests/generation/` that `test_modeling_common` imports `ExportTesterMixin` and
`GenerationTesterMixin` from. Both are replaced by empty classes: `GenerationTesterMixin` is only
used in `issubclass` checks (encoder models do not generate), and the export tests (ONNX,
ExecuTorch, TensorRT, ...) are therefore not run by this harness.

Cache: `$PAD_MOE_HF_TESTS_CACHE` if set, else `~/.cache/pad_moe_transformers`; one directory
`transformers-<version>-tests/` per version.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import transformers

PACKAGE = "transformers_sdist_tests"


class SdistUnavailable(RuntimeError):
    """The transformers sdist could not be fetched (e.g. no access to PyPI)."""


def cache_root() -> Path:
    return Path(os.environ.get("PAD_MOE_HF_TESTS_CACHE", Path.home() / ".cache" / "pad_moe_transformers"))


def _download_sdist(version: str, into: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
        f"transformers=={version}", "-d", str(into),
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise SdistUnavailable(f"`{' '.join(command)}` did not finish in 600 s") from None
    archives = sorted(into.glob(f"transformers-{version}.tar.gz"))
    if result.returncode != 0 or not archives:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise SdistUnavailable(f"`{' '.join(command)}` failed (exit {result.returncode}): {' | '.join(tail)}")
    return archives[0]


def sdist_tests_dir(version: str | None = None) -> Path:
    """Directory holding the package `transformers_sdist_tests` (the sdist's `tests/*.py`) for `version`.

    Downloads and extracts on first use; later calls reuse the cache. Raises `SdistUnavailable`.
    """
    version = version or transformers.__version__
    target = cache_root() / f"transformers-{version}-tests"
    if (target / PACKAGE / "test_modeling_common.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        archive = _download_sdist(version, Path(tmp))
        staging = Path(tmp) / "staging"
        package = staging / PACKAGE
        package.mkdir(parents=True)
        prefix = f"transformers-{version}/tests/"
        with tarfile.open(archive) as tar:
            members = [
                m for m in tar.getmembers()
                if m.isfile() and m.name.startswith(prefix) and "/" not in m.name[len(prefix):]
                and m.name.endswith(".py")
            ]
            if not any(m.name == prefix + "test_modeling_common.py" for m in members):
                raise SdistUnavailable(f"{archive.name} has no {prefix}test_modeling_common.py")
            for member in members:
                member.name = member.name[len(prefix):]
                tar.extract(member, package, filter="data")
        (package / "__init__.py").write_text('"""tests/*.py of the transformers sdist (see tests/hf_common)."""\n')
        try:
            staging.rename(target)  # atomic: a concurrent session sees all files or none
        except OSError:  # another session extracted it first
            if not (target / PACKAGE / "test_modeling_common.py").is_file():
                raise SdistUnavailable(
                    f"{target} exists but holds no {PACKAGE}/test_modeling_common.py; delete it and rerun"
                ) from None
    return target


def _install_missing_subpackages() -> None:
    """Empty stand-ins for the mixins of the test sub-packages the sdist does not ship."""
    for subpackage, module, class_name in (
        ("exporters", "test_export", "ExportTesterMixin"),
        ("generation", "test_utils", "GenerationTesterMixin"),
    ):
        package_name, module_name = f"{PACKAGE}.{subpackage}", f"{PACKAGE}.{subpackage}.{module}"
        if module_name in sys.modules:
            continue
        package = types.ModuleType(package_name)
        package.__path__ = []
        stub = types.ModuleType(module_name)
        setattr(stub, class_name, type(class_name, (), {"__doc__": "Not in the sdist; see _hf_sdist.py."}))
        sys.modules[package_name], sys.modules[module_name] = package, stub


def load_modeling_common(version: str | None = None) -> types.ModuleType:
    """Import the sdist's `tests/test_modeling_common.py` (the module defining `ModelTesterMixin`)."""
    root = str(sdist_tests_dir(version))
    if root not in sys.path:
        sys.path.insert(0, root)
    importlib.import_module(PACKAGE)
    _install_missing_subpackages()
    return importlib.import_module(f"{PACKAGE}.test_modeling_common")
