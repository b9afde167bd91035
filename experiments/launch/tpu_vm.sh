#!/usr/bin/env bash
# Pretraining on every worker of a Cloud TPU VM slice (one process per host, all hosts at once).
#
# Usage:
#   experiments/launch/tpu_vm.sh TPU_NAME ZONE PRESET WORKDIR [--setup] [-- EXTRA TRAIN FLAGS...]
# The preset's `v5p` layout (experiments/configs/pretrain.py) is used: FSDP over the slice's
# ICI (13B adds tensor parallelism 2). WORKDIR must be storage every host can write, e.g. a
# bucket mounted with gcsfuse at the same path on each worker. Example (v5p-128, 16 hosts):
#   experiments/launch/tpu_vm.sh my-v5p europe-west4-b baichuan2-7b /mnt/gcs/b2-7b --setup
# Multislice (e.g. 2 x v5p-128 over DCN): create the slices with queued resources (JAX reads
# MEGASCALE_* from them); data parallelism spans the slices:
#   experiments/launch/tpu_vm.sh my-v5p-ms europe-west4-b baichuan2-13b /mnt/gcs/b2-13b -- \
#       --config.train.mesh.data=2 --config.train.mesh.dcn_data=2
#
# Environment:
#   REPO_URL   git URL to clone on the workers with --setup (default: this checkout's origin)
#   REPO_DIR   checkout directory on the workers (default: ~/baichuan-jax)
#   PROJECT    gcloud project (default: gcloud's configured one)
#   PIP_EXTRA  extra pip arguments for --setup (default installs jax[tpu])
#
# Every worker runs the same command; BAICHUAN_CLUSTER=tpu makes
# `baichuan_jax.distributed.initialize` call `jax.distributed.initialize()`, which asks the TPU
# metadata server for the coordinator, host count and host id. LIBTPU_INIT_ARGS receives the
# overlap flags of `sharding.XLA_FLAG_PRESETS["tpu"]`.
set -euo pipefail

usage() { sed -n '2,24p' "$0"; exit "${1:-0}"; }
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && usage 0
[[ $# -lt 4 ]] && { echo "error: need TPU_NAME ZONE PRESET WORKDIR" >&2; usage 2; }
TPU_NAME=$1; ZONE=$2; PRESET=$3; WORKDIR=$4; shift 4
SETUP=0
if [[ "${1:-}" == "--setup" ]]; then SETUP=1; shift; fi
if [[ "${1:-}" == "--" ]]; then shift; fi
EXTRA=$(printf ' %q' "$@")

REPO_URL=${REPO_URL:-$(git -C "$(dirname "$0")" remote get-url origin 2>/dev/null || true)}
REPO_DIR=${REPO_DIR:-'~/baichuan-jax'}
PIP_EXTRA=${PIP_EXTRA:-'jax[tpu]'}
GCLOUD=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all)
[[ -n "${PROJECT:-}" ]] && GCLOUD+=(--project "$PROJECT")

if [[ $SETUP == 1 ]]; then
  [[ -z "$REPO_URL" ]] && { echo "error: --setup needs REPO_URL" >&2; exit 2; }
  "${GCLOUD[@]}" --command "set -e; [ -d $REPO_DIR ] || git clone $REPO_URL $REPO_DIR; \
cd $REPO_DIR && git pull --ff-only && python3 -m pip install -q -U '$PIP_EXTRA' && \
python3 -m pip install -q -e ."
fi

# 1) every host joins the job and all chips take part in one all-reduce (fails fast on a
#    broken slice); 2) the training job itself, same command on every host.
"${GCLOUD[@]}" --command "set -eo pipefail; cd $REPO_DIR; export BAICHUAN_CLUSTER=tpu; \
eval \"\$(python3 -m baichuan_jax.distributed flags tpu)\"; \
python3 -m baichuan_jax.distributed check && \
python3 -m experiments.train --config experiments/configs/pretrain.py:$PRESET,v5p \
--workdir $WORKDIR $EXTRA 2>&1 | tee -a /tmp/baichuan_train.log"
