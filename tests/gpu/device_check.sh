#!/usr/bin/env bash
# One prepared GPU check (issue 14): the first run of this project on a GPU, in one command.
#   bash tests/gpu/device_check.sh
# 1. environment  2. native build + C++ exception repro  3. `bus selftest` (budget SELFTEST_BUDGET s)
# 4. the op tests on CUDA
# (tests/gpu/run_gpu_tests.sh: native build, fp32/fp16/bf16 vs the float64 CPU reference, large offsets).
# Everything goes to a work folder; $OUT (set by the device tool; else ./gpu-check-out) receives
# summary.txt, the selftest's JSON + Markdown and one gpu-check.tgz with all logs (few files: the tool
# returns at most 8).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-check-out}; mkdir -p "$OUT"
W=$(mktemp -d /tmp/gpu-check.XXXX)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export BUS_KERNELS_BUILD_DIR=${BUS_KERNELS_BUILD_DIR:-/tmp/bus_kernels_build}
exec > >(tee "$OUT/summary.txt") 2>&1  # straight to $OUT: it comes back even if the run is cut short
date -u; nvidia-smi -L; nvcc --version | tail -1
$PY -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
{ [ -f COMMIT ] && echo "tree of commit $(cat COMMIT)"; } || git log --oneline -1 2>/dev/null || true
# no network there: install the package alone (its dependencies are in the image)
$PY -m pip install -q --no-deps --no-build-isolation -e . > "$W/pip.log" 2>&1 || { echo "pip install failed:"; tail -5 "$W/pip.log"; }
# the native extension before the selftest (else the selftest reports native "not built"); the test
# shards below only load it (run_gpu_tests.sh's own build step is then a cache hit)
echo "== native build"
timeout ${BUILD_TIMEOUT:-240} $PY -m bus_kernels.build --verbose > "$W/native_build.log" 2>&1
echo "native build exit $? ($(tail -1 "$W/native_build.log"))"
grep -iE "warning|eh_frame" "$W/native_build.log" | grep -v "^\[" | head -10  # linker/compiler warnings (full log in the tgz)
export BUS_SKIP_NATIVE_BUILD=1
# C++ input checks raising through the CUDA build, each case in its own child process (seconds)
timeout 150 $PY tests/gpu/native_exception_repro.py > "$W/native_exception_repro.log" 2>&1; head -80 "$W/native_exception_repro.log"
echo "== selftest"
timeout ${SELFTEST_TIMEOUT:-330} $PY benchmarks/selftest.py --out "$W/selftest" --budget ${SELFTEST_BUDGET:-240} > "$W/selftest.log" 2>&1
echo "selftest exit $?"; grep -E "FAILED|bus selftest:" "$W/selftest.log" | head -40
cp "$W/selftest/selftest.json" "$W/selftest/selftest.md" "$OUT/" 2>/dev/null
echo "== op tests on CUDA"
OUT="$W/tests" timeout ${TESTS_TIMEOUT:-240} bash tests/gpu/run_gpu_tests.sh 2>&1 | tail -70
echo "op tests exit ${PIPESTATUS[0]}"
date -u
tar czf "$OUT/gpu-check.tgz" -C "$W" .
