#!/usr/bin/env bash
# The GPU figures in one device call on a lent NVIDIA machine (H100/H200), meant to finish in
# 6 minutes from a cold start (each benchmark has its own time limit, 365 s in all): every
# package's version first; the MAE and fine-tuning train steps (bf16, remat none vs
# stage_dots, batch 2 and 4) against the PyTorch AMP reference with TFLOP/s, MFU and peak
# memory, and a jax.profiler trace of 3 MAE steps in $OUT/trace; whole-scan sliding-window
# inference against MONAI; XLA:GPU's compiled memory analysis, remat none vs stage_dots. Each
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
    STEP=(--net small --crop 16 32 32 --steps 2 --warmup 0)
    B4=2  # the "batch 4" runs at toy size
    INFER=(--net small --shape 40 48 48 --window 32 32 32 --batch-windows 2 --repeats 1)
    MEMORY=(--backbones plain_unet --remat none stage_dots --crop 32 64 64)
else
    STEP=(--crop 96 128 128 --steps 10 --warmup 3)
    B4=4
    INFER=(--shape 320 192 192 --window 96 128 128 --batch-windows 4 --repeats 3)
    MEMORY=(--backbones plain_unet --remat none stage_dots)
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  "$PY" - <<'PY'
import importlib.metadata as md, platform
names = ["jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "flax", "optax", "orbax-checkpoint",
         "grain", "tensorstore", "numpy", "scipy", "nibabel", "ml_collections", "etils",
         "torch", "monai", "dynamic_network_architectures", "einops", "tensorboardX"]
versions = {}
for name in names:
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = "not installed"
print("python", platform.python_version(), "|", " ".join(f"{k}={v}" for k, v in versions.items()))
import jax
print("devices", jax.devices())
PY
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
# batch 2 (the paper's per GPU) with both tasks and the trace, then the MAE step alone.
run train_step_b2_none 110 benchmarks/train_step.py --no-huge-pages "${STEP[@]}" --batch 2 \
    --remat none --trace "$OUT/trace"
run train_step_b2_stage_dots 50 benchmarks/train_step.py --no-huge-pages "${STEP[@]}" --batch 2 \
    --remat stage_dots --no-finetune
run train_step_b4_none 50 benchmarks/train_step.py --no-huge-pages "${STEP[@]}" --batch "$B4" \
    --remat none --no-finetune
run train_step_b4_stage_dots 50 benchmarks/train_step.py --no-huge-pages "${STEP[@]}" --batch "$B4" \
    --remat stage_dots --no-finetune
run inference 45 benchmarks/inference.py --no-huge-pages "${INFER[@]}"
run memory 60 benchmarks/memory.py "${MEMORY[@]}"
exit $failed
