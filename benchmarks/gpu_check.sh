#!/usr/bin/env bash
# The one prepared GPU session: what changed on the GPU path since the last GPU check (03655bf),
# and the packed mask update. Everything lands under $OUT (one folder, for docs/results/).
#
#   OUT=/tmp/gpu-out bash benchmarks/gpu_check.sh
#
# Stages (each with its own timeout; about 5 minutes in all on an H100/H200, at most 9.5):
#  1. install the package from this tree (no network: --no-build-isolation --no-deps);
#  2. GPU tests: the torch backend on CUDA (its per-layer path, and the packed update: the
#     property tests against NumPy, host synchronisations counted by CUDA), attach on CUDA (the
#     adapter's update routing changed since 03655bf), attach with the CUDA kernels, and the
#     CuPy backend (the subnormal fix). The kernels and their tests are unchanged since
#     03655bf, whose check passed them: not rerun here;
#  3. compute-sanitizer memcheck on a short packed-update and kernel run, if the tool works here
#     (skipped cleanly otherwise);
#  4. the mask update over ResNet-50: time, launches, host synchronisations, peak memory, per
#     candidate (benchmarks/mask_update_gpu.py), with a per-operation profile.
# A failing stage does not stop the later ones; the exit status is that of the GPU tests.
# GPU_CHECK_STAGES=bench runs the install and stage 4 only; GPU_CHECK_BENCH_ARGS adds options to
# the benchmark (a dry run on a CPU machine: GPU_CHECK_BENCH_ARGS="--layers 6 --repeats 1").
set -u
OUT=${OUT:-/tmp/sparsecore-gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Never let the source tree shadow the installed package (sparsecore.torch lives in backends/).
export PYTHONSAFEPATH=1

stage() { echo "== $1 (at ${SECONDS} s)"; }

main() {
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  "$PY" -c "import sys, torch, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__)"
  "$PY" -c "import cupy; print('cupy', cupy.__version__)" || echo "cupy missing"
  cat .gpu_commit 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo "commit unknown"
} 2>&1 | tee "$OUT/env.txt"
SPARSECORE_COMMIT=$(cat .gpu_commit 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)
export SPARSECORE_COMMIT

stage install
if ! "$PY" -m pip install -q --no-build-isolation --no-deps . > "$OUT/install.log" 2>&1; then
  echo "pip install . failed (see install.log)"
  tail -20 "$OUT/install.log"
fi
"$PY" -c "import sparsecore.torch.packed_update as p; print('installed', p.__file__)"

status=0
if [ "${GPU_CHECK_STAGES:-all}" != bench ]; then
  stage "GPU tests"
  timeout 240 "$PY" -m pytest -m gpu -q -p no:cacheprovider -rs \
    tests/torch tests/kernels/test_gpu_attach.py tests/kernels/test_cupy_backend.py \
    2>&1 | tee "$OUT/pytest.log" | tail -30
  status=${PIPESTATUS[0]}

  stage "compute-sanitizer memcheck (where the tool works)"
  if command -v compute-sanitizer > /dev/null 2>&1; then
    timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" -m pytest -q \
      -p no:cacheprovider tests/torch/test_packed_update.py tests/kernels/test_gpu_attach.py \
      -k "(large_layers and cuda and normal-float32) or synchronises or training_with_cuda" \
      > "$OUT/sanitizer.log" 2>&1
    echo "compute-sanitizer exit status $? (0: clean; 3: errors found; 124: timed out)"
    tail -15 "$OUT/sanitizer.log"
  else
    echo "compute-sanitizer not found: skipped" | tee "$OUT/sanitizer.log"
  fi
fi

stage "mask update on the GPU (ResNet-50)"
# shellcheck disable=SC2086  # the extra arguments are words on purpose
timeout 200 "$PY" benchmarks/mask_update_gpu.py --repeats 9 --json "$OUT/mask_update_gpu.json" \
  --profile-table "$OUT/mask_update_gpu_profile.txt" ${GPU_CHECK_BENCH_ARGS:-} 2>&1 \
  | tee "$OUT/mask_update_gpu.txt"
stage done
return "$status"
}

main 2>&1 | tee "$OUT/console.txt"
exit "${PIPESTATUS[0]}"
