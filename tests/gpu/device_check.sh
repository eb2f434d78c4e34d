#!/usr/bin/env bash
# One prepared GPU check, in one command, under 10 minutes on one H100/H200 (issues 14 and 22):
#   bash tests/gpu/device_check.sh
# 1. environment  2. native build + C++ exception repro  3. `bus selftest` (budget SELFTEST_BUDGET s)
# 4. `bus bench train --gpu-suite`: bus-small batch 32 and bus-base batch 64 vs their baselines, eager and
#    compiled with CUDA graphs (reduce-overhead), bf16: speedup, images/s, MFU, compile time
# 5. `bus train --compile reduce-overhead` on bus-tiny (the training loop with CUDA graphs, a resume)
# 6. only with OP_TESTS=1: the op tests on CUDA (tests/gpu/run_gpu_tests.sh; run on the H200 in issue 14;
#    they alone take about 4 minutes, so they do not fit beside the rest)
# Every step has a timeout (worst case about 590 s in all; each *_TIMEOUT can be set). Everything goes to a
# work folder; $OUT (set by the device tool; else ./gpu-check-out) receives summary.txt, the selftest's and
# the suite's JSON + Markdown (the suite's JSON is rewritten after each case, so a cut-short run keeps
# the finished cases) and one gpu-check.tgz with all logs (few files: the tool returns at most 8).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-check-out}; mkdir -p "$OUT"
W=$(mktemp -d /tmp/gpu-check.XXXX)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export BUS_KERNELS_BUILD_DIR=${BUS_KERNELS_BUILD_DIR:-/tmp/bus_kernels_build}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$W/inductor}
exec > >(tee "$OUT/summary.txt") 2>&1  # straight to $OUT: it comes back even if the run is cut short
START=$SECONDS
stamp() { echo "[+$((SECONDS - START)) s] $*"; }
date -u; nvidia-smi -L; nvcc --version | tail -1
$PY -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
{ [ -f COMMIT ] && echo "tree of commit $(cat COMMIT)"; } || git log --oneline -1 2>/dev/null || true
# no network there: install the package alone (its dependencies are in the image)
$PY -m pip install -q --no-deps --no-build-isolation -e . > "$W/pip.log" 2>&1 || { echo "pip install failed:"; tail -5 "$W/pip.log"; }

# the native extension before the selftest (else the selftest reports native "not built")
stamp "== native build"
timeout ${BUILD_TIMEOUT:-150} $PY -m bus_kernels.build --verbose > "$W/native_build.log" 2>&1
echo "native build exit $? ($(tail -1 "$W/native_build.log"))"
grep -iE "warning|eh_frame" "$W/native_build.log" | grep -v "^\[" | head -10  # linker/compiler warnings (full log in the tgz)
export BUS_SKIP_NATIVE_BUILD=1
# C++ input checks raising through the CUDA build, each case in its own child process (seconds)
timeout ${REPRO_TIMEOUT:-40} $PY tests/gpu/native_exception_repro.py > "$W/native_exception_repro.log" 2>&1; head -60 "$W/native_exception_repro.log"

stamp "== selftest"
timeout ${SELFTEST_TIMEOUT:-100} $PY benchmarks/selftest.py --out "$W/selftest" --budget ${SELFTEST_BUDGET:-60} > "$W/selftest.log" 2>&1
echo "selftest exit $?"; grep -E "FAILED|bus selftest:" "$W/selftest.log" | head -40
cp "$W/selftest/selftest.json" "$W/selftest/selftest.md" "$OUT/" 2>/dev/null

stamp "== bench train --gpu-suite (bus-small b32, bus-base b64; eager and reduce-overhead)"
timeout ${SUITE_TIMEOUT:-240} $PY -m bus_benchmarks.train_speed --gpu-suite --compile reduce-overhead \
  --steps ${SUITE_STEPS:-6} --warmup 3 --json "$OUT/train_gpu_suite.json" > "$W/train_gpu_suite.md" 2> "$W/train_gpu_suite.log"
echo "gpu suite exit $?"; cat "$W/train_gpu_suite.md"; cp "$W/train_gpu_suite.md" "$OUT/" 2>/dev/null
grep -E "^== |Error|error:|Traceback|skipping cudagraphs|graph break|recompil" "$W/train_gpu_suite.log" | head -30
[ -s "$W/train_gpu_suite.md" ] || { echo "(cut short: finished cases in train_gpu_suite.json; log tail:)"; tail -5 "$W/train_gpu_suite.log"; }

stamp "== bus train --compile reduce-overhead (bus-tiny, CUDA graphs in the loop, stop and resume)"
TRAIN=(-m bus_model.training.train --model bus-tiny --data synthetic --out "$W/train" --steps 6 --batch-size 16
       --train-samples 256 --log-every 1 --save-every 3 --no-progress --compile reduce-overhead)
timeout ${TRAIN_TIMEOUT:-45} $PY "${TRAIN[@]}" --stop-at 3 > "$W/train.log" 2>&1 \
  && timeout ${TRAIN_TIMEOUT:-45} $PY "${TRAIN[@]}" --resume >> "$W/train.log" 2>&1
echo "compiled train exit $?"; grep -E "error|Error|skipping cudagraphs" "$W/train.log" | head -10
$PY -c "import json, sys; [print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in json.loads(l).items()}) for l in open(sys.argv[1])]" "$W/train/metrics.jsonl" 2>/dev/null

if [ "${OP_TESTS:-0}" = 1 ]; then
  stamp "== op tests on CUDA"
  OUT="$W/tests" timeout ${TESTS_TIMEOUT:-240} bash tests/gpu/run_gpu_tests.sh 2>&1 | tail -70
  echo "op tests exit ${PIPESTATUS[0]}"
fi
stamp "done"; date -u
tar czf "$OUT/gpu-check.tgz" -C "$W" --exclude=inductor .
