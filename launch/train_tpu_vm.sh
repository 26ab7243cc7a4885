#!/usr/bin/env bash
# Train one stage on a Cloud TPU VM.
#
# On a single-host TPU VM (v4-8, v5e-8, ...), on the VM itself:
#   launch/train_tpu_vm.sh CONFIG WORKDIR [--config.x.y=value ...]
# On a multi-host TPU pod slice, from your workstation (runs on every worker, JAX finds the pod):
#   TPU_NAME=my-tpu ZONE=us-central2-b REPO_DIR=~/oeem_jax launch/train_tpu_vm.sh CONFIG WORKDIR [...]
#
# Needs jax[tpu] on the VM(s) (pip install -U "jax[tpu]"). On a pod, WORKDIR must be shared by the
# workers (e.g. a GCS-fuse or Filestore mount) and the GlaS folder present on every worker.
# train.batch_size must be divisible by the number of TPU cores.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,12p' "$0"; exit 2
fi
config=$1; workdir=$2; shift 2
if [[ -n "${TPU_NAME:-}" ]]; then
  args=$(printf ' %q' "$@")
  exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="${ZONE:?set ZONE}" --worker=all --command \
    "cd ${REPO_DIR:-~/oeem_jax} && OEEM_DISTRIBUTED=1 ${PYTHON:-python3} -m oeem_jax.main --config=$config --workdir=$workdir$args"
fi
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m oeem_jax.main --config="$config" --workdir="$workdir" "$@"
