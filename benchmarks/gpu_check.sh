#!/usr/bin/env bash
# The GPU run, prepared and short (< 8 minutes on one H100): everything the CPU machines cannot check.
#
#   benchmarks/gpu_check.sh prepare        # on a CPU machine with the offline datasets: the demo store (~2 min)
#   benchmarks/gpu_check.sh run [OUT]      # on the GPU machine, from the repository root (the store carried)
#
# `run` does, each step with its own time limit, writing everything under OUT (default $OUT, else
# gpu-check-results/):
#   1. CUDA exactness: the tests that compare every engine strategy on CUDA with the CPU engine, CUDA graphs
#      on and off (tests/server/http/test_resilience.py -k cuda; tests/server/runtime/test_lowrank.py, which
#      runs its exactness and no-host-sync tests on cuda too), and benchmarks/cuda_check.py on the demo store;
#   2. the low-rank engine's throughput vs a plain ViT-B/16 at batch 32 and 128, fp32 and bf16, and bf16's
#      top-1 agreement with fp32 (target >= 99.9%) -- benchmarks/gpu_lowrank.py;
#   3. the HTTP path under hey on the GPU: `vitmerge serve --device cuda`, single-image raw-PNG and base64-JSON
#      requests, task given and routed, concurrency 16 and 64, with the engine in the server process
#      (`--worker thread`) and in its own process (`--worker process`).
# It installs nothing: python3 must have this project's dependencies and torch with CUDA, and hey (Debian's
# package) must be on PATH; the script says what is missing and stops. Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STORE=benchmarks/.gpu-store

prepare() {
  "$PY" benchmarks/gpu_http.py prepare "$STORE" && du -sh "$STORE"
}

run() {
  OUT=${1:-${OUT:-gpu-check-results}}
  mkdir -p "$OUT"
  local missing=0
  command -v hey >/dev/null || { echo "missing: hey (Debian package 'hey')"; missing=1; }
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "missing: torch with a CUDA device"; missing=1; }
  "$PY" -c "import timm, fastapi, uvicorn, pytest, httpx, PIL, model_store, server" \
    || { echo "missing: this project's Python dependencies (pip install -e '.[test]' from a wheel store)"; missing=1; }
  [ -f "$STORE/CURRENT" ] || { echo "missing: $STORE (run 'benchmarks/gpu_check.sh prepare' on a CPU machine)"; missing=1; }
  [ "$missing" = 0 ] || exit 2
  "$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
  local status=0 start=$SECONDS

  echo "== 1. CUDA exactness (limit 150 s)"
  timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/server/runtime/test_lowrank.py \
    "tests/server/http/test_resilience.py::test_cuda_engine_matches_the_cpu_engine" > "$OUT/1-cuda-tests.log" 2>&1 \
    || status=1
  tail -n 3 "$OUT/1-cuda-tests.log"
  grep -q " skipped" "$OUT/1-cuda-tests.log" && grep -n "SKIPPED" "$OUT/1-cuda-tests.log" | head -5
  if timeout 60 "$PY" benchmarks/cuda_check.py "$STORE" > "$OUT/1-cuda-check.json" 2> "$OUT/1-cuda-check.log"; then
    echo "cuda_check: CUDA engine = CPU engine on $STORE (task given and routed)"
  else
    echo "cuda_check: FAILED (see $OUT/1-cuda-check.*)"; status=1
  fi

  echo "== 2. low-rank engine vs plain ViT-B/16, fp32/bf16, batch 32/128 (limit 180 s)"
  timeout 180 "$PY" benchmarks/gpu_lowrank.py --out "$OUT" > "$OUT/2-gpu-lowrank.log" 2>&1 || status=1
  cat "$OUT/gpu_lowrank.md" 2>/dev/null || tail -n 20 "$OUT/2-gpu-lowrank.log"

  echo "== 3. HTTP under hey on the GPU (limit 150 s)"
  timeout 150 "$PY" benchmarks/gpu_http.py run "$STORE" "$OUT" > "$OUT/3-http.log" 2>&1 || status=1
  cat "$OUT/gpu_http.md" 2>/dev/null || tail -n 20 "$OUT/3-http.log"
  echo "== done in $((SECONDS - start)) s, status $status; results in $OUT"
  return $status
}

case "${1:-}" in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 prepare | run [OUT_DIR]"; exit 2 ;;
esac
