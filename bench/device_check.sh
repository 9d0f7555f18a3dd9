#!/usr/bin/env bash
# The prepared GPU check for the lent device machine: installs the abi3 wheel built here
# (no network there), runs the GPU tests and the GPU benchmark, and leaves logs in $OUT.
# Build first, here: make wheel   (writes dist/tensorstream-*.whl)
# One device call runs at most 600 s: split the check in three calls, for example
#   SKIP_PRESSURE=1 SKIP_SPEC=1 BENCH_TIMEOUT=400 bench/device_check.sh          (GPU tests, gpu_stream.py)
#   SKIP_BENCH=1 SKIP_SPEC=1 TEST_PATHS=tests/test_pressure.py bench/device_check.sh   (memory pressure)
#   SKIP_BENCH=1 SKIP_PRESSURE=1 TEST_PATHS="tests/test_speculative.py tests/test_selfdraft.py" \
#     bench/device_check.sh                                       (speculative decoding)
# gpu_stream.py takes --skip-disk / --skip-compressed / --disk-tokens to shorten it.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ts-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ts-site dist/tensorstream-*.whl || exit 1
export PYTHONPATH=/tmp/ts-site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
df -h . | tail -1
set -o pipefail
timeout "${TEST_TIMEOUT:-180}" python3 -m pytest -q -m gpu ${TEST_PATHS:-tests} -p no:cacheprovider 2>&1 | tail -40 | tee "$OUT/pytest_gpu.log"
echo "pytest exit: $?"
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  mkdir -p bench/out
  timeout "${BENCH_TIMEOUT:-330}" python3 bench/gpu_stream.py --workdir bench/out/gpu ${BENCH_ARGS:-} 2>&1 | grep -v "it/s]" | tee "$OUT/gpu_stream.log"
  echo "bench exit: $?"
fi
if [ "${SKIP_PRESSURE:-0}" != 1 ]; then
  timeout "${PRESSURE_TIMEOUT:-240}" python3 bench/memory_pressure.py --gpu --workdir bench/out/pressure 2>&1 | grep -v "it/s]" | tee "$OUT/memory_pressure_gpu.log"
  echo "pressure bench exit: $?"
fi
if [ "${SKIP_SPEC:-0}" != 1 ]; then
  timeout "${SPEC_TIMEOUT:-360}" python3 bench/speculative.py --device cuda --reps 1 --workdir bench/out/spec ${SPEC_ARGS:-} 2>&1 | grep -v "it/s]" | tee "$OUT/speculative_gpu.log"
  echo "speculative bench exit: $?"
fi
