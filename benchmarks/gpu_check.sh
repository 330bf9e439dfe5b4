#!/usr/bin/env bash
# The one prepared GPU session: install the package, run the GPU tests, try compute-sanitizer on
# a short kernel test, time the mask update on the GPU, run the kernel benchmark. Everything it
# prints also lands under $OUT, with each stage's duration.
#
#   OUT=/tmp/gpu-out bash benchmarks/gpu_check.sh
#
# GPU_CHECK_STAGES=bench skips the tests and the sanitizer; BENCH_TILED=1 also times the tiled
# convolution kernel (slower; see docs/kernels-gpu.md).
# Budget: about 8 minutes at most (each stage has its own timeout); a failing stage does not stop
# the later ones, and the exit status is that of the GPU tests.
set -u
OUT=${OUT:-/tmp/sparsecore-gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Never let the source tree shadow the installed package (sparsecore.kernels lives in kernels/).
export PYTHONSAFEPATH=1

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  "$PY" -c "import sys, torch, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__)"
  "$PY" -c "import cupy; print('cupy', cupy.__version__)" || echo "cupy missing"
  cat .gpu_commit 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo "commit unknown"
} 2>&1 | tee "$OUT/env.txt"
SPARSECORE_COMMIT=$(cat .gpu_commit 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)
export SPARSECORE_COMMIT
stage() { echo "== $1 (at ${SECONDS} s)"; }

stage install
if ! "$PY" -m pip install -q --no-build-isolation --no-deps . > "$OUT/install.log" 2>&1; then
  echo "pip install . failed (see install.log); trying the prebuilt wheel"
  "$PY" -m pip install -q --no-deps --force-reinstall .gpuwheel/sparsecore-*.whl >> "$OUT/install.log" 2>&1 \
    || { echo "install failed"; tail -20 "$OUT/install.log"; }
fi
# Run the tests from a directory where the source tree cannot shadow the installed package.
"$PY" -c "import sparsecore.kernels as k; print('installed kernels at', k.source_dir())"

if [ "${GPU_CHECK_STAGES:-all}" = bench ]; then
  status=0
  tiled_status=1
else
stage "GPU tests (the tiled convolution kernel in its own process: a fault there cannot
   take the other tests' CUDA context down)"
SPARSECORE_CUDA_CONV=gather timeout 200 "$PY" -m pytest -m gpu tests/kernels tests/torch -q \
  -p no:cacheprovider -k "not tiled" \
  2>&1 | tee "$OUT/pytest.log" | tail -30
status=${PIPESTATUS[0]}
SPARSECORE_CUDA_CONV=auto timeout 70 "$PY" -m pytest -m gpu tests/kernels -q -p no:cacheprovider \
  -k "tiled or attach or training" \
  2>&1 | tee -a "$OUT/pytest.log" | tail -30
tiled_status=${PIPESTATUS[0]}
[ "$status" -eq 0 ] && status=$tiled_status
bench_args=()
if [ "$tiled_status" -eq 0 ] && [ "${BENCH_TILED:-0}" = 1 ]; then
  bench_args=(--tiled)
fi

stage "compute-sanitizer memcheck (works only on some machines)"
( timeout 50 compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" -m pytest -q \
    -p no:cacheprovider tests/kernels/test_gpu_kernels.py \
    -k "deterministic or current_torch_stream or rebuilds or (network_shapes and 0.5)" ) \
  > "$OUT/sanitizer.log" 2>&1
echo "compute-sanitizer exit status $?"
tail -15 "$OUT/sanitizer.log"
fi

stage "mask update on the GPU (CuPy and torch backends, ResNet-50)"
timeout 70 "$PY" benchmarks/mask_update_gpu.py --repeats 9 2>&1 | tee "$OUT/mask_update_gpu.txt"

stage "kernel benchmark"
timeout 100 "$PY" benchmarks/kernels_gpu.py --reps 25 ${bench_args[@]+"${bench_args[@]}"} --json "$OUT/bench.json" \
  2>&1 | tee "$OUT/bench.txt"
stage done
exit "$status"
