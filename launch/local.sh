#!/bin/bash
# MAE pretraining on one machine: one process over all its devices, or N processes on
# localhost joined like the hosts of a cluster.
#
# Worked examples:
#
#   # one process, every local GPU (or TPU chip, or the CPU) in one mesh
#   STORE=runs/store WORKDIR=runs/mae bash launch/local.sh
#
#   # the tiny CPU config on 8 virtual CPU devices, parameters split 4 ways
#   CPU_DEVICES=8 CONFIG=configs/pretrain.py:tiny STORE=runs/store WORKDIR=runs/mae8 \
#     bash launch/local.sh --config.mesh.fsdp=4
#
#   # 4 processes, one per GPU (CUDA_VISIBLE_DEVICES=i for process i)
#   NPROC=4 STORE=/data/store WORKDIR=runs/mae bash launch/local.sh
#
#   # 2 CPU processes x 2 devices: the multi-host code paths without a cluster
#   NPROC=2 CPU_DEVICES=2 CONFIG=configs/pretrain.py:tiny STORE=runs/store WORKDIR=runs/mp \
#     bash launch/local.sh
#
# Arguments go to `petct pretrain` (more --config.KEY=VALUE; or --dry-run to print the
# mesh/sharding/memory plan and exit). With NPROC > 1 every process gets
# PETCT_COORDINATOR=localhost:PORT, PETCT_NUM_PROCESSES=NPROC and PETCT_PROCESS_ID=i, which
# `petct pretrain` hands to jax.distributed.initialize(); when one process fails the
# others are stopped (they would wait for it forever), and the script exits with the first
# failure's status (143 after a SIGTERM, which saves a checkpoint). Process i logs to
# WORKDIR.logs/i.
#
# Environment:
#   STORE        (required) the store made by `petct preprocess` (path or gs://...)
#   WORKDIR      (required) the run directory (path or gs://...)
#   CONFIG       config and variant (default configs/pretrain.py:plain_unet)
#   PETCT        the command (default `petct`; e.g. "python -m petct_jax.cli")
#   NPROC        processes (default 1)
#   CPU_DEVICES  run on the CPU with this many virtual devices per process
#                (JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=k); otherwise with NPROC > 1
#                process i gets GPU i
#   PORT         coordinator port (default 12355)
#   DRY_RUN=1    print the commands (with --dry-run added) instead of running them
#
# Resume: run the same command again; it continues from the last checkpoint in WORKDIR.

set -euo pipefail

: "${STORE:?set STORE to the store made by petct preprocess}"
: "${WORKDIR:?set WORKDIR to the run directory}"
CONFIG=${CONFIG:-configs/pretrain.py:plain_unet}
PETCT=${PETCT:-petct}
NPROC=${NPROC:-1}
PORT=${PORT:-12355}
DRY_RUN=${DRY_RUN:-0}

source "$(dirname "${BASH_SOURCE[0]}")/show.sh"  # show: a command as a pastable line

read -r -a petct_cmd <<< "$PETCT"
cmd=("${petct_cmd[@]}" pretrain --config "$CONFIG" --workdir "$WORKDIR" "--config.store=$STORE" "$@")
if [[ "$DRY_RUN" == 1 ]]; then
  cmd+=(--dry-run)
fi

# The environment of process $1, as NAME=VALUE words for `env`.
process_env() {
  local i=$1 vars=()
  if [[ -n "${CPU_DEVICES:-}" ]]; then
    vars+=(JAX_PLATFORMS=cpu "JAX_NUM_CPU_DEVICES=$CPU_DEVICES")
  elif (( NPROC > 1 )); then
    vars+=("CUDA_VISIBLE_DEVICES=$i")
  fi
  if (( NPROC > 1 )); then
    vars+=("PETCT_COORDINATOR=localhost:$PORT" "PETCT_NUM_PROCESSES=$NPROC" "PETCT_PROCESS_ID=$i")
  fi
  if (( ${#vars[@]} )); then printf '%s\n' "${vars[@]}"; fi
}

if [[ "$DRY_RUN" == 1 ]]; then
  for ((i = 0; i < NPROC; i++)); do
    mapfile -t vars < <(process_env "$i")
    line=$(if (( ${#vars[@]} )); then show env "${vars[@]}" "${cmd[@]}"; else show "${cmd[@]}"; fi)
    if (( NPROC > 1 )); then echo "$line &"; else echo "$line"; fi
  done
  exit 0
fi

if (( NPROC == 1 )); then
  mapfile -t vars < <(process_env 0)
  exec env "${vars[@]}" "${cmd[@]}"
fi

if (( BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 501 )); then
  echo "petct: NPROC > 1 needs bash 5.1 or newer (wait -n -p); this is $BASH_VERSION" >&2
  exit 2
fi
logs="${WORKDIR%/}.logs"
mkdir -p "$logs"
pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
# SIGTERM (docker stop, a scheduler) or Ctrl-C reaching this script goes on to the processes
# as SIGTERM (they ignore SIGINT: background jobs of a script): they agree on a step, save it
# and exit 143, and this script waits for that rather than leaving them to die with it.
trap stop_all INT TERM
for ((i = 0; i < NPROC; i++)); do
  mapfile -t vars < <(process_env "$i")
  env "${vars[@]}" "${cmd[@]}" > "$logs/$i" 2>&1 &
  pids+=($!)
  echo "petct: process $i (pid $!) logs to $logs/$i"
done
status=0  # the first failure's status (143: stopped by SIGTERM after saving)
running=${#pids[@]}
while (( running )); do
  ended="" rc=0
  wait -n -p ended || rc=$?
  [[ -n "${ended:-}" ]] || continue  # a trapped signal interrupted the wait: no process ended
  running=$((running - 1))
  if (( rc != 0 && status == 0 )); then
    status=$rc
    echo "petct: process pid $ended exited with status $rc; stopping the others (see $logs/)" >&2
    stop_all
  fi
done
exit "$status"
