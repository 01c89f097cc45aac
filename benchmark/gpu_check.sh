#!/usr/bin/env bash
# Issue 14's device check, in one go (about 2 minutes on an H100, under 6 at most): the suite's
# phase-1 loop against the bare CUDA-graph step, fit's graph path against the eager one, and EOS
# at ImageNet-LT scale with the neighbour search on the GPU.  Every part runs under its own
# timeout; figures go to stdout and to "$OUT" (default /tmp/gpu_check).
#
#   bash benchmark/gpu_check.sh            on the GPU machine (torch and scikit-learn are enough; with a
#                                .whl/ folder from /work/shared/tools/gpu-wheels.sh it installs
#                                imbalanced-learn to time EOS().fit_resample itself)
#   bash benchmark/gpu_check.sh --small    anywhere: small sizes; without CUDA the CUDA parts are skipped
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
small=0
[ "${1:-}" = "--small" ] && small=1
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
started=$(date +%s)

part() {  # part NAME SECONDS COMMAND...: run under a timeout, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  local verdict="ok"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && verdict="TIMED OUT"
  [ $rc -ne 0 ] && [ "$verdict" = ok ] && verdict="FAILED (exit $rc)"
  echo "=== $name: $verdict in $(( $(date +%s) - t0 ))s"
  echo "$name: $verdict" >> "$OUT/summary.txt"
}

: > "$OUT/summary.txt"
part environment 40 bash -c "nvidia-smi -L 2>/dev/null || echo 'no nvidia-smi'; $PY -c '
import sys, torch, numpy
print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"numpy\", numpy.__version__,
      \"cuda\", torch.cuda.is_available())
for name in (\"sklearn\", \"imblearn\", \"torchvision\"):
    try:
        module = __import__(name); print(name, module.__version__)
    except ImportError:
        print(name, \"absent\")
'"

cuda=$(timeout 30 $PY -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [ "$cuda" != 1 ]; then
  echo "no CUDA device: the CUDA parts are skipped; CPU fallback at small sizes"
  small=1
fi

if [ "$cuda" = 1 ] && [ -d .whl ] && ! $PY -c 'import imblearn' 2>/dev/null; then
  part wheels 120 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi

if [ "$cuda" = 1 ] && [ $small = 0 ]; then
  part speed 150 $PY -m benchmark.speed --device cuda --check --json "$OUT/speed.json"
  part eos_cuda 90 $PY -m benchmark.eos_speed --device cuda --verify 2048 \
    --json "$OUT/eos_cuda.json"
elif [ "$cuda" = 1 ]; then
  part speed 120 $PY -m benchmark.speed --device cuda --check --scale 0.1 --epochs 3 \
    --steps 50 --json "$OUT/speed.json"
  part eos_cuda 60 $PY -m benchmark.eos_speed --device cuda --scale 0.1 --verify 512 \
    --json "$OUT/eos_cuda.json"
else
  part speed 150 $PY -m benchmark.speed --device cpu --scale 0.01 --epochs 2 --steps 3 \
    --json "$OUT/speed.json"
  part eos_cpu 60 $PY -m benchmark.eos_speed --device cpu --scale 0.02 --verify 64 \
    --json "$OUT/eos_cpu.json"
fi

echo "=== summary ($(( $(date +%s) - started ))s in all; files in $OUT)"
cat "$OUT/summary.txt"
grep -h -E "^(suite|bare|check|CUDA graph|WARNING|bound|matmul)|ratio to bound|fit_resample|expand \(|neighbours of" \
  "$OUT"/speed.log "$OUT"/eos_*.log 2>/dev/null
