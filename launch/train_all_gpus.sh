#!/usr/bin/env bash
# Train one stage data-parallel on all GPUs of this machine (one process drives them all).
#
#   launch/train_all_gpus.sh CONFIG WORKDIR [--config.x.y=value ...]
#
# The global batch (train.batch_size) is split evenly over the GPUs, so it must be divisible by the
# GPU count (e.g. 8 GPUs: --config.train.batch_size=32 for seg, 24 or 40 for cls instead of 20).
# BatchNorm statistics are computed over the global batch (synchronised BN), parameters are
# replicated. Restrict the GPUs with CUDA_VISIBLE_DEVICES=0,1,... .
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,10p' "$0"; exit 2
fi
config=$1; workdir=$2; shift 2
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
exec "${PYTHON:-python}" -m oeem_jax.main --config="$config" --workdir="$workdir" "$@"
