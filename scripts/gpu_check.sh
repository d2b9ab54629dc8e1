#!/usr/bin/env bash
# The GPU check: build against the torch already installed, run the CUDA tests, then the CUDA
# benchmarks against torch. Writes logs and JSON under $OUT (or benchmarks/results/gpu when unset).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
status=0

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT_DIR/gpu_env.txt"

echo "== build"
if ! PYCONV_PTXAS_VERBOSE=1 MAX_JOBS="$(nproc)" "$PY" -m pip install -v --no-build-isolation --no-deps -e . \
    >"$OUT_DIR/gpu_build.log" 2>&1; then
  tail -50 "$OUT_DIR/gpu_build.log"
  echo "BUILD FAILED"
  exit 1
fi
"$PY" -c "import pyconv, json; print(json.dumps(pyconv.info()))" | tee -a "$OUT_DIR/gpu_env.txt"

echo "== tests (cuda)"
timeout 300 "$PY" -m pytest tests -q -k cuda -p no:cacheprovider -rf --tb=short 2>&1 \
  | tee "$OUT_DIR/gpu_tests.log" | grep -E "^(FAILED|ERROR)|passed|failed" | cut -c1-220 | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "ptxas: $(grep -cE "[1-9][0-9]* bytes spill" "$OUT_DIR/gpu_build.log") kernels with spills"

echo "== benchmark (cuda)"
"$PY" -m pyconv.bench --device cuda --json "$OUT_DIR/bench_cuda.json" 2>"$OUT_DIR/gpu_bench.err" \
  | tee "$OUT_DIR/gpu_bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { tail -20 "$OUT_DIR/gpu_bench.err"; status=1; }

echo "gpu-check status $status"
exit $status
