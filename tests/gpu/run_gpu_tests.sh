#!/usr/bin/env bash
# The op tests on a CUDA machine (issue 14, part 1): every Triton and native kernel forward and backward
# on the GPU in fp32/fp16/bf16 against the float64 CPU reference, plus the large-offset cases
# (tests/test_cuda_large.py). Without CUDA the same command runs the CPU suite.
#   bash tests/gpu/run_gpu_tests.sh            # all of it (CPU tests too)
#   ONLY_CUDA=1 bash tests/gpu/run_gpu_tests.sh  # only the tests marked cuda
# Writes junit XML and logs to $OUT (default ./gpu-tests-out) and prints a summary per shard.
# Triton compiles every kernel variant on first use (~160 attention variants; one process compiles
# serially), so the tests run as seven pytest processes in parallel, sharing Triton's on-disk cache.
# The same tests in one process (slower on a cold Triton cache):
#   python -m pytest -q -m "not slow" tests/test_pruning_ops.py tests/test_pruning_validation.py \
#     tests/test_varlen_attention.py tests/test_padding.py tests/test_native.py tests/test_cuda_large.py tests/test_backends.py
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-tests-out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
unset TRITON_INTERPRET
MARK="not slow"; [ "${ONLY_CUDA:-0}" = 1 ] && MARK="cuda and not slow"

# The native extension once, before the shards (each test process would otherwise try to build it).
# A failed build is reported here; the native tests then skip with the reason.
timeout ${BUILD_TIMEOUT:-400} $PY -m bus_kernels.build > "$OUT/native_build.log" 2>&1
echo "native build: exit $? ($(tail -1 "$OUT/native_build.log"))"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
$PY -m bus_kernels.info > "$OUT/backends.txt" 2>&1; cat "$OUT/backends.txt" | head -30

export BUS_SKIP_NATIVE_BUILD=1  # built (or not) above: the shards only load it
run_shard() {  # name, pytest args...
  local name=$1; shift
  $PY -m pytest -q -p no:cacheprovider -m "$MARK" -rs --junitxml="$OUT/junit_$name.xml" "$@" > "$OUT/pytest_$name.log" 2>&1
  echo "$name: exit $? -- $(tail -1 "$OUT/pytest_$name.log")"
}
run_shard attn_fp16 tests/test_varlen_attention.py -k "cuda_every_head_dim and not bfloat16" &
run_shard attn_bf16 tests/test_varlen_attention.py -k "cuda_every_head_dim and bfloat16" &
run_shard attn_fp32 tests/test_varlen_attention.py -k "fp32_matches" &
run_shard attn_rest tests/test_varlen_attention.py tests/test_padding.py -k "not cuda_every_head_dim and not fp32_matches" &
run_shard pruning tests/test_pruning_ops.py tests/test_pruning_validation.py &
run_shard native tests/test_native.py tests/test_backends.py &
run_shard large tests/test_cuda_large.py &  # alone: a crash elsewhere must not take these with it
wait
echo "== failures and skips (first 60 lines)"
grep -h -E "^(FAILED|ERROR|SKIPPED)" "$OUT"/pytest_*.log | head -60
if grep -q -E "^(FAILED|ERROR)" "$OUT"/pytest_*.log; then exit 1; fi
