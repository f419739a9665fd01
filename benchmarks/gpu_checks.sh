#!/usr/bin/env bash
# Issue #10's GPU figures in one run on a lent NVIDIA machine (H100/H200), within 9 minutes
# (each benchmark has its own time limit): the MAE and fine-tuning train steps against the
# PyTorch AMP reference (with TFLOP/s, MFU and peak memory), whole-scan sliding-window
# inference against MONAI, and XLA:GPU's compiled memory analysis with remat policies. Each
# benchmark's output goes to $OUT/<name>.log, its last line (one JSON object) to
# $OUT/results.jsonl; a failing benchmark does not stop the others, and the script exits
# non-zero if any failed.
#
# The device image has jax, flax, optax, orbax, tensorstore, torch and einops but not grain,
# nibabel, ml_collections, tensorboardX, MONAI or dynamic_network_architectures: `make
# gpu-wheels` puts them (Python 3.12, manylinux) in .whl/ here, and this script installs them
# into /tmp/site there. From the repository root:
#
#   make gpu-wheels                      # once, here; .whl/ is git-ignored
#   device run, carry [".whl"], timeout_s 600:  bash benchmarks/gpu_checks.sh
#
# GPU_CHECKS_QUICK=1 runs every step at toy sizes (a check of this script, on a CPU too).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
PY=${PY:-python3}

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# JAX and torch share the GPU in one process: no preallocation of 75% of it by JAX.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1

if [ "${GPU_CHECKS_QUICK:-0}" = 1 ]; then
    STEP=(--net small --crop 16 32 32 --batch 2 --steps 2 --warmup 0)
    INFER=(--net small --shape 40 48 48 --window 32 32 32 --batch-windows 2 --repeats 1)
    MEMORY=(--backbones plain_unet --remat none --crop 32 64 64)
else
    STEP=(--batch 2 --crop 96 128 128 --steps 10 --warmup 3)  # the paper's batch per GPU
    INFER=(--shape 320 192 192 --window 96 128 128 --batch-windows 4 --repeats 3)
    MEMORY=(--backbones plain_unet resenc_l --remat none stage)
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  "$PY" -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__)"
} 2>&1 | tee "$OUT/env.log"

failed=0
run() {  # run NAME TIMEOUT_S ARGS...: one benchmark, its log and its JSON line
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    if timeout "$limit" "$PY" "$@" > "$OUT/$name.log" 2>&1; then
        tail -n 1 "$OUT/$name.log" | tee -a "$OUT/results.jsonl"
    else
        echo "$name failed (status $?); the end of its log:"
        tail -n 20 "$OUT/$name.log"
        failed=1
    fi
}
run train_step 270 benchmarks/train_step.py --no-huge-pages "${STEP[@]}"
run inference 150 benchmarks/inference.py --no-huge-pages "${INFER[@]}"
run memory 120 benchmarks/memory.py "${MEMORY[@]}"
exit $failed
