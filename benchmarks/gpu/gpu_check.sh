#!/usr/bin/env bash
# One prepared GPU check (issue: speed round two): on one CUDA GPU, within about 8 minutes,
#   1. the CUDA-relevant tests (experts backends incl. the fullgraph trace, bf16, mixed precision) on the GPU,
#   2. the speed benchmark (MiniLM model, MiniLM and BERT-base-sized layers; fp32 and bf16),
#   3. the full-data GLUE table (CoLA, RTE, MRPC, STS-B x static / MoE / PAD x seeds 42-44, 3 epochs, bf16),
#      runs in parallel on the one GPU,
# writing everything under benchmarks/results/gpu_check/ (or $GPU_CHECK_OUT).
#
#   bash benchmarks/gpu/gpu_check.sh            # on a CUDA machine
#   bash benchmarks/gpu/gpu_check.sh --smoke    # on the CPU, tiny budget: checks the script itself (run by the tests)
set -euo pipefail
cd "$(dirname "$0")/../.."
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
OUT="${GPU_CHECK_OUT:-benchmarks/results/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
start=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/gpu_check.log"; }

if [[ $SMOKE == 1 ]]; then
  DEVICE=cpu
  TESTS=(tests/test_experts_backends.py -k "reference and grouped_mm")
  SPEED=(--smoke --skip-memory --precisions fp32)
  GLUE=(--table 1 --smoke --tasks rte --seeds 42 --parallel 1)
else
  DEVICE=cuda
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --smoke on a CPU')"
  TESTS=(tests/test_experts_backends.py tests/test_bf16.py tests/test_mixed_precision.py)
  SPEED=(--device cuda --precisions fp32,bf16 --compile)
  GLUE=(--table 1 --parallel "${GLUE_PARALLEL:-12}" --precision bf16)
fi

stamp "device=$DEVICE: tests"
PAD_MOE_TEST_DEVICE=$DEVICE "$PY" -m pytest -q -p no:randomly "${TESTS[@]}" 2>&1 | tail -n 5 | tee -a "$OUT/gpu_check.log"

stamp "speed benchmark"
"$PY" benchmarks/cost/speed.py "${SPEED[@]}" --out "$OUT/speed.json" > "$OUT/speed.log" 2>&1
stamp "speed -> $OUT/speed.json"

stamp "GLUE table"
"$PY" benchmarks/glue/glue_quality.py "${GLUE[@]}" --work_dir "$OUT/glue_runs" --out "$OUT/glue_table1" \
  --delete_models > "$OUT/glue.log" 2>&1 || stamp "GLUE: some runs failed (see $OUT/glue.log); the table is partial"
stamp "GLUE -> $OUT/glue_table1.{json,md,png}"
stamp "done"
