#!/usr/bin/env bash
# Try the newest Transformers release on the registry, outside the tested window, and print what breaks.
#
#   tools/check_newest_transformers.sh            # the newest release
#   tools/check_newest_transformers.sh 5.26.0     # a given one
#
# A fresh venv in $TMPDIR (CPU torch first), the package with test extras, then that release; the window check is
# lifted for the run (PAD_MOE_ALLOW_UNTESTED_TRANSFORMERS=1). It prints the private internals the release lacks
# (pad_moe_transformers/_compat.py), then the failing tests of the default suite and of Transformers' common model
# tests. When all pass, raise the window on purpose: TRANSFORMERS_BELOW / TESTED_RELEASES in _compat.py, setup.cfg
# and the README, in one commit with the suite counts.
set -uo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-}
VENV=$(mktemp -d "${TMPDIR:-/tmp}/pad-moe-newest-XXXXXX")
trap 'rm -rf "$VENV"' EXIT
python3 -m venv "$VENV"
PY=$VENV/bin/python
$PY -m pip install -q --upgrade pip
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[test]" || exit 1
$PY -m pip install -q --no-deps timm==1.0.31
$PY -m pip install -q --upgrade "transformers${VERSION:+==$VERSION}" || exit 1
export PAD_MOE_ALLOW_UNTESTED_TRANSFORMERS=1
INSTALLED=$($PY -c 'import transformers; print(transformers.__version__)')
echo "=== transformers $INSTALLED (window: $($PY -c 'from pad_moe_transformers._compat import TRANSFORMERS_WINDOW as w; print(w)'))"
echo "=== private internals missing:"
$PY - <<'PYTHON'
from pad_moe_transformers._compat import missing_internals
missing = missing_internals()
for internal in missing:
    print(f"  {internal.name}: {internal.purpose} (public alternative: {internal.public_alternative})")
print("  none" if not missing else f"  {len(missing)} missing")
PYTHON
echo "=== default suite:"
$PY -m pytest -q -p no:randomly 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" | tail -60
SUITE=${PIPESTATUS[0]}
echo "=== Transformers' common model tests:"
PAD_MOE_HF_COMMON_REQUIRED=1 $PY -m pytest -q -p no:randomly -m hf_common tests/hf_common 2>&1 \
    | grep -E "^(FAILED|ERROR)|passed|failed" | tail -30
COMMON=${PIPESTATUS[0]}
if [ "$SUITE" -eq 0 ] && [ "$COMMON" -eq 0 ]; then
    echo "=== transformers $INSTALLED passes: the window can be raised to include it."
else
    echo "=== transformers $INSTALLED breaks the package (suite exit $SUITE, common tests exit $COMMON)."
    exit 1
fi
