#!/bin/bash
# MAE pretraining on a Cloud TPU VM slice: the same command on every worker at once.
#
# Worked example (a v5p-64 slice = 8 workers; store and workdir in a bucket, which every
# worker reads and writes):
#
#   TPU_NAME=petct-v5p-64 ZONE=us-east5-a PROJECT=my-project \
#   STORE=gs://my-bucket/petct/store WORKDIR=gs://my-bucket/petct/runs/swin_base \
#   CONFIG=configs/pretrain.py:swin_base SETUP="source ~/venv/bin/activate" \
#     bash launch/tpu_vm.sh --config.mesh.fsdp=8
#
# Arguments go to `petct pretrain` (more --config.KEY=VALUE; or --dry-run to print the
# plan on the slice and exit). It runs
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone ZONE --worker=all --command "..."
# and on each worker `PETCT_DISTRIBUTED=1 petct pretrain ...`: jax.distributed.initialize()
# finds the coordinator, process count and id from the TPU metadata itself. The repository
# and its Python environment must already be on every worker (same path; e.g. a SETUP of
# "cd ~/petct-jax && git pull && source ~/venv/bin/activate", with
# `pip install -e '.[gcs]'` done once).
#
# Environment:
#   TPU_NAME, ZONE  (required) the TPU VM and its zone; PROJECT (optional) gcloud project
#   STORE     (required) the store, normally gs://bucket/path (TensorStore reads it directly)
#   WORKDIR   (required) the run directory, normally gs://bucket/path (Orbax, metrics,
#             TensorBoard and previews are written there; needs gcsfs and
#             google-cloud-storage on the workers: the `gcs` extra)
#   CONFIG    config and variant (default configs/pretrain.py:plain_unet)
#   REPO_DIR  the repository on the workers (default ~/petct-jax); commands run there
#   PETCT     the command (default `petct`)
#   SETUP     shell code run first on every worker (activate a venv, git pull, ...)
#   DRY_RUN=1 print the gcloud command (with --dry-run added to petct) instead of running it
#
# Preemption (spot/preemptible slices, maintenance): the VM's shutdown sends SIGTERM, on
# which the training processes save the step they reached and exit (143); run this same
# command again once the slice is back; it resumes from the last checkpoint in WORKDIR.

set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
: "${STORE:?set STORE to the store (gs://bucket/store)}"
: "${WORKDIR:?set WORKDIR to the run directory (gs://bucket/runs/NAME)}"
CONFIG=${CONFIG:-configs/pretrain.py:plain_unet}
REPO_DIR=${REPO_DIR:-"~/petct-jax"}  # quoted: the remote shell expands ~
PETCT=${PETCT:-petct}
DRY_RUN=${DRY_RUN:-0}

source "$(dirname "${BASH_SOURCE[0]}")/show.sh"  # show: a command as a pastable line

args=(pretrain --config "$CONFIG" --workdir "$WORKDIR" "--config.store=$STORE" "$@")
if [[ "$DRY_RUN" == 1 ]]; then
  args+=(--dry-run)
fi
# One shell line for every worker; each argument quoted for the remote shell.
remote="cd ${REPO_DIR} && "
if [[ -n "${SETUP:-}" ]]; then
  remote+="${SETUP} && "
fi
remote+="PETCT_DISTRIBUTED=1 ${PETCT}$(printf ' %q' "${args[@]}")"

gcloud_cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all)
if [[ -n "${PROJECT:-}" ]]; then
  gcloud_cmd+=(--project "$PROJECT")
fi
gcloud_cmd+=(--command "$remote")

if [[ "$DRY_RUN" == 1 ]]; then
  show "${gcloud_cmd[@]}"
  exit 0
fi
exec "${gcloud_cmd[@]}"
